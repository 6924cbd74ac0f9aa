"""Spot-centred tiles at a true physical scale: the ``patch`` and ``region`` JPEGs of every spot.

For each spot of a :class:`~curate.slide.Slide` (``spots.x_px/y_px`` in level-0 pixels of
``slide.image``, ``slide.mpp`` um/px), two views are cut and encoded as JPEG (CORPUS.md §2):

``patch``
    ``patch_size`` px at ``patch_mpp`` um/px centred on the spot (224 px at 0.5 um/px: 112 um).
``region``
    ``region_size`` px at ``region_mpp`` um/px (224 px at 1.5 um/px: 336 um): a 3x3 grid of
    patch-sized cells placed so that the spot's patch is cell ``pos`` (0..8, row-major), where
    ``pos`` is drawn from a stable hash of the sample key (:func:`region_pos`).

How the pixels are made (:class:`Tiler`):

1. Each view reads the coarsest pyramid level, or JPEG DCT-domain reduction of a level, whose
   um/px is at most the view's (never coarser than needed), and resamples from there with an
   area filter. When the level is the view's scale, the view is a plain crop of it. Otherwise
   the image is resampled to the view's um/px tile by tile on a fixed grid (cached like image
   tiles, so overlapping views share the work) and the view is a crop of that: where the scale
   ratio is p/q for small integers (2, 3, 1.5, ...) every output pixel is the exact average of
   the source area under it (pixels repeated q times, then p x p block means); other ratios
   use Pillow's antialiased triangle filter. Either way the spot lies within half an output
   pixel of the view's centre. An image coarser than a view's um/px is
   enlarged by at most ``max_upsample``; beyond that the slide raises ``ImageTooCoarseError``.
2. Spots are visited in row bands (top to bottom, left to right within a band), so each image
   tile is decoded once while neighbouring spots use it, and the image's decoded-tile cache
   (bounded in bytes) keeps memory flat whatever the slide size.
3. A spot whose patch lies mostly outside the image, or shows mostly background (a cheap test
   of colour saturation, :func:`tissue_fraction`), is rejected with a reason; rejections are
   counted by reason in :class:`TileStats`.
4. JPEG with libjpeg-turbo at a fixed quality and chroma subsampling, no metadata: the same
   slide and settings give byte-identical files.

The build's entry point is :func:`cut_tiles`; the pyramid level each view reads is chosen by
:func:`curate.geometry.choose_level`, and neighbours live in :mod:`curate.geometry` too.

Coordinates: a spot at pixel ``(x_px, y_px)`` is the centre of that pixel, i.e. the point
``(x_px + 0.5, y_px + 0.5)`` of the continuous image plane in which pixel ``(i, j)`` covers
``[i, i + 1) x [j, j + 1)``. A view of even size has its centre on the corner shared by its four
central pixels.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import numpy.typing as npt

from stcorpus.curate.errors import ImageTooCoarseError, SettingsError
from stcorpus.curate.geometry import LevelChoice, choose_level
from stcorpus.curate.imaging import RGBArray, SlideImage, Window
from stcorpus.schema import DEFAULT_VIEWS, PATCH_COLUMN, REGION_COLUMN, REGION_GRID, sample_key
from stcorpus.settings import unknown_keys_message

if TYPE_CHECKING:
    from stcorpus.curate.slide import Slide

Resample = Literal["area", "bilinear", "bicubic", "lanczos"]
Subsampling = Literal["444", "422", "420"]
Encoder = Literal["simplejpeg", "pil"]

#: Rejection reasons, as counted in :class:`TileStats` and carried by :class:`TileResult`.
REJECT_OUTSIDE: Final = "outside_image"
REJECT_BACKGROUND: Final = "background"
REJECT_REASONS: Final = (REJECT_OUTSIDE, REJECT_BACKGROUND)

#: A pixel is tissue when max(R, G, B) - min(R, G, B) is at least this (0..255). Slide
#: background is grey or white whatever its brightness (chroma 0-8 on the real H&E fixture,
#: even where the glass reads dark grey), H&E-stained tissue is pink to purple (chroma 25-60).
TISSUE_CHROMA: Final = 16
#: The tissue test looks at every 4th pixel in each direction: 3,136 of a 224 px patch.
_TISSUE_STRIDE: Final = 4

_FILTER_SUPPORT: Final[Mapping[str, float]] = {"area": 0.5, "bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}
_PIL_SUBSAMPLING: Final[Mapping[str, int]] = {"444": 0, "422": 1, "420": 2}


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileSettings:
    """How tiles are cut and encoded. Defaults follow CORPUS.md §2 (HEST-Benchmark / STAMP).

    ``region_mpp=None`` derives the region's um/px so that it spans exactly 3x3 patches:
    ``3 * patch_size * patch_mpp / region_size`` (1.5 um/px with the defaults).
    """

    patch_size: int = DEFAULT_VIEWS[PATCH_COLUMN].size_px
    patch_mpp: float = DEFAULT_VIEWS[PATCH_COLUMN].mpp
    region_size: int = DEFAULT_VIEWS[REGION_COLUMN].size_px
    region_mpp: float | None = None
    #: Cut the region view too (False: patches only).
    regions: bool = True
    #: Largest enlargement of the image allowed for a view (2.0: a 1 um/px image still gives
    #: 0.5 um/px patches; CORPUS.md §5: coarser images cannot give honest 0.5 um/px tiles).
    max_upsample: float = 2.0
    #: Resampling filter when reducing: "area" averages exactly the source area under each
    #: output pixel where the scale ratio is p/q with q <= 4 (2x, 3x, 1.5x, ...) and uses the
    #: antialiased triangle filter otherwise (Pillow's box filter would jitter pixel positions
    #: at fractional ratios); the others are Pillow's antialiased filters. Enlarging is bicubic
    #: with "area".
    resample: Resample = "area"
    jpeg_quality: int = 90
    jpeg_subsampling: Subsampling = "420"
    encoder: Encoder = "simplejpeg"
    #: Reject a spot when more than this fraction of its patch lies outside the image.
    max_outside_fraction: float = 0.5
    #: Reject a spot when less than this fraction of its patch is tissue (:func:`tissue_fraction`).
    #: A 55 um Visium spot covers 19% of a 112 um patch: below 10% tissue the spot itself
    #: cannot be mostly on tissue. 0 disables the test.
    min_tissue_fraction: float = 0.1
    #: Seed mixed into the key hash that draws ``pos`` (change it for another draw).
    pos_seed: int = 0
    #: Bound of the image's decoded-tile cache while cutting (None: leave the image's own).
    cache_bytes: int | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name in ("patch_size", "region_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 8 <= value <= 4096:
                problems.append(f"{name} must be an integer number of pixels in 8..4096, not {value!r}")
        for name in ("patch_mpp", "region_mpp"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and 0 < value < 1000):
                problems.append(f"{name} must be a positive um/px, not {value!r}")
        if not self.max_upsample >= 1:
            problems.append(f"max_upsample must be >= 1 (1: never enlarge), not {self.max_upsample!r}")
        if self.resample not in _FILTER_SUPPORT:
            problems.append(f"resample must be one of {', '.join(_FILTER_SUPPORT)}, not {self.resample!r}")
        if not (isinstance(self.jpeg_quality, int) and 1 <= self.jpeg_quality <= 100):
            problems.append(f"jpeg_quality must be an integer in 1..100, not {self.jpeg_quality!r}")
        if self.jpeg_subsampling not in _PIL_SUBSAMPLING:
            problems.append(f"jpeg_subsampling must be one of 444, 422, 420, not {self.jpeg_subsampling!r}")
        if self.encoder not in ("simplejpeg", "pil"):
            problems.append(f"encoder must be simplejpeg or pil, not {self.encoder!r}")
        for name in ("max_outside_fraction", "min_tissue_fraction"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                problems.append(f"{name} must be a fraction in 0..1, not {value!r}")
        if self.cache_bytes is not None and self.cache_bytes < 0:
            problems.append(f"cache_bytes must be >= 0, not {self.cache_bytes!r}")
        if not problems and self.region_mpp is not None:
            expected = REGION_GRID * self.patch_size * self.patch_mpp / self.region_size
            if not math.isclose(self.region_mpp, expected, rel_tol=1e-6):
                problems.append(
                    f"region_mpp={self.region_mpp} does not make the region a {REGION_GRID}x{REGION_GRID} grid of "
                    f"patches: with patch {self.patch_size} px at {self.patch_mpp} um/px and region "
                    f"{self.region_size} px it must be {expected:.6g} (or leave it unset)"
                )
        if problems:
            raise SettingsError("tile settings: " + "; ".join(problems))

    @property
    def region_um_per_px(self) -> float:
        """The region's um/px (``region_mpp``, or derived from the patch geometry)."""
        if self.region_mpp is not None:
            return self.region_mpp
        return REGION_GRID * self.patch_size * self.patch_mpp / self.region_size

    @property
    def patch_um(self) -> float:
        """Field of view of a patch (and of one region cell) in micrometres."""
        return self.patch_size * self.patch_mpp

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TileSettings:
        """Settings from a mapping (YAML/JSON/CLI); unknown keys are an error."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known), key=str)
        if unknown:
            raise SettingsError(f"tile settings: {unknown_keys_message(unknown, known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values, with the derived region um/px filled in (for provenance)."""
        values = asdict(self)
        values["region_mpp"] = self.region_um_per_px
        return values


