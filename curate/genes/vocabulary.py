"""The corpus gene vocabulary (``genes.parquet``) and re-indexing slides onto it.

The vocabulary is the union of the measured genes of every slide, sorted by species then
Ensembl id, with a dense int32 ``index`` from 0: exactly ``GENE_COLUMNS`` of the schema. Human ids
(``ENSG``) sort before mouse ids (``ENSMUSG``), so the ``ensembl_id`` column is sorted as a whole
and a slide's genes find their indices by binary search.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from stcorpus.curate.errors import GeneVocabularyError, SettingsError
from stcorpus.curate.genes.panels import check_panels
from stcorpus.curate.genes.reference import GENE_SPECIES, check_species, id_species, load_reference, reference_sources
from stcorpus.schema import GENE_COLUMNS, SCHEMA_ID

if TYPE_CHECKING:
    import pyarrow as pa


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
    }
    nullable = {"symbol", "biotype", "human_ortholog", "human_ortholog_id"}
    return pa.schema([pa.field(name, types[name], nullable=name in nullable) for name in GENE_COLUMNS])


def build_vocabulary(slides: Iterable[Measured], *, panel: str | Iterable[str] | None = None) -> pa.Table:
    """The gene vocabulary of a corpus: the union of its slides' measured genes, as an Arrow table.

    Columns are ``GENE_COLUMNS``: ``symbol`` is the approved symbol (else the Ensembl or 10x
    name), ``biotype`` the HGNC locus group / MGI feature type, ``human_ortholog`` the index of
    a mouse gene's one-to-one human ortholog when that gene is in the vocabulary (else null), and
    ``human_ortholog_id`` its Ensembl id either way. ``panel`` names the panels the slides were
    mapped with (``map_slide_genes(..., panel=...)``): a gene outside them is an error here,
    because dropping it would lose counts that the slide reports did not count.

    The table's metadata holds the schema id, the panel selection, the reference sources and
    ortholog figures. The same slides give the same table, whatever their order.
    """
    import pyarrow as pa

    panels = check_panels(panel)
    measured: dict[str, set[str]] = {species: set() for species in GENE_SPECIES}
    for slide in slides:
        species = check_species(slide.species)
        ids = {str(i) for i in np.asarray(slide.gene_ids).tolist()}
        wrong = sorted(i for i in ids if id_species(i) != species)
        if wrong:
            raise GeneVocabularyError(
                f"a {species} slide lists {len(wrong)} gene id(s) of another species (e.g. {wrong[:3]}); "
                "map it with map_slide_genes, which keeps only ids of the slide's species"
            )
        measured[species] |= ids
    ids_all = sorted(measured["human"]) + sorted(measured["mouse"])
    species_all = ["human"] * len(measured["human"]) + ["mouse"] * len(measured["mouse"])
    references = {species: load_reference(species) for species in GENE_SPECIES if measured[species]}
    unknown = [i for i, s in zip(ids_all, species_all, strict=True) if i not in references[s]]
    if unknown:
        raise GeneVocabularyError(
            f"{len(unknown)} measured id(s) are not in the gene reference (e.g. {unknown[:3]}): "
            "measured ids must come from map_slide_genes"
        )
    gene_panels = [list(references[s].panels(i)) for i, s in zip(ids_all, species_all, strict=True)]
    if panels is not None:
        outside = [i for i, p in zip(ids_all, gene_panels, strict=True) if not set(p) & set(panels)]
        if outside:
            raise SettingsError(
                f"{len(outside)} measured gene(s) are outside panel(s) {', '.join(panels)} (e.g. {outside[:3]}): "
                "map the slides with map_slide_genes(..., panel=...) set to the same panels, so their "
                "reports count the features left out"
            )
    position = {gene_id: i for i, gene_id in enumerate(ids_all)}
    ortholog_ids: list[str | None] = [
        references[s].human_ortholog(i) if s == "mouse" else None for i, s in zip(ids_all, species_all, strict=True)
    ]
    ortholog_index = [position.get(o) if o is not None else None for o in ortholog_ids]
    columns: dict[str, Any] = {
        "index": np.arange(len(ids_all), dtype=np.int32),
        "ensembl_id": ids_all,
        "symbol": [references[s].symbol(i) for i, s in zip(ids_all, species_all, strict=True)],
        "species": species_all,
        "biotype": [references[s].biotype(i) for i, s in zip(ids_all, species_all, strict=True)],
        "human_ortholog": ortholog_index,
        "human_ortholog_id": ortholog_ids,
        "panels": gene_panels,
    }
    n_mouse = len(measured["mouse"])
    stats = {
        "n_genes": len(ids_all),
        "n_human": len(measured["human"]),
        "n_mouse": n_mouse,
        "mouse_with_one2one_human_ortholog": sum(o is not None for o in ortholog_ids),
        "mouse_with_ortholog_in_vocabulary": sum(o is not None for o in ortholog_index),
    }
    metadata = {
        "stcorpus": SCHEMA_ID,
        "panel": json.dumps(list(panels) if panels is not None else None),
        "stats": json.dumps(stats, sort_keys=True),
        "gene_references": json.dumps(reference_sources()["tables"], sort_keys=True),
    }
    schema = vocabulary_arrow_schema().with_metadata(metadata)
    return pa.table(columns, schema=schema)


def vocabulary_digest(vocabulary: pa.Table) -> str:
    """sha256 of the vocabulary's content (column values, not Parquet bytes), for ``corpus.json``."""
    digest = hashlib.sha256()
    for name in GENE_COLUMNS:
        digest.update(name.encode())
        digest.update(json.dumps(vocabulary.column(name).to_pylist(), separators=(",", ":")).encode())
    return digest.hexdigest()


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
    "GeneIndex",
    "Measured",
    "MeasuredGenes",
    "build_vocabulary",
    "vocabulary_arrow_schema",
    "vocabulary_digest",
    "vocabulary_indices",
]
