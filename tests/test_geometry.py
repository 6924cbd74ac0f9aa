"""Spot lattices: the scale fit and the derivation of array coordinates, on real Visium positions."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from stcorpus.curate.geometry import derive_array_coords, fit_lattice
from stcorpus.curate.readers._tenx import Positions, read_positions
from tests.test_readers_support import HEART, MOUSE_BRAIN

HEART_POSITIONS = HEART / "spatial" / "tissue_positions_list.csv"
HEART_DIAMETER = 89.42751063343188  # spot_diameter_fullres of the heart fixture


def _same_sites(row: np.ndarray, col: np.ndarray, true_row: np.ndarray, true_col: np.ndarray) -> bool:
    """Equal up to a translation and a flip of either axis (symmetries of the array grid)."""
    derived = np.column_stack([row, col]).astype(int)
    true = np.column_stack([true_row, true_col]).astype(int)
    return any(
        np.array_equal((derived - derived[0]) * np.array(flip), true - true[0])
        for flip in ((1, 1), (1, -1), (-1, 1), (-1, -1))
    )


def _heart() -> Positions:
    return read_positions(HEART_POSITIONS)


def test_fit_on_real_positions_gives_space_ranger_65_um_scale() -> None:
    p = _heart()
    fit = fit_lattice(p.pxl_col, p.pxl_row, p.array_row, p.array_col, lattice="hex", pitch_um=100.0)
    assert fit is not None
    # Space Ranger's spot_diameter_fullres spans 65 um: 65 / 89.43 = 0.7268 um/px; the lattice agrees to 0.3%
    assert fit.mpp == pytest.approx(65.0 / HEART_DIAMETER, rel=0.003)
    assert fit.mpp != pytest.approx(55.0 / HEART_DIAMETER, rel=0.1)
    assert fit.n_inliers == fit.n_spots == 4992
    assert fit.anisotropy == pytest.approx(1.0, abs=0.01)


def test_fit_is_robust_to_rotation_flips_and_outliers() -> None:
    rng = np.random.default_rng(0)
    grid = [(r, c) for r in range(20) for c in range(40) if (r + c) % 2 == 0]
    row = np.array([r for r, _ in grid])
    col = np.array([c for _, c in grid])
    mpp, angle = 0.3, math.radians(23.0)
    u, v = col * 50.0 / mpp, row * 100.0 * math.sqrt(3) / 2 / mpp  # px before rotation
    x = 500 + u * math.cos(angle) - v * math.sin(angle) + rng.normal(0, 2, row.shape[0])
    y = 800 - (u * math.sin(angle) + v * math.cos(angle)) + rng.normal(0, 2, row.shape[0])  # and a flip
    x[:15] += 150.0  # 15 misregistered spots, half a pitch off
    fit = fit_lattice(x, y, row, col, lattice="hex", pitch_um=100.0)
    assert fit is not None
    assert fit.mpp == pytest.approx(mpp, rel=0.002)
    assert fit.n_inliers == row.shape[0] - 15
    # one lattice row cannot fix a 2-D scale
    assert fit_lattice(x[row == 0], y[row == 0], row[row == 0], col[row == 0], lattice="hex", pitch_um=100.0) is None


def test_derivation_recovers_the_real_grid() -> None:
    p = _heart()
    derived = derive_array_coords(p.pxl_col, p.pxl_row, lattice="hex")
    assert _same_sites(derived.row, derived.col, p.array_row, p.array_col)
    assert derived.n_components == 1 and derived.n_collisions == 0
    assert derived.pitch_px == pytest.approx(100.0 / (65.0 / HEART_DIAMETER), rel=0.01)
    assert ((derived.row + derived.col) % 2 == 0).all()


@pytest.mark.parametrize("fraction", [0.3, 0.02])
def test_derivation_of_sparse_subsets_with_a_known_pitch(fraction: float) -> None:
    p = _heart()
    keep = np.random.default_rng(1).random(p.barcode.shape[0]) < fraction
    # the pitch from the scale, 2% off, as a spot radius or metadata would give it
    hint = 1.02 * 100.0 / (65.0 / HEART_DIAMETER)
    derived = derive_array_coords(p.pxl_col[keep], p.pxl_row[keep], lattice="hex", pitch_px=hint)
    assert derived.n_components > 1
    assert _same_sites(derived.row, derived.col, p.array_row[keep], p.array_col[keep])


def test_derivation_of_the_mouse_brain_subset_and_a_rotated_square_lattice() -> None:
    p = read_positions(MOUSE_BRAIN / "outs" / "spatial" / "tissue_positions_list.csv")  # 50 scattered spots
    derived = derive_array_coords(p.pxl_col, p.pxl_row, lattice="hex", pitch_px=100.0 / (65.0 / 89.44476048022638))
    assert _same_sites(derived.row, derived.col, p.array_row, p.array_col)

    rng = np.random.default_rng(2)
    row, col = np.divmod(np.arange(35 * 33), 33)
    angle = math.radians(4.0)
    u, v = col * 220.0, row * 220.0
    x = u * math.cos(angle) - v * math.sin(angle) + rng.normal(0, 4, row.shape[0])
    y = u * math.sin(angle) + v * math.cos(angle) + rng.normal(0, 4, row.shape[0])
    keep = rng.random(row.shape[0]) < 0.6
    derived = derive_array_coords(x[keep], y[keep], lattice="square")
    assert derived.angle_deg == pytest.approx(4.0, abs=0.5)
    assert _same_sites(derived.row, derived.col, row[keep], col[keep])


# ---------------------------------------------------------------------------------------------
# Geometries by key
# ---------------------------------------------------------------------------------------------


def test_every_assay_has_a_declared_geometry_and_an_unknown_one_is_refused() -> None:
    from stcorpus.curate.errors import UnsupportedAssayError
    from stcorpus.curate.geometry import GEOMETRIES, assay_geometry
    from stcorpus.curate.manifest import ASSAYS

    assert set(GEOMETRIES) == set(ASSAYS)  # the manifest's assays, no more, no fewer
    visium, st = assay_geometry("visium"), assay_geometry("st")
    assert (visium.kind, visium.pitch_um, visium.spot_diameter_um) == ("hex", 100.0, 55.0)
    assert (st.kind, st.pitch_um, st.spot_diameter_um) == ("square", 200.0, 100.0)
    assert assay_geometry("visium-cytassist").kind == "hex"
    cells = assay_geometry("xenium")
    assert cells.kind == "cells" and cells.pitch_um is None and cells.neighbour_radius_um and cells.neighbour_k
    # no silent square 100 um lattice for what is not on record
    with pytest.raises(UnsupportedAssayError, match=r"assay 'slide-seq' has no spot geometry on record \(known: st, "):
        assay_geometry("slide-seq", slide_id="S1")
    # square bins: each output states the size
    with pytest.raises(UnsupportedAssayError, match=r"square bins whose size each output states.*: look here"):
        assay_geometry("visium-hd", pitch_hint="look here")
    bins = assay_geometry("visium-hd", pitch_um=16.0)
    assert (bins.kind, bins.pitch_um, bins.spot_diameter_um) == ("square", 16.0, 16.0)
    # a stated pitch replaces the lattice's, the spot stays what it is
    assert assay_geometry("st", pitch_um=110.0).spot_diameter_um == 100.0


def test_cell_level_sites_have_no_lattice_to_fit() -> None:
    from stcorpus.curate.geometry import CELLS, Geometry

    x, y = np.arange(10.0) * 50, np.arange(10.0) % 3 * 40
    assert fit_lattice(x, y, np.arange(10), np.arange(10), lattice="cells", pitch_um=None) is None
    assert fit_lattice(x, y, np.arange(10), np.arange(10), lattice="square", pitch_um=None) is None
    with pytest.raises(ValueError, match="not a lattice"):
        CELLS.lattice_and_pitch()
    with pytest.raises(ValueError, match="needs neighbour_radius_um"):
        Geometry("cells2", "cells")


def test_fit_takes_fractional_corrected_coordinates() -> None:
    rng = np.random.default_rng(3)
    new_x, new_y = rng.uniform(1, 30, 200), rng.uniform(1, 30, 200)  # spot-corrected array units
    mpp = 0.69
    x, y = 100 + new_x * 200 / mpp, 50 + new_y * 200 / mpp
    fit = fit_lattice(x, y, new_y, new_x, lattice="square", pitch_um=200.0)
    assert fit is not None and fit.mpp == pytest.approx(mpp, rel=1e-9)
    # one lattice row, jittered off it as corrected coordinates are, fixes no 2-D scale
    row_x = np.arange(1.0, 30.0)
    row_y = 15 + rng.normal(0, 0.03, row_x.size)
    assert fit_lattice(row_x * 200 / mpp, row_y * 200 / mpp, row_y, row_x, lattice="square", pitch_um=200.0) is None
    # rounding them to the integer grid costs the fit its precision
    coarse = fit_lattice(x, y, np.rint(new_y), np.rint(new_x), lattice="square", pitch_um=200.0)
    assert coarse is not None and coarse.rms_residual_px > 10


# ---------------------------------------------------------------------------------------------
# Neighbours of cell-level sites
# ---------------------------------------------------------------------------------------------


def test_radius_neighbours_keep_the_k_nearest_within_the_radius() -> None:
    from stcorpus.curate.geometry import radius_neighbors

    rng = np.random.default_rng(4)
    x, y = rng.uniform(0, 400, 300), rng.uniform(0, 400, 300)
    include = rng.random(300) > 0.1
    x[7] = np.nan
    nbrs = radius_neighbors(x, y, radius_um=40.0, k=5, include=include)
    points = np.column_stack([x, y])
    for site in range(300):
        got = nbrs.of(site)
        assert list(got) == sorted(got)
        if site == 7:
            assert got.size == 0
            continue
        distance = np.linalg.norm(points - points[site], axis=1)
        within = np.flatnonzero(include & (distance <= 40.0) & (np.arange(300) != site))
        expected_k = within[np.lexsort((within, distance[within]))][:5]
        assert set(got.tolist()) == set(expected_k.tolist()), site
    assert 7 not in set(nbrs.indices.tolist())
    every = radius_neighbors(x, y, radius_um=40.0)  # no k: everyone within the radius
    assert (every.counts >= nbrs.counts).all() and every.counts.max() > 5


def test_spot_neighbours_follow_the_slide_geometry() -> None:
    from stcorpus.curate.geometry import CELLS, LEGACY_ST, VISIUM, radius_neighbors, spot_neighbors
    from stcorpus.curate.slide import Spots

    grid = [(r, c) for r in range(6) for c in range(12) if (r + c) % 2 == 0]
    row = np.array([r for r, _ in grid], dtype=np.int32)
    col = np.array([c for _, c in grid], dtype=np.int32)
    mpp = 0.5
    x = (col * 50.0 / mpp).astype(np.float64)
    y = (row * 100.0 * math.sqrt(3) / 2 / mpp).astype(np.float64)
    spots = Spots(
        barcode=np.array([f"S{i}" for i in range(row.size)]),
        in_tissue=np.ones(row.size, dtype=bool),
        array_row=row,
        array_col=col,
        x_px=x,
        y_px=y,
    )
    hexagonal = spot_neighbors(spots, geometry=VISIUM, mpp=mpp)
    assert hexagonal.counts.max() == 6
    # the same sites as cells: the six nearest within 50 um... none, at 100 um apart; within 150 um, six
    assert spot_neighbors(spots, geometry=CELLS, mpp=mpp).counts.max() == 0
    wide = replace(CELLS, neighbour_radius_um=101.0)
    as_cells = spot_neighbors(spots, geometry=wide, mpp=mpp)
    np.testing.assert_array_equal(as_cells.indptr, hexagonal.indptr)
    np.testing.assert_array_equal(as_cells.indices, hexagonal.indices)
    expected_cells = radius_neighbors(x * mpp, y * mpp, radius_um=101.0, k=6)
    np.testing.assert_array_equal(as_cells.indices, expected_cells.indices)
    square = spot_neighbors(spots, geometry=LEGACY_ST, mpp=mpp)
    assert square.counts.max() <= 4


# ---------------------------------------------------------------------------------------------
# The pyramid level for a target um/px
# ---------------------------------------------------------------------------------------------


def test_choose_level_picks_the_coarsest_level_that_is_fine_enough(tmp_path: Path) -> None:
    from PIL import Image

    from stcorpus.curate.geometry import choose_level
    from stcorpus.curate.imaging import open_image
    from tests.test_readers_support import write_pyramid

    pixels = np.asarray(Image.new("RGB", (2048, 1024), (200, 100, 150)))
    write_pyramid(tmp_path / "p.tif", pixels, resolution_um=0.25)
    with open_image(tmp_path / "p.tif") as image:
        assert [lvl.downsample for lvl in image.levels][:3] == [1.0, 2.0, 4.0]
        choice = choose_level(image, image_mpp=0.25, target_mpp=0.5)
        assert choice is not None and (choice.level, choice.mpp) == (1, 0.5)
        # a level coarser than the target by less than the tolerance counts as equal
        near = choose_level(image, image_mpp=0.251, target_mpp=0.5, tolerance=0.01)
        assert near is not None and near.level == 1
        below = choose_level(image, image_mpp=0.251, target_mpp=0.5)
        assert below is not None and below.level == 0
        assert choose_level(image, image_mpp=1.0, target_mpp=0.5) is None  # even level 0 is coarser


def test_qc_does_not_import_a_reader_module() -> None:
    import subprocess
    import sys

    code = "import sys, stcorpus.curate.qc; print(sorted(m for m in sys.modules if 'curate.readers' in m))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
