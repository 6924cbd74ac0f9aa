"""The gene reference tables shipped in ``curate/genes/data`` and name resolution over them.

One table per species (``human.tsv.gz``, ``mouse.tsv.gz``), one row per gene, written by
``scripts/build_gene_tables.py`` from HGNC, MGI and Ensembl BioMart (``SOURCES.json`` beside the
tables records versions, licences and checksums). Columns (tab-separated, ``|`` joins lists):

============== ====================================================================================
``key``        Ensembl gene id (unversioned); ``HGNC:<n>`` for an HGNC gene without one
``symbol``     approved symbol(s): HGNC / MGI (several when records share an Ensembl id)
``biotype``    HGNC locus group / MGI feature type
``panels``     named panels the gene belongs to (:mod:`stcorpus.curate.genes.panels`)
``ensembl``    the Ensembl gene name, where it differs from the approved symbol
``reference``  the name 10x GRCh38-2020-A (Ensembl 98) gives the gene, where it differs from both
``previous``   HGNC previous symbols
``alias``      HGNC alias symbols
``ortholog``   (mouse) Ensembl id of the one-to-one human ortholog
============== ====================================================================================

A name resolves through tiers, first match wins: approved symbol, Ensembl name, 10x reference
name, previous symbol, alias. A name that a tier gives to several genes is ambiguous there and is
not mapped (a lower tier would be a guess). Exact matches in every tier are tried before
case-insensitive ones, and a case-insensitive match counts only when it names one gene.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from typing import Any, Final

from stcorpus.curate.errors import UnsupportedSpeciesError

#: Species with a shipped gene table.
GENE_SPECIES: Final = ("human", "mouse")

#: Columns of the shipped tables, in order.
TABLE_COLUMNS: Final = (
    "key",
    "symbol",
    "biotype",
    "panels",
    "ensembl",
    "reference",
    "previous",
    "alias",
    "ortholog",
)
TABLE_FILES: Final = {species: f"{species}.tsv.gz" for species in GENE_SPECIES}
SOURCES_FILE: Final = "SOURCES.json"
LIST_SEPARATOR: Final = "|"

#: Ensembl gene id prefixes per species (``ENSG00000141510``, ``ENSMUSG00000051951``).
ID_PREFIX: Final = {"human": "ENSG", "mouse": "ENSMUSG"}

# An Ensembl gene id of any species, with an optional version and GENCODE's _PAR_Y suffix
# (ENSG00000002586.20_PAR_Y is the Y copy of a pseudoautosomal gene; it is the same gene).
_ENSEMBL_ID: Final = re.compile(r"^(ENS[A-Z]*G\d{11})(?:\.\d+)?(?:_PAR_Y)?$")


class Tier(str, Enum):
    """How a feature found its gene (the name tiers in resolution order, then the others)."""

    ID = "id"
    APPROVED = "approved"
    ENSEMBL = "ensembl_name"
    REFERENCE = "reference_name"
    PREVIOUS = "previous"
    ALIAS = "alias"
    MAKE_UNIQUE = "make_unique"


#: Name tiers in resolution order, with the table column each one reads.
NAME_TIERS: Final[tuple[tuple[Tier, str], ...]] = (
    (Tier.APPROVED, "symbol"),
    (Tier.ENSEMBL, "ensembl"),
    (Tier.REFERENCE, "reference"),
    (Tier.PREVIOUS, "previous"),
    (Tier.ALIAS, "alias"),
)


def normalise_id(value: str) -> str | None:
    """The unversioned Ensembl gene id in ``value``, or ``None`` if it is not one.

    >>> normalise_id("ENSG00000141510.17")
    'ENSG00000141510'
    >>> normalise_id("ENSG00000002586.20_PAR_Y")
    'ENSG00000002586'
    >>> normalise_id("TP53") is None
    True
    """
    match = _ENSEMBL_ID.match(value.strip())
    return match.group(1) if match else None


def id_species(gene_id: str) -> str | None:
    """``human`` / ``mouse`` for an unversioned Ensembl id of that species, else ``None``."""
    if gene_id.startswith("ENSMUSG"):
        return "mouse"
    if gene_id.startswith("ENSG"):
        return "human"
    return None


def check_species(species: str, *, slide_id: str | None = None) -> str:
    """Return ``species`` if a gene table exists for it, else raise ``UnsupportedSpeciesError``."""
    if species not in GENE_SPECIES:
        raise UnsupportedSpeciesError(
            f"no gene reference for species {species!r}: gene tables exist for {', '.join(GENE_SPECIES)}; "
            "exclude the slide or add a table to scripts/build_gene_tables.py",
            slide_id=slide_id,
        )
    return species


def species_case(name: str, species: str) -> str:
    """``name`` in the species' symbol convention: human upper-case (``GAPDH``), mouse capitalised (``Gapdh``).

    >>> species_case("Gapdh", "human"), species_case("GAPDH", "mouse")
    ('GAPDH', 'Gapdh')
    """
    return name.upper() if species == "human" else name[:1].upper() + name[1:].lower()


@dataclass(frozen=True)
class NameMatch:
    """What a name resolved to: one gene key, several (ambiguous), or none."""

    tier: Tier | None  # the tier that decided; None when no tier knows the name
    key: str | None  # the gene key when exactly one gene matched
    candidates: tuple[str, ...] = ()  # the genes an ambiguous name names
    case_insensitive: bool = False

    @property
    def ambiguous(self) -> bool:
        """True when the deciding tier gives the name to more than one gene."""
        return len(self.candidates) > 1


_NO_MATCH: Final = NameMatch(tier=None, key=None)

# Within a tier: a name -> its gene key, or the sorted tuple of keys when it names several genes.
_Index = dict[str, "str | tuple[str, ...]"]


def _add(index: dict[str, set[str]], name: str, key: str) -> None:
    index.setdefault(name, set()).add(key)


def _freeze(index: dict[str, set[str]]) -> _Index:
    return {name: next(iter(keys)) if len(keys) == 1 else tuple(sorted(keys)) for name, keys in index.items()}


class GeneReference:
    """The gene table of one species, indexed for id look-ups and name resolution.

    Load the shipped table with :func:`load_reference` (cached); build one from rows for tests or
    for a table of your own with :meth:`from_rows`.
    """

    def __init__(
        self,
        species: str,
        rows: Iterable[Mapping[str, str]],
        *,
        tiers: Iterable[Tier] | None = None,
    ) -> None:
        self.species = check_species(species)
        self.tiers: tuple[Tier, ...] = tuple(
            tier for tier, _ in NAME_TIERS if tiers is None or tier in set(tiers) or tier == Tier.APPROVED
        )
        self._symbol: dict[str, str] = {}
        self._biotype: dict[str, str] = {}
        self._panels: dict[str, tuple[str, ...]] = {}
        self._ortholog: dict[str, str] = {}
        exact: dict[Tier, dict[str, set[str]]] = {tier: {} for tier in self.tiers}
        folded: dict[Tier, dict[str, set[str]]] = {tier: {} for tier in self.tiers}
        columns = dict(NAME_TIERS)
        ids: set[str] = set()
        for row in rows:
            key = row["key"]
            if _is_id(key):
                ids.add(key)
            symbols = _split(row["symbol"])
            name = symbols[0] if symbols else row["ensembl"] or row["reference"]
            if name:
                self._symbol[key] = name
            if row["biotype"]:
                self._biotype[key] = row["biotype"]
            if row["panels"]:
                self._panels[key] = tuple(_split(row["panels"]))
            if row["ortholog"]:
                self._ortholog[key] = row["ortholog"]
            for tier in self.tiers:
                for value in _split(row[columns[tier]]):
                    _add(exact[tier], value, key)
                    _add(folded[tier], value.casefold(), key)
        self._exact: list[tuple[Tier, _Index]] = [(tier, _freeze(exact[tier])) for tier in self.tiers]
        self._folded: list[tuple[Tier, _Index]] = [(tier, _freeze(folded[tier])) for tier in self.tiers]
        self._ids = frozenset(ids)

    @classmethod
    def from_rows(
        cls, species: str, rows: Iterable[Mapping[str, str]], *, tiers: Iterable[Tier] | None = None
    ) -> GeneReference:
        """A reference from table rows (dicts with :data:`TABLE_COLUMNS`; missing columns read as empty)."""
        full = ({column: row.get(column, "") for column in TABLE_COLUMNS} for row in rows)
        return cls(species, full, tiers=tiers)

    def __contains__(self, gene_id: object) -> bool:
        return gene_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> frozenset[str]:
        """Every Ensembl gene id of the table."""
        return self._ids

    def symbol(self, gene_id: str) -> str | None:
        """The approved symbol (else the Ensembl or 10x name) of a gene, or ``None``."""
        return self._symbol.get(gene_id)

    def biotype(self, gene_id: str) -> str | None:
        """HGNC locus group / MGI feature type of a gene, where known."""
        return self._biotype.get(gene_id)

    def panels(self, gene_id: str) -> tuple[str, ...]:
        """Names of the panels a gene belongs to."""
        return self._panels.get(gene_id, ())

    def human_ortholog(self, gene_id: str) -> str | None:
        """Ensembl id of the one-to-one human ortholog of a mouse gene, else ``None``."""
        return self._ortholog.get(gene_id)

    def resolve(self, name: str, *, case_insensitive: bool = True) -> NameMatch:
        """Resolve a gene name through the tiers: exact matches first, then case-insensitive ones.

        Case is changed only when the name as given is unknown: first to the species' convention
        (``Gapdh`` on a human slide tries ``GAPDH``), then ignored altogether, and then only a
        name that names one gene counts. The result's ``key`` is an Ensembl id, or ``HGNC:<n>``
        for a gene HGNC names but Ensembl does not annotate (the caller reports it unmapped
        rather than trying lower tiers).
        """
        name = name.strip()
        if not name:
            return _NO_MATCH
        match = _lookup(self._exact, name, case_insensitive=False)
        if match is None and case_insensitive:
            conventional = species_case(name, self.species)
            if conventional != name:
                match = _lookup(self._exact, conventional, case_insensitive=True)
            if match is None:
                match = _lookup(self._folded, name.casefold(), case_insensitive=True)
        return match or _NO_MATCH


def _lookup(indexes: list[tuple[Tier, _Index]], name: str, *, case_insensitive: bool) -> NameMatch | None:
    for position, (tier, index) in enumerate(indexes):
        found = index.get(name)
        if found is None:
            continue
        if isinstance(found, str):
            return NameMatch(tier=tier, key=found, candidates=(found,), case_insensitive=case_insensitive)
        # Ambiguous here (often Ensembl's copies of a gene on alternate haplotypes). A lower tier
        # that names exactly one of these genes settles it; anything else stays ambiguous.
        for lower_tier, lower in indexes[position + 1 :]:
            settled = lower.get(name)
            if isinstance(settled, str) and settled in found:
                return NameMatch(tier=lower_tier, key=settled, candidates=(settled,), case_insensitive=case_insensitive)
        return NameMatch(tier=tier, key=None, candidates=found, case_insensitive=case_insensitive)
    return None


def _split(value: str) -> list[str]:
    return [part for part in value.split(LIST_SEPARATOR) if part] if value else []


def _is_id(key: str) -> bool:
    return key.startswith("ENS")


def _data_bytes(name: str) -> bytes:
    return resources.files("stcorpus.curate.genes").joinpath("data", name).read_bytes()


def read_table(species: str) -> list[dict[str, str]]:
    """The rows of the shipped table of ``species`` as dicts of :data:`TABLE_COLUMNS`."""
    check_species(species)
    text = gzip.decompress(_data_bytes(TABLE_FILES[species])).decode("utf-8")
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader)
    if tuple(header) != TABLE_COLUMNS:
        raise RuntimeError(
            f"gene table {TABLE_FILES[species]} has columns {header}, expected {list(TABLE_COLUMNS)}: "
            "regenerate it with scripts/build_gene_tables.py"
        )
    return [dict(zip(TABLE_COLUMNS, row, strict=True)) for row in reader]


@functools.lru_cache(maxsize=len(GENE_SPECIES))
def load_reference(species: str) -> GeneReference:
    """The shipped gene reference of ``species`` (``human`` or ``mouse``), loaded once per process."""
    return GeneReference(species, read_table(species))


@functools.lru_cache(maxsize=1)
def _sources() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(_data_bytes(SOURCES_FILE))
    return result


def reference_sources() -> dict[str, Any]:
    """Versions, licences and checksums of the gene tables, for a corpus's ``corpus.json``.

    The result is a fresh copy (callers may edit it): ``{"inputs": [...], "tables": {...},
    "stats": {...}, ...}`` as written by ``scripts/build_gene_tables.py``.
    """
    copied: dict[str, Any] = json.loads(json.dumps(_sources()))
    return copied


__all__ = [
    "GENE_SPECIES",
    "NAME_TIERS",
    "TABLE_COLUMNS",
    "GeneReference",
    "NameMatch",
    "Tier",
    "check_species",
    "id_species",
    "load_reference",
    "normalise_id",
    "read_table",
    "reference_sources",
    "species_case",
]
