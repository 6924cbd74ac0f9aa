"""Lazily opened slide images: pyramidal TIFF/BigTIFF, plain TIFF, PNG and JPEG.

``open_image(path)`` reads only the header. Pixels are read window by window through
``SlideImage.read_region``; a whole-slide image is never held decoded in memory:

- TIFF (tiled or in strips; JPEG, LZW, deflate, JPEG 2000, uncompressed, ...): the file's own
  tiles/strips are read and decoded one by one and kept in an LRU cache bounded in bytes
  (``cache_bytes``), so a window decodes only the tiles it touches and neighbouring windows
  reuse them. JPEG tiles in YCbCr (nearly every scanner's and pyvips' pyramid) are decoded with
  libjpeg-turbo directly, which can also decode them at 1/2, 1/4 or 1/8 scale in the DCT
  domain (``reduce``): a cheap, antialiased 2x/4x/8x reduction when the pyramid lacks a level.
  Uncompressed strips are read row by row. Layouts this path does not cover (planar RGB, NDPI,
  multi-page levels) go through tifffile's zarr store.
- A TIFF that is a partial copy of a remote file (``fetch/ranges.py``: a build's range reads) is
  read through it: what a read touches is downloaded first, and ``prefetch`` downloads the
  tiles under many windows in a few requests. The bytes, hence the pixels, are the file's own.
- PNG and JPEG files cannot be read by window; they are decoded in full on first access
  (in practice they are small: Space Ranger hires/lowres images, STimage PNGs, legacy ST JPEGs).

Whatever must be decoded at once -- a whole PNG or JPEG, one tile or strip of a TIFF (a flat
TIFF may be a single strip) -- is checked against a pixel budget (``ImageSettings.max_pixels``,
``curate build --max-image-pixels``) when the image is opened, from the header alone: a
778-byte PNG declaring 60,000 x 60,000 px is refused with :class:`ImageTooLargeError` before a
byte of it is decoded. Tiled TIFFs are read tile by tile whatever their size.

Every read returns RGB ``uint8`` (grey is expanded, alpha dropped unless asked for); pixels
outside the image are white, as the tiles pad them.

Coordinates: pixel ``(x, y)`` of a level covers ``[x, x + 1) x [y, y + 1)`` of that level;
level ``k`` pixel ``i`` covers level-0 pixels ``[i * d, (i + 1) * d)`` with ``d`` its
``downsample``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from stcorpus.curate.errors import CorruptSourceError, FetchError, ImageTooLargeError, SettingsError

if TYPE_CHECKING:
    from stcorpus.curate.fetch.ranges import PartialFile

WHITE: Final = 255
TIFF_SUFFIXES: Final = (".tif", ".tiff", ".btf", ".svs", ".ome.tif", ".ome.tiff")
PIL_SUFFIXES: Final = (".png", ".jpg", ".jpeg")

#: Default bound of the decoded-tile cache of one open image. A band of 224 px patches across
#: a 100,000 px wide slide at 0.5 um/px needs about 80 MB of decoded 256 px tiles.
DEFAULT_CACHE_BYTES: Final = 256 * 2**20

#: Default budget of pixels decoded at once (a PNG or JPEG, or one TIFF tile or strip): 2**29 px,
#: a 23,170 px square, 1.5 GiB as RGB. Whole-slide images belong in tiled TIFFs, which this
#: never limits; a larger PNG/JPEG is refused unless the budget is raised knowingly.
DEFAULT_MAX_PIXELS: Final = 2**29
#: The command-line flag that sets ``ImageSettings.max_pixels`` (named in refusals).
MAX_PIXELS_FLAG: Final = "--max-image-pixels"

#: Scales libjpeg-turbo can decode a JPEG tile at in the DCT domain (1/1, 1/2, 1/4, 1/8).
JPEG_REDUCTIONS: Final = (1, 2, 4, 8)

# TIFF tag values used below (tifffile enums compare equal to these ints).
_COMPRESSION_NONE: Final = 1
_COMPRESSION_JPEG: Final = 7
_PHOTOMETRIC_MINISBLACK: Final = 1
_PHOTOMETRIC_RGB: Final = 2
_PHOTOMETRIC_YCBCR: Final = 6
#: Uncompressed strips are cut into virtual tiles of this size for the cache.
_RAW_TILE: Final = 512

RGBArray = npt.NDArray[np.uint8]

#: A window of one level to prefetch: ``(level, reduce, x0, y0, x1, y1)``, pixels ``[x0, x1) x
#: [y0, y1)`` of the level decoded at 1/``reduce`` scale (as :meth:`SlideImage.read_region` takes them).
Window = tuple[int, int, int, int, int, int]


@dataclass(frozen=True)
class ImageSettings:
    """How images are opened.

    ``max_pixels`` bounds the pixels decoded at once: a PNG or JPEG whole, or one tile or strip
    of a TIFF. An image over it is refused when it is opened (:class:`ImageTooLargeError`),
    before anything is decoded, so a decompression bomb costs nothing.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if not isinstance(self.max_pixels, int) or isinstance(self.max_pixels, bool) or self.max_pixels < 1:
            raise SettingsError(f"max_pixels must be a positive number of pixels, not {self.max_pixels!r}")


