"""Spot lattices: fit um/px from array coordinates, and derive array coordinates from pixels.

Conventions (Space Ranger's): on the Visium hex lattice a spot's six neighbours are at
``(row, col ± 2)`` and ``(row ± 1, col ± 1)``, so one column step is half the pitch along a
row and one row step is ``pitch * sqrt(3) / 2``; on the ST square lattice neighbours are one
step apart in either direction and a step is the pitch.

Both functions work on plain arrays so that readers (which may need to derive coordinates)
and QC (which fits the scale) share them; they import scipy only when called.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from curate.slide import Lattice

SQRT3_2: Final = math.sqrt(3.0) / 2.0

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int32]

#: Neighbour distances within this fraction of the median nearest-neighbour distance count
#: as lattice edges. Visium spot detection jitters by a few pixels at ~140-300 px pitch.
_EDGE_TOLERANCE: Final = 0.25


def lattice_steps(lattice: Lattice) -> tuple[float, float]:
    """(column step, row step) in units of the pitch."""
    if lattice == "hex":
        return 0.5, SQRT3_2
    return 1.0, 1.0


@dataclass(frozen=True)
class LatticeFit:
    """An affine fit of pixel coordinates against lattice positions in micrometres."""

    mpp: float  # um per pixel: 1 / sqrt(|det A|) of the fitted map um -> px
    anisotropy: float  # ratio of the singular values of that map (1.0 = square pixels)
    rms_residual_px: float  # over the inliers
    n_spots: int
    n_inliers: int


def fit_lattice(
    x: FloatArray,
    y: FloatArray,
    row: npt.NDArray[np.integer],
    col: npt.NDArray[np.integer],
    *,
    lattice: Lattice,
    pitch_um: float,
    iterations: int = 5,
) -> LatticeFit | None:
    """Fit ``(x, y) = A @ (col_um, row_um) + t`` robustly; ``None`` if the spots cannot fix A.

    Least squares, then refits on the spots whose residual is within ``max(4 x median
    residual, 5% of the pitch)``, so a few misregistered or mislabelled spots do not move the
    scale. Rotation, flips and a swapped axis order are absorbed by ``A``.
    """
    n = int(x.shape[0])
    col_step, row_step = lattice_steps(lattice)
    design = np.column_stack(
        [
            col.astype(np.float64) * col_step * pitch_um,
            row.astype(np.float64) * row_step * pitch_um,
            np.ones(n),
        ]
    )
    target = np.column_stack([x, y]).astype(np.float64)
    finite = np.isfinite(target).all(axis=1)
    inliers = finite.copy()
    if inliers.sum() < 3 or np.linalg.matrix_rank(design[inliers]) < 3:
        return None
    coef: npt.NDArray[np.float64] = np.zeros((3, 2))
    for _ in range(iterations):
        coef = np.linalg.lstsq(design[inliers], target[inliers], rcond=None)[0].astype(np.float64)
        residual = np.linalg.norm(design @ coef - target, axis=1)
        scale = math.sqrt(abs(float(np.linalg.det(coef[:2, :]))))
        if scale == 0.0:
            return None
        threshold = max(4.0 * float(np.median(residual[inliers])), 0.05 * pitch_um * scale)
        keep = finite & (residual <= threshold)
        if keep.sum() < 3 or np.linalg.matrix_rank(design[keep]) < 3:
            break
        if np.array_equal(keep, inliers):
            break
        inliers = keep
    matrix = coef[:2, :]
    singular = np.linalg.svd(matrix, compute_uv=False)
    px_per_um = math.sqrt(abs(float(np.linalg.det(matrix))))
    if px_per_um == 0.0:
        return None
    residual = np.linalg.norm(design[inliers] @ coef - target[inliers], axis=1)
    return LatticeFit(
        mpp=1.0 / px_per_um,
        anisotropy=float(singular[0] / singular[1]) if singular[1] > 0 else math.inf,
        rms_residual_px=float(np.sqrt(np.mean(residual**2))),
        n_spots=n,
        n_inliers=int(inliers.sum()),
    )


@dataclass(frozen=True)
class DerivedLattice:
    """Array coordinates derived from pixel positions, and what the derivation measured."""

    row: IntArray
    col: IntArray
    pitch_px: float  # median nearest-neighbour distance
    angle_deg: float  # orientation of the lattice rows in the image
    n_components: int  # connected groups of spots (islands of tissue)
    n_collisions: int  # spots that landed on an occupied lattice site

    def describe(self) -> str:
        """One line for ``Slide.notes``."""
        return (
            f"array coordinates derived from the pixel lattice (pitch {self.pitch_px:.1f} px, rows at "
            f"{self.angle_deg:.1f} deg, {self.n_components} connected group(s), {self.n_collisions} "
            "collision(s)); origin and orientation are arbitrary, lattice neighbours are exact"
        )


def _round_step(dc: float, dr: float, *, hex_lattice: bool) -> tuple[int, int]:
    """Nearest lattice offset ``(row, col)`` to a fractional offset given as ``(col, row)``."""
    r = round(dr)
    if hex_lattice:
        # On the hex lattice row + col keeps its parity: a column offset has the parity of the row offset.
        c = 2 * round((dc - r) / 2.0) + r
    else:
        c = round(dc)
    return int(r), int(c)


def derive_array_coords(x: FloatArray, y: FloatArray, *, lattice: Lattice) -> DerivedLattice:
    """Array (row, col) for spots given only their pixel centres.

    The pitch is the median nearest-neighbour distance and the orientation the m-fold
    circular mean of the neighbour directions (m = 6 hex, 4 square). Indices are then
    propagated breadth-first along lattice edges from the spot nearest the centroid, each
    edge rounded on its own, so a slightly wrong pitch estimate never accumulates across the
    slide. Spots in other connected groups are placed by an affine fit of the first group.
    """
    from scipy.spatial import cKDTree

    n = int(x.shape[0])
    zeros = np.zeros(n, dtype=np.int32)
    if n < 2:
        return DerivedLattice(
            row=zeros, col=zeros.copy(), pitch_px=math.nan, angle_deg=0.0, n_components=n, n_collisions=0
        )
    points = np.column_stack([x, y]).astype(np.float64)
    tree = cKDTree(points)
    k = min(9, n)
    dist, idx = tree.query(points, k=k)
    pitch = float(np.median(dist[:, 1]))
    if not pitch > 0:
        return DerivedLattice(
            row=zeros, col=zeros.copy(), pitch_px=pitch, angle_deg=0.0, n_components=n, n_collisions=n - 1
        )
    edge = np.abs(dist[:, 1:] - pitch) <= _EDGE_TOLERANCE * pitch
    src = np.repeat(np.arange(n), k - 1).reshape(n, k - 1)[edge]
    dst = idx[:, 1:][edge]
    vectors = points[dst] - points[src]
    fold = 6 if lattice == "hex" else 4
    theta = np.arctan2(vectors[:, 1], vectors[:, 0])
    angle = float(np.angle(np.exp(1j * fold * theta).sum())) / fold
    cos, sin = math.cos(-angle), math.sin(-angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    rotated = (points - points.mean(axis=0)) @ rotation.T
    col_step, row_step = lattice_steps(lattice)
    hex_lattice = lattice == "hex"

    neighbours: list[list[int]] = [[] for _ in range(n)]
    for a, b in zip(src.tolist(), dst.tolist(), strict=True):
        neighbours[a].append(b)
        neighbours[b].append(a)

    row = np.zeros(n, dtype=np.int64)
    col = np.zeros(n, dtype=np.int64)
    component = np.full(n, -1, dtype=np.int64)
    centre = int(np.argmin(np.linalg.norm(rotated, axis=1)))
    order = [centre, *(i for i in np.argsort(np.linalg.norm(rotated, axis=1)).tolist() if i != centre)]
    n_components = 0
    for seed in order:
        if component[seed] >= 0:
            continue
        component[seed] = n_components
        queue = deque([seed])
        while queue:
            a = queue.popleft()
            for b in neighbours[a]:
                if component[b] >= 0:
                    continue
                d = rotated[b] - rotated[a]
                step_row, step_col = _round_step(
                    d[0] / (col_step * pitch), d[1] / (row_step * pitch), hex_lattice=hex_lattice
                )
                row[b], col[b] = row[a] + step_row, col[a] + step_col
                component[b] = component[a]
                queue.append(b)
        n_components += 1

    if n_components > 1:
        main = component == 0
        design = np.column_stack([col[main], row[main], np.ones(int(main.sum()))]).astype(np.float64)
        if main.sum() >= 3 and np.linalg.matrix_rank(design) == 3:
            coef, *_ = np.linalg.lstsq(design, rotated[main], rcond=None)
            inverse = np.linalg.inv(coef[:2, :].T)
            for i in np.flatnonzero(~main).tolist():
                dc, dr = inverse @ (rotated[i] - coef[2])
                r, c = _round_step(float(dc), float(dr), hex_lattice=hex_lattice)
                row[i], col[i] = r, c
        else:  # too few spots to fit: place by the nominal steps
            for i in np.flatnonzero(~main).tolist():
                r, c = _round_step(
                    rotated[i, 0] / (col_step * pitch), rotated[i, 1] / (row_step * pitch), hex_lattice=hex_lattice
                )
                row[i], col[i] = r, c

    row_min, col_min = int(row.min()), int(col.min())
    row -= row_min
    col -= col_min
    if hex_lattice and (row_min + col_min) % 2:
        col += 1  # keep row + col even, Space Ranger's parity
    sites = row * (int(col.max()) + 1) + col
    collisions = n - int(np.unique(sites).shape[0])
    return DerivedLattice(
        row=row.astype(np.int32),
        col=col.astype(np.int32),
        pitch_px=pitch,
        angle_deg=math.degrees(angle),
        n_components=n_components,
        n_collisions=collisions,
    )
