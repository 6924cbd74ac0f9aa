"""Per-slide gene mapping on real fixtures, full real feature lists and random matrices."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import anndata
import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from stcorpus.curate.errors import GeneMappingError, SettingsError, UnsupportedSpeciesError
from stcorpus.curate.genes import SlideGenes, Tier, load_reference, map_slide_genes
from stcorpus.curate.genes.reference import GeneReference, read_table
from stcorpus.curate.slide import Features
from tests.conftest import DATA, FULLRES, HEART, MOUSE_BRAIN

FEATURE_LIST = DATA / "feature-lists" / "GRCh38-2020-A_features.tsv.gz"


def read_10x_h5(path: Path) -> tuple[Features, sp.csr_matrix]:
    """Features and spots x features counts of a 10x h5 (CSC features x barcodes = CSR barcodes x features)."""
    with h5py.File(path, "r") as f:
        m = f["matrix"]
        n_features, n_barcodes = (int(x) for x in m["shape"][:])
        counts = sp.csr_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=(n_barcodes, n_features))
        features = Features(ids=m["features/id"][:].astype(str), names=m["features/name"][:].astype(str))
    return features, counts


def names_only(features: Features) -> Features:
    return Features(ids=np.full(len(features), "", dtype=str), names=features.names)


def mapped_ids(genes: SlideGenes) -> np.ndarray:
    """The Ensembl id each source feature was mapped to ("" where it was not kept)."""
    ids = genes.gene_ids.tolist()
    return np.array([ids[i] if i >= 0 else "" for i in genes.feature_index.tolist()], dtype=str)


def assert_totals_exact(genes: SlideGenes, counts: sp.spmatrix) -> None:
    """Per-spot totals after mapping = source totals minus the counts of features not kept, exactly."""
    source = sp.csr_matrix(counts)
    dropped = genes.feature_index < 0
    expected = np.asarray(source.sum(axis=1)).ravel() - np.asarray(source[:, dropped].sum(axis=1)).ravel()
    np.testing.assert_array_equal(np.asarray(genes.counts.sum(axis=1)).ravel(), expected)
    assert genes.counts.dtype == source.dtype
    assert genes.counts.shape == (source.shape[0], genes.gene_ids.size)


# --- real fixtures --------------------------------------------------------------------------------


def test_human_heart_maps_every_feature_by_id() -> None:
    features, counts = read_10x_h5(HEART / "filtered_feature_bc_matrix.h5")
    assert features.names[0] == "ENSG00000243485"  # names are ids in this file
    genes = map_slide_genes(features, counts, species="human")
    report = genes.report
    assert (report.n_features, report.by_id, report.n_genes, report.unmapped, report.ambiguous) == (100, 100, 100, 0, 0)
    assert report.conflicts == 0 and report.lost_fraction == 0.0
    assert genes.gene_ids.tolist() == sorted(features.ids.tolist())
    assert report.total_counts == counts.sum()
    assert_totals_exact(genes, counts)
    # The names column alone (ids in disguise) maps the same way.
    by_name = map_slide_genes(names_only(features), counts, species="human")
    assert by_name.report.by_id == 100 and by_name.gene_ids.tolist() == genes.gene_ids.tolist()


def test_mouse_brain_h5_maps_ids_and_its_symbols_agree() -> None:
    features, counts = read_10x_h5(MOUSE_BRAIN / "outs" / "raw_feature_bc_matrix.h5")
    genes = map_slide_genes(features, counts, species="mouse")
    assert (genes.report.n_features, genes.report.by_id, genes.report.n_genes, genes.report.conflicts) == (
        49,
        49,
        49,
        0,
    )
    assert genes.counts.dtype == np.int32
    assert_totals_exact(genes, counts)
    by_symbol = map_slide_genes(names_only(features), counts, species="mouse")
    assert by_symbol.report.by_approved == 49
    np.testing.assert_array_equal(mapped_ids(by_symbol), features.ids)


def test_mouse_brain_mtx_maps_ids_and_one_renamed_symbol_is_reported() -> None:
    folder = MOUSE_BRAIN / "outs" / "raw_feature_bc_matrix"
    counts = scipy.io.mmread(folder / "matrix.mtx").T.tocsr()
    rows = [line.rstrip("\n").split("\t") for line in (folder / "features.tsv").read_text().splitlines()]
    features = Features(ids=np.array([r[0] for r in rows]), names=np.array([r[1] for r in rows]))
    genes = map_slide_genes(features, counts, species="mouse")
    assert (genes.report.by_id, genes.report.n_genes) == (50, 50)
    assert_totals_exact(genes, counts)
    by_symbol = map_slide_genes(names_only(features), counts, species="mouse")
    report = by_symbol.report
    # 3110035E14Rik (mm10 name of ENSMUSG00000067879) is no longer an MGI or Ensembl name.
    assert (report.by_approved + report.by_ensembl_name, report.unmapped) == (49, 1)
    assert report.unmapped_examples[0]["name"] == "3110035E14Rik"
    assert report.counts_unmapped == counts[:, 25].sum() == pytest.approx(report.lost_fraction * report.total_counts)
    assert_totals_exact(by_symbol, counts)


def test_squidpy_h5ad_symbols_map_to_its_gene_ids() -> None:
    adata = anndata.read_h5ad(FULLRES / "test_data.h5ad")
    symbols = np.asarray(adata.var_names, dtype=str)
    truth = np.asarray(adata.var["gene_ids"], dtype=str)
    genes = map_slide_genes(Features(ids=np.full(symbols.size, "", dtype=str), names=symbols), adata.X, species="mouse")
    report = genes.report
    mapped = mapped_ids(genes)
    same = int(np.sum(mapped == truth))
    different = int(np.sum((mapped != "") & (mapped != truth)))
    assert (report.n_features, report.mapped, report.unmapped, report.ambiguous) == (1999, 1907, 92, 0)
    assert (same, different) == (1904, 3)  # the 3: MGI has moved the symbol to another gene since mm10
    assert report.by_approved == 1887 and report.by_ensembl_name == 20
    assert genes.counts.dtype == np.float32  # log-normalised in the fixture: dtype is kept
    # Totals of float data: the kept entries are the source entries, summed per spot in another order.
    source = sp.csr_matrix(adata.X)
    dropped = genes.feature_index < 0
    expected = np.asarray(source.sum(axis=1)).ravel() - np.asarray(source[:, dropped].sum(axis=1)).ravel()
    np.testing.assert_allclose(np.asarray(genes.counts.sum(axis=1)).ravel(), expected, rtol=1e-5)
    # With the ids the file carries, they win; where MGI disagrees with the symbol it is a conflict.
    by_id = map_slide_genes(Features(ids=truth, names=symbols), adata.X, species="mouse")
    assert by_id.report.by_id == 1982 and by_id.report.conflicts == 2
    assert {c["name"] for c in by_id.report.conflict_examples} == {"Ccdc121", "Pakap"}


# --- full real feature lists ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def grch38() -> Features:
    with gzip.open(FEATURE_LIST, "rt") as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle]
    assert len(rows) == 36601 and {r[2] for r in rows} == {"Gene Expression"}
    return Features(ids=np.array([r[0] for r in rows]), names=np.array([r[1] for r in rows]))


def empty_counts(n_features: int) -> sp.csr_matrix:
    return sp.csr_matrix((3, n_features), dtype=np.int32)


def test_grch38_2020a_maps_by_id(grch38: Features) -> None:
    genes = map_slide_genes(grch38, empty_counts(len(grch38)), species="human")
    report = genes.report
    assert report.by_id == 36399  # 99.45%: the other 202 ids were retired after Ensembl 98
    assert report.by_id / report.n_features >= 0.99
    assert report.id_fallback == 37  # retired ids recovered by their symbol
    assert report.unmapped_reasons == {"no_ensembl_id": 9, "unknown_id": 156}
    # 10x names one gene twice (TBCE, MATR3, ...): the id wins, the other gene is a conflict.
    assert report.conflicts == 16
    assert any(c["name"] == "TBCE" for c in report.conflict_examples)
    json.dumps(report.to_dict())  # JSON-ready


def symbol_only_agreement(genes: SlideGenes, truth: np.ndarray) -> tuple[float, float]:
    mapped = mapped_ids(genes)
    n = truth.size
    return float(np.sum(mapped == truth)) / n, float(np.sum((mapped != "") & (mapped != truth))) / n


def test_grch38_2020a_maps_by_symbol_only(grch38: Features) -> None:
    genes = map_slide_genes(names_only(grch38), empty_counts(len(grch38)), species="human")
    same, different = symbol_only_agreement(genes, grch38.ids)
    assert same >= 0.95 and different < 0.005
    mapped = mapped_ids(genes)
    current = np.array([i in load_reference("human") for i in grch38.ids.tolist()])
    assert int(np.sum(mapped == grch38.ids)) == 36377  # 99.39%
    # 53 (0.14%) land elsewhere: 37 whose Space Ranger id was retired go to the id HGNC now gives the
    # symbol; 16 are names 10x gives two genes (TBCE, MATR3, GGT1, ...) or that HGNC moved since.
    elsewhere = (mapped != "") & (mapped != grch38.ids)
    assert (int(np.sum(elsewhere & ~current)), int(np.sum(elsewhere & current))) == (37, 16)
    report = genes.report
    assert report.ambiguous == 3  # Ensembl names of two genes each, and no lower tier settles them
    assert report.by_make_unique == 0  # TBCE twice in the list: the name is known, never stripped


def test_grch38_2020a_symbols_without_the_10x_name_tier(grch38: Features) -> None:
    """Out of sample for the tables: the 10x names are one of their inputs, so measure without them."""
    tiers = [Tier.ENSEMBL, Tier.PREVIOUS, Tier.ALIAS]
    reference = GeneReference("human", read_table("human"), tiers=tiers)
    genes = map_slide_genes(
        names_only(grch38), empty_counts(len(grch38)), species="human", reference=reference, min_mapped_fraction=0
    )
    same, different = symbol_only_agreement(genes, grch38.ids)
    # Two thirds: Ensembl dropped the clone-based names (AL627309.1, ...) that 10x still uses.
    assert 0.63 < same < 0.67 and different < 0.005
    named = np.array(
        [not n.startswith(("AC0", "AC1", "AL", "AP0", "AF", "BX", "FP", "Z9", "Z8")) for n in grch38.names]
    )
    mapped = mapped_ids(genes)
    assert np.mean(mapped[named] == grch38.ids[named]) > 0.98  # names HGNC/Ensembl know map back


def mouse_features(column: str) -> tuple[Features, int]:
    """A mouse features list from the shipped table: every Ensembl gene with its name from ``column``."""
    rows = [r for r in read_table("mouse") if r[column]]
    names = np.array([r[column].split("|")[0] for r in rows])
    return Features(ids=np.array([r["key"] for r in rows]), names=names), len(rows)


def test_mouse_list_from_mgi_symbols() -> None:
    features, n = mouse_features("symbol")
    assert n == 56426  # every MGI marker with an Ensembl id
    by_id = map_slide_genes(features, empty_counts(n), species="mouse")
    assert by_id.report.by_id == n
    genes = map_slide_genes(names_only(features), empty_counts(n), species="mouse")
    same, different = symbol_only_agreement(genes, features.ids)
    assert same == 1.0 and different == 0.0


def test_mouse_list_with_ensembl_names_where_they_differ_from_mgi() -> None:
    """The names a Space Ranger reference built from an Ensembl GTF carries, mapped MGI-first."""
    rows = read_table("mouse")
    ids = np.array([r["key"] for r in rows])
    names = np.array([(r["ensembl"] or r["symbol"]).split("|")[0] for r in rows])
    keep = names != ""
    features = Features(ids=ids[keep], names=names[keep])
    genes = map_slide_genes(names_only(features), empty_counts(len(features)), species="mouse")
    same, different = symbol_only_agreement(genes, features.ids)
    assert same >= 0.995 and different < 0.005
    assert genes.report.by_ensembl_name > 300  # the renamed ones resolve through Ensembl's names


# --- behaviours -------------------------------------------------------------------------------------


def features_of(*pairs: tuple[str, str]) -> Features:
    return Features(ids=np.array([p[0] for p in pairs], dtype=str), names=np.array([p[1] for p in pairs], dtype=str))


def test_duplicates_summed_versions_stripped_and_unknown_counted() -> None:
    features = features_of(
        ("ENSG00000141510.17", "TP53"),
        ("", "TP53-1"),  # scanpy make_unique suffix: the full name is unknown, the base is TP53
        ("", "GAPDH"),
        ("", "gapdh"),  # case-insensitive, unique
        ("", "NOT-A-GENE"),
        ("", "ARHGEF19-AS1"),  # ambiguous
        ("ENSG00000002586.20_PAR_Y", ""),
    )
    counts = sp.csr_matrix(np.array([[1, 2, 3, 4, 5, 6, 7], [0, 1, 0, 1, 0, 1, 0]], dtype=np.int32))
    genes = map_slide_genes(features, counts, species="human")
    assert genes.gene_ids.tolist() == ["ENSG00000002586", "ENSG00000111640", "ENSG00000141510"]
    np.testing.assert_array_equal(genes.counts.toarray(), [[7, 7, 3], [0, 1, 1]])
    r = genes.report
    assert (r.by_id, r.by_approved, r.by_make_unique, r.by_case_insensitive) == (2, 2, 1, 1)
    assert (r.ambiguous, r.unmapped, r.merged) == (1, 1, 2)
    assert (r.counts_ambiguous, r.counts_unmapped, r.total_counts) == (7, 5, 31)
    assert r.lost_fraction == pytest.approx(12 / 31)
    assert genes.feature_index.tolist() == [2, 2, 1, 1, -1, -1, 0]


def test_bytes_fields_as_h5py_gives_them() -> None:
    with h5py.File(HEART / "filtered_feature_bc_matrix.h5", "r") as f:
        raw_ids = f["matrix/features/id"][:3]  # numpy bytes, not decoded
    assert raw_ids.dtype.kind == "S"
    features = Features(ids=raw_ids, names=np.array([b"", b"", b""]))
    genes = map_slide_genes(features, empty_counts(3), species="human")
    assert genes.gene_ids.tolist() == sorted(x.decode() for x in raw_ids.tolist())


def test_make_unique_suffix_only_when_the_full_symbol_is_unknown() -> None:
    features = features_of(("", "NKX2-1"), ("", "HLA-A"), ("", "TBCE-2"), ("", "ZZZNOTAGENE-1"))
    genes = map_slide_genes(features, empty_counts(4), species="human", min_mapped_fraction=0)
    r = genes.report
    assert (r.by_approved, r.by_make_unique, r.unmapped) == (2, 1, 1)
    assert mapped_ids(genes).tolist()[:3] == [
        load_reference("human").resolve("NKX2-1").key,
        load_reference("human").resolve("HLA-A").key,
        load_reference("human").resolve("TBCE").key,
    ]


def test_retired_id_falls_back_to_symbol_and_conflicts_keep_the_id() -> None:
    features = features_of(
        ("ENSG00000112096", "SOD2"),  # SOD2's Ensembl 98 id, not in the current tables
        ("ENSG00000285053", "TBCE"),  # a second TBCE id in GRCh38-2020-A: HGNC's TBCE is another gene
        ("ENSG00000999999", ""),  # unknown id, no name
    )
    genes = map_slide_genes(features, empty_counts(3), species="human", min_mapped_fraction=0)
    r = genes.report
    assert (r.by_id, r.by_approved, r.id_fallback, r.conflicts, r.unmapped) == (1, 1, 1, 1, 1)
    assert r.fallback_examples[0]["mapped_to"] == load_reference("human").resolve("SOD2").key
    assert r.conflict_examples[0] == {
        "index": 1,
        "id": "ENSG00000285053",
        "name": "TBCE",
        "name_maps_to": load_reference("human").resolve("TBCE").key,
    }
    assert "ENSG00000285053" in genes.gene_ids.tolist()
    assert r.unmapped_reasons == {"unknown_id": 1}


def test_wrong_species_ids_are_not_rescued_by_symbols_and_fail_the_slide() -> None:
    features, counts = read_10x_h5(MOUSE_BRAIN / "outs" / "raw_feature_bc_matrix.h5")
    with pytest.raises(GeneMappingError, match=r"0 of 49 features .*other_species") as error:
        map_slide_genes(features, counts, species="human", slide_id="mouse-as-human")
    assert error.value.slide_id == "mouse-as-human"
    assert error.value.reason.startswith("unmapped_genes: ")


def test_min_mapped_fraction_and_species_errors() -> None:
    features = features_of(("", "GAPDH"), ("", "X1"), ("", "X2"))
    with pytest.raises(GeneMappingError, match="1 of 3 features"):
        map_slide_genes(features, empty_counts(3), species="human")
    assert map_slide_genes(features, empty_counts(3), species="human", min_mapped_fraction=0.3).report.mapped == 1
    with pytest.raises(UnsupportedSpeciesError, match="rat"):
        map_slide_genes(features, empty_counts(3), species="rat")
    with pytest.raises(GeneMappingError, match="no feature"):
        map_slide_genes(features_of(), sp.csr_matrix((2, 0)), species="human")
    with pytest.raises(ValueError, match="3 columns"):
        map_slide_genes(features_of(("", "GAPDH")), empty_counts(3), species="human")


def test_panel_keeps_its_genes_and_counts_the_rest() -> None:
    features = features_of(("", "MT-CO1"), ("", "GAPDH"), ("", "MALAT1"), ("", "NOT-A-GENE"))
    counts = sp.csr_matrix(np.array([[1, 10, 100, 1000]], dtype=np.int64))
    genes = map_slide_genes(features, counts, species="human", panel="human-mt", min_mapped_fraction=0)
    assert genes.gene_ids.tolist() == [load_reference("human").resolve("MT-CO1").key]
    r = genes.report
    assert (r.outside_panel, r.counts_outside_panel, r.unmapped, r.counts_unmapped) == (2, 110, 1, 1000)
    assert r.mapped == 3 and r.panel == ("human-mt",)
    coding = map_slide_genes(features, counts, species="human", panel=["human-protein-coding"], min_mapped_fraction=0)
    assert coding.gene_ids.size == 2 and coding.report.counts_outside_panel == 100
    with pytest.raises(GeneMappingError, match="hold no human gene"):
        map_slide_genes(features, counts, species="human", panel="mouse-protein-coding")
    with pytest.raises(SettingsError):
        map_slide_genes(features, counts, species="human", panel="no-such-panel")


# --- property: totals are conserved exactly -----------------------------------------------------

# Features with the gene each must land on (None: not kept), drawn from the shipped human tables.
CATALOGUE: list[tuple[str, str, str | None]] = [
    ("ENSG00000111640", "GAPDH", "ENSG00000111640"),
    ("ENSG00000111640.15", "", "ENSG00000111640"),
    ("", "GAPDH", "ENSG00000111640"),
    ("", "gapdh", "ENSG00000111640"),
    ("", "GAPDH-1", "ENSG00000111640"),
    ("", "TP53", "ENSG00000141510"),
    ("ENSG00000141510.17", "TP53", "ENSG00000141510"),
    ("", "MRPS36", "ENSG00000134056"),
    ("", "KGD4", "ENSG00000134056"),
    ("", "AL627309.1", "ENSG00000238009"),
    ("", "ARHGEF19-AS1", None),  # ambiguous
    ("", "NOT-A-GENE", None),  # unknown
    ("ENSMUSG00000057666", "Gapdh", None),  # another species
    ("", "", None),  # empty
]


@st.composite
def slides(draw: st.DrawFn) -> tuple[list[int], sp.csr_matrix]:
    picks = draw(st.lists(st.integers(0, len(CATALOGUE) - 1), min_size=1, max_size=25))
    n_spots = draw(st.integers(0, 12))
    dtype = draw(st.sampled_from([np.int32, np.int64, np.uint16, np.float32, np.float64]))
    density = draw(st.floats(0.0, 1.0))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dense = rng.integers(1, 50, size=(n_spots, len(picks))) * (rng.random((n_spots, len(picks))) < density)
    # Quarters for float dtypes: sums of them are exact in binary floating point.
    values = dense / 4 if np.dtype(dtype).kind == "f" else dense
    return picks, sp.csr_matrix(values.astype(dtype))


@settings(max_examples=150, deadline=None)
@given(slides())
def test_totals_conserved_over_random_slides(slide: tuple[list[int], sp.csr_matrix]) -> None:
    picks, counts = slide
    features = features_of(*((CATALOGUE[i][0], CATALOGUE[i][1]) for i in picks))
    expected_ids = [CATALOGUE[i][2] for i in picks]
    genes = map_slide_genes(features, counts, species="human", min_mapped_fraction=0)
    assert genes.gene_ids.tolist() == sorted({e for e in expected_ids if e})
    assert mapped_ids(genes).tolist() == [e or "" for e in expected_ids]
    assert_totals_exact(genes, counts)
    # Each gene's column is the sum of its features' columns.
    dense = counts.toarray()
    for column, gene_id in enumerate(genes.gene_ids.tolist()):
        members = [i for i, e in enumerate(expected_ids) if e == gene_id]
        np.testing.assert_array_equal(genes.counts[:, column].toarray().ravel(), dense[:, members].sum(axis=1))
    r = genes.report
    assert r.mapped + r.ambiguous + r.unmapped == r.n_features == len(picks)
    assert r.total_counts - r.counts_lost == genes.counts.sum()