# ---------------------------------------------------------------------------------------------
# Small pure functions
# ---------------------------------------------------------------------------------------------


def region_pos(key: str, *, seed: int = 0) -> int:
    """The region cell (0..8, row-major) holding the patch of sample ``key``.

    A stable hash (BLAKE2b) of the key, so every build, process and platform agrees; Python's
    ``hash()`` is salted per process and would not.

    >>> region_pos("TENX95__AAACAAGTATCTCCCA-1")
    4
    """
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (REGION_GRID * REGION_GRID)


def tissue_fraction(pixels: RGBArray, *, stride: int = _TISSUE_STRIDE, chroma: int = TISSUE_CHROMA) -> float:
    """Fraction of the (subsampled) pixels of an RGB view that look like stained tissue.

    A pixel counts as tissue when ``max(R, G, B) - min(R, G, B) >= chroma``: glass, white
    padding and grey background have almost no colour, H&E stain has plenty.
    """
    # One copy of the sample into channel planes, then max/min across the planes: numpy's
    # max/min over a last axis of 3 is ten times slower, and plane by plane on the strided
    # sample (7 ufunc calls) costs 12 us per 224 px patch against 7 us this way.
    planes = pixels[::stride, ::stride, :3].transpose(2, 0, 1).copy()
    spread = planes.max(axis=0)
    spread -= planes.min(axis=0)
    return int(np.count_nonzero(spread >= chroma)) / int(spread.size)


