"""The corpus vocabulary: union, dense indices, orthologs, panels, determinism, re-indexing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from stcorpus import schema
from stcorpus.curate.errors import GeneVocabularyError, SettingsError
from stcorpus.curate.genes import (
    GeneIndex,
    MeasuredGenes,
    build_vocabulary,
    load_reference,
    map_slide_genes,
    vocabulary_digest,
    vocabulary_indices,
)
from stcorpus.curate.slide import Features
from stcorpus.schema import GENE_COLUMNS

GAPDH, TP53, MT_CO1, ACTB = "ENSG00000111640", "ENSG00000141510", "ENSG00000198804", "ENSG00000075624"
M_GAPDH, M_TRP53, M_ACTB, M_GM37381 = (
    "ENSMUSG00000057666",
    "ENSMUSG00000059552",
    "ENSMUSG00000029580",
    ("ENSMUSG00000102343"),
)


def measured(species: str, *ids: str) -> MeasuredGenes:
    return MeasuredGenes(species=species, gene_ids=np.array(sorted(ids), dtype=str))


@pytest.fixture(scope="module")
def slides() -> list[MeasuredGenes]:
    return [
        measured("human", GAPDH, TP53),
        measured("human", TP53, MT_CO1),
        measured("mouse", M_GAPDH, M_TRP53, M_ACTB, M_GM37381),
    ]


def rows(table) -> dict[str, dict]:
    return {row["ensembl_id"]: row for row in table.to_pylist()}


def test_union_sorted_by_species_then_id_with_dense_indices(slides: list[MeasuredGenes]) -> None:
    table = build_vocabulary(slides)
    assert tuple(table.column_names) == GENE_COLUMNS
    assert table.column("ensembl_id").to_pylist() == [GAPDH, TP53, MT_CO1, M_ACTB, M_GAPDH, M_TRP53, M_GM37381]
    assert table.column("species").to_pylist() == ["human"] * 3 + ["mouse"] * 4
    assert table.column("index").to_pylist() == list(range(7))
    assert str(table.schema.field("index").type) == "int32"
    assert str(table.schema.field("human_ortholog").type) == "int32"


def test_symbols_biotypes_and_panels(slides: list[MeasuredGenes]) -> None:
    by_id = rows(build_vocabulary(slides))
    assert (by_id[TP53]["symbol"], by_id[TP53]["biotype"]) == ("TP53", "protein-coding gene")
    assert by_id[MT_CO1]["panels"] == ["human-mt", "human-protein-coding"]
    assert (by_id[M_GM37381]["symbol"], by_id[M_GM37381]["biotype"], by_id[M_GM37381]["panels"]) == (
        "Gm37381",
        "lncRNA gene",
        [],
    )


def test_orthologs_index_when_in_vocabulary_id_regardless(slides: list[MeasuredGenes]) -> None:
    table = build_vocabulary(slides)
    by_id = rows(table)
    # Trp53 -> TP53, in the vocabulary: its index.
    assert by_id[M_TRP53]["human_ortholog_id"] == TP53
    assert by_id[M_TRP53]["human_ortholog"] == by_id[TP53]["index"]
    # Actb -> ACTB, one-to-one, but no human slide measured ACTB: null index, the id still given.
    assert (by_id[M_ACTB]["human_ortholog"], by_id[M_ACTB]["human_ortholog_id"]) == (None, ACTB)
    # Gapdh has no one-to-one human ortholog (many mouse copies): both null.
    assert (by_id[M_GAPDH]["human_ortholog"], by_id[M_GAPDH]["human_ortholog_id"]) == (None, None)
    # Human genes never carry an ortholog.
    assert {by_id[g]["human_ortholog_id"] for g in (GAPDH, TP53, MT_CO1)} == {None}
    stats = json.loads(table.schema.metadata[b"stats"])
    assert stats == {
        "n_genes": 7,
        "n_human": 3,
        "n_mouse": 4,
        "mouse_with_one2one_human_ortholog": 2,
        "mouse_with_ortholog_in_vocabulary": 1,
    }


def test_deterministic_whatever_the_slide_order(slides: list[MeasuredGenes], tmp_path: Path) -> None:
    first = build_vocabulary(slides)
    second = build_vocabulary(list(reversed(slides)))
    assert first.equals(second)
    assert first.schema.metadata == second.schema.metadata
    assert vocabulary_digest(first) == vocabulary_digest(second)
    assert vocabulary_digest(build_vocabulary(slides[:2])) != vocabulary_digest(first)
    pq.write_table(first, tmp_path / "a.parquet")
    pq.write_table(second, tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    back = pq.read_table(tmp_path / "a.parquet")
    assert back.equals(first) and back.schema.metadata[b"stcorpus"] == schema.SCHEMA_ID.encode()


def test_panel_selection_is_checked_not_silently_applied(slides: list[MeasuredGenes]) -> None:
    with pytest.raises(SettingsError, match="outside panel"):
        build_vocabulary(slides, panel=["human-protein-coding", "mouse-protein-coding"])
    features = Features(ids=np.array(["", "", ""]), names=np.array(["MT-CO1", "GAPDH", "MALAT1"]))
    genes = map_slide_genes(features, sp.csr_matrix((1, 3)), species="human", panel="human-protein-coding")
    table = build_vocabulary([genes], panel="human-protein-coding")
    assert table.column("ensembl_id").to_pylist() == [GAPDH, MT_CO1]
    assert json.loads(table.schema.metadata[b"panel"]) == ["human-protein-coding"]
    assert genes.report.outside_panel == 1  # MALAT1, counted at the slide


def test_bad_inputs() -> None:
    with pytest.raises(GeneVocabularyError, match="another species"):
        build_vocabulary([measured("human", M_GAPDH)])
    with pytest.raises(GeneVocabularyError, match="not in the gene reference"):
        build_vocabulary([measured("human", "ENSG00000999999")])
    empty = build_vocabulary([])
    assert empty.num_rows == 0 and tuple(empty.column_names) == GENE_COLUMNS


def test_reindexing_slides_onto_the_vocabulary(slides: list[MeasuredGenes]) -> None:
    table = build_vocabulary(slides)
    index = GeneIndex(table)
    got = vocabulary_indices(slides[2].gene_ids, index)
    assert got.dtype == np.int32
    assert table.column("ensembl_id").take(got).to_pylist() == slides[2].gene_ids.tolist()
    assert vocabulary_indices(np.array([TP53, GAPDH]), table).tolist() == [1, 0]  # aligned, not sorted
    assert vocabulary_indices(np.array([], dtype=str), table).tolist() == []
    with pytest.raises(GeneVocabularyError, match="1 gene id"):
        index.indices([GAPDH, ACTB])
    with pytest.raises(GeneVocabularyError):
        index.indices(["ENSMUSG99999999999"])  # sorts past the end
    with pytest.raises(GeneVocabularyError, match="not sorted"):
        GeneIndex([TP53, GAPDH])


def test_real_slide_through_mapping_vocabulary_and_reindexing() -> None:
    """A mapped slide's columns land on vocabulary indices that name the same genes."""
    reference = load_reference("human")
    names = np.array(["GAPDH", "TP53", "MT-CO1", "ACTB", "TP53-1"])
    counts = sp.csr_matrix(np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]], dtype=np.int32))
    genes = map_slide_genes(Features(ids=np.full(5, "", dtype=str), names=names), counts, species="human")
    other = measured("human", "ENSG00000000003")  # TSPAN6, measured by another slide only
    table = build_vocabulary([genes, other])
    positions = vocabulary_indices(genes.gene_ids, table)
    assert np.all(np.diff(positions) > 0)  # sorted slide genes stay sorted: samples need no re-sort
    symbols = table.column("symbol").take(positions).to_pylist()
    assert symbols == [reference.symbol(g) for g in genes.gene_ids.tolist()]
    tp53 = symbols.index("TP53")
    assert genes.counts[:, tp53].toarray().ravel().tolist() == [7, 5]  # TP53 + TP53-1 summed
