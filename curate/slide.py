"""The ``Slide``: what every reader returns, whatever the source technology.

A slide is raw counts (spots x features, sparse, as stored), the features as the source names
them, a spot table in full-resolution image pixels, a lazily opened image, the um/px of that
image and where it came from, how its spots are laid out (a ``curate.geometry.Geometry``: a
lattice and its pitch, or a cell-level neighbour rule), the manifest sample, the QC checks run
on it so far, and every spot the reader read but could not keep, counted by reason.

Coordinates: ``spots.x_px`` / ``spots.y_px`` are in level-0 pixels of ``slide.image`` (x to the
right, y down), and ``slide.mpp`` is the um/px of that level. When a reader falls back to a
downscaled image (Space Ranger's hires/lowres PNG), it scales the coordinates and the um/px
together and says so in ``notes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from stcorpus.curate.errors import CorruptSourceError
from stcorpus.curate.geometry import VISIUM, Geometry, Kind

if TYPE_CHECKING:
    import scipy.sparse as sp

    from stcorpus.curate.imaging import SlideImage
    from stcorpus.curate.manifest import Sample

#: Where a slide's um/px came from, in order of preference when sources disagree.
MppSource = Literal["manifest", "metadata", "scalefactors", "lattice", "spot_radius"]


class SpotDrop:
    """Why a reader dropped a spot it read (the keys of ``Slide.dropped_spots``)."""

    NOT_IN_POSITIONS = "barcode_not_in_positions"  # a matrix row with no row in the positions file
    NOT_IN_MATRIX = "barcode_not_in_matrix"  # an in-tissue position with no matrix row (legacy ST: no count row)
    NAN_COORDINATES = "nan_coordinates"  # a spot centre that is NaN or infinite
    DUPLICATE_BARCODE = "duplicate_barcode"  # a barcode listed twice (the later rows are dropped)


@dataclass(frozen=True)
class Features:
    """The features (genes) of a matrix, as the source names them, aligned with its columns."""

    ids: npt.NDArray[np.str_]  # Ensembl ids as given ("" where the source gives none)
    names: npt.NDArray[np.str_]  # symbols as given ("" where the source gives none)

    def __post_init__(self) -> None:
        if self.ids.shape != self.names.shape or self.ids.ndim != 1:
            raise ValueError(f"feature ids {self.ids.shape} and names {self.names.shape} must be equal 1-d arrays")

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class Spots:
    """The spot table, one row per matrix row (aligned with ``Slide.counts``)."""

    barcode: npt.NDArray[np.str_]
    in_tissue: npt.NDArray[np.bool_]
    array_row: npt.NDArray[np.int32]
    array_col: npt.NDArray[np.int32]
    x_px: npt.NDArray[np.float64]  # level-0 pixels of Slide.image
    y_px: npt.NDArray[np.float64]

    def __post_init__(self) -> None:
        n = self.barcode.shape[0]
        for name in ("in_tissue", "array_row", "array_col", "x_px", "y_px"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"spots.{name} has shape {getattr(self, name).shape}, expected ({n},)")

    def __len__(self) -> int:
        return int(self.barcode.shape[0])

    def subset(self, mask: npt.NDArray[np.bool_] | npt.NDArray[np.intp]) -> Spots:
        """The rows selected by a boolean mask or an index array, in that order."""
        return Spots(
            barcode=self.barcode[mask],
            in_tissue=self.in_tissue[mask],
            array_row=self.array_row[mask],
            array_col=self.array_col[mask],
            x_px=self.x_px[mask],
            y_px=self.y_px[mask],
        )


@dataclass(frozen=True)
class QCCheck:
    """One quality-control measurement on a slide."""

    name: str  # e.g. "mpp_lattice_agreement"
    value: float | int | str | None  # the number measured
    passed: bool
    reason: str = ""  # why it failed, or what was done about it
    blocking: bool = False  # a failed blocking check raises; a failed non-blocking one flags


@dataclass
class Slide:
    """One slide read from its sources, validated, before genes and tiles touch it."""

    sample: Sample
    counts: sp.csr_matrix  # spots x features, dtype as stored (integers, or float if the source is)
    features: Features
    spots: Spots
    image: SlideImage
    mpp: float  # um/px of level 0 of `image`
    mpp_source: MppSource
    #: How the spots are laid out (lattice kind and pitch, or a cell-level neighbour rule).
    geometry: Geometry = VISIUM
    qc: list[QCCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. image fallbacks, features dropped
    dropped_features: int = 0  # non "Gene Expression" features removed by the reader
    #: Spots the reader read but could not keep, by reason (``SpotDrop`` values): every one is
    #: counted here and shown in the build summary, ``slides.parquet`` and the QC report.
    dropped_spots: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_spots, n_features = self.counts.shape
        if n_spots != len(self.spots):
            raise ValueError(f"counts has {n_spots} rows but the spot table has {len(self.spots)}")
        if n_features != len(self.features):
            raise ValueError(f"counts has {n_features} columns but there are {len(self.features)} features")
        if not self.geometry.complete:
            raise ValueError(f"geometry {self.geometry.key!r} has no pitch: give the slide its stated pitch")
        if not (np.isfinite(self.mpp) and self.mpp > 0):  # every size in um downstream divides by it
            self.image.close()
            raise CorruptSourceError(
                f"{self.sample.describe()}: the um/px from {self.mpp_source} is {self.mpp!r}, not a positive number: "
                "the source states a broken scale; set the sample's `mpp` in the manifest",
                slide_id=self.sample.id,
            )

    @property
    def lattice(self) -> Kind:
        """The kind of layout: ``hex``, ``square`` (lattices) or ``cells``."""
        return self.geometry.kind

    @property
    def pitch_um(self) -> float | None:
        """The lattice pitch in micrometres (None for cell-level sites)."""
        return self.geometry.pitch_um

    @property
    def id(self) -> str:
        """The slide id (the manifest sample's id)."""
        return self.sample.id

    @property
    def flags(self) -> list[str]:
        """Names of failed non-blocking checks."""
        return [check.name for check in self.qc if not check.passed and not check.blocking]