def encode_jpeg(
    pixels: RGBArray, *, quality: int = 90, subsampling: Subsampling = "420", encoder: Encoder = "simplejpeg"
) -> bytes:
    """Encode an RGB ``uint8`` array as a baseline JPEG with libjpeg-turbo, without metadata.

    The output depends only on the pixels and the arguments (no timestamps), so it is
    byte-identical across runs and processes for one encoder and libjpeg-turbo version.
    """
    if encoder == "simplejpeg":
        import simplejpeg

        data: bytes = simplejpeg.encode_jpeg(
            np.ascontiguousarray(pixels), quality=quality, colorspace="RGB", colorsubsampling=subsampling
        )
        return data
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(
        buffer, format="JPEG", quality=quality, subsampling=_PIL_SUBSAMPLING[subsampling], optimize=False
    )
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Scale plans
# ---------------------------------------------------------------------------------------------

Method = Literal["crop", "area", "resample"]

#: Largest q of an exact p/q area reduction (the view is enlarged q times in between).
_MAX_AREA_ZOOM: Final = 4


@dataclass(frozen=True)
class ScalePlan:
    """Where a view's pixels are read from and how they become ``size`` x ``size`` pixels."""

    view: str  # "patch" or "region"
    size: int  # output pixels per side
    mpp: float  # output um/px
    level: int  # pyramid level read
    reduce: int  # JPEG DCT-domain reduction of that level (1: none)
    source_mpp: float  # um/px of the pixels read
    factor: float  # source pixels per output pixel (> 1 reduces, < 1 enlarges)
    method: Method  # crop: no resampling; area: exact p/q area means; resample: a filter
    step: float = 1.0  # source pixels per output pixel as made: 1 (crop), p/q (area), factor
    block: int = 1  # p for method "area": output pixels are p x p block means ...
    zoom: int = 1  # ... of the source enlarged q times (pixel repetition)


