"""The corpus vocabulary: the references' genes, measured, dense indices, orthologs, panels, digest, re-indexing."""

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
    reference_vocabulary,
    vocabulary_digest,
    vocabulary_indices,
    with_measured,
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


def test_reference_genes_sorted_by_species_then_id_with_dense_indices(slides: list[MeasuredGenes]) -> None:
    table = build_vocabulary(slides)
    assert tuple(table.column_names) == GENE_COLUMNS
    ids = table.column("ensembl_id").to_pylist()
    species = table.column("species").to_pylist()
    n_human, n_mouse = len(load_reference("human")), len(load_reference("mouse"))
    # Every reference gene of both species, whatever the slides measured: human ids first, then mouse.
    assert len(ids) == n_human + n_mouse and species == ["human"] * n_human + ["mouse"] * n_mouse
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert set(ids[:n_human]) == load_reference("human").ids
    assert table.column("index").to_pylist() == list(range(len(ids)))
    assert str(table.schema.field("index").type) == "int32"
    assert str(table.schema.field("human_ortholog").type) == "int32"
    assert str(table.schema.field("measured").type) == "bool"


def test_measured_marks_exactly_the_slides_genes(slides: list[MeasuredGenes]) -> None:
    table = build_vocabulary(slides)
    ids = np.asarray(table.column("ensembl_id").to_pylist())
    measured = ids[np.asarray(table.column("measured").to_pylist())]
    assert measured.tolist() == [GAPDH, TP53, MT_CO1, M_ACTB, M_GAPDH, M_TRP53, M_GM37381]
    assert not build_vocabulary([]).column("measured").to_pylist().count(True)


def test_indices_do_not_depend_on_the_slides(slides: list[MeasuredGenes]) -> None:
    """A human-only and a mouse-only set of slides index every gene alike; only ``measured`` differs."""
    human, mouse = build_vocabulary(slides[:2]), build_vocabulary(slides[2:])
    for name in ("index", "ensembl_id", "human_ortholog"):
        assert human.column(name).equals(mouse.column(name))
    assert vocabulary_digest(human) == vocabulary_digest(mouse) == vocabulary_digest(build_vocabulary([]))
    assert not human.column("measured").equals(mouse.column("measured"))
    assert reference_vocabulary().equals(build_vocabulary([]))


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
    # Actb -> ACTB: no slide measured ACTB, but the reference holds it, so it has an index.
    assert (by_id[M_ACTB]["human_ortholog"], by_id[M_ACTB]["human_ortholog_id"]) == (by_id[ACTB]["index"], ACTB)
    assert by_id[ACTB]["measured"] is False
    # Gapdh has no one-to-one human ortholog (many mouse copies): both null.
    assert (by_id[M_GAPDH]["human_ortholog"], by_id[M_GAPDH]["human_ortholog_id"]) == (None, None)
    # Human genes never carry an ortholog.
    assert {by_id[g]["human_ortholog_id"] for g in (GAPDH, TP53, MT_CO1)} == {None}
    stats = json.loads(table.schema.metadata[b"stats"])
    assert stats["n_genes"] == table.num_rows == stats["n_human"] + stats["n_mouse"]
    assert (stats["n_measured"], stats["n_measured_human"], stats["n_measured_mouse"]) == (7, 3, 4)
    # A human-panel vocabulary holds no mouse gene; a mouse panel without the human one: no ortholog index.
    mouse_only = build_vocabulary([], panel="mouse-protein-coding")
    mouse_stats = json.loads(mouse_only.schema.metadata[b"stats"])
    assert mouse_stats["mouse_with_one2one_human_ortholog"] > 0
    assert mouse_stats["mouse_with_ortholog_in_vocabulary"] == 0
    assert set(mouse_only.column("human_ortholog").to_pylist()) == {None}


