"""Where a slide's measurements sit: one home for spot geometry.

Everything that depends on how an assay lays out its measurement sites lives here:

* **Geometries, declared by key** (:data:`GEOMETRIES`, :func:`assay_geometry`): the Visium hex
  lattice (100 um pitch, 55 um spots), the legacy ST square lattice (200 um pitch, 100 um
  spots), square bins whose size each output states (Visium HD: :func:`square_bins`), and
  cell-level data, whose sites have no lattice and whose neighbours follow a radius/kNN rule.
  An assay without a declared geometry is an error listing the known ones, never a guess.
* **Lattice fits** (:func:`fit_lattice`): um/px from an affine fit of pixel positions against
  lattice positions; and the inverse, array coordinates derived from pixels alone
  (:func:`derive_array_coords`).
* **Neighbours** (:class:`Neighbors`): lattice neighbours from array coordinates
  (:func:`lattice_neighbors`), radius/kNN neighbours from positions in micrometres
  (:func:`radius_neighbors`), and :func:`spot_neighbors`, which picks the rule of a geometry.
* **The pyramid level for a target um/px** (:func:`choose_level`).

Lattice conventions (Space Ranger's): on the Visium hex lattice a spot's six neighbours are at
``(row, col ± 2)`` and ``(row ± 1, col ± 1)``, so one column step is half the pitch along a
row and one row step is ``pitch * sqrt(3) / 2``; on a square lattice (legacy ST, bins)
neighbours are one step apart in either direction and a step is the pitch.

The functions work on plain arrays, so readers (which may need to derive coordinates), QC
(which fits the scale), tiling and the build share them; scipy is imported only when called.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final, Literal

import numpy as np
import numpy.typing as npt

from stcorpus.curate.errors import CorruptSourceError, UnsupportedAssayError

if TYPE_CHECKING:
    import scipy.sparse as sp

    from stcorpus.curate.imaging import SlideImage
    from stcorpus.curate.slide import Spots

#: How sites are laid out: a hex or square lattice (sites have array coordinates), or cells
#: (free positions; neighbours by distance).
Kind = Literal["hex", "square", "cells"]
#: The kinds that are lattices.
Lattice = Literal["hex", "square"]
LATTICE_KINDS: Final = ("hex", "square")

SQRT3_2: Final = math.sqrt(3.0) / 2.0

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int32]

#: Neighbour distances within this fraction of the median nearest-neighbour distance count
#: as lattice edges. Visium spot detection jitters by a few pixels at ~140-300 px pitch.
_EDGE_TOLERANCE: Final = 0.25
#: A lattice fit needs sites spread across both directions: a standard deviation of at least
#: this fraction of the pitch along the narrower one.
_MIN_SPREAD: Final = 0.25


# ---------------------------------------------------------------------------------------------
# Geometries by key
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """How the measurement sites of a slide are laid out.

    A lattice geometry (``kind`` hex or square) has a ``pitch_um``: the distance between
    neighbouring sites (for square bins, the bin side). A geometry declared with
    ``pitch_um=None`` is a template whose pitch each slide states (:meth:`with_pitch`).
    A cell-level geometry (``kind="cells"``) has no lattice: a site's neighbours are its
    ``neighbour_k`` nearest sites within ``neighbour_radius_um`` (every site within the
    radius when ``neighbour_k`` is None).
    """

    key: str
    kind: Kind
    pitch_um: float | None = None
    spot_diameter_um: float | None = None
    neighbour_radius_um: float | None = None
    neighbour_k: int | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.kind not in (*LATTICE_KINDS, "cells"):
            problems.append(f"kind must be hex, square or cells, not {self.kind!r}")
        for name in ("pitch_um", "spot_diameter_um", "neighbour_radius_um"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a positive number of micrometres, not {value!r}")
        if self.kind == "cells":
            if self.neighbour_radius_um is None:
                problems.append("a cell-level geometry needs neighbour_radius_um")
            if self.neighbour_k is not None and not (isinstance(self.neighbour_k, int) and self.neighbour_k >= 1):
                problems.append(f"neighbour_k must be a positive integer, not {self.neighbour_k!r}")
        if problems:
            raise ValueError(f"geometry {self.key!r}: " + "; ".join(problems))

    @property
    def is_lattice(self) -> bool:
        """True for hex and square lattices (sites have array coordinates)."""
        return self.kind in LATTICE_KINDS

    @property
    def complete(self) -> bool:
        """False for a lattice template whose pitch each slide must state."""
        return not self.is_lattice or self.pitch_um is not None

    def lattice_and_pitch(self) -> tuple[Lattice, float]:
        """``(kind, pitch_um)`` of a complete lattice; ValueError for cell-level sites or a template."""
        if self.kind == "cells" or self.pitch_um is None:
            raise ValueError(f"geometry {self.key!r} ({self.describe()}) is not a lattice with a pitch")
        return self.kind, self.pitch_um

    def with_pitch(self, pitch_um: float) -> Geometry:
        """This lattice with another pitch (square bins: the bin side, which is also the spot's)."""
        if not self.is_lattice:
            raise ValueError(f"geometry {self.key!r} is {self.kind}: it has no lattice pitch")
        diameter = self.spot_diameter_um
        if self.kind == "square" and diameter in (None, self.pitch_um):  # a bin is its own spot
            diameter = float(pitch_um)
        return replace(self, pitch_um=float(pitch_um), spot_diameter_um=diameter)

    def describe(self) -> str:
        """One phrase for notes and messages, e.g. ``hex lattice, 100 um pitch, 55 um spots``."""
        if not self.is_lattice:
            k = f"{self.neighbour_k} nearest" if self.neighbour_k is not None else "every site"
            return f"cell-level sites; neighbours: {k} within {self.neighbour_radius_um:g} um"
        pitch = f"{self.pitch_um:g} um pitch" if self.pitch_um is not None else "pitch stated by each slide"
        spots = f", {self.spot_diameter_um:g} um spots" if self.spot_diameter_um is not None else ""
        return f"{self.kind} lattice, {pitch}{spots}"


#: 10x Visium: spots of 55 um on a hex lattice of 100 um pitch.
VISIUM: Final = Geometry("visium", "hex", pitch_um=100.0, spot_diameter_um=55.0)
#: Legacy Spatial Transcriptomics: spots of 100 um on a square lattice of 200 um pitch.
LEGACY_ST: Final = Geometry("st", "square", pitch_um=200.0, spot_diameter_um=100.0)
#: Square bins whose side each output states (Visium HD: 2, 8 or 16 um): a template.
SQUARE_BINS: Final = Geometry("square-bins", "square")
#: Cell-level data (Xenium and other imaging-based assays): the 6 nearest cells within 50 um,
#: the generic-coordinate default of squidpy's ``spatial_neighbors``, bounded so that an
#: isolated cell gets none rather than distant ones.
CELLS: Final = Geometry("cells", "cells", neighbour_radius_um=50.0, neighbour_k=6)

#: The geometry of each assay (manifest ``assay`` values).
GEOMETRIES: Final[Mapping[str, Geometry]] = {
    "visium": VISIUM,
    "visium-cytassist": replace(VISIUM, key="visium-cytassist"),
    "st": LEGACY_ST,
    "visium-hd": replace(SQUARE_BINS, key="visium-hd"),
    "xenium": replace(CELLS, key="xenium"),
}


def square_bins(bin_um: float) -> Geometry:
    """Square bins of ``bin_um`` micrometres, one bin apart."""
    return SQUARE_BINS.with_pitch(bin_um)


def assay_geometry(
    assay: str, *, pitch_um: float | None = None, slide_id: str | None = None, pitch_hint: str = ""
) -> Geometry:
    """The geometry of ``assay``, with ``pitch_um`` (when given) as its lattice pitch.

    Raises :class:`~curate.errors.UnsupportedAssayError` for an assay with no declared geometry
    (listing the known ones), or for a template (square bins) when no pitch is given; the
    reader says in ``pitch_hint`` where its format states the pitch.

    >>> assay_geometry("st").describe()
    'square lattice, 200 um pitch, 100 um spots'
    """
    geometry = GEOMETRIES.get(assay)
    if geometry is None:
        raise UnsupportedAssayError(
            f"assay {assay!r} has no spot geometry on record (known: {', '.join(sorted(GEOMETRIES))}); set the "
            "sample's `assay` to one of them",
            slide_id=slide_id,
        )
    if pitch_um is not None and geometry.is_lattice:
        geometry = geometry.with_pitch(pitch_um)
    if not geometry.complete:
        raise UnsupportedAssayError(
            f"assay {assay!r} is laid out in square bins whose size each output states, and none was found"
            + (f": {pitch_hint}" if pitch_hint else ""),
            slide_id=slide_id,
        )
    return geometry


# ---------------------------------------------------------------------------------------------
# Lattice fits: um/px from array coordinates, and array coordinates from pixels
# ---------------------------------------------------------------------------------------------


def lattice_steps(lattice: Kind) -> tuple[float, float]:
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
    row: npt.NDArray[np.integer] | npt.NDArray[np.floating],
    col: npt.NDArray[np.integer] | npt.NDArray[np.floating],
    *,
    lattice: Kind,
    pitch_um: float | None,
    iterations: int = 5,
) -> LatticeFit | None:
    """Fit ``(x, y) = A @ (col_um, row_um) + t`` robustly; ``None`` if the spots cannot fix A.

    Least squares, then refits on the spots whose residual is within ``max(4 x median
    residual, 5% of the pitch)``, so a few misregistered or mislabelled spots do not move the
    scale. Rotation, flips and a swapped axis order are absorbed by ``A``. ``row`` and ``col``
    may be fractional (legacy ST's spot-corrected array coordinates). Cell-level sites
    (``lattice="cells"``) and a lattice without a pitch have nothing to fit: ``None``.
    """
    if lattice not in LATTICE_KINDS or pitch_um is None:
        return None
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
    # Sites along one lattice line, jittered off it (fractional corrected coordinates), are of
    # full rank but fix the scale across the line only by their jitter: no fit.
    spread = design[inliers, :2] - design[inliers, :2].mean(axis=0)
    if np.linalg.svd(spread, compute_uv=False)[-1] / math.sqrt(int(inliers.sum())) < _MIN_SPREAD * pitch_um:
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
    pitch_px: float  # the lattice pitch used: pitch_um / mpp when known, else spacing_px
    angle_deg: float  # orientation of the lattice rows in the image
    n_components: int  # connected groups of spots (islands of tissue)
    n_collisions: int  # spots that landed on an occupied lattice site
    spacing_px: float = math.nan  # median nearest-neighbour distance measured between the spots

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
    spacing = float(np.median(dist[:, 1]))
    pitch = float(pitch_px) if pitch_px is not None and pitch_px > 0 else spacing
    if not pitch > 0:
        return DerivedLattice(
            row=zeros,
            col=zeros.copy(),
            pitch_px=pitch,
            angle_deg=0.0,
            n_components=n,
            n_collisions=n - 1,
            spacing_px=spacing,
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
        spacing_px=spacing,
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


# ---------------------------------------------------------------------------------------------
# Neighbours
# ---------------------------------------------------------------------------------------------

#: Array-coordinate offsets (row, col) of the lattice neighbours of a spot.
LATTICE_OFFSETS: Final[Mapping[str, tuple[tuple[int, int], ...]]] = {
    # Visium: rows alternate even/odd columns; the six neighbours sit at (r, c±2), (r±1, c±1).
    "hex": ((0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1)),
    # Legacy ST: a square grid.
    "square": ((0, -1), (0, 1), (-1, 0), (1, 0)),
}


@dataclass(frozen=True)
class Neighbors:
    """Adjacency in CSR form: the neighbours of spot ``i`` are
    ``indices[indptr[i]:indptr[i + 1]]`` (positions in the arrays given, ascending)."""

    indptr: npt.NDArray[np.int64]
    indices: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.indptr.size - 1)

    @property
    def counts(self) -> npt.NDArray[np.int32]:
        """Number of neighbours of every spot."""
        return np.diff(self.indptr).astype(np.int32)

    def of(self, spot: int) -> npt.NDArray[np.int64]:
        """Positions of the neighbours of ``spot``."""
        return self.indices[self.indptr[spot] : self.indptr[spot + 1]]

    def to_csr(self) -> sp.csr_matrix:
        """The n x n 0/1 adjacency matrix: ``adjacency @ counts`` sums each spot's neighbours."""
        import scipy.sparse as sp

        n = len(self)
        data = np.ones(self.indices.size, dtype=np.int32)
        return sp.csr_matrix((data, self.indices, self.indptr), shape=(n, n))

    def keys(self, keys: Sequence[str]) -> list[list[str]]:
        """The neighbours of every spot named by ``keys`` (aligned with the arrays given)."""
        return [[keys[j] for j in self.indices[a:b]] for a, b in zip(self.indptr[:-1], self.indptr[1:], strict=True)]