def plan_scale(
    image: SlideImage,
    *,
    image_mpp: float,
    mpp: float,
    size: int,
    max_upsample: float = 2.0,
    resample: Resample = "area",
    view: str = "patch",
) -> ScalePlan:
    """Choose where to read a ``size`` px view at ``mpp`` um/px from an image at ``image_mpp``.

    The source is the coarsest (level, JPEG reduction) whose um/px is at most ``mpp``, counting
    as equal a source coarser by less than half an output pixel over the view; among equally
    coarse sources, the one with the least reduction. Raises :class:`ImageTooCoarseError` when
    even level 0 would have to be enlarged by more than ``max_upsample``.
    """
    if not (image_mpp > 0 and math.isfinite(image_mpp)):
        raise ImageTooCoarseError(f"{image.path.name}: image um/px {image_mpp!r} is not a positive number")
    choice = choose_level(image, image_mpp=image_mpp, target_mpp=mpp, tolerance=0.5 / size)
    if choice is None:
        enlarge = image_mpp / mpp
        if enlarge > max_upsample * (1 + 1e-9):
            raise ImageTooCoarseError(
                f"{image.path.name}: the image is {image_mpp:.4g} um/px; {view} tiles at {mpp:g} um/px would "
                f"enlarge it {enlarge:.2f}x, more than max_upsample={max_upsample:g}. Use a finer image of the "
                "slide, or coarser tiles (`curate build --patch-mpp`) or more enlargement (`--max-upsample`)"
            )
        choice = LevelChoice(level=0, reduce=1, mpp=image_mpp)
    source, reduce, level = choice.mpp, choice.reduce, choice.level
    factor = mpp / source
    method: Method = "resample"
    step = factor
    block = zoom = 1
    if abs(factor - 1) * size < 0.5:
        method, step = "crop", 1.0
    elif factor > 1 and resample == "area":
        for q in range(1, _MAX_AREA_ZOOM + 1):
            p = round(factor * q)
            # p/q reproduces the view's extent to within half an output pixel.
            if p > q and abs(factor - p / q) * size < 0.5:
                method, step, block, zoom = "area", p / q, p, q
                break
    return ScalePlan(
        view=view,
        size=size,
        mpp=mpp,
        level=level,
        reduce=reduce,
        source_mpp=source,
        factor=factor,
        method=method,
        step=step,
        block=block,
        zoom=zoom,
    )


# ---------------------------------------------------------------------------------------------
# Results and statistics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileResult:
    """The tiles of one spot, or why it has none."""

    index: int  # the spot's row in slide.spots
    key: str  # sample key <slide_id>__<barcode>
    pos: int  # region cell 0..8 holding the patch
    outside_fraction: float  # fraction of the patch outside the image (padded white)
    tissue_fraction: float | None  # fraction of the patch that is tissue (None: not looked at)
    patch: bytes | None  # JPEG; None when rejected
    region: bytes | None  # JPEG; None when rejected or regions are off
    rejected: str | None = None  # one of REJECT_REASONS, or None

    @property
    def accepted(self) -> bool:
        """True when the spot has its tiles."""
        return self.rejected is None


