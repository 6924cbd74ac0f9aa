"""Slide QC: every check on small crafted slides, each failure with its message."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import tifffile
from PIL import Image

from stcorpus.curate.errors import (
    BarcodeMismatchError,
    BlankImageError,
    CorruptSourceError,
    ImageTooCoarseError,
    NoSpotsError,
    ScaleMismatchError,
    SettingsError,
    SpotsOutsideImageError,
)
from stcorpus.curate.imaging import open_image
from stcorpus.curate.qc import QCSettings, blank_reason, check_slide, image_blank_reason, match_barcodes, summary
from stcorpus.curate.slide import Features, QCCheck, Slide, Spots
from tests.test_readers_support import make_sample

N_GENES = 20


def _lattice_spots(mpp: float, *, rows: int = 6, cols: int = 12, origin: float = 150.0) -> tuple[np.ndarray, ...]:
    """Visium hex lattice spots (100 um pitch) at ``mpp`` um/px."""
    pitch = 100.0 / mpp
    grid = [(r, c) for r in range(rows) for c in range(cols) if (r + c) % 2 == 0]
    row = np.array([r for r, _ in grid], dtype=np.int32)
    col = np.array([c for _, c in grid], dtype=np.int32)
    x = origin + col * pitch / 2
    y = origin + row * pitch * math.sqrt(3) / 2
    return row, col, x, y


def _slide(
    tmp_path: Path,
    *,
    mpp: float = 0.5,
    lattice_mpp: float | None = None,
    pixels: np.ndarray | None = None,
    in_tissue: np.ndarray | None = None,
    counts: np.ndarray | None = None,
    shift_x: np.ndarray | None = None,
) -> Slide:
    row, col, x, y = _lattice_spots(lattice_mpp or mpp)
    n = row.shape[0]
    if pixels is None:
        height, width = int(y.max() + 150), int(x.max() + 150)
        pixels = np.full((height, width, 3), 240, dtype=np.uint8)
        pixels[::3, ::5] = (150, 80, 160)  # something that is not one colour
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    rng = np.random.default_rng(0)
    matrix = counts if counts is not None else rng.poisson(2.0, size=(n, N_GENES)) + np.eye(n, N_GENES, dtype=np.int64)
    return Slide(
        sample=make_sample({"image": path}),
        counts=sp.csr_matrix(matrix.astype(np.int32)),
        features=Features(ids=np.array([f"ENSG{i:011d}" for i in range(N_GENES)]), names=np.full(N_GENES, "")),
        spots=Spots(
            barcode=np.array([f"B{i}-1" for i in range(n)]),
            in_tissue=in_tissue if in_tissue is not None else np.ones(n, dtype=bool),
            array_row=row,
            array_col=col,
            x_px=x + (shift_x if shift_x is not None else 0.0),
            y_px=y,
        ),
        image=open_image(path),
        mpp=mpp,
        mpp_source="metadata",
    )


def _check(slide: Slide, name: str) -> QCCheck:
    return next(c for c in slide.qc if c.name == name)


def test_a_good_slide_passes_every_check(tmp_path: Path) -> None:
    slide = check_slide(_slide(tmp_path))
    names = [c.name for c in slide.qc]
    assert names == [
        "in_tissue_spots",
        "spots_with_counts",
        "zero_count_spots",
        "total_counts_median",
        "genes_detected_median",
        "image_not_blank",
        "image_mpp",
        "spots_outside_image",
        "mpp_lattice_agreement",
    ]
    assert all(c.passed for c in slide.qc)
    assert slide.flags == []
    agreement = _check(slide, "mpp_lattice_agreement").value
    assert isinstance(agreement, float) and agreement < 1e-9
    assert _check(slide, "in_tissue_spots").value == len(slide.spots)
    # checking again replaces the records instead of piling them up
    assert len(check_slide(slide).qc) == len(names)
    assert "mpp_lattice_agreement: " in summary(slide) and "(PASS)" in summary(slide)


def test_blank_single_colour_image(tmp_path: Path) -> None:
    white = np.full((1000, 1500, 3), 255, dtype=np.uint8)
    slide = _slide(tmp_path, pixels=white)
    with pytest.raises(BlankImageError, match=r"image image.png \(1500x1000\) is a single colour \(255, 255, 255\)"):
        check_slide(slide)
    assert not _check(slide, "image_not_blank").passed
    # every other check was still recorded
    assert _check(slide, "mpp_lattice_agreement").passed


def test_fully_transparent_image(tmp_path: Path) -> None:
    clear = np.zeros((1000, 1500, 4), dtype=np.uint8)
    clear[..., :3] = np.random.default_rng(1).integers(0, 255, size=(1000, 1500, 3))
    slide = _slide(tmp_path, pixels=clear)
    with pytest.raises(BlankImageError, match=r"fully transparent \(alpha 0 everywhere\)"):
        check_slide(slide)


def test_spots_outside_the_image(tmp_path: Path) -> None:
    row, *_ = _lattice_spots(0.5)
    shift = np.zeros(row.shape[0])
    shift[:6] = 5000.0  # 6 of 36 spots pushed off the right edge
    slide = _slide(tmp_path, shift_x=shift)
    with pytest.raises(
        SpotsOutsideImageError, match=r"6 of 36 in-tissue spot centres \(16\.7%, more than the 5% allowed\)"
    ):
        check_slide(slide)
    # one spot outside is within the allowed fraction: counted, not fatal (and the lattice fit shrugs it off)
    shift[1:] = 0.0
    slide = check_slide(_slide(tmp_path, shift_x=shift))
    assert _check(slide, "spots_outside_image").value == 1
    assert _check(slide, "mpp_lattice_agreement").passed


def test_image_too_coarse_for_half_micron_tiles(tmp_path: Path) -> None:
    slide = _slide(tmp_path, mpp=2.0)
    with pytest.raises(
        ImageTooCoarseError, match=r"image.png is 2 um/px \(metadata\), coarser than the 1 um/px needed"
    ):
        check_slide(slide)
    assert check_slide(_slide(tmp_path, mpp=2.0), settings=QCSettings(max_mpp=2.5)).flags == []


def test_scale_mismatch_is_flagged_or_blocking(tmp_path: Path) -> None:
    # metadata says 0.5 um/px, the spot lattice says 0.6: 16.7% apart
    slide = check_slide(_slide(tmp_path, mpp=0.5, lattice_mpp=0.6))
    assert slide.flags == ["mpp_lattice_agreement"]
    check = _check(slide, "mpp_lattice_agreement")
    assert check.value == pytest.approx(1 / 6)
    assert "more than the 10% allowed" in check.reason
    with pytest.raises(
        ScaleMismatchError,
        match=r"0\.5000 um/px \(metadata\) vs 0\.6000 um/px from the hex lattice "
        r"\(100 um pitch, 36/36 spots.*16\.7% apart",
    ):
        check_slide(_slide(tmp_path, mpp=0.5, lattice_mpp=0.6), settings=QCSettings(scale_mismatch_blocking=True))
    # within tolerance: passes
    assert check_slide(_slide(tmp_path, mpp=0.5, lattice_mpp=0.52)).flags == []


def test_no_spot_in_tissue_and_no_counts(tmp_path: Path) -> None:
    row, *_ = _lattice_spots(0.5)
    with pytest.raises(NoSpotsError, match=r"none of the 36 spots is flagged in tissue"):
        check_slide(_slide(tmp_path, in_tissue=np.zeros(row.shape[0], dtype=bool)))
    with pytest.raises(NoSpotsError, match=r"all 36 in-tissue spots have zero counts"):
        check_slide(_slide(tmp_path, counts=np.zeros((row.shape[0], N_GENES), dtype=np.int64)))
    some_empty = np.random.default_rng(2).poisson(2.0, size=(row.shape[0], N_GENES)) + 1
    some_empty[:4] = 0
    slide = check_slide(_slide(tmp_path, counts=some_empty))
    assert _check(slide, "zero_count_spots").value == 4


def test_blocking_failures_raise_in_order(tmp_path: Path) -> None:
    white = np.full((1000, 1500, 3), 255, dtype=np.uint8)
    with pytest.raises(BlankImageError):  # blank comes before too coarse
        check_slide(_slide(tmp_path, pixels=white, mpp=2.0))


def test_match_barcodes_counts_drops_and_refuses_disjoint_sets() -> None:
    matrix = np.array(["A-1", "B-1", "C-1", "D-1"])
    positions = np.array(["D-1", "C-1", "A-1", "Z-1"])
    rows, pos, check = match_barcodes(matrix, positions, slide_id="s")
    assert rows.tolist() == [0, 2, 3] and pos.tolist() == [2, 1, 0]
    assert check.value == 1 and "1 of 4 matrix barcodes have no row in positions: dropped" in check.reason
    with pytest.raises(BarcodeMismatchError, match=r"none of the 4 matrix barcodes has a row in positions \(2 rows\)"):
        match_barcodes(matrix, np.array(["X-1", "Y-1"]), slide_id="s")
    with pytest.raises(CorruptSourceError, match=r"1 barcode\(s\) appear more than once"):
        match_barcodes(matrix, np.array(["A-1", "A-1"]), slide_id="s")


def test_blank_reason_and_windowed_sampling_of_a_flat_tiff(tmp_path: Path) -> None:
    assert blank_reason(np.zeros((4, 4, 4), dtype=np.uint8) + np.array([0, 0, 0, 255], dtype=np.uint8)) == (
        "a single colour (0, 0, 0) (every channel within 0 grey levels)"
    )
    noisy = np.full((50, 50, 3), 128, dtype=np.uint8) + np.random.default_rng(3).integers(0, 3, (50, 50, 3)).astype(
        np.uint8
    )
    assert blank_reason(noisy, tolerance=4) is not None  # JPEG-level noise on a flat image is still blank
    # A single-level (strip) TIFF too big for a thumbnail is sampled in windows around the spots.
    pixels = np.full((3000, 3000, 3), 250, dtype=np.uint8)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, pixels, rowsperstrip=16)
    settings = QCSettings(max_thumbnail_source_pixels=1_000_000)
    x, y = np.array([1000.0, 2000.0]), np.array([1500.0, 500.0])
    with open_image(path) as image:
        assert len(image.levels) == 1
        assert image_blank_reason(image, x=x, y=y, settings=settings) is not None
    pixels[1480:1520, 980:1020] = (120, 40, 150)  # tissue under one spot only
    tifffile.imwrite(path, pixels, rowsperstrip=16)
    with open_image(path) as image:
        assert image_blank_reason(image, x=x, y=y, settings=settings) is None


def test_settings_are_validated() -> None:
    with pytest.raises(SettingsError, match=r"mpp_tolerance must be in \(0, 1\)"):
        QCSettings(mpp_tolerance=1.5)
