"""The spatialdata reader: a real Visium fixture through spatialdata-io into a SpatialData store, read back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stcorpus.curate.errors import CorruptSourceError, SourceMissingError
from stcorpus.curate.readers import check_sample, read_slide
from stcorpus.curate.slide import Slide
from tests.test_readers_support import HEART, files_of, make_sample

spatialdata_io = pytest.importorskip("spatialdata_io", reason="the spatialdata extra")


@pytest.fixture(scope="module")
def heart_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Space Ranger 1.0 heart subset as spatialdata-io's Visium reader makes it, written to zarr."""
    store = tmp_path_factory.mktemp("sdata") / "heart.zarr"
    spatialdata_io.visium(HEART, dataset_id="heart").write(store)
    return store


def _native() -> Slide:
    sample = make_sample({"matrix": HEART / "filtered_feature_bc_matrix.h5", "spatial": HEART / "spatial"})
    return read_slide(sample, files_of(sample))


def _from_store(store: Path, **reader: object) -> Slide:
    sample = make_sample({"store": store}, technology="spatialdata", reader=reader)
    assert check_sample(sample) == []
    return read_slide(sample, files_of(sample))


def test_store_gives_the_native_readers_samples(heart_store: Path) -> None:
    native, ours = _native(), _from_store(heart_store)
    assert ours.spots.barcode.tolist() == native.spots.barcode.tolist()
    assert (ours.counts != native.counts).nnz == 0
    assert ours.counts.dtype == native.counts.dtype
    assert ours.features.ids.tolist() == native.features.ids.tolist()
    np.testing.assert_array_equal(ours.spots.in_tissue, native.spots.in_tissue)
    np.testing.assert_array_equal(ours.spots.array_row, native.spots.array_row)
    np.testing.assert_array_equal(ours.spots.array_col, native.spots.array_col)
    # Both fall back past the blank hires placeholder to the lowres image; the store keeps its scale as float32.
    assert (ours.image.width, ours.image.height) == (native.image.width, native.image.height) == (600, 600)
    np.testing.assert_allclose(ours.spots.x_px, native.spots.x_px, rtol=1e-6)
    np.testing.assert_allclose(ours.spots.y_px, native.spots.y_px, rtol=1e-6)
    np.testing.assert_allclose(ours.mpp, native.mpp, rtol=1e-6)
    assert ours.mpp_source == "spot_radius"
    np.testing.assert_array_equal(
        ours.image.read_region(level=0, x=100, y=200, width=32, height=16),
        native.image.read_region(level=0, x=100, y=200, width=32, height=16),
    )


def _built_rows(manifest_entry: str, folder: Path) -> list[dict[str, Any]]:
    """``curate build`` of one slide (coarse tiles: the fixture's image is 16 um/px); its Parquet rows by key."""
    import pyarrow.parquet as pq

    from stcorpus import schema
    from stcorpus.curate.cli import main
    from tests.build_fixtures import manifest

    out = folder / "corpus"
    argv = ["build", str(manifest(folder, [manifest_entry])), "--out", str(out), "--no-progress", "--holdout", "none"]
    # 32 px at 16 um/px: the lowres image's own scale (the hires image is a blank placeholder)
    assert main([*argv, "--max-mpp", "20", "--patch-mpp", "16", "--patch-size", "32", "--no-regions"]) == 0
    rows: list[dict[str, Any]] = []
    for shard in pq.read_table(out / schema.SHARDS_FILE).to_pylist():
        if shard["format"] == "parquet":
            rows += pq.read_table(out / shard["path"]).to_pylist()
    return sorted(rows, key=lambda r: r[schema.KEY_COLUMN])


