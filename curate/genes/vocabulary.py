"""The corpus gene vocabulary (``genes.parquet``) and re-indexing slides onto it.

The vocabulary is every gene of the shipped reference tables (``load_reference`` of each species
in ``GENE_SPECIES``, whatever species the slides are), restricted to the build's panels when it
has some, sorted by species then Ensembl id, with a dense int32 ``index`` from 0: exactly
``GENE_COLUMNS`` of the schema. It depends on the reference tables and the panels only, never on
the slides, so the same gene has the same index in every corpus built with the same reference:
corpora can be appended to and combined, and a model trained on one reads another. The
``measured`` column marks the genes some built slide measured. Human ids (``ENSG``) sort before
mouse ids (``ENSMUSG``), so the ``ensembl_id`` column is sorted as a whole and a slide's genes find
their indices by binary search.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from stcorpus.curate.errors import GeneVocabularyError, SettingsError
from stcorpus.curate.genes.panels import check_panels
from stcorpus.curate.genes.reference import GENE_SPECIES, check_species, id_species, load_reference, reference_sources
from stcorpus.schema import GENE_COLUMNS, SCHEMA_ID

if TYPE_CHECKING:
    import pyarrow as pa

#: The column that says which genes the corpus measured: outside the digest, which names the index space.
MEASURED: Final = "measured"
#: Columns of ``genes.parquet`` that ``vocabulary_digest`` hashes: everything but ``measured``.
DIGEST_COLUMNS: Final = tuple(name for name in GENE_COLUMNS if name != MEASURED)


class Measured(Protocol):
    """Anything with a species and the sorted unique Ensembl ids it measured (e.g. ``SlideGenes``)."""

    @property
    def species(self) -> str: ...

    @property
    def gene_ids(self) -> npt.NDArray[np.str_]: ...


@dataclass(frozen=True)
class MeasuredGenes:
    """The measured genes of one slide, when the counts are not at hand (e.g. read back from ``slides.parquet``)."""

    species: str
    gene_ids: npt.NDArray[np.str_]


def vocabulary_arrow_schema() -> pa.Schema:
    """The Arrow schema of ``genes.parquet`` (columns in ``GENE_COLUMNS`` order)."""
    import pyarrow as pa

    types = {
        "index": pa.int32(),
        "ensembl_id": pa.string(),
        "symbol": pa.string(),
        "species": pa.string(),
        "biotype": pa.string(),
        "human_ortholog": pa.int32(),
        "human_ortholog_id": pa.string(),
        "panels": pa.list_(pa.string()),
        MEASURED: pa.bool_(),
    }
    nullable = {"symbol", "biotype", "human_ortholog", "human_ortholog_id"}
    return pa.schema([pa.field(name, types[name], nullable=name in nullable) for name in GENE_COLUMNS])


@dataclass(frozen=True)
class _ReferenceGenes:
    """The vocabulary's columns but ``measured``: a function of the reference tables and the panels."""

    columns: dict[str, Any]
    index: GeneIndex
    species: npt.NDArray[np.str_]
    n_species: dict[str, int]
    n_with_ortholog: int
    n_ortholog_in_vocabulary: int


@functools.lru_cache(maxsize=4)
def _reference_genes(panels: tuple[str, ...] | None) -> _ReferenceGenes:
    """Every reference gene (of the panels), sorted by species then id; built once per process and selection."""
    ids_all: list[str] = []
    species_all: list[str] = []
    references = {species: load_reference(species) for species in GENE_SPECIES}
    for species in GENE_SPECIES:
        reference = references[species]
        ids = sorted(reference.ids)
        if panels is not None:
            ids = [i for i in ids if set(reference.panels(i)) & set(panels)]
        ids_all += ids
        species_all += [species] * len(ids)
    position = {gene_id: i for i, gene_id in enumerate(ids_all)}
    pairs = list(zip(ids_all, species_all, strict=True))
    ortholog_ids: list[str | None] = [references[s].human_ortholog(i) if s == "mouse" else None for i, s in pairs]
    ortholog_index = [position.get(o) if o is not None else None for o in ortholog_ids]
    columns: dict[str, Any] = {
        "index": np.arange(len(ids_all), dtype=np.int32),
        "ensembl_id": ids_all,
        "symbol": [references[s].symbol(i) for i, s in pairs],
        "species": species_all,
        "biotype": [references[s].biotype(i) for i, s in pairs],
        "human_ortholog": ortholog_index,
        "human_ortholog_id": ortholog_ids,
        "panels": [list(references[s].panels(i)) for i, s in pairs],
    }
    return _ReferenceGenes(
        columns=columns,
        index=GeneIndex(ids_all),
        species=np.asarray(species_all, dtype=np.str_),
        n_species={species: species_all.count(species) for species in GENE_SPECIES},
        n_with_ortholog=sum(o is not None for o in ortholog_ids),
        n_ortholog_in_vocabulary=sum(o is not None for o in ortholog_index),
    )


