"""Lattice neighbours: six on the Visium hex grid, four on the square ST grid, in-tissue only."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import scipy.sparse as sp

from stcorpus.curate.errors import CorruptSourceError
from stcorpus.curate.geometry import lattice_neighbors
from tests.conftest import HEART


def real_visium_positions() -> dict[str, np.ndarray]:
    """The 4,992 spots of a real Visium slide (Space Ranger 1.0 tissue_positions_list.csv)."""
    with (HEART / "spatial" / "tissue_positions_list.csv").open() as f:
        rows = list(csv.reader(f))
    return {
        "in_tissue": np.asarray([int(r[1]) for r in rows], dtype=bool),
        "array_row": np.asarray([int(r[2]) for r in rows]),
        "array_col": np.asarray([int(r[3]) for r in rows]),
        "y_px": np.asarray([float(r[4]) for r in rows]),
        "x_px": np.asarray([float(r[5]) for r in rows]),
    }


def test_hex_neighbours_are_the_spots_one_pitch_away_on_a_real_slide() -> None:
    """Array-coordinate neighbours agree with pixel distances on a real Visium slide."""
    spots = real_visium_positions()
    nbrs = lattice_neighbors(spots["array_row"], spots["array_col"], lattice="hex", include=spots["in_tissue"])
    assert len(nbrs) == 4992
    xy = np.stack([spots["x_px"], spots["y_px"]], axis=1)
    counts = nbrs.counts
    # Every spot inside the capture area with all six neighbours in tissue has six.
    assert counts.max() == 6 and np.count_nonzero(counts == 6) > 3000
    distances = np.linalg.norm(xy[nbrs.indices] - xy[np.repeat(np.arange(4992), counts)], axis=1)
    pitch = float(np.median(distances))
    assert (np.abs(distances / pitch - 1) < 0.05).all()  # every pair is one lattice pitch apart
    rng = np.random.default_rng(0)
    tissue = np.flatnonzero(spots["in_tissue"])
    for spot in rng.choice(4992, size=300, replace=False):
        distance = np.linalg.norm(xy[tissue] - xy[spot], axis=1)
        near = set(tissue[(distance > 0) & (distance < 1.2 * pitch)].tolist())
        assert set(nbrs.of(spot).tolist()) == near, spot


def test_square_lattice_and_the_include_mask() -> None:
    grid_rows, grid_cols = np.meshgrid(np.arange(5), np.arange(4), indexing="ij")
    rows, cols = grid_rows.ravel(), grid_cols.ravel()
    include = np.ones(rows.size, dtype=bool)
    include[(rows == 2) & (cols == 2)] = False  # a spot off tissue
    nbrs = lattice_neighbors(rows, cols, lattice="square", include=include)

    def at(r: int, c: int) -> int:
        return int(np.flatnonzero((rows == r) & (cols == c))[0])

    assert sorted(nbrs.of(at(1, 1)).tolist()) == sorted([at(0, 1), at(2, 1), at(1, 0), at(1, 2)])
    assert sorted(nbrs.of(at(2, 1)).tolist()) == sorted([at(1, 1), at(3, 1), at(2, 0)])  # (2, 2) excluded
    assert nbrs.counts[at(0, 0)] == 2
    assert nbrs.of(at(2, 2)).size == 4  # an excluded spot still has its in-tissue neighbours
    hex_nbrs = lattice_neighbors(rows, cols, lattice="hex")
    assert sorted(hex_nbrs.of(at(2, 2)).tolist()) == sorted([at(2, 0), at(1, 1), at(1, 3), at(3, 1), at(3, 3)])


def test_neighbour_sums_keys_and_errors() -> None:
    # A Visium flower: a centre and its six neighbours.
    rows = np.asarray([10, 10, 10, 9, 9, 11, 11])
    cols = np.asarray([20, 18, 22, 19, 21, 19, 21])
    nbrs = lattice_neighbors(rows, cols)
    assert nbrs.counts.tolist() == [6, 3, 3, 3, 3, 3, 3]
    counts = sp.csr_matrix(np.arange(14, dtype=np.int32).reshape(7, 2))
    niche = (nbrs.to_csr() @ counts).toarray()
    assert niche[0].tolist() == counts[1:].sum(axis=0).tolist()[0]
    assert niche[1].tolist() == (counts[0] + counts[3] + counts[5]).toarray()[0].tolist()
    keys = [f"S__B{i}" for i in range(7)]
    assert nbrs.keys(keys)[1] == ["S__B0", "S__B3", "S__B5"]
    with pytest.raises(CorruptSourceError, match=r"share array position \(10, 20\)"):
        lattice_neighbors(np.append(rows, 10), np.append(cols, 20))
    with pytest.raises(ValueError, match="unknown lattice"):
        lattice_neighbors(rows, cols, lattice="triangle")  # type: ignore[arg-type]
    assert len(lattice_neighbors(np.zeros(0), np.zeros(0))) == 0