def test_store_builds_the_native_readers_corpus(heart_store: Path, tmp_path: Path) -> None:
    """The same real slide built from its SpatialData store and from its Space Ranger files: the same shards."""
    from stcorpus import schema
    from tests.build_fixtures import spaceranger_entry
    from tests.test_tiles import decode

    native = _built_rows(
        spaceranger_entry("HEART", matrix=HEART / "filtered_feature_bc_matrix.h5", spatial=HEART / "spatial"),
        tmp_path / "native",
    )
    entry = "\n".join(
        [
            "- id: HEART",
            "  technology: spatialdata",
            "  assay: visium",
            "  species: human",
            f"  sources: {{store: '{heart_store}'}}",
        ]
    )
    ours = _built_rows(entry, tmp_path / "store")
    assert len(native) == 100  # every spot of the real subset is in tissue with counts
    assert [r[schema.KEY_COLUMN] for r in ours] == [r[schema.KEY_COLUMN] for r in native]
    for a, b in zip(ours, native, strict=True):
        assert a["barcode"] == b["barcode"]
        assert (a["genes"], a["counts"]) == (b["genes"], b["counts"])
        assert (a["niche_genes"], a["niche_counts"], a["neighbors"]) == (
            b["niche_genes"],
            b["niche_counts"],
            b["neighbors"],
        )
        assert (a["array_row"], a["array_col"]) == (b["array_row"], b["array_col"])
        assert abs(a["x_um"] - b["x_um"]) <= 1e-6 and abs(a["y_um"] - b["y_um"]) <= 1e-6
        pixels, expected = decode(a["patch"]["bytes"]).astype(float), decode(b["patch"]["bytes"]).astype(float)
        assert pixels.shape == expected.shape == (32, 32, 3) and pixels.std() > 0
        assert np.abs(pixels - expected).mean() <= 2.0, a[schema.KEY_COLUMN]
    assert {r["technology"] for r in ours} == {"spatialdata"} and {r["technology"] for r in native} == {"spaceranger"}


def test_named_image_and_manifest_mpp(heart_store: Path) -> None:
    hires = _from_store(heart_store, image="heart_hires_image")
    assert (hires.image.width, hires.image.height) == (2000, 2000)
    native = _native()
    # hires is 0.150015 of full resolution, lowres 0.045004502: positions scale by their ratio
    np.testing.assert_allclose(hires.spots.x_px, native.spots.x_px * 0.150015 / 0.045004502, rtol=1e-6)
    sample = make_sample({"store": heart_store}, technology="spatialdata", mpp=2.0)
    assert read_slide(sample, files_of(sample)).mpp_source == "manifest"


def test_errors_name_the_option(heart_store: Path) -> None:
    with pytest.raises(SourceMissingError, match=r"no image 'nope'.*heart_hires_image"):
        _from_store(heart_store, image="nope")
    with pytest.raises(SourceMissingError, match=r"no table 'nope' \(reader option table\)"):
        _from_store(heart_store, table="nope")
    with pytest.raises(SourceMissingError, match="micron_coordinate_system"):
        _from_store(heart_store, micron_coordinate_system="global")
    with pytest.raises(CorruptSourceError, match="not a readable SpatialData"):
        _from_store(HEART / "spatial")


def test_polygons_layer_and_a_micron_system(tmp_path: Path) -> None:
    """Cell polygons in um, an H&E at 0.5 um/px shifted by an affine, raw counts in a layer."""
    import anndata as ad
    import pandas as pd  # type: ignore[import-untyped]
    import scipy.sparse as sp
    from geopandas import GeoDataFrame
    from shapely.geometry import Polygon
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Affine, Identity

    rng = np.random.default_rng(3)
    centres = rng.uniform(20, 80, size=(6, 2))  # um
    polygons = [Polygon([(x - 3, y - 3), (x + 3, y - 3), (x + 3, y + 3), (x - 3, y + 3)]) for x, y in centres]
    cells = ShapesModel.parse(
        GeoDataFrame({"geometry": polygons}, index=pd.Index([f"c{i}" for i in range(6)], name="cell_id")),
        transformations={"global": Identity()},
    )
    pixels = rng.integers(0, 255, size=(3, 240, 220), dtype=np.uint8)  # not blank
    # H&E pixels -> um: 0.5 um/px, shifted by (-5, 4) um
    to_um = Affine(np.array([[0.5, 0, -5.0], [0, 0.5, 4.0], [0, 0, 1]]), input_axes=("x", "y"), output_axes=("x", "y"))
    image = Image2DModel.parse(pixels, dims=("c", "y", "x"), transformations={"global": to_um})
    raw = sp.csr_matrix(rng.poisson(2.0, size=(6, 4)).astype(np.float32))
    table = ad.AnnData(
        X=raw.multiply(1 / (raw.sum(axis=1) + 1)).tocsr(),  # normalised X; raw counts in a layer
        layers={"counts": raw},
        obs=pd.DataFrame(
            {"cell_id": [f"c{i}" for i in range(6)][::-1], "region": "cells"}, index=[f"b{i}" for i in range(6)]
        ),
        var=pd.DataFrame(index=["ENSG00000243485", "ENSG00000237613", "GAPDH", "ACTB"]),
    )
    table.obs["region"] = table.obs["region"].astype("category")
    table = TableModel.parse(table, region="cells", region_key="region", instance_key="cell_id")
    store = tmp_path / "cells.zarr"
    SpatialData(images={"he": image}, shapes={"cells": cells}, tables={"table": table}).write(store)

    sample = make_sample(
        {"store": store},
        technology="spatialdata",
        assay="xenium",
        reader={"layer": "counts", "micron_coordinate_system": "global"},
    )
    slide = read_slide(sample, files_of(sample))
    order = [5 - i for i in range(6)]  # table row i is cell c(5 - i)
    np.testing.assert_allclose(slide.spots.x_px, (centres[order, 0] + 5.0) / 0.5, atol=1e-9)
    np.testing.assert_allclose(slide.spots.y_px, (centres[order, 1] - 4.0) / 0.5, atol=1e-9)
    assert slide.mpp == pytest.approx(0.5) and slide.mpp_source == "metadata"
    np.testing.assert_array_equal(slide.counts.toarray(), raw.toarray().astype(np.int32))
    assert slide.features.ids.tolist() == ["ENSG00000243485", "ENSG00000237613", "", ""]
    assert slide.lattice == "cells"
    with pytest.raises(SourceMissingError, match="no layer 'spliced'"):
        read_slide(
            make_sample({"store": store}, technology="spatialdata", assay="xenium", reader={"layer": "spliced"}),
            {"store": store},
        )