def check_decode_budget(path: Path, width: int, height: int, *, what: str, max_pixels: int) -> None:
    """Raise :class:`ImageTooLargeError` when ``width`` x ``height`` pixels decoded at once exceed the budget."""
    pixels = width * height
    if pixels <= max_pixels:
        return
    raise ImageTooLargeError(
        f"{path}: {what} is {width:,} x {height:,} px ({pixels / 1e6:,.0f} Mpx, {pixels * 3 / 2**30:,.1f} GiB as RGB) "
        f"and must be decoded at once, over the budget of {max_pixels:,} px ({MAX_PIXELS_FLAG}). "
        "A decompression bomb or a broken header looks like this; a real whole-slide "
        "image should be a tiled pyramidal TIFF (e.g. `vips tiffsave in.png out.tif --tile --pyramid "
        f"--compression jpeg`), or raise {MAX_PIXELS_FLAG} if the machine has the memory"
    )


#: The default settings (a module constant, so readers can default to it).
DEFAULT_IMAGES: Final = ImageSettings()


@dataclass(frozen=True)
class Level:
    """One resolution level: its size in pixels and its downsample factor from level 0."""

    width: int
    height: int
    downsample: float


def level_downsample(width0: int, height0: int, width: int, height: int) -> float:
    """The downsample of a ``width`` x ``height`` level of a ``width0`` x ``height0`` image.

    Pyramids are built by shrinking by an integer factor and rounding the level size up or
    down, so ``width0 / width`` is not the factor (a 1001 px wide image gives a 500 px level
    at 2x: 2.002). A ratio that such rounding explains on both axes is snapped to the integer;
    over a 100,000 px slide the difference is 50 level pixels, far more than a spot can move.

    >>> level_downsample(1001, 777, 500, 388)
    2.0
    """
    ratio = width0 / width
    factor = round(ratio)
    if factor >= 1 and abs(width0 / factor - width) <= 1 and abs(height0 / factor - height) <= 1:
        return float(factor)
    return ratio


