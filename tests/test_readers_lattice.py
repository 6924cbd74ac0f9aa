"""Spot lattices: the scale fit and the derivation of array coordinates, on real Visium positions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stcorpus.curate.readers._lattice import derive_array_coords, fit_lattice
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