def test_points_element_sites(tmp_path: Path) -> None:
    """Bead centres as a points element (no radius), an H&E at 2 um/px: positions join the table by point index."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, PointsModel, TableModel
    from spatialdata.transformations import Identity, Scale

    rng = np.random.default_rng(5)
    centres = rng.uniform(10, 90, size=(5, 2))  # um
    ids = [f"p{i}" for i in range(5)]
    frame = pd.DataFrame({"x": centres[:, 0], "y": centres[:, 1]}, index=pd.Index(ids, name="bead"))
    beads = PointsModel.parse(frame, coordinates={"x": "x", "y": "y"}, transformations={"global": Identity()})
    pixels = rng.integers(0, 255, size=(3, 60, 50), dtype=np.uint8)
    image = Image2DModel.parse(pixels, dims=("c", "y", "x"), transformations={"global": Scale([2.0, 2.0], ("x", "y"))})
    raw = sp.csr_matrix(rng.poisson(3.0, size=(5, 3)).astype(np.int32))
    order = [3, 0, 4, 1, 2]  # table row i is bead p(order[i])
    table = ad.AnnData(
        X=raw,
        obs=pd.DataFrame({"bead": [ids[j] for j in order], "region": "beads"}, index=[f"b{i}" for i in range(5)]),
        var=pd.DataFrame(index=["ENSG00000243485", "GAPDH", "ACTB"]),
    )
    table.obs["region"] = table.obs["region"].astype("category")
    table = TableModel.parse(table, region="beads", region_key="region", instance_key="bead")
    store = tmp_path / "beads.zarr"
    SpatialData(images={"he": image}, points={"beads": beads}, tables={"table": table}).write(store)

    sample = make_sample(
        {"store": store}, technology="spatialdata", assay="xenium", reader={"micron_coordinate_system": "global"}
    )
    slide = read_slide(sample, files_of(sample))
    assert slide.spots.barcode.tolist() == [f"b{i}" for i in range(5)]
    np.testing.assert_allclose(slide.spots.x_px, centres[order, 0] / 2.0, atol=1e-9)
    np.testing.assert_allclose(slide.spots.y_px, centres[order, 1] / 2.0, atol=1e-9)
    assert slide.mpp == pytest.approx(2.0) and slide.mpp_source == "metadata"
    np.testing.assert_array_equal(slide.counts.toarray(), raw.toarray())
    # A table naming a region that is no element of the store is refused with the elements it has.
    table.uns["spatialdata_attrs"]["region"] = "missing"
    table.obs["region"] = pd.Categorical(["missing"] * 5)
    bad = tmp_path / "bad.zarr"
    SpatialData(images={"he": image}, points={"beads": beads}, tables={"table": table}).write(bad)
    with pytest.raises(CorruptSourceError, match=r"'missing'.*points: beads"):
        read_slide(make_sample({"store": bad}, technology="spatialdata", assay="xenium"), {"store": bad})