@dataclass
class CacheStats:
    """Counters of a :class:`TileCache`."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    peak_bytes: int = 0


class TileCache:
    """A least-recently-used cache of decoded image tiles, bounded in bytes.

    A tile larger than the bound is returned to its caller but not kept.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, not {max_bytes}")
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._items: OrderedDict[Hashable, npt.NDArray[Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> npt.NDArray[Any] | None:
        """The tile stored under ``key`` (now the most recently used), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.stats.misses += 1
                return None
            self._items.move_to_end(key)
            self.stats.hits += 1
            return value

    def put(self, key: Hashable, value: npt.NDArray[Any]) -> None:
        """Store ``value``, evicting the least recently used tiles to stay within the bound."""
        size = value.nbytes
        if size > self.max_bytes:
            return
        value.flags.writeable = False  # tiles are shared between reads
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.stats.bytes -= old.nbytes
            while self._items and self.stats.bytes + size > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.stats.bytes -= evicted.nbytes
                self.stats.evictions += 1
            self._items[key] = value
            self.stats.bytes += size
            self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.bytes)

    def resize(self, max_bytes: int) -> None:
        """Change the bound, evicting the least recently used tiles above it."""
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, not {max_bytes}")
        with self._lock:
            self.max_bytes = max_bytes
            while self._items and self.stats.bytes > max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.stats.bytes -= evicted.nbytes
                self.stats.evictions += 1

    def clear(self) -> None:
        """Drop every tile (the counters stay)."""
        with self._lock:
            self._items.clear()
            self.stats.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


class SlideImage(ABC):
    """A read-only image opened without decoding it."""

    def __init__(
        self, path: Path, levels: tuple[Level, ...], *, has_alpha: bool, cache_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        if not levels:
            raise ValueError(f"{path}: image has no levels")
        self.path = path
        self.levels = levels
        self.has_alpha = has_alpha
        self.cache = TileCache(cache_bytes)

    @property
    def width(self) -> int:
        """Width of level 0 in pixels."""
        return self.levels[0].width

    @property
    def height(self) -> int:
        """Height of level 0 in pixels."""
        return self.levels[0].height

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (never coarser than asked)."""
        best = 0
        for index, level in enumerate(self.levels):
            if level.downsample <= downsample * (1 + 1e-6):
                best = index
        return best

    def reductions(self, level: int) -> tuple[int, ...]:
        """Factors ``read_region(reduce=...)`` accepts for ``level``: always 1, and 2/4/8 where
        the level's tiles can be decoded at a reduced scale (JPEG tiles in YCbCr)."""
        self._check_level(level)
        return (1,)

    @property
    def is_remote(self) -> bool:
        """True when reads download what they touch (a partial copy of a remote TIFF): worth a :meth:`prefetch`."""
        return False

    def prefetch(self, windows: Iterable[Window]) -> int:
        """Download at once what reading ``windows`` will need; returns the bytes downloaded.

        A no-op (0) for a local file. Reads are correct without it, only slower (a request per miss).
        """
        return 0

    def level_size(self, level: int, *, reduce: int = 1) -> tuple[int, int]:
        """``(width, height)`` of ``level`` decoded at 1/``reduce`` scale."""
        lvl = self.levels[level]
        return -(-lvl.width // reduce), -(-lvl.height // reduce)

    def read_region(
        self, *, level: int, x: int, y: int, width: int, height: int, keep_alpha: bool = False, reduce: int = 1
    ) -> RGBArray:
        """Pixels ``[y:y+height, x:x+width]`` of ``level`` (coordinates in that level's pixels).

        ``reduce`` (one of :meth:`reductions`) decodes the level at 1/``reduce`` scale, and the
        window is then in those reduced pixels. Parts of the window outside the image are
        white (alpha 0 where kept).
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"empty window {width}x{height}")
        self._check_level(level)
        if reduce != 1 and reduce not in self.reductions(level):
            raise ValueError(
                f"{self.path.name}: level {level} cannot be read at 1/{reduce} scale: "
                f"available reductions are {self.reductions(level)}"
            )
        lvl = self.levels[level]
        level_width, level_height = -(-lvl.width // reduce), -(-lvl.height // reduce)
        channels = 4 if keep_alpha and self.has_alpha else 3
        if x >= 0 and y >= 0 and x + width <= level_width and y + height <= level_height:
            window = self._read(level, y, y + height, x, x + width, reduce)
            if window.dtype != np.uint8 or window.ndim != 3 or window.shape[2] != channels:
                window = _to_channels(window, channels, path=self.path)
            return window if window.flags.owndata and window.flags.writeable else window.copy()
        out = np.full((height, width, channels), WHITE, dtype=np.uint8)
        if keep_alpha and self.has_alpha:
            out[..., 3] = 0
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, level_width), min(y + height, level_height)
        if x0 >= x1 or y0 >= y1:
            return out
        window = self._read(level, y0, y1, x0, x1, reduce)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = _to_channels(window, channels, path=self.path)
        return out

    def thumbnail_window(self, *, max_size: int = 1024) -> Window:
        """The source :meth:`thumbnail` reads: a whole level (at a JPEG reduction), as a prefetch window.

        The coarsest source at least as fine as the thumbnail; among equally coarse ones, the one with
        the least reduction (as plan_scale chooses): the smaller level decodes (and, read by range,
        downloads) less.
        """
        scale = max(self.width, self.height) / max_size
        level, reduce = 0, 1
        for index, lvl in enumerate(self.levels):
            for factor in self.reductions(index):
                if lvl.downsample * factor <= scale * (1 + 1e-6) and (
                    lvl.downsample * factor >= self.levels[level].downsample * reduce * (1 - 1e-9)
                ):
                    level, reduce = index, factor
        width, height = self.level_size(level, reduce=reduce)
        return (level, reduce, 0, 0, width, height)

    def thumbnail(self, *, max_size: int = 1024, keep_alpha: bool = False) -> RGBArray:
        """The whole image scaled so its longer side is ``max_size`` pixels (never enlarged).

        Read from the coarsest level (and JPEG reduction) that is at least as fine as needed,
        band by band with an area filter, so memory stays bounded however large the level.
        """
        from PIL import Image

        scale = max(self.width, self.height) / max_size
        if scale <= 1:
            return self.read_region(level=0, x=0, y=0, width=self.width, height=self.height, keep_alpha=keep_alpha)
        level, reduce, _, _, source_width, source_height = window = self.thumbnail_window(max_size=max_size)
        if self.is_remote:
            self.prefetch([window])
        step = scale / (self.levels[level].downsample * reduce)  # source pixels per output pixel, >= 1
        out_width = max(1, round(self.width / scale))
        out_height = max(1, round(self.height / scale))
        # Bands of about 32 MB of source pixels.
        band = max(1, int(2**25 // max(1, round(source_width * step * 4))))
        pieces: list[RGBArray] = []
        for row0 in range(0, out_height, band):
            row1 = min(out_height, row0 + band)
            top, bottom = row0 * step, min(row1 * step, source_height)
            first, last = math.floor(top), max(math.ceil(bottom), math.floor(top) + 1)
            pixels = self.read_region(
                level=level, x=0, y=first, width=source_width, height=last - first, keep_alpha=keep_alpha, reduce=reduce
            )
            right = min(out_width * step, source_width)
            box = (0.0, top - first, right, max(bottom - first, top - first + 1e-3))
            piece = Image.fromarray(pixels).resize((out_width, row1 - row0), Image.Resampling.BOX, box=box)
            pieces.append(np.asarray(piece))
        return np.concatenate(pieces, axis=0)

    def _check_level(self, level: int) -> None:
        if not 0 <= level < len(self.levels):
            raise ValueError(f"{self.path.name}: no level {level}; the image has {len(self.levels)} level(s)")

    @abstractmethod
    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int, reduce: int) -> npt.NDArray[Any]:
        """Pixels of an in-bounds window, in the file's own channel layout."""

    def close(self) -> None:
        """Release the file handle and the cached tiles."""
        self.cache.clear()

    def __enter__(self) -> SlideImage:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{lvl.width}x{lvl.height}" for lvl in self.levels)
        return f"{type(self).__name__}({self.path.name}: {sizes})"


def _to_channels(window: npt.NDArray[Any], channels: int, *, path: Path) -> RGBArray:
    if window.dtype != np.uint8:
        if window.dtype == np.uint16:
            window = (window >> 8).astype(np.uint8)
        else:
            raise CorruptSourceError(
                f"{path}: unsupported image sample type {window.dtype}: expected 8-bit (or 16-bit) RGB or grey; "
                "convert the image to 8-bit RGB and name that file as the image source"
            )
    if window.ndim == 2:
        window = window[..., None]
    have = window.shape[2]
    if have == 1:
        window = np.repeat(window, 3, axis=2)
        have = 3
    if channels == 3:
        return window if have == 3 else window[..., :3]
    if have == 3:
        alpha = np.full((*window.shape[:2], 1), WHITE, dtype=np.uint8)
        return np.concatenate([window, alpha], axis=2)
    return window[..., :4]


@dataclass(frozen=True)
class _Grid:
    """How one TIFF level is cut into independently decodable segments (tiles or strips)."""

    page: Any  # tifffile.TiffPage
    width: int
    height: int
    tile_width: int
    tile_height: int
    across: int  # segments per row of segments
    samples: int
    dtype: np.dtype[Any]
    offsets: npt.NDArray[np.int64]  # arrays, not tuples: a 100k x 100k slide has 150k tiles per level
    bytecounts: npt.NDArray[np.int64]
    jpeg: bool  # YCbCr JPEG tiles: decoded with libjpeg-turbo, reducible
    jpegtables: bytes | None
    raw_rows: bool  # uncompressed strips: read row by row into virtual tiles
    rows_per_strip: int

    def reductions(self) -> tuple[int, ...]:
        if not self.jpeg:
            return (1,)
        return tuple(r for r in JPEG_REDUCTIONS if self.tile_width % r == 0 and self.tile_height % r == 0)


class TiffImage(SlideImage):
    """A (pyramidal) TIFF read tile by tile (see the module docstring)."""

    def __init__(
        self, path: Path, *, cache_bytes: int = DEFAULT_CACHE_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        import tifffile

        from stcorpus.curate.fetch.ranges import open_partial

        # A partial copy of a remote TIFF (a build's range reads) downloads what is read of it.
        self._remote = open_partial(path)
        try:
            source: Any = self._remote if self._remote is not None else path  # a binary file tifffile seeks in
            self._tif = tifffile.TiffFile(source)
            series = self._tif.series[0]
            series_levels = list(series.levels)
        except FetchError:  # a range read of the header failed: a fetch failure, retried next run
            self._close_remote()
            raise
        except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError) as exc:
            self._close_remote()
            raise CorruptSourceError(f"{path}: not a readable TIFF: {exc}") from exc
        axes = series.axes
        if axes not in ("YXS", "YX", "SYX"):
            self._tif.close()
            self._close_remote()
            raise CorruptSourceError(f"{path}: TIFF axes {axes!r} are not a 2-D RGB/grey image")
        self._planar = axes == "SYX"
        shapes = [tuple(level.shape) for level in series_levels]
        height0, width0 = self._hw(shapes[0])
        levels = []
        for shape in shapes:
            h, w = self._hw(shape)
            levels.append(Level(width=w, height=h, downsample=level_downsample(width0, height0, w, h)))
        samples = shapes[0][0] if self._planar else (shapes[0][2] if len(shapes[0]) == 3 else 1)
        self._lock = threading.Lock()  # one file handle: reads are serialised
        self._fd = self._tif.filehandle
        try:
            self._grids: list[_Grid | None] = [self._grid(level) for level in series_levels]
            for index, (level, grid) in enumerate(zip(series_levels, self._grids, strict=True)):
                segment = self._segment_size(level, grid)
                what = f"one {'tile' if grid is not None and grid.page.is_tiled else 'strip'} of level {index}"
                check_decode_budget(path, segment[1], segment[0], what=what, max_pixels=max_pixels)
        except (CorruptSourceError, ImageTooLargeError):
            self._tif.close()
            self._close_remote()
            raise
        self._series = series
        self._zarr: list[Any] | None = None
        self._reductions = tuple(grid.reductions() if grid is not None else (1,) for grid in self._grids)
        super().__init__(path, tuple(levels), has_alpha=samples == 4, cache_bytes=cache_bytes)

    def _hw(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (shape[1], shape[2]) if self._planar else (shape[0], shape[1])

    @staticmethod
    def _segment_size(level: Any, grid: _Grid | None) -> tuple[int, int]:
        """``(height, width)`` of what one read of ``level`` decodes at once (a tile or strip)."""
        if grid is not None:
            # uncompressed strips are read row by row into virtual tiles: never more at once
            return (grid.tile_height, grid.tile_width)
        chunks = getattr(level.pages[0], "chunks", None) if level.pages else None
        if chunks is not None and len(chunks) >= 2:
            return (int(chunks[0]), int(chunks[1]))
        height, width = level.shape[:2] if level.shape[-1] in (1, 3, 4) else level.shape[-2:]
        return (int(height), int(width))

    def _grid(self, level: Any) -> _Grid | None:
        """The segment layout of a level, or None where tifffile's zarr store must read it."""
        import tifffile

        pages = list(level.pages)
        if self._planar or len(pages) != 1 or not isinstance(pages[0], tifffile.TiffPage):
            return None
        page = pages[0]
        if page.is_ndpi or page.imagedepth != 1 or page.bitspersample not in (8, 16):
            return None
        photometric = int(page.photometric)
        compression = int(page.compression)
        if photometric not in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_MINISBLACK, _PHOTOMETRIC_YCBCR) or (
            photometric == _PHOTOMETRIC_YCBCR and compression != _COMPRESSION_JPEG
        ):
            raise CorruptSourceError(
                f"{self._tif.filehandle.path}: TIFF photometric {page.photometric!r} with compression "
                f"{page.compression!r} is not an RGB or grey image this reader handles; convert it to RGB"
            )
        jpeg = (
            compression == _COMPRESSION_JPEG
            and photometric == _PHOTOMETRIC_YCBCR
            and page.samplesperpixel == 3
            and page.bitspersample == 8
        )
        width, height = int(page.imagewidth), int(page.imagelength)
        raw_rows = False
        if page.is_tiled:
            tile_width, tile_height = int(page.tilewidth), int(page.tilelength)
        elif compression == _COMPRESSION_NONE:
            tile_width, tile_height, raw_rows = _RAW_TILE, _RAW_TILE, True
        else:
            tile_width, tile_height = width, int(page.rowsperstrip) or height
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        bytecounts = np.asarray(page.databytecounts, dtype=np.int64)
        if page.is_tiled:
            segments, kind = -(-width // tile_width) * -(-height // tile_height), "tile"
        else:
            segments, kind = -(-height // (int(page.rowsperstrip) or height)), "strip"
        if offsets.size < segments or bytecounts.size < segments:
            raise CorruptSourceError(
                f"{self._tif.filehandle.path}: the TIFF declares {width} x {height} px, which needs {segments} "
                f"{kind}s, but its {kind} table lists {min(offsets.size, bytecounts.size)}: the file is damaged or its "
                "size tags are wrong; export the image again"
            )
        return _Grid(
            page=page,
            width=width,
            height=height,
            tile_width=tile_width,
            tile_height=tile_height,
            across=-(-width // tile_width),
            samples=int(page.samplesperpixel),
            dtype=np.dtype(page.dtype),
            offsets=offsets,
            bytecounts=bytecounts,
            jpeg=jpeg,
            jpegtables=page.jpegtables,
            raw_rows=raw_rows,
            rows_per_strip=int(page.rowsperstrip) or height,
        )

    def reductions(self, level: int) -> tuple[int, ...]:
        """See :meth:`SlideImage.reductions`."""
        self._check_level(level)
        return self._reductions[level]

    @property
    def is_remote(self) -> bool:
        """See :meth:`SlideImage.is_remote`."""
        return self._remote is not None

    @property
    def remote(self) -> PartialFile | None:
        """The partial copy reads go through, or None for a local file."""
        return self._remote

    def prefetch(self, windows: Iterable[Window]) -> int:
        """Download the file segments (tiles, strips, rows) under ``windows`` in few requests.

        See :meth:`SlideImage.prefetch`; levels tifffile's zarr store reads are left to reads.
        """
        if self._remote is None:
            return 0
        spans: list[tuple[int, int]] = []
        tiles: dict[int, set[int]] = {}
        for level, reduce, x0, y0, x1, y1 in windows:
            grid = self._grids[level]
            if grid is None:
                continue
            # In the level's own pixels, clipped to it.
            x0, y0 = max(0, x0 * reduce), max(0, y0 * reduce)
            x1, y1 = min(grid.width, x1 * reduce), min(grid.height, y1 * reduce)
            if x0 >= x1 or y0 >= y1:
                continue
            if grid.raw_rows:
                itemsize = grid.dtype.itemsize * grid.samples
                for row in range(y0, y1):
                    strip, within = divmod(row, grid.rows_per_strip)
                    start = int(grid.offsets[strip]) + (within * grid.width + x0) * itemsize
                    spans.append((start, start + (x1 - x0) * itemsize))
                continue
            chosen = tiles.setdefault(level, set())
            for ty in range(y0 // grid.tile_height, (y1 - 1) // grid.tile_height + 1):
                first = ty * grid.across
                chosen.update(range(first + x0 // grid.tile_width, first + (x1 - 1) // grid.tile_width + 1))
        for level, chosen in tiles.items():
            grid = self._grids[level]
            assert grid is not None
            index = np.fromiter(chosen, dtype=np.int64, count=len(chosen))
            index = index[index < grid.offsets.size]
            starts, counts = grid.offsets[index], grid.bytecounts[index]
            keep = (starts > 0) & (counts > 0)  # sparse TIFFs leave empty tiles out
            spans.extend(zip(starts[keep].tolist(), (starts[keep] + counts[keep]).tolist(), strict=True))
        with self._lock:
            return self._remote.prefetch(spans)

    def _close_remote(self) -> None:
        if self._remote is not None:
            self._remote.close()

    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int, reduce: int) -> npt.NDArray[Any]:
        grid = self._grids[level]
        if grid is None:
            return self._read_zarr(level, y0, y1, x0, x1)
        tile_width, tile_height = grid.tile_width // reduce, grid.tile_height // reduce
        ty0, ty1 = y0 // tile_height, (y1 - 1) // tile_height
        tx0, tx1 = x0 // tile_width, (x1 - 1) // tile_width
        if ty0 == ty1 and tx0 == tx1:  # the common case for small windows: a view, no copy
            tile = self._tile(level, grid, ty0, tx0, reduce)
            oy, ox = ty0 * tile_height, tx0 * tile_width
            return tile[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        out = np.empty((y1 - y0, x1 - x0, grid.samples), dtype=grid.dtype)
        for ty in range(ty0, ty1 + 1):
            oy = ty * tile_height
            a, b = max(y0, oy), min(y1, oy + tile_height)
            for tx in range(tx0, tx1 + 1):
                ox = tx * tile_width
                c, d = max(x0, ox), min(x1, ox + tile_width)
                tile = self._tile(level, grid, ty, tx, reduce)
                out[a - y0 : b - y0, c - x0 : d - x0] = tile[a - oy : b - oy, c - ox : d - ox]
        return out

    def _tile(self, level: int, grid: _Grid, ty: int, tx: int, reduce: int) -> npt.NDArray[Any]:
        key = (level, reduce, ty, tx)
        tile = self.cache.get(key)
        if tile is None:
            tile = self._decode(grid, ty, tx, reduce)
            self.cache.put(key, tile)
        return tile

    def _decode(self, grid: _Grid, ty: int, tx: int, reduce: int) -> npt.NDArray[Any]:
        """Decode tile ``(ty, tx)`` of a level: always ``(tile_height, tile_width, samples)``
        at the reduced scale (strips at the image's bottom edge may be shorter)."""
        if grid.raw_rows:
            return self._read_raw(grid, ty, tx)
        index = ty * grid.across + tx
        height, width = grid.tile_height // reduce, grid.tile_width // reduce
        offset, count = int(grid.offsets[index]), int(grid.bytecounts[index])
        if offset == 0 or count == 0:  # a sparse TIFF leaves empty tiles out: background
            return np.full((height, width, grid.samples), WHITE, dtype=grid.dtype)
        with self._lock:
            self._fd.seek(offset)
            data = self._fd.read(count)
        tile: npt.NDArray[Any]
        try:
            if grid.jpeg:
                import simplejpeg

                if grid.jpegtables:  # abbreviated stream: splice the shared tables in
                    data = grid.jpegtables[:-2] + data[2:]
                tile = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=height, min_width=width)
            else:
                decoded, _, _ = grid.page.decode(data, index, jpegtables=grid.jpegtables)
                tile = decoded[0]
        except (ValueError, RuntimeError, OSError) as exc:
            raise CorruptSourceError(f"{self.path}: tile {index} of a level cannot be decoded: {exc}") from exc
        if tile.ndim == 2:
            tile = tile[..., None]
        if tile.shape[0] < height or tile.shape[1] < width:
            # A writer that stored an edge tile cropped: pad it to the grid.
            padded = np.full((height, width, tile.shape[2]), WHITE, dtype=tile.dtype)
            padded[: tile.shape[0], : tile.shape[1]] = tile[:height, :width]
            tile = padded
        return tile

    def _read_raw(self, grid: _Grid, ty: int, tx: int) -> npt.NDArray[Any]:
        """A virtual tile of an uncompressed strip image, read row by row (never the whole strip)."""
        itemsize = grid.dtype.itemsize * grid.samples
        row0, row1 = ty * grid.tile_height, min(grid.height, (ty + 1) * grid.tile_height)
        col0, col1 = tx * grid.tile_width, min(grid.width, (tx + 1) * grid.tile_width)
        out = np.full((grid.tile_height, grid.tile_width, grid.samples), WHITE, dtype=grid.dtype)
        length = (col1 - col0) * itemsize
        with self._lock:
            for row in range(row0, row1):
                strip, within = divmod(row, grid.rows_per_strip)
                offset = int(grid.offsets[strip]) + (within * grid.width + col0) * itemsize
                self._fd.seek(offset)
                data = self._fd.read(length)
                if len(data) != length:
                    raise CorruptSourceError(f"{self.path}: truncated image data at row {row}")
                out[row - row0, : col1 - col0] = np.frombuffer(data, dtype=grid.dtype).reshape(-1, grid.samples)
        return out

    def _read_zarr(self, level: int, y0: int, y1: int, x0: int, x1: int) -> npt.NDArray[Any]:
        if self._zarr is None:
            import zarr

            root: Any = zarr.open(self._series.aszarr(), mode="r")
            self._zarr = [root[str(i)] for i in range(len(self._series.levels))] if hasattr(root, "keys") else [root]
        array = self._zarr[level]
        with self._lock:
            if self._planar:
                return np.moveaxis(np.asarray(array[:, y0:y1, x0:x1]), 0, -1)
            return np.asarray(array[y0:y1, x0:x1])

    def close(self) -> None:
        """Release the file handle and the cached tiles."""
        super().close()
        self._tif.close()
        self._close_remote()


_PIL_LIMIT_LOCK: Final = threading.Lock()


@contextlib.contextmanager
def _our_pixel_budget() -> Iterator[None]:
    """Pillow's own bomb check off while we open an image, then as it was.

    Pillow warns over 89 Mpx and refuses over 179 Mpx, which would refuse real legacy-ST and
    STimage images; our budget (:func:`check_decode_budget`, ``--max-image-pixels``) replaces it,
    checked from the header. ``Image.MAX_IMAGE_PIXELS`` is a process-wide global that belongs to
    whoever embeds us, so it is changed only for the open (Pillow checks there) and restored.
    """
    from PIL import Image

    with _PIL_LIMIT_LOCK:
        before = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


class PilImage(SlideImage):
    """A PNG or JPEG; decoded in full on first read (these formats have no random access)."""

    def __init__(
        self, path: Path, *, cache_bytes: int = DEFAULT_CACHE_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        from PIL import Image, UnidentifiedImageError

        try:
            with _our_pixel_budget(), Image.open(path) as im:  # the budget below replaces Pillow's check
                width, height = im.size
                mode = im.mode
        except (UnidentifiedImageError, OSError) as exc:
            raise CorruptSourceError(f"{path}: not a readable image: {exc}") from exc
        check_decode_budget(
            path, width, height, what=f"the {path.suffix.lstrip('.').upper() or 'image'}", max_pixels=max_pixels
        )
        self._pixels: npt.NDArray[Any] | None = None
        self._mode = mode
        super().__init__(
            path,
            (Level(width=width, height=height, downsample=1.0),),
            has_alpha="A" in mode,
            cache_bytes=cache_bytes,
        )

    def _load(self) -> npt.NDArray[Any]:
        if self._pixels is None and self._mode == "RGB" and self.path.name.lower().endswith((".jpg", ".jpeg")):
            # libjpeg-turbo straight into one array: the same pixels as Pillow's decoder (ISLOW DCT,
            # fancy upsampling), at a third of its peak memory (Pillow holds its image, then a
            # bytes copy, then the array).
            import simplejpeg

            try:
                pixels = simplejpeg.decode_jpeg(self.path.read_bytes(), colorspace="RGB")
            except (ValueError, OSError):
                pixels = None  # a JPEG libjpeg-turbo will not take whole: Pillow below says why
            if pixels is not None:
                pixels.flags.writeable = False
                self._pixels = pixels
        if self._pixels is None:
            from PIL import Image

            try:
                with _our_pixel_budget():
                    opened = Image.open(self.path)
                with opened as im:
                    target = "RGBA" if self.has_alpha else "RGB"
                    im.load()
                    if im.mode.startswith("I;16") or im.mode == "I":
                        # 16-bit grey (PNG, a TIFF Pillow opened): Pillow's convert clips every value over
                        # 255 to white; keep the high byte, as `_to_channels` does for 16-bit TIFFs.
                        grey = (np.asarray(im).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
                        self._pixels = np.repeat(grey[..., None], 3, axis=2)
                        return self._pixels
                    # the same mode needs no converted copy: one whole-image allocation fewer
                    self._pixels = np.asarray(im if im.mode == target else im.convert(target))
            except OSError as exc:
                raise CorruptSourceError(f"{self.path}: image data cannot be decoded: {exc}") from exc
        return self._pixels

    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int, reduce: int) -> npt.NDArray[Any]:
        return self._load()[y0:y1, x0:x1]

    def close(self) -> None:
        """Drop the decoded pixels."""
        super().close()
        self._pixels = None


class ArrayImage(SlideImage):
    """An image held as lazily indexed arrays, finest first (a SpatialData/OME-Zarr multiscale image).

    Each level is an array of shape ``(channels, height, width)`` (the OME-NGFF ``c, y, x``
    order) that is sliced window by window: a dask or zarr array decodes only the chunks a
    window touches. ``path`` names where the image lives (for messages).
    """

    def __init__(self, path: Path, arrays: list[Any], *, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if not arrays:
            raise CorruptSourceError(f"{path}: the image has no resolution levels")
        shapes = [tuple(int(n) for n in array.shape) for array in arrays]
        bad = [shape for shape in shapes if len(shape) != 3]
        if bad:
            raise CorruptSourceError(f"{path}: image levels must be (c, y, x) arrays, found shape {bad[0]}")
        _, height0, width0 = shapes[0]
        levels = tuple(
            Level(width=w, height=h, downsample=level_downsample(width0, height0, w, h)) for _, h, w in shapes
        )
        self._arrays = arrays
        super().__init__(path, levels, has_alpha=shapes[0][0] == 4, cache_bytes=cache_bytes)

    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int, reduce: int) -> npt.NDArray[Any]:
        window = self._arrays[level][:, y0:y1, x0:x1]
        if hasattr(window, "compute"):  # dask: in this thread, not in a pool of its own
            window = window.compute(scheduler="synchronous")
        return np.moveaxis(np.asarray(window), 0, -1)


def open_image(
    path: str | Path, *, cache_bytes: int = DEFAULT_CACHE_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> SlideImage:
    """Open an image by its file type without decoding its pixels.

    ``cache_bytes`` bounds the decoded tiles a TIFF keeps between reads; ``max_pixels`` the
    pixels decoded at once (a whole PNG/JPEG, one TIFF tile or strip): an image over it raises
    :class:`~curate.errors.ImageTooLargeError` here, before anything is decoded.

    >>> with open_image("wsis/TENX95.tif") as image:  # doctest: +SKIP
    ...     tile = image.read_region(level=0, x=1000, y=2000, width=224, height=224)
    """
    path = Path(path)
    name = path.name.lower()
    if not path.is_file():
        raise CorruptSourceError(f"{path}: image file not found")
    if name.endswith(TIFF_SUFFIXES):
        return TiffImage(path, cache_bytes=cache_bytes, max_pixels=max_pixels)
    if name.endswith(PIL_SUFFIXES):
        return PilImage(path, cache_bytes=cache_bytes, max_pixels=max_pixels)
    raise CorruptSourceError(
        f"{path}: unsupported image type; expected one of {', '.join(TIFF_SUFFIXES + PIL_SUFFIXES)}"
    )