@dataclass
class TileStats:
    """What a :func:`cut_tiles` run did: counts by outcome, sources read, time and cache use."""

    n_spots: int
    patch_plan: ScalePlan
    region_plan: ScalePlan | None
    n_done: int = 0
    n_accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    tiles_decoded: int = 0  # image tiles decoded (cache misses)
    cache_hits: int = 0
    cache_peak_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain values for build reports (JSON-ready)."""
        return {
            "n_spots": self.n_spots,
            "n_done": self.n_done,
            "n_accepted": self.n_accepted,
            "rejected": {reason: self.rejected.get(reason, 0) for reason in REJECT_REASONS},
            "seconds": round(self.seconds, 3),
            "tiles_decoded": self.tiles_decoded,
            "cache_hits": self.cache_hits,
            "cache_peak_bytes": self.cache_peak_bytes,
            "patch_plan": asdict(self.patch_plan),
            "region_plan": asdict(self.region_plan) if self.region_plan is not None else None,
        }


# ---------------------------------------------------------------------------------------------
# The tiler
# ---------------------------------------------------------------------------------------------


class Tiler:
    """Cuts the patch and region of spots from one image at a known um/px.

    Example::

        tiler = Tiler(slide.image, mpp=slide.mpp)
        pixels = tiler.patch_pixels(1520.0, 2210.5)  # 224x224x3 uint8 at 0.5 um/px
    """

    def __init__(self, image: SlideImage, *, mpp: float, settings: TileSettings | None = None) -> None:
        self.image = image
        self.mpp = float(mpp)
        self.settings = settings = settings or TileSettings()
        self.patch_plan = plan_scale(
            image,
            image_mpp=self.mpp,
            mpp=settings.patch_mpp,
            size=settings.patch_size,
            max_upsample=settings.max_upsample,
            resample=settings.resample,
            view="patch",
        )
        self.region_plan = (
            plan_scale(
                image,
                image_mpp=self.mpp,
                mpp=settings.region_um_per_px,
                size=settings.region_size,
                max_upsample=settings.max_upsample,
                resample=settings.resample,
                view="region",
            )
            if settings.regions
            else None
        )
        #: Half the patch's side in level-0 pixels.
        self._half_patch = settings.patch_um / self.mpp / 2
        self._grids: dict[str, _ResampledGrid] = {}

    # -- geometry ------------------------------------------------------------------------------

    def outside_fraction(self, x_px: float, y_px: float) -> float:
        """Fraction of the patch around spot ``(x_px, y_px)`` that lies outside the image."""
        if not (math.isfinite(x_px) and math.isfinite(y_px)):
            return 1.0
        cx, cy, half = x_px + 0.5, y_px + 0.5, self._half_patch
        inside_x = max(0.0, min(cx + half, self.image.width) - max(cx - half, 0.0))
        inside_y = max(0.0, min(cy + half, self.image.height) - max(cy - half, 0.0))
        return max(0.0, 1.0 - inside_x * inside_y / (2 * half) ** 2)

    def region_offset(self, pos: int) -> tuple[float, float]:
        """Level-0 pixels from the spot to the centre of its region when the patch is cell ``pos``."""
        row, col = divmod(pos, REGION_GRID)
        cell = self.settings.patch_um / self.mpp
        middle = (REGION_GRID - 1) / 2
        return (middle - col) * cell, (middle - row) * cell

    # -- pixels --------------------------------------------------------------------------------

    def patch_pixels(self, x_px: float, y_px: float) -> RGBArray:
        """The patch of the spot at level-0 pixel ``(x_px, y_px)``: ``patch_size``² RGB pixels."""
        return self._view(self.patch_plan, x_px + 0.5, y_px + 0.5)

    def region_pixels(self, x_px: float, y_px: float, pos: int) -> RGBArray:
        """The region of the spot at ``(x_px, y_px)`` with its patch in cell ``pos``."""
        if self.region_plan is None:
            raise SettingsError("regions are switched off in these tile settings (regions=False)")
        dx, dy = self.region_offset(pos)
        return self._view(self.region_plan, x_px + 0.5 + dx, y_px + 0.5 + dy)

    def _view(self, plan: ScalePlan, cx: float, cy: float) -> RGBArray:
        """A ``plan.size`` px view centred (to half an output pixel) on the level-0 point ``(cx, cy)``."""
        x0, y0 = self._origin(plan, cx, cy)
        size = plan.size
        if plan.method == "crop":
            return self.image.read_region(level=plan.level, x=x0, y=y0, width=size, height=size, reduce=plan.reduce)
        return self._grid(plan).read(x0, y0, size)

    def _origin(self, plan: ScalePlan, cx: float, cy: float) -> tuple[int, int]:
        """The top-left pixel of the view centred on ``(cx, cy)``, in the pixels of the grid it is cut
        from: the source level itself for a crop, else the image resampled to the view's scale."""
        scale = self.image.levels[plan.level].downsample * plan.reduce * plan.step
        return math.floor(cx / scale - plan.size / 2 + 0.5), math.floor(cy / scale - plan.size / 2 + 0.5)

    def _grid(self, plan: ScalePlan) -> _ResampledGrid:
        grid = self._grids.get(plan.view)
        if grid is None:
            grid = self._grids[plan.view] = _ResampledGrid(self.image, plan, self.settings.resample)
        return grid

    def windows(self, x_px: npt.ArrayLike, y_px: npt.ArrayLike, keys: Sequence[str]) -> set[Window]:
        """The source windows cutting spots ``(x_px[i], y_px[i])`` reads (their patches and regions),
        for :meth:`SlideImage.prefetch`. Spots rejected as outside the image read nothing."""
        windows: set[Window] = set()
        for x, y, key in zip(np.asarray(x_px, dtype=np.float64), np.asarray(y_px, dtype=np.float64), keys, strict=True):
            if self.outside_fraction(float(x), float(y)) > self.settings.max_outside_fraction:
                continue
            views = [(self.patch_plan, x + 0.5, y + 0.5)]
            if self.region_plan is not None:
                dx, dy = self.region_offset(region_pos(key, seed=self.settings.pos_seed))
                views.append((self.region_plan, x + 0.5 + dx, y + 0.5 + dy))
            for plan, cx, cy in views:
                x0, y0 = self._origin(plan, float(cx), float(cy))
                if plan.method == "crop":
                    windows.add((plan.level, plan.reduce, x0, y0, x0 + plan.size, y0 + plan.size))
                else:
                    windows.update(self._grid(plan).source_windows(x0, y0, plan.size))
        return windows

    # -- one spot ------------------------------------------------------------------------------

    def cut(self, x_px: float, y_px: float, *, key: str, index: int = -1) -> TileResult:
        """Cut, test and encode the views of one spot (see the module docstring)."""
        settings = self.settings
        pos = region_pos(key, seed=settings.pos_seed)
        outside = self.outside_fraction(x_px, y_px)
        if outside > settings.max_outside_fraction:
            return TileResult(index, key, pos, outside, None, None, None, REJECT_OUTSIDE)
        patch = self.patch_pixels(x_px, y_px)
        tissue = tissue_fraction(patch)
        if tissue < settings.min_tissue_fraction:
            return TileResult(index, key, pos, outside, tissue, None, None, REJECT_BACKGROUND)
        encode = self._encode
        region = encode(self.region_pixels(x_px, y_px, pos)) if self.region_plan is not None else None
        return TileResult(index, key, pos, outside, tissue, encode(patch), region)

    def _encode(self, pixels: RGBArray) -> bytes:
        s = self.settings
        return encode_jpeg(pixels, quality=s.jpeg_quality, subsampling=s.jpeg_subsampling, encoder=s.encoder)

    # -- many spots ----------------------------------------------------------------------------

    def order(self, x_px: npt.ArrayLike, y_px: npt.ArrayLike) -> npt.NDArray[np.intp]:
        """Positions of the spots in reading order: row bands one patch high, top to bottom, and
        left to right within a band (spots with no finite position last, in input order)."""
        xs = np.asarray(x_px, dtype=np.float64)
        ys = np.asarray(y_px, dtype=np.float64)
        finite = np.isfinite(xs) & np.isfinite(ys)
        band = np.where(finite, np.floor(ys / (2 * self._half_patch)), np.inf)
        across = np.where(finite, xs, np.inf)
        return np.lexsort((np.arange(xs.size), across, band))

    def cut_many(
        self,
        x_px: npt.ArrayLike,
        y_px: npt.ArrayLike,
        keys: Sequence[str],
        *,
        indices: npt.ArrayLike | None = None,
    ) -> TileRun:
        """Cut every spot ``i`` at ``(x_px[i], y_px[i])`` with key ``keys[i]``, in reading order.

        ``indices[i]`` is what ``TileResult.index`` reports for spot ``i`` (default ``i``).
        """
        xs = np.asarray(x_px, dtype=np.float64)
        ys = np.asarray(y_px, dtype=np.float64)
        if not xs.shape == ys.shape == (len(keys),):
            raise ValueError(f"x_px {xs.shape}, y_px {ys.shape} and {len(keys)} keys must have one entry per spot")
        ids = np.arange(xs.size) if indices is None else np.asarray(indices, dtype=np.int64)
        if ids.shape != xs.shape:
            raise ValueError(f"indices {ids.shape} must have one entry per spot {xs.shape}")
        if self.image.is_remote:  # download every tile the views need in few requests, before any is cut
            self.image.prefetch(self.windows(xs, ys, keys))
        return TileRun(self, xs, ys, keys, ids, self.order(xs, ys))


