"""Lazily opened slide images: pyramidal TIFF/BigTIFF, plain TIFF, PNG and JPEG.

``open_image(path)`` reads only the header. Pixels are read window by window through
``SlideImage.read_region`` (TIFF: tifffile's zarr store decodes only the tiles a window
touches), so a whole-slide image is never held decoded in memory. PNG and JPEG files cannot
be read by window; they are decoded on first access (they are small in practice: Space Ranger
hires/lowres images, STimage PNGs).

Every read returns RGB ``uint8`` (grey is expanded, alpha dropped unless asked for); pixels
outside the image are white, as the tiles pad them.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from curate.errors import CorruptSourceError

WHITE: Final = 255
TIFF_SUFFIXES: Final = (".tif", ".tiff", ".btf", ".svs", ".ome.tif", ".ome.tiff")
PIL_SUFFIXES: Final = (".png", ".jpg", ".jpeg")

RGBArray = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Level:
    """One resolution level: its size in pixels and its downsample factor from level 0."""

    width: int
    height: int
    downsample: float


class SlideImage(ABC):
    """A read-only image opened without decoding it."""

    def __init__(self, path: Path, levels: tuple[Level, ...], *, has_alpha: bool) -> None:
        if not levels:
            raise ValueError(f"{path}: image has no levels")
        self.path = path
        self.levels = levels
        self.has_alpha = has_alpha

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

    def read_region(self, *, level: int, x: int, y: int, width: int, height: int, keep_alpha: bool = False) -> RGBArray:
        """Pixels ``[y:y+height, x:x+width]`` of ``level`` (coordinates in that level's pixels).

        Parts of the window outside the image are white (alpha 0 where kept).
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"empty window {width}x{height}")
        lvl = self.levels[level]
        channels = 4 if keep_alpha and self.has_alpha else 3
        out = np.full((height, width, channels), WHITE, dtype=np.uint8)
        if keep_alpha and self.has_alpha:
            out[..., 3] = 0
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, lvl.width), min(y + height, lvl.height)
        if x0 >= x1 or y0 >= y1:
            return out
        window = self._read(level, y0, y1, x0, x1)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = _to_channels(window, channels)
        return out

    def thumbnail(self, *, max_size: int = 1024, keep_alpha: bool = False) -> RGBArray:
        """The whole image scaled to fit ``max_size`` pixels, read from the smallest level that allows it."""
        from PIL import Image

        scale = max(self.width, self.height) / max_size
        level = self.best_level(max(scale, 1.0))
        lvl = self.levels[level]
        pixels = self.read_region(level=level, x=0, y=0, width=lvl.width, height=lvl.height, keep_alpha=keep_alpha)
        if max(lvl.width, lvl.height) <= max_size:
            return pixels
        factor = max_size / max(lvl.width, lvl.height)
        size = (max(1, round(lvl.width * factor)), max(1, round(lvl.height * factor)))
        return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))

    @abstractmethod
    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> npt.NDArray[Any]:
        """Pixels of an in-bounds window, in the file's own channel layout."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the file handle."""

    def __enter__(self) -> SlideImage:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{lvl.width}x{lvl.height}" for lvl in self.levels)
        return f"{type(self).__name__}({self.path.name}: {sizes})"


def _to_channels(window: npt.NDArray[Any], channels: int) -> RGBArray:
    if window.dtype != np.uint8:
        if window.dtype == np.uint16:
            window = (window >> 8).astype(np.uint8)
        else:
            raise CorruptSourceError(f"unsupported image sample type {window.dtype}: expected 8-bit RGB")
    if window.ndim == 2:
        window = window[..., None]
    have = window.shape[2]
    if have == 1:
        window = np.repeat(window, 3, axis=2)
        have = 3
    if channels == 3:
        return window[..., :3]
    if have == 3:
        alpha = np.full((*window.shape[:2], 1), WHITE, dtype=np.uint8)
        return np.concatenate([window, alpha], axis=2)
    return window[..., :4]


