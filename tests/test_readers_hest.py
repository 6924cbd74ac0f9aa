"""HEST reader on squidpy's real full-resolution crop, laid out as a HEST-1k sample at test time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import tifffile
from PIL import Image

from stcorpus.curate.errors import CorruptSourceError, NonIntegerCountsError, ScaleMismatchError, UnsupportedAssayError
from stcorpus.curate.qc import QCSettings, check_slide
from stcorpus.curate.readers import read_slide
from stcorpus.curate.slide import Slide, SpotDrop
from tests.test_readers_support import FULLRES, HEST_TENX52_MPP, expected, files_of, make_sample, write_pyramid

H5AD = FULLRES / "test_data.h5ad"
SPOT_DIAMETER = expected(FULLRES)["h5ad"]["scalefactors"]["spot_diameter_fullres"]


def _hest_sample(
    tmp_path: Path,
    *,
    mpp: float | None = HEST_TENX52_MPP,
    counts: str = "normalized",
    h5ad: Path = H5AD,
    metadata: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Path]]:
    """``st/``, ``wsis/`` and ``metadata/`` of a HEST sample made from the squidpy crop."""
    for folder in ("st", "wsis", "metadata"):
        (tmp_path / folder).mkdir(exist_ok=True)
    st = tmp_path / "st" / "SQUIDPY1.h5ad"
    shutil.copy(h5ad, st)
    wsi = tmp_path / "wsis" / "SQUIDPY1.tif"
    if not wsi.exists():
        pixels = np.asarray(Image.open(FULLRES / "test_img.jpg").convert("RGB"))
        # HEST's TIFF resolution tags are off by 10x: write tags that claim 10x finer pixels.
        write_pyramid(wsi, pixels, resolution_um=HEST_TENX52_MPP / 10)
    sources = {"st": st, "wsi": wsi}
    if mpp is not None or metadata is not None:
        meta = {
            "id": "SQUIDPY1",
            "st_technology": "Visium",
            "inter_spot_dist": 100.0,
            "spot_diameter": 55.0,
            "spots_under_tissue": 49,
            "pixel_size_um_embedded": HEST_TENX52_MPP / 10,
            "fullres_px_width": 950,
            "fullres_px_height": 1717,
            "species": "Mus musculus",
        }
        if mpp is not None:
            meta["pixel_size_um_estimated"] = mpp
        meta.update(metadata or {})
        path = tmp_path / "metadata" / "SQUIDPY1.json"
        path.write_text(json.dumps(meta))
        sources["metadata"] = path
    sample = make_sample(
        sources, technology="hest", assay="visium", counts=counts, species="mouse", sample_id="SQUIDPY1"
    )
    return sample, files_of(sample)


def _read(tmp_path: Path, **kwargs: Any) -> Slide:
    sample, files = _hest_sample(tmp_path, **kwargs)
    return read_slide(sample, files)


def test_spots_land_on_tissue_and_mpp_comes_from_metadata(tmp_path: Path) -> None:
    slide = _read(tmp_path)
    facts = expected(FULLRES)
    adata = anndata.read_h5ad(H5AD)
    assert len(slide.spots) == facts["h5ad"]["n_obs"]
    assert slide.counts.shape == (facts["h5ad"]["n_obs"], facts["h5ad"]["n_vars"])
    assert (slide.image.width, slide.image.height) == (facts["image"]["width"], facts["image"]["height"])
    assert len(slide.image.levels) >= 3  # a real pyramid
    # obsm['spatial'] is (x, y): x is the column of the 950-wide image, y the row of the 1717-high one
    np.testing.assert_array_equal(slide.spots.x_px, adata.obsm["spatial"][:, 0])
    np.testing.assert_array_equal(slide.spots.y_px, adata.obsm["spatial"][:, 1])
    assert [slide.spots.x_px.min(), slide.spots.x_px.max()] == facts["h5ad"]["x_range"]
    assert slide.spots.y_px.max() > slide.image.width  # so swapped axes could not pass

    # H&E tissue is purple (red above green), the slide background grey: measure under every spot.
    def redness(x: int, y: int) -> float:
        window = slide.image.read_region(level=0, x=x - 8, y=y - 8, width=16, height=16).astype(np.int64)
        return float((window[..., 0] - window[..., 1]).mean())

    background = slide.image.read_region(level=0, x=0, y=700, width=60, height=1000).astype(np.int64)
    assert float((background[..., 0] - background[..., 1]).mean()) < 3.0
    under_spots = [redness(int(x), int(y)) for x, y in zip(slide.spots.x_px, slide.spots.y_px, strict=True)]
    assert min(under_spots) > 10.0

    # um/px from the metadata, never from the TIFF tags (which claim 10x finer pixels)
    assert slide.mpp == HEST_TENX52_MPP
    assert slide.mpp_source == "metadata"
    with tifffile.TiffFile(slide.image.path) as tif:
        x_resolution = tif.pages.first.tags["XResolution"].value
    tag_mpp = 1e4 * x_resolution[1] / x_resolution[0]
    assert tag_mpp == pytest.approx(HEST_TENX52_MPP / 10, rel=1e-3)


def test_normalised_counts_are_kept_as_float_only_when_declared(tmp_path: Path) -> None:
    slide = _read(tmp_path)
    assert slide.counts.dtype == np.float32
    assert any("counts: normalized" in note for note in slide.notes)
    with pytest.raises(NonIntegerCountsError, match=r"SQUIDPY1\.h5ad: .* not whole non-negative numbers"):
        _read(tmp_path, counts="raw")


def test_missing_array_coordinates_are_derived_on_the_hex_lattice(tmp_path: Path) -> None:
    slide = _read(tmp_path)
    assert any("array coordinates derived from the pixel lattice" in note for note in slide.notes)
    row, col = slide.spots.array_row.astype(int), slide.spots.array_col.astype(int)
    assert ((row + col) % 2 == 0).all()  # Space Ranger's parity
    xy = np.column_stack([slide.spots.x_px, slide.spots.y_px])
    distance = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    close = np.argwhere((distance > 100) & (distance < 175))  # centre spacing is 137.5 px
    offsets = {(int(row[j] - row[i]), int(col[j] - col[i])) for i, j in close}
    assert offsets <= {(0, 2), (0, -2), (1, 1), (1, -1), (-1, 1), (-1, -1)}
    assert len(close) > 50


def test_lattice_agrees_with_hest_mpp_of_the_source_slide(tmp_path: Path) -> None:
    # The crop comes from V1_Adult_Mouse_Brain (HEST TENX52, 0.7267 um/px). Its 137.5 px spot spacing
    # is 100 um at that scale: the lattice agrees and nothing is flagged.
    slide = check_slide(_read(tmp_path))
    check = next(c for c in slide.qc if c.name == "mpp_lattice_agreement")
    assert check.passed
    assert isinstance(check.value, float) and check.value < 0.01
    assert slide.flags == []


def test_the_55_um_reading_of_spot_diameter_is_flagged(tmp_path: Path) -> None:
    # squidpy's fixture notes say ~0.615 um/px (55 / spot_diameter_fullres) and call the 137.5 px lattice
    # "rescaled". Space Ranger's spot_diameter_fullres spans 65 um, not 55: at 0.615 um/px the lattice pitch
    # would be 162.6 px. QC must flag that disagreement, never choose silently.
    naive = 55.0 / SPOT_DIAMETER
    slide = check_slide(_read(tmp_path, mpp=naive))
    check = next(c for c in slide.qc if c.name == "mpp_lattice_agreement")
    assert not check.passed and not check.blocking
    assert slide.flags == ["mpp_lattice_agreement"]
    assert check.value == pytest.approx((65.0 - 55.0) / 65.0, abs=0.01)
    with pytest.raises(ScaleMismatchError, match=r"0\.6149 um/px \(metadata\) vs 0\.72\d\d um/px from the hex lattice"):
        check_slide(_read(tmp_path, mpp=naive), settings=QCSettings(scale_mismatch_blocking=True))


def test_without_metadata_the_scale_comes_from_the_lattice(tmp_path: Path) -> None:
    slide = _read(tmp_path, mpp=None)
    assert "metadata" not in files_of(slide.sample)
    assert slide.mpp_source == "lattice"
    assert slide.mpp == pytest.approx(HEST_TENX52_MPP, rel=0.01)
    assert slide.mpp == pytest.approx(65.0 / SPOT_DIAMETER, rel=0.01)


def test_manifest_mpp_wins_over_metadata(tmp_path: Path) -> None:
    sample, files = _hest_sample(tmp_path)
    sample = make_sample(files, technology="hest", counts="normalized", mpp=0.7, species="mouse")
    slide = read_slide(sample, files)
    assert (slide.mpp, slide.mpp_source) == (0.7, "manifest")


def test_ensembl_var_names_and_feature_types(tmp_path: Path) -> None:
    adata = anndata.read_h5ad(H5AD)
    symbols = adata.var_names.to_numpy().astype(str)
    adata.var_names = adata.var["gene_ids"].to_numpy().astype(str)
    adata.var = adata.var.drop(columns=["gene_ids"])
    adata.var["feature_types"] = ["Gene Expression"] * (adata.n_vars - 2) + ["Antibody Capture"] * 2
    adata.obs["array_row"] = 0
    adata.obs["array_col"] = np.arange(adata.n_obs) * 2
    path = tmp_path / "ensembl.h5ad"
    adata.write_h5ad(path)
    slide = _read(tmp_path, h5ad=path)
    assert slide.features.ids[0].startswith("ENSMUSG")
    assert slide.features.names[0] == ""
    assert slide.dropped_features == 2
    assert slide.counts.shape[1] == len(symbols) - 2
    # given array coordinates are used as they are
    assert slide.spots.array_col.tolist() == (np.arange(49) * 2).tolist()
    assert not any("derived" in note for note in slide.notes)


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_spots_without_a_centre_and_repeated_obs_names_are_counted_and_dropped(tmp_path: Path) -> None:
    adata = anndata.read_h5ad(H5AD)
    names = adata.obs_names.to_numpy().astype(str).copy()
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64).copy()
    xy[3, 0], xy[10, 1] = np.nan, np.inf
    names[20] = names[19]  # listed twice: the second row goes
    adata.obs_names = names
    adata.obsm["spatial"] = xy
    path = tmp_path / "faulty.h5ad"
    adata.write_h5ad(path)
    slide = _read(tmp_path, h5ad=path)
    assert slide.dropped_spots == {SpotDrop.NAN_COORDINATES: 2, SpotDrop.DUPLICATE_BARCODE: 1}
    assert len(slide.spots) == slide.counts.shape[0] == 49 - 3
    assert np.isfinite(slide.spots.x_px).all() and np.isfinite(slide.spots.y_px).all()
    reference = anndata.read_h5ad(H5AD)
    kept = [i for i in range(49) if i not in (3, 10, 20)]
    np.testing.assert_array_equal(slide.spots.x_px, np.asarray(reference.obsm["spatial"])[kept, 0])
    assert (slide.counts != sp.csr_matrix(reference.X)[kept]).nnz == 0
    assert any("NaN or infinite centre" in note for note in slide.notes)
    assert _read(tmp_path).dropped_spots == {}

    xy[:] = np.nan
    adata.obsm["spatial"] = xy
    adata.write_h5ad(path)
    with pytest.raises(CorruptSourceError, match=r"SQUIDPY1\.h5ad: every spot's centre is NaN or infinite"):
        _read(tmp_path, h5ad=path)


def test_an_assay_without_a_geometry_is_refused_not_guessed(tmp_path: Path) -> None:
    _, files = _hest_sample(tmp_path)
    odd = make_sample(files, technology="hest", assay="slide-seq", counts="normalized", species="mouse")
    with pytest.raises(UnsupportedAssayError, match=r"assay 'slide-seq' has no spot geometry on record \(known: st, "):
        read_slide(odd, files)
    # Visium HD bins: HEST's metadata states their size; without it nothing does
    no_metadata = {name: path for name, path in files.items() if name != "metadata"}
    bins = make_sample(no_metadata, technology="hest", assay="visium-hd", counts="normalized", species="mouse", mpp=0.7)
    with pytest.raises(UnsupportedAssayError, match=r"square bins .* name the sample's `metadata` source"):
        read_slide(bins, no_metadata)
    # HEST's Xenium samples are square pseudo-spots of 100 um (hest's xenium_to_pseudo_visium)
    xenium = make_sample(files, technology="hest", assay="xenium", counts="normalized", species="mouse")
    slide = read_slide(xenium, files)
    assert (slide.lattice, slide.pitch_um) == ("square", 100.0)
    assert any("pseudo-spots" in note for note in slide.notes)