def _pil_filter(name: str) -> Any:
    from PIL import Image

    return {
        "area": Image.Resampling.BOX,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
    }[name]


class _ResampledGrid:
    """The image resampled to a view's scale on a fixed grid of ``TILE`` px tiles, made on demand
    and kept in the image's tile cache: a virtual pyramid level at exactly the view's um/px.

    Views are crops of it, so every output pixel is resampled once however many views hold it:
    regions (336 um) overlap about 13 times on a 100 um hex lattice, patches (112 um) 1.5 times.
    Tile ``(ty, tx)`` is output pixels ``[ty * TILE, (ty + 1) * TILE)``, i.e. source pixels
    ``[ty * TILE * step, ...)``: each output pixel depends only on the source pixels under its
    filter, so tiles join without seams.
    """

    TILE: Final = 240  # a multiple of every zoom an exact area reduction uses (1-4)

    def __init__(self, image: SlideImage, plan: ScalePlan, resample: Resample) -> None:
        self.image = image
        self.plan = plan
        name: str = resample
        if name == "area":  # where no exact p/q area average applies: antialiased triangle / bicubic
            name = "bicubic" if plan.step < 1 else "bilinear"
        self.filter = name
        self._key = ("resampled", plan.level, plan.reduce, plan.method, plan.step, name)

    def read(self, x0: int, y0: int, size: int) -> RGBArray:
        """Output pixels ``[y0:y0+size, x0:x0+size]`` of the grid."""
        tile = self.TILE
        ty0, ty1 = y0 // tile, (y0 + size - 1) // tile
        tx0, tx1 = x0 // tile, (x0 + size - 1) // tile
        out = np.empty((size, size, 3), dtype=np.uint8)
        for ty in range(ty0, ty1 + 1):
            oy = ty * tile
            a, b = max(y0, oy), min(y0 + size, oy + tile)
            for tx in range(tx0, tx1 + 1):
                ox = tx * tile
                c, d = max(x0, ox), min(x0 + size, ox + tile)
                pixels = self._tile(ty, tx)
                out[a - y0 : b - y0, c - x0 : d - x0] = pixels[a - oy : b - oy, c - ox : d - ox]
        return out

    def _tile(self, ty: int, tx: int) -> RGBArray:
        key = (self._key, ty, tx)
        cache = self.image.cache
        pixels = cache.get(key)
        if pixels is None:
            pixels = self._make(ty, tx)
            cache.put(key, pixels)
        return pixels

    def source_window(self, ty: int, tx: int) -> tuple[int, int, int, int]:
        """``(x, y, width, height)`` of the source pixels (level ``plan.level`` at 1/``plan.reduce``) tile
        ``(ty, tx)`` is made from."""
        plan, tile = self.plan, self.TILE
        if plan.method == "area":
            span = tile * plan.block // plan.zoom  # whole source pixels: TILE is a multiple of zoom
            return tx * span, ty * span, span, span
        extent = tile * plan.step
        left, top = tx * extent, ty * extent
        pad = math.ceil(_FILTER_SUPPORT[self.filter] * max(plan.step, 1.0)) + 1
        x0, y0 = math.floor(left) - pad, math.floor(top) - pad
        return x0, y0, math.ceil(left + extent) + pad - x0, math.ceil(top + extent) + pad - y0

    def source_windows(self, x0: int, y0: int, size: int) -> Iterator[Window]:
        """The source windows of the tiles a view ``[y0:y0+size, x0:x0+size]`` of the grid reads."""
        tile, plan = self.TILE, self.plan
        for ty in range(y0 // tile, (y0 + size - 1) // tile + 1):
            for tx in range(x0 // tile, (x0 + size - 1) // tile + 1):
                x, y, width, height = self.source_window(ty, tx)
                yield (plan.level, plan.reduce, x, y, x + width, y + height)

    def _make(self, ty: int, tx: int) -> RGBArray:
        from PIL import Image

        plan, tile = self.plan, self.TILE
        x0, y0, width, height = self.source_window(ty, tx)
        pixels = self.image.read_region(level=plan.level, x=x0, y=y0, width=width, height=height, reduce=plan.reduce)
        if plan.method == "area":
            image = Image.fromarray(pixels)
            if plan.zoom > 1:  # repeat every pixel zoom x zoom times: exact fractional areas
                image = image.resize((width * plan.zoom, height * plan.zoom), Image.Resampling.NEAREST)
            return np.asarray(image.reduce(plan.block))
        extent = tile * plan.step
        left, top = tx * extent, ty * extent
        box = (left - x0, top - y0, left - x0 + extent, top - y0 + extent)
        return np.asarray(Image.fromarray(pixels).resize((tile, tile), _pil_filter(self.filter), box=box))


class TileRun(Iterator[TileResult]):
    """An iterator of :class:`TileResult` in reading order, with running :class:`TileStats`.

    When exhausted (or closed), it empties the image's tile cache (the memory goes back before
    the next slide) and restores the cache bound it found.
    """

    def __init__(
        self,
        tiler: Tiler,
        x_px: npt.NDArray[np.float64],
        y_px: npt.NDArray[np.float64],
        keys: Sequence[str],
        indices: npt.NDArray[np.int64],
        order: npt.NDArray[np.intp],
    ) -> None:
        self.tiler = tiler
        self._x, self._y, self._keys, self._indices, self._order = x_px, y_px, keys, indices, order
        self._next = 0
        self.stats = TileStats(n_spots=int(order.size), patch_plan=tiler.patch_plan, region_plan=tiler.region_plan)
        cache = tiler.image.cache
        self._cache_bound: int | None = cache.max_bytes
        if tiler.settings.cache_bytes is not None:
            cache.resize(tiler.settings.cache_bytes)
        self._hits0, self._misses0 = cache.stats.hits, cache.stats.misses
        cache.stats.peak_bytes = cache.stats.bytes

    def __iter__(self) -> TileRun:
        return self

    def __next__(self) -> TileResult:
        if self._next >= self._order.size:
            self._finish()
            raise StopIteration
        start = time.perf_counter()
        spot = int(self._order[self._next])
        self._next += 1
        result = self.tiler.cut(
            float(self._x[spot]), float(self._y[spot]), key=self._keys[spot], index=int(self._indices[spot])
        )
        stats = self.stats
        stats.n_done += 1
        if result.rejected is None:
            stats.n_accepted += 1
        else:
            stats.rejected[result.rejected] += 1
        stats.seconds += time.perf_counter() - start
        self._update_cache_stats()
        return result

    def close(self) -> None:
        """Stop early: empty the image's tile cache and restore its bound (done on exhaustion)."""
        self._next = int(self._order.size)
        self._finish()

    def _update_cache_stats(self) -> None:
        cache = self.tiler.image.cache.stats
        self.stats.tiles_decoded = cache.misses - self._misses0
        self.stats.cache_hits = cache.hits - self._hits0
        self.stats.cache_peak_bytes = max(self.stats.cache_peak_bytes, cache.peak_bytes)

    def _finish(self) -> None:
        if self._cache_bound is None:
            return
        self._update_cache_stats()
        cache = self.tiler.image.cache
        cache.clear()
        cache.resize(self._cache_bound)
        self._cache_bound = None


# ---------------------------------------------------------------------------------------------
# The build's entry point
# ---------------------------------------------------------------------------------------------


def cut_tiles(slide: Slide, *, indices: npt.ArrayLike | None = None, settings: TileSettings | None = None) -> TileRun:
    """Cut the patch and region of spots of ``slide``: an iterator of :class:`TileResult`.

    ``indices`` are rows of ``slide.spots`` (default: every in-tissue spot). Results come in
    reading order (row bands top to bottom, left to right), the same for the same slide and
    settings; ``result.index`` says which spot each is. The returned run's ``stats``
    (:class:`TileStats`) count the spots done, accepted and rejected by reason.

    Scales are planned before anything is read, so a slide whose image is too coarse raises
    :class:`~curate.errors.ImageTooCoarseError` here, not halfway through.

    Example::

        run = cut_tiles(slide, settings=TileSettings(jpeg_quality=90))
        for tile in run:
            if tile.accepted:
                write(tile.key, tile.patch, tile.region, tile.pos)
        run.stats.rejected  # Counter({'background': 12, 'outside_image': 3})
    """
    spots = slide.spots
    rows = np.flatnonzero(spots.in_tissue) if indices is None else np.asarray(indices, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(spots)):
        raise IndexError(f"spot indices must be in 0..{len(spots) - 1}")
    tiler = Tiler(slide.image, mpp=slide.mpp, settings=settings)
    keys = [sample_key(slide.id, str(barcode)) for barcode in spots.barcode[rows]]
    return tiler.cut_many(spots.x_px[rows], spots.y_px[rows], keys, indices=rows)


__all__ = [
    "REJECT_BACKGROUND",
    "REJECT_OUTSIDE",
    "REJECT_REASONS",
    "TISSUE_CHROMA",
    "ScalePlan",
    "TileResult",
    "TileRun",
    "TileSettings",
    "TileStats",
    "Tiler",
    "cut_tiles",
    "encode_jpeg",
    "plan_scale",
    "region_pos",
    "tissue_fraction",
]
