"""The spatialdata reader: a real Visium fixture through spatialdata-io into a SpatialData store, read back."""

from __future__ import annotations

from pathlib import Path

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