class TiffImage(SlideImage):
    """A (pyramidal) TIFF read window by window through tifffile's zarr store."""

    def __init__(self, path: Path) -> None:
        import tifffile
        import zarr

        try:
            self._tif = tifffile.TiffFile(path)
            series = self._tif.series[0]
            store = series.aszarr()
            root: Any = zarr.open(store, mode="r")
        except (tifffile.TiffFileError, ValueError, OSError, IndexError) as exc:
            raise CorruptSourceError(f"{path}: not a readable TIFF: {exc}") from exc
        axes = series.axes
        if axes not in ("YXS", "YX", "SYX"):
            raise CorruptSourceError(f"{path}: TIFF axes {axes!r} are not a 2-D RGB/grey image")
        self._planar = axes == "SYX"
        arrays: list[Any] = [root[str(i)] for i in range(len(series.levels))] if hasattr(root, "keys") else [root]
        self._arrays = arrays
        shapes = [a.shape for a in arrays]
        w0 = self._hw(shapes[0])[1]
        levels = []
        for shape in shapes:
            h, w = self._hw(shape)
            levels.append(Level(width=w, height=h, downsample=w0 / w))
        samples = shapes[0][0] if self._planar else (shapes[0][2] if len(shapes[0]) == 3 else 1)
        # zarr arrays are not safe to read from several threads at once through one file handle.
        self._lock = threading.Lock()
        super().__init__(path, tuple(levels), has_alpha=samples == 4)

    def _hw(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (shape[1], shape[2]) if self._planar else (shape[0], shape[1])

    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> npt.NDArray[Any]:
        array = self._arrays[level]
        with self._lock:
            if self._planar:
                return np.moveaxis(np.asarray(array[:, y0:y1, x0:x1]), 0, -1)
            return np.asarray(array[y0:y1, x0:x1])

    def close(self) -> None:
        self._tif.close()


class PilImage(SlideImage):
    """A PNG or JPEG; decoded in full on first read (these formats have no random access)."""

    def __init__(self, path: Path) -> None:
        from PIL import Image, UnidentifiedImageError

        Image.MAX_IMAGE_PIXELS = None  # whole-slide PNGs are legitimately huge; we never trust sizes blindly
        try:
            with Image.open(path) as im:
                width, height = im.size
                mode = im.mode
        except (UnidentifiedImageError, OSError) as exc:
            raise CorruptSourceError(f"{path}: not a readable image: {exc}") from exc
        self._pixels: npt.NDArray[Any] | None = None
        self._mode = mode
        super().__init__(path, (Level(width=width, height=height, downsample=1.0),), has_alpha="A" in mode)

    def _load(self) -> npt.NDArray[Any]:
        if self._pixels is None:
            from PIL import Image

            with Image.open(self.path) as im:
                target = "RGBA" if self.has_alpha else "RGB"
                self._pixels = np.asarray(im.convert(target))
        return self._pixels

    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> npt.NDArray[Any]:
        return self._load()[y0:y1, x0:x1]

    def close(self) -> None:
        self._pixels = None


def open_image(path: str | Path) -> SlideImage:
    """Open an image by its file type without decoding its pixels.

    >>> with open_image("wsis/TENX95.tif") as image:  # doctest: +SKIP
    ...     tile = image.read_region(level=0, x=1000, y=2000, width=224, height=224)
    """
    path = Path(path)
    name = path.name.lower()
    if not path.is_file():
        raise CorruptSourceError(f"{path}: image file not found")
    if name.endswith(TIFF_SUFFIXES):
        return TiffImage(path)
    if name.endswith(PIL_SUFFIXES):
        return PilImage(path)
    raise CorruptSourceError(
        f"{path}: unsupported image type; expected one of {', '.join(TIFF_SUFFIXES + PIL_SUFFIXES)}"
    )
