"""``curate export``: a slide of a built corpus as .h5ad, read back with anndata and used by scanpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from stcorpus.curate.cli import main
from stcorpus.curate.errors import ExportError
from stcorpus.curate.export import export_slide
from tests.conftest import DemoCorpus
from tests.corpus_fixture import FixtureCorpus, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> FixtureCorpus:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def test_export_h5ad_round_trip(corpus: FixtureCorpus, tmp_path: Path) -> None:
    import anndata as ad

    target = tmp_path / "out" / "heart-b.h5ad"
    assert main(["export", str(corpus.root), "--slide", "heart-b", "--to", str(target)]) == 0
    back = ad.read_h5ad(target)
    written = sorted((s for s in corpus.by_key.values() if s.meta["slide_id"] == "heart-b"), key=lambda s: s.key)
    assert list(back.obs_names) == [s.key for s in written]
    assert len(written) == 30
    n_genes = len(corpus.genes)
    expected = np.zeros((len(written), n_genes), dtype=np.int64)
    for i, s in enumerate(written):
        expected[i, s.genes] = s.counts
    np.testing.assert_array_equal(back.X.toarray(), expected)
    assert list(back.var_names) == [g["ensembl_id"] for g in sorted(corpus.genes, key=lambda g: g["index"])]
    assert list(back.var["symbol"]) == [g["symbol"] or "" for g in sorted(corpus.genes, key=lambda g: g["index"])]
    um = np.array([[s.meta["x_um"], s.meta["y_um"]] for s in written])
    np.testing.assert_allclose(back.obsm["spatial_um"], um)
    mpp = back.uns["stcorpus"]["mpp"]
    np.testing.assert_allclose(back.obsm["spatial"] * mpp, um)
    assert back.uns["stcorpus"]["slide"]["slide_id"] == "heart-b"
    assert list(back.obs["array_row"]) == [s.meta["array_row"] for s in written]


def test_export_runs_in_scanpy(corpus: FixtureCorpus, tmp_path: Path) -> None:
    sc = pytest.importorskip("scanpy", reason="scanpy is in the dev extra")
    adata = export_slide(corpus.root, "mbrain-a", tmp_path / "m.h5ad")
    back = sc.read_h5ad(tmp_path / "m.h5ad")
    sc.pp.normalize_total(back, target_sum=1e4)
    totals = np.asarray(back.X.sum(axis=1)).ravel()
    nonzero = np.asarray(adata.X.sum(axis=1)).ravel() > 0
    np.testing.assert_allclose(totals[nonzero], 1e4, rtol=1e-4)


def test_export_names_missing_and_unbuilt_slides(corpus: FixtureCorpus, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no slide 'nope'"):
        export_slide(corpus.root, "nope", tmp_path / "x.h5ad")
    with pytest.raises(ExportError, match="status 'quarantined'"):
        export_slide(corpus.root, "heart-q", tmp_path / "x.h5ad")
    with pytest.raises(ExportError, match="unknown export format"):
        export_slide(corpus.root, "heart-a", tmp_path / "x.csv")


def test_export_zarr_round_trip(corpus: FixtureCorpus, tmp_path: Path) -> None:
    spatialdata = pytest.importorskip("spatialdata", reason="the spatialdata extra")
    from spatialdata.transformations import get_transformation

    target = tmp_path / "heart-b.zarr"
    assert main(["export", str(corpus.root), "--slide", "heart-b", "--to", str(target)]) == 0
    back = spatialdata.read_zarr(target)
    table = back.tables["table"]
    written = sorted((s for s in corpus.by_key.values() if s.meta["slide_id"] == "heart-b"), key=lambda s: s.key)
    assert list(table.obs_names) == [s.key for s in written]
    expected = np.zeros((len(written), len(corpus.genes)), dtype=np.int64)
    for i, s in enumerate(written):
        expected[i, s.genes] = s.counts
    np.testing.assert_array_equal(table.X.toarray(), expected)
    # The table annotates one circle per sample, in order, at its centre in um (55 um Visium spots).
    attrs = table.uns["spatialdata_attrs"]
    circles = back.shapes[attrs["region"]]
    assert circles.index.tolist() == table.obs[attrs["instance_key"]].tolist()
    um = np.array([[s.meta["x_um"], s.meta["y_um"]] for s in written])
    np.testing.assert_allclose(np.column_stack([circles.geometry.x, circles.geometry.y]), um)
    assert circles["radius"].unique().tolist() == [27.5]
    mpp = table.uns["stcorpus"]["mpp"]
    to_px = get_transformation(circles, "fullres").to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    px = np.column_stack([um, np.ones(len(um))]) @ np.asarray(to_px).T
    np.testing.assert_allclose(px[:, :2], um / mpp)
    # Writing again over the store replaces it; a folder that is not a store is left alone.
    export_slide(corpus.root, "heart-a", target)
    assert spatialdata.read_zarr(target).tables["table"].n_obs == 40
    plain = tmp_path / "plain.zarr"
    plain.mkdir()
    (plain / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a zarr store"):
        export_slide(corpus.root, "heart-a", plain)
    assert (plain / "keep.txt").read_text() == "mine"


def _demo_slide_rows(root: Path, slide_id: str) -> list[dict]:
    """The slide's rows as the Parquet shards hold them (read here with pyarrow, not through export), by key."""
    import pyarrow.parquet as pq

    from stcorpus import schema

    rows = []
    for shard in pq.read_table(root / schema.SHARDS_FILE).to_pylist():
        if shard["format"] == "parquet" and slide_id in shard["slide_ids"]:
            table = pq.read_table(
                root / shard["path"],
                columns=[schema.KEY_COLUMN, "slide_id", "genes", "counts", "x_um", "y_um", "patch"],
            )
            rows += [r for r in table.to_pylist() if r["slide_id"] == slide_id]
    return sorted(rows, key=lambda r: r[schema.KEY_COLUMN])


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_export_with_patches_of_a_real_demo_slide(demo_corpus: DemoCorpus, tmp_path: Path, suffix: str) -> None:
    """HER2ST-C2 of the real demo corpus, with its H&E patches: counts, positions and pixels as the shards hold them."""
    import io
    import json

    from PIL import Image

    from stcorpus import schema

    sc = pytest.importorskip("scanpy", reason="scanpy is in the dev extra")
    target = tmp_path / f"HER2ST-C2{suffix}"
    argv = ["export", str(demo_corpus.root), "--slide", "HER2ST-C2", "--to", str(target), "--with-patches"]
    assert main(argv) == 0
    if suffix == ".zarr":
        spatialdata = pytest.importorskip("spatialdata", reason="the spatialdata extra")
        back = spatialdata.read_zarr(target).tables["table"]
    else:
        import anndata as ad

        back = ad.read_h5ad(target)
    rows = _demo_slide_rows(demo_corpus.root, "HER2ST-C2")
    assert len(rows) > 100 and list(back.obs_names) == [r[schema.KEY_COLUMN] for r in rows]
    # The columns are the corpus's measured genes (not the references' ~128k), each with its vocabulary index.
    genes = pq.read_table(demo_corpus.root / schema.GENES_FILE, columns=["ensembl_id", "measured"]).to_pylist()
    measured = [i for i, g in enumerate(genes) if g["measured"]]
    assert back.var["index"].tolist() == measured and len(measured) < len(genes)
    assert list(back.var_names) == [genes[i]["ensembl_id"] for i in measured]
    expected = np.zeros((len(rows), back.n_vars), dtype=np.int64)
    for i, r in enumerate(rows):
        expected[i, np.searchsorted(measured, r["genes"])] = r["counts"]
    np.testing.assert_array_equal(back.X.toarray(), expected)
    np.testing.assert_array_equal(back.obsm["spatial_um"], [[r["x_um"], r["y_um"]] for r in rows])
    # The patches: n x H x W x 3 uint8, each the shard's own bytes decoded, at the corpus' patch view.
    view = schema.corpus_views(json.loads((demo_corpus.root / schema.CORPUS_FILE).read_text()))["patch"]
    patches = np.asarray(back.obsm["patch"])
    assert patches.dtype == np.uint8 and patches.shape == (len(rows), view.size_px, view.size_px, 3)
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(
            patches[i], np.asarray(Image.open(io.BytesIO(r["patch"]["bytes"])).convert("RGB"))
        )
    assert back.uns["stcorpus"]["patch_mpp"] == view.mpp == 0.5
    assert patches.std() > 10  # real H&E, not a blank
    # scanpy works on it as exported, with the micrometre positions as the neighbourhood.
    sc.pp.normalize_total(back, target_sum=1e4)
    sc.pp.log1p(back)
    sc.pp.neighbors(back, use_rep="spatial_um", n_neighbors=6)
    assert back.obsp["connectivities"].shape == (len(rows), len(rows)) and back.obsp["connectivities"].nnz > 0


def test_export_without_patches_has_none(demo_corpus: DemoCorpus, tmp_path: Path) -> None:
    import anndata as ad

    assert main(["export", str(demo_corpus.root), "--slide", "HER2ST-C2", "--to", str(tmp_path / "c2.h5ad")]) == 0
    back = ad.read_h5ad(tmp_path / "c2.h5ad")
    assert "patch" not in back.obsm and "patch_mpp" not in back.uns["stcorpus"]
    assert set(back.obsm) == {"spatial", "spatial_um"}