def build_vocabulary(slides: Iterable[Measured], *, panel: str | Iterable[str] | None = None) -> pa.Table:
    """The gene vocabulary of a corpus: every reference gene (of ``panel``), and which ones its slides measured.

    Columns are ``GENE_COLUMNS``: ``symbol`` is the approved symbol (else the Ensembl or 10x
    name), ``biotype`` the HGNC locus group / MGI feature type, ``human_ortholog`` the index of
    a mouse gene's one-to-one human ortholog when that gene is in the vocabulary (else null),
    ``human_ortholog_id`` its Ensembl id either way, and ``measured`` whether some slide of
    ``slides`` measured the gene. Every column but ``measured`` depends only on the shipped
    reference tables (human and mouse, whatever species the slides are) and ``panel``, so the
    indices are the same in every corpus built with them. ``panel`` names the panels the slides
    were mapped with (``map_slide_genes(..., panel=...)``): the vocabulary holds their genes only,
    and a measured gene outside them is an error here, because dropping it would lose counts that
    the slide reports did not count.

    The table's metadata holds the schema id, the panel selection, the reference sources and
    gene figures (``stats``: genes per species, measured, orthologs). The same slides give the same
    table, whatever their order.
    """
    import pyarrow as pa

    panels = check_panels(panel)
    base = _reference_genes(panels)
    measured = np.zeros(len(base.index), dtype=np.bool_)
    for slide in slides:
        species = check_species(slide.species)
        ids = np.unique(np.asarray(slide.gene_ids, dtype=np.str_))
        wrong = sorted(str(i) for i in ids.tolist() if id_species(str(i)) != species)
        if wrong:
            raise GeneVocabularyError(
                f"a {species} slide lists {len(wrong)} gene id(s) of another species (e.g. {wrong[:3]}); "
                "map it with map_slide_genes, which keeps only ids of the slide's species"
            )
        found = base.index.positions(ids)
        missing = ids[found < 0].tolist()
        if missing:
            unknown = [i for i in missing if i not in load_reference(species)]
            if unknown:
                raise GeneVocabularyError(
                    f"{len(unknown)} measured id(s) are not in the gene reference (e.g. {unknown[:3]}): "
                    "measured ids must come from map_slide_genes"
                )
            raise SettingsError(
                f"{len(missing)} measured gene(s) are outside panel(s) {', '.join(panels or ())} (e.g. "
                f"{missing[:3]}): map the slides with map_slide_genes(..., panel=...) set to the same panels, so "
                "their reports count the features left out"
            )
        measured[found] = True
    stats = {
        "n_genes": len(base.index),
        "n_human": base.n_species["human"],
        "n_mouse": base.n_species["mouse"],
        "n_measured": int(measured.sum()),
        "n_measured_human": int(measured[base.species == "human"].sum()),
        "n_measured_mouse": int(measured[base.species == "mouse"].sum()),
        "mouse_with_one2one_human_ortholog": base.n_with_ortholog,
        "mouse_with_ortholog_in_vocabulary": base.n_ortholog_in_vocabulary,
    }
    metadata = {
        "stcorpus": SCHEMA_ID,
        "panel": json.dumps(list(panels) if panels is not None else None),
        "stats": json.dumps(stats, sort_keys=True),
        "gene_references": json.dumps(reference_sources()["tables"], sort_keys=True),
    }
    schema = vocabulary_arrow_schema().with_metadata(metadata)
    return pa.table({**base.columns, MEASURED: measured}, schema=schema)


def reference_vocabulary(*, panel: str | Iterable[str] | None = None) -> pa.Table:
    """The vocabulary the shipped references give ``panel``, with no gene measured (``build_vocabulary([])``)."""
    return build_vocabulary([], panel=panel)


def vocabulary_digest(vocabulary: pa.Table) -> str:
    """sha256 of the vocabulary's index space, for ``corpus.json`` ``vocabulary_sha256``.

    It hashes the column values (not Parquet bytes) of ``DIGEST_COLUMNS``: every column but
    ``measured``. Two corpora with the same digest put the same gene, with the same annotations,
    at the same index (a model or a shard of one reads the other), and an append that measures
    more genes leaves it as it was. A corpus written before ``measured`` existed hashes the same way.
    """
    digest = hashlib.sha256()
    for name in DIGEST_COLUMNS:
        digest.update(name.encode())
        digest.update(json.dumps(vocabulary.column(name).to_pylist(), separators=(",", ":")).encode())
    return digest.hexdigest()