def lattice_neighbors(
    array_row: npt.ArrayLike,
    array_col: npt.ArrayLike,
    *,
    lattice: Kind = "hex",
    include: npt.ArrayLike | None = None,
) -> Neighbors:
    """The lattice neighbours of every spot among the ``include``\\ d spots (default: all).

    Hex (Visium): (r, c±2), (r±1, c±1); square (legacy ST): (r±1, c), (r, c±1). Two included
    spots at the same array position are a broken spot table and raise
    :class:`~curate.errors.CorruptSourceError`.

    Example::

        nbrs = lattice_neighbors(spots.array_row, spots.array_col, lattice="hex", include=spots.in_tissue)
        niche = nbrs.to_csr() @ counts  # summed neighbour expression, one row per spot
    """
    if lattice not in LATTICE_OFFSETS:
        raise ValueError(
            f"unknown lattice {lattice!r}; lattices are {', '.join(LATTICE_OFFSETS)} (cell-level sites: "
            "radius_neighbors, or spot_neighbors with the slide's geometry)"
        )
    rows = np.asarray(array_row, dtype=np.int64)
    cols = np.asarray(array_col, dtype=np.int64)
    if rows.shape != cols.shape or rows.ndim != 1:
        raise ValueError(f"array_row {rows.shape} and array_col {cols.shape} must be equal 1-d arrays")
    n = rows.size
    mask = np.ones(n, dtype=bool) if include is None else np.asarray(include, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"include {mask.shape} must have one entry per spot ({n},)")
    if n == 0:
        return Neighbors(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64))
    # One integer per array position, with room for the offsets on every side.
    row0, col0 = rows.min() - 2, cols.min() - 2
    width = int(cols.max() - col0) + 3

    def code(r: npt.NDArray[np.int64], c: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        result: npt.NDArray[np.int64] = (r - row0) * width + (c - col0)
        return result

    members = np.flatnonzero(mask)
    member_codes = code(rows[members], cols[members])
    sort = np.argsort(member_codes, kind="stable")
    sorted_codes = member_codes[sort]
    same = np.flatnonzero(sorted_codes[1:] == sorted_codes[:-1])
    if same.size:
        a, b = members[sort[same[0]]], members[sort[same[0] + 1]]
        raise CorruptSourceError(
            f"spots {a} and {b} (and {same.size - 1} more pairs) share array position "
            f"({rows[a]}, {cols[a]}): the spot table is broken; check the positions file"
        )
    sources: list[npt.NDArray[np.int64]] = []
    targets: list[npt.NDArray[np.int64]] = []
    everyone = np.arange(n, dtype=np.int64)
    for dr, dc in LATTICE_OFFSETS[lattice]:
        wanted = code(rows + dr, cols + dc)
        at = np.searchsorted(sorted_codes, wanted)
        at_clipped = np.minimum(at, sorted_codes.size - 1)
        found = (at < sorted_codes.size) & (sorted_codes[at_clipped] == wanted)
        sources.append(everyone[found])
        targets.append(members[sort[at_clipped[found]]].astype(np.int64))
    source = np.concatenate(sources)
    target = np.concatenate(targets)
    order = np.lexsort((target, source))
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(source, minlength=n), out=indptr[1:])
    return Neighbors(indptr=indptr, indices=target[order])


