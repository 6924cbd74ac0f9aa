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

from stcorpus.curate.slide import Lattice

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


def derive_array_coords(
    x: FloatArray, y: FloatArray, *, lattice: Lattice, pitch_px: float | None = None
) -> DerivedLattice:
    """Array (row, col) for spots given only their pixel centres.

    The pitch is ``pitch_px`` when the scale is already known (pitch_um / mpp), else the
    median nearest-neighbour distance; the orientation is the m-fold circular mean of the
    directions between neighbours (m = 6 hex, 4 square). Indices are propagated
    breadth-first along lattice edges, each edge rounded on its own, so a slightly wrong
    pitch never accumulates across a contiguous tissue. Separate groups of spots (islands,
    or a sparse subset with no neighbours at all) are then placed outward from the largest
    group, each as a whole, by an affine map refitted as groups are added: a pitch known
    to a few percent is corrected before it can shift a distant spot by a whole site.
    """
    from scipy.spatial import cKDTree

    n = int(x.shape[0])
    zeros = np.zeros(n, dtype=np.int32)
    if n < 2:
        return DerivedLattice(
            row=zeros, col=zeros.copy(), pitch_px=math.nan, angle_deg=0.0, n_components=n, n_collisions=0
        )
    points = np.column_stack([x, y]).astype(np.float64)
    k = min(9, n)
    dist, idx = cKDTree(points).query(points, k=k)
    pitch = float(pitch_px) if pitch_px is not None and pitch_px > 0 else float(np.median(dist[:, 1]))
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
    angle = float(np.angle(np.exp(1j * fold * theta).sum())) / fold if theta.size else 0.0
    cos, sin = math.cos(-angle), math.sin(-angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    rotated = (points - points.mean(axis=0)) @ rotation.T
    col_step, row_step = lattice_steps(lattice)
    hex_lattice = lattice == "hex"

    neighbours: list[list[int]] = [[] for _ in range(n)]
    for a, b in zip(src.tolist(), dst.tolist(), strict=True):
        neighbours[a].append(b)
        neighbours[b].append(a)

    # 1. Breadth-first along lattice edges: indices relative to each group's seed.
    row = np.zeros(n, dtype=np.int64)
    col = np.zeros(n, dtype=np.int64)
    component = np.full(n, -1, dtype=np.int64)
    n_components = 0
    for seed in np.argsort(np.linalg.norm(rotated, axis=1)).tolist():
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

    # 2. Place the other groups outward from the largest, each by one lattice offset.
    if n_components > 1:
        sizes = np.bincount(component, minlength=n_components)
        main = int(np.argmax(sizes))
        placed = component == main
        members = [np.flatnonzero(component == c) for c in range(n_components)]
        centres = np.array([rotated[m].mean(axis=0) for m in members])
        seed = int(members[main][0])
        # nominal map lattice (col, row) -> rotated px, anchored at the main group's seed
        coef = np.array([[col_step * pitch, 0.0], [0.0, row_step * pitch], [0.0, 0.0]])
        coef[2] = rotated[seed] - np.array([col[seed], row[seed]]) @ coef[:2]
        coef = _refit(coef, col[placed], row[placed], rotated[placed])
        fitted_at = int(placed.sum())
        order = np.argsort(np.linalg.norm(centres - centres[main], axis=1)).tolist()
        for c in order:
            if c == main:
                continue
            inside = members[c]
            fractional = (rotated[inside] - coef[2]) @ np.linalg.inv(coef[:2])
            offset = (fractional - np.column_stack([col[inside], row[inside]])).mean(axis=0)
            d_row, d_col = _round_step(float(offset[0]), float(offset[1]), hex_lattice=hex_lattice)
            row[inside] += d_row
            col[inside] += d_col
            placed[inside] = True
            if placed.sum() >= max(3, int(fitted_at * 1.1)):
                coef = _refit(coef, col[placed], row[placed], rotated[placed])
                fitted_at = int(placed.sum())

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


def _refit(
    coef: npt.NDArray[np.float64],
    col: npt.NDArray[np.int64],
    row: npt.NDArray[np.int64],
    target: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """Least-squares map (col, row, 1) -> px over placed spots; the previous map if they cannot fix one."""
    design = np.column_stack([col, row, np.ones(col.shape[0])]).astype(np.float64)
    if design.shape[0] < 3 or np.linalg.matrix_rank(design) < 3:
        return coef
    fitted: npt.NDArray[np.float64] = np.linalg.lstsq(design, target, rcond=None)[0].astype(np.float64)
    return fitted