def with_measured(vocabulary: pa.Table, measured: npt.ArrayLike) -> pa.Table:
    """``vocabulary`` with its ``measured`` column replaced by ``measured`` (bool, one per gene), metadata kept.

    The stats in the metadata follow: ``n_measured`` and its split by species.
    """
    import pyarrow as pa

    flags = np.asarray(measured, dtype=np.bool_)
    if flags.shape != (vocabulary.num_rows,):
        raise GeneVocabularyError(f"measured has {flags.size} entries for a vocabulary of {vocabulary.num_rows}")
    metadata = dict(vocabulary.schema.metadata or {})
    if b"stats" in metadata:
        stats = json.loads(metadata[b"stats"])
        species = np.asarray(vocabulary.column("species").to_pylist(), dtype=np.str_)
        stats["n_measured"] = int(flags.sum())
        for name in GENE_SPECIES:
            stats[f"n_measured_{name}"] = int(flags[species == name].sum())
        metadata[b"stats"] = json.dumps(stats, sort_keys=True).encode()
    position = vocabulary.schema.get_field_index(MEASURED)
    field = vocabulary_arrow_schema().field(MEASURED)
    column = pa.array(flags, type=pa.bool_())
    table = vocabulary.set_column(position, field, column) if position >= 0 else vocabulary.append_column(field, column)
    return table.replace_schema_metadata(metadata)


class GeneIndex:
    """Fast look-up of vocabulary indices by Ensembl id; build once per vocabulary."""

    def __init__(self, vocabulary: pa.Table | Iterable[str]) -> None:
        ids = vocabulary.column("ensembl_id").to_pylist() if hasattr(vocabulary, "column") else list(vocabulary)
        self.ids: npt.NDArray[np.str_] = np.asarray(ids, dtype=np.str_)
        if self.ids.size > 1 and not bool(np.all(self.ids[1:] > self.ids[:-1])):
            raise GeneVocabularyError(
                "vocabulary ids are not sorted and unique; build the vocabulary with build_vocabulary"
            )

    def __len__(self) -> int:
        return int(self.ids.size)

    def positions(self, gene_ids: npt.ArrayLike) -> npt.NDArray[np.int32]:
        """Vocabulary indices (int32) of ``gene_ids``, aligned; -1 for an id not in the vocabulary."""
        query = np.asarray(gene_ids, dtype=np.str_)
        if query.size == 0 or self.ids.size == 0:
            return np.full(query.size, -1, dtype=np.int32)
        found = np.minimum(np.searchsorted(self.ids, query), self.ids.size - 1).astype(np.int32)
        found[self.ids[found] != query] = -1
        return found

    def indices(self, gene_ids: npt.ArrayLike) -> npt.NDArray[np.int32]:
        """Vocabulary indices (int32) of ``gene_ids``, aligned; an id not in the vocabulary is an error."""
        query = np.asarray(gene_ids, dtype=np.str_)
        if query.size and self.ids.size == 0:
            raise GeneVocabularyError(f"the vocabulary is empty; {query.size} gene id(s) cannot be placed")
        found = self.positions(query)
        missing = found < 0
        if missing.any():
            examples = query[missing][:5].tolist()
            raise GeneVocabularyError(
                f"{int(missing.sum())} gene id(s) are not in the vocabulary (e.g. {examples}): "
                "build the vocabulary from every slide that is packed"
            )
        return found


def vocabulary_indices(gene_ids: npt.ArrayLike, vocabulary: pa.Table | GeneIndex) -> npt.NDArray[np.int32]:
    """Vocabulary indices of a slide's ``gene_ids`` (int32, aligned), by binary search.

    Pass a :class:`GeneIndex` when re-indexing many slides against one vocabulary.
    """
    index = vocabulary if isinstance(vocabulary, GeneIndex) else GeneIndex(vocabulary)
    return index.indices(gene_ids)


__all__ = [
    "DIGEST_COLUMNS",
    "MEASURED",
    "GeneIndex",
    "Measured",
    "MeasuredGenes",
    "build_vocabulary",
    "reference_vocabulary",
    "vocabulary_arrow_schema",
    "vocabulary_digest",
    "vocabulary_indices",
    "with_measured",
]