def test_deterministic_whatever_the_slide_order(slides: list[MeasuredGenes], tmp_path: Path) -> None:
    first = build_vocabulary(slides)
    second = build_vocabulary(list(reversed(slides)))
    assert first.equals(second)
    assert first.schema.metadata == second.schema.metadata
    assert vocabulary_digest(first) == vocabulary_digest(second)
    pq.write_table(first, tmp_path / "a.parquet")
    pq.write_table(second, tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    back = pq.read_table(tmp_path / "a.parquet")
    assert back.equals(first) and back.schema.metadata[b"stcorpus"] == schema.SCHEMA_ID.encode()


def test_digest_names_the_index_space_not_what_was_measured(slides: list[MeasuredGenes]) -> None:
    full = build_vocabulary(slides)
    assert vocabulary_digest(full) == vocabulary_digest(full.drop_columns(["measured"]))  # older corpora
    assert vocabulary_digest(full) != vocabulary_digest(build_vocabulary([], panel="human-mt"))
    updated = with_measured(full, np.ones(full.num_rows, dtype=bool))
    assert vocabulary_digest(updated) == vocabulary_digest(full)
    assert json.loads(updated.schema.metadata[b"stats"])["n_measured"] == full.num_rows
    assert updated.column("ensembl_id").equals(full.column("ensembl_id"))
    with pytest.raises(GeneVocabularyError, match="entries"):
        with_measured(full, [True])


def test_panel_selection_is_checked_not_silently_applied(slides: list[MeasuredGenes]) -> None:
    with pytest.raises(SettingsError, match="outside panel"):
        build_vocabulary(slides, panel=["human-protein-coding", "mouse-protein-coding"])
    features = Features(ids=np.array(["", "", ""]), names=np.array(["MT-CO1", "GAPDH", "MALAT1"]))
    genes = map_slide_genes(features, sp.csr_matrix((1, 3)), species="human", panel="human-protein-coding")
    table = build_vocabulary([genes], panel="human-protein-coding")
    # The panel's genes, every one of them, whatever the slide measured; nothing else.
    reference = load_reference("human")
    panel_ids = sorted(g for g in reference.ids if "human-protein-coding" in reference.panels(g))
    assert table.column("ensembl_id").to_pylist() == panel_ids
    assert all("human-protein-coding" in p for p in table.column("panels").to_pylist())
    ids = np.asarray(table.column("ensembl_id").to_pylist())
    assert ids[np.asarray(table.column("measured").to_pylist())].tolist() == [GAPDH, MT_CO1]
    assert json.loads(table.schema.metadata[b"panel"]) == ["human-protein-coding"]
    assert genes.report.outside_panel == 1  # MALAT1, counted at the slide


def test_bad_inputs() -> None:
    with pytest.raises(GeneVocabularyError, match="another species"):
        build_vocabulary([measured("human", M_GAPDH)])
    with pytest.raises(GeneVocabularyError, match="not in the gene reference"):
        build_vocabulary([measured("human", "ENSG00000999999")])
    empty = build_vocabulary([])
    assert tuple(empty.column_names) == GENE_COLUMNS and not any(empty.column("measured").to_pylist())


def test_reindexing_slides_onto_the_vocabulary(slides: list[MeasuredGenes]) -> None:
    table = build_vocabulary(slides)
    index = GeneIndex(table)
    got = vocabulary_indices(slides[2].gene_ids, index)
    assert got.dtype == np.int32
    assert table.column("ensembl_id").take(got).to_pylist() == slides[2].gene_ids.tolist()
    tp53, gapdh = vocabulary_indices(np.array([TP53, GAPDH]), table).tolist()  # aligned, not sorted
    assert tp53 > gapdh and table.column("ensembl_id").take([tp53, gapdh]).to_pylist() == [TP53, GAPDH]
    assert vocabulary_indices(np.array([], dtype=str), table).tolist() == []
    with pytest.raises(GeneVocabularyError, match="1 gene id"):
        index.indices([GAPDH, "ENSG00000999999"])
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


def test_the_build_marks_measured_genes_from_positions_as_build_vocabulary_does(slides: list[MeasuredGenes]) -> None:
    from types import SimpleNamespace

    from stcorpus.curate.build.pipeline import _measured_vocabulary

    base = reference_vocabulary()
    index = GeneIndex(base)
    units = [
        SimpleNamespace(slide_id=f"S{i}", slide={"species": s.species}, gene_ids=list(s.gene_ids))
        for i, s in enumerate(slides)
    ]
    positions = {u.slide_id: index.positions(np.asarray(u.gene_ids, dtype=str)) for u in units}
    made = _measured_vocabulary(base, units, positions, panel=None)  # type: ignore[arg-type]
    expected = build_vocabulary(slides)
    assert made.equals(expected) and made.schema.metadata == expected.schema.metadata
    assert sum(made.column("measured").to_pylist()) == len({g for s in slides for g in s.gene_ids})

    # a slide whose genes are not of its species goes through build_vocabulary, which names the fault
    wrong = [*units, SimpleNamespace(slide_id="W", slide={"species": "human"}, gene_ids=[M_GAPDH])]
    positions["W"] = index.positions(np.asarray([M_GAPDH], dtype=str))
    with pytest.raises(GeneVocabularyError, match="another species"):
        _measured_vocabulary(base, wrong, positions, panel=None)  # type: ignore[arg-type]