def radius_neighbors(
    x_um: npt.ArrayLike,
    y_um: npt.ArrayLike,
    *,
    radius_um: float,
    k: int | None = None,
    include: npt.ArrayLike | None = None,
) -> Neighbors:
    """The neighbours of every site among the ``include``\\ d sites (default: all) by distance.

    A site's neighbours are the included sites other than itself within ``radius_um`` (positions
    in micrometres), the ``k`` nearest of them when ``k`` is given (ties broken by position in
    the arrays, so the result is deterministic). Sites at a non-finite position have none and
    are nobody's neighbour.

    Example::

        nbrs = radius_neighbors(spots.x_px * mpp, spots.y_px * mpp, radius_um=50.0, k=6)
    """
    from scipy.spatial import cKDTree

    xs = np.asarray(x_um, dtype=np.float64)
    ys = np.asarray(y_um, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x_um {xs.shape} and y_um {ys.shape} must be equal 1-d arrays")
    if not (math.isfinite(radius_um) and radius_um > 0):
        raise ValueError(f"radius_um must be a positive number, not {radius_um!r}")
    if k is not None and k < 1:
        raise ValueError(f"k must be at least 1, not {k!r}")
    n = xs.size
    mask = np.ones(n, dtype=bool) if include is None else np.asarray(include, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"include {mask.shape} must have one entry per site ({n},)")
    points = np.column_stack([xs, ys])
    members = np.flatnonzero(mask & np.isfinite(points).all(axis=1))
    indptr = np.zeros(n + 1, dtype=np.int64)
    if members.size < 2:
        return Neighbors(indptr=indptr, indices=np.zeros(0, dtype=np.int64))
    tree = cKDTree(points[members])
    finite = np.flatnonzero(np.isfinite(points).all(axis=1))
    found: list[npt.NDArray[np.int64]] = [np.zeros(0, dtype=np.int64)] * n
    for site, near in zip(finite.tolist(), tree.query_ball_point(points[finite], r=radius_um), strict=True):
        candidates = members[np.asarray(near, dtype=np.int64)]
        candidates = candidates[candidates != site]
        if k is not None and candidates.size > k:
            distance = np.hypot(xs[candidates] - xs[site], ys[candidates] - ys[site])
            candidates = candidates[np.lexsort((candidates, distance))[:k]]
        found[site] = np.sort(candidates)
    np.cumsum([part.size for part in found], out=indptr[1:])
    return Neighbors(indptr=indptr, indices=np.concatenate(found).astype(np.int64))


def spot_neighbors(spots: Spots, *, geometry: Geometry, mpp: float, include: npt.ArrayLike | None = None) -> Neighbors:
    """The neighbours of every spot of ``spots`` by the rule of ``geometry``.

    Lattices: :func:`lattice_neighbors` on the array coordinates. Cell-level sites:
    :func:`radius_neighbors` on the pixel positions times ``mpp`` (um/px).
    """
    if geometry.is_lattice:
        return lattice_neighbors(spots.array_row, spots.array_col, lattice=geometry.kind, include=include)
    if geometry.neighbour_radius_um is None:  # refused by Geometry itself; here for the type checker
        raise ValueError(f"geometry {geometry.key!r} has no neighbour radius")
    return radius_neighbors(
        spots.x_px * mpp,
        spots.y_px * mpp,
        radius_um=geometry.neighbour_radius_um,
        k=geometry.neighbour_k,
        include=include,
    )


# ---------------------------------------------------------------------------------------------
# Pooling points (bins, cells) onto a declared grid
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridPool:
    """Which site of a declared grid each point falls in, and the sites that received any.

    ``site[i]`` is the site of point ``i`` (an index into the per-site arrays), or -1 when the
    point lies in no site (between the discs of a hex lattice). Sites are in lattice order
    (row, then column); centres are in the frame of the points given.
    """

    site: npt.NDArray[np.int64]
    row: IntArray
    col: IntArray
    x_um: FloatArray
    y_um: FloatArray

    def __len__(self) -> int:
        return int(self.row.shape[0])

    def matrix(self) -> sp.csr_matrix:
        """The sites x points 0/1 matrix: ``pool.matrix() @ counts`` sums each site's points."""
        import scipy.sparse as sp

        inside = np.flatnonzero(self.site >= 0)
        data = np.ones(inside.size, dtype=np.int32)
        return sp.csr_matrix((data, (self.site[inside], inside)), shape=(len(self), self.site.shape[0]))


def pool_to_grid(x_um: npt.ArrayLike, y_um: npt.ArrayLike, *, geometry: Geometry) -> GridPool:
    """Assign points (positions in micrometres) to the sites of a lattice ``geometry``.

    Square lattice: cells of side ``pitch_um`` with a corner at the origin; every point falls
    in one (``floor(x / pitch)``). Hex lattice (Space Ranger's convention: site ``(row, col)``,
    ``row + col`` even, at ``x = col * pitch / 2``, ``y = row * pitch * sqrt(3) / 2``): a point
    belongs to its nearest site when it lies within the site's disc of ``spot_diameter_um``
    (Visium's 55 um spots on a 100 um pitch leave the points between discs in no site).

    >>> pool = pool_to_grid([5.0, 15.0, 25.0], [5.0, 5.0, 5.0], geometry=square_bins(20.0))
    >>> pool.site.tolist(), pool.col.tolist()
    ([0, 0, 1], [0, 1])
    """
    xs = np.asarray(x_um, dtype=np.float64)
    ys = np.asarray(y_um, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x_um {xs.shape} and y_um {ys.shape} must be equal 1-d arrays")
    kind, pitch = geometry.lattice_and_pitch()
    if kind == "square":
        rows = np.floor(ys / pitch).astype(np.int64)
        cols = np.floor(xs / pitch).astype(np.int64)
        inside = np.isfinite(xs) & np.isfinite(ys)
    else:
        if geometry.spot_diameter_um is None:
            raise ValueError(f"geometry {geometry.key!r}: a hex grid to pool onto needs spot_diameter_um")
        step_x, step_y = pitch / 2.0, pitch * SQRT3_2
        base = np.rint(ys / step_y).astype(np.int64)
        best = np.full(xs.shape, np.inf)
        rows = np.zeros(xs.shape, dtype=np.int64)
        cols = np.zeros(xs.shape, dtype=np.int64)
        for offset in (-1, 0, 1):
            r = base + offset
            c = np.rint(xs / step_x).astype(np.int64)
            odd = (r + c) % 2 != 0  # the nearest column of the right parity
            c = np.where(odd, np.where(xs / step_x > c, c + 1, c - 1), c)
            distance = np.hypot(xs - c * step_x, ys - r * step_y)
            closer = distance < best
            best = np.where(closer, distance, best)
            rows = np.where(closer, r, rows)
            cols = np.where(closer, c, cols)
        inside = best <= geometry.spot_diameter_um / 2.0
    site = np.full(xs.shape, -1, dtype=np.int64)
    if not inside.any():
        empty_i, empty_f = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float64)
        return GridPool(site=site, row=empty_i, col=empty_i.copy(), x_um=empty_f, y_um=empty_f.copy())
    pairs = np.column_stack([rows[inside], cols[inside]])
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    site[inside] = inverse.ravel()
    site_row, site_col = unique[:, 0], unique[:, 1]
    if kind == "square":
        x_c, y_c = (site_col + 0.5) * pitch, (site_row + 0.5) * pitch
    else:
        x_c, y_c = site_col * (pitch / 2.0), site_row * (pitch * SQRT3_2)
    return GridPool(
        site=site,
        row=site_row.astype(np.int32),
        col=site_col.astype(np.int32),
        x_um=x_c.astype(np.float64),
        y_um=y_c.astype(np.float64),
    )


# ---------------------------------------------------------------------------------------------
# The pyramid level for a target um/px
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LevelChoice:
    """Where to read pixels at a target um/px: a pyramid level, decoded at 1/``reduce`` scale."""

    level: int
    reduce: int  # JPEG DCT-domain reduction of that level (1: none)
    mpp: float  # um/px of the pixels read


def choose_level(
    image: SlideImage, *, image_mpp: float, target_mpp: float, tolerance: float = 0.0
) -> LevelChoice | None:
    """The coarsest (level, JPEG reduction) of ``image`` whose um/px is at most ``target_mpp``.

    A source coarser than the target by at most the fraction ``tolerance`` counts as equal
    (the tiler allows half an output pixel over a view). Among equally coarse sources, the one
    with the least reduction. ``None`` when even level 0 is coarser than the target: the
    caller decides whether to enlarge.
    """
    best: tuple[float, int, int] | None = None  # (source um/px, reduce, level)
    for index, lvl in enumerate(image.levels):
        for reduce in image.reductions(index):
            source = image_mpp * lvl.downsample * reduce
            if source > target_mpp * (1 + tolerance):
                continue
            if best is None or source > best[0] * (1 + 1e-9) or (math.isclose(source, best[0]) and reduce < best[1]):
                best = (source, reduce, index)
    if best is None:
        return None
    return LevelChoice(level=best[2], reduce=best[1], mpp=best[0])


__all__ = [
    "CELLS",
    "GEOMETRIES",
    "LATTICE_KINDS",
    "LATTICE_OFFSETS",
    "LEGACY_ST",
    "SQUARE_BINS",
    "VISIUM",
    "DerivedLattice",
    "Geometry",
    "GridPool",
    "Kind",
    "Lattice",
    "LatticeFit",
    "LevelChoice",
    "Neighbors",
    "assay_geometry",
    "choose_level",
    "derive_array_coords",
    "fit_lattice",
    "lattice_neighbors",
    "lattice_steps",
    "pool_to_grid",
    "radius_neighbors",
    "spot_neighbors",
    "square_bins",
]
