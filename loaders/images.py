"""JPEG decoding into batch buffers, and seeded torch-side augmentations (no torchvision).

Decoding writes straight into a preallocated ``(B, H, W, 3)`` uint8 array (libjpeg-turbo via
``simplejpeg``, or Pillow): no per-image allocation. Augmentations work on that array; the batch
tensor is a view of it in channels-last memory layout, shape ``(B, 3, H, W)`` (``loaders/batch.py``).

Augmentations act on a whole batch, with one generator per batch seeded by
``(seed, epoch, rank, batch index)``: the same batch gets the same augmentation whatever the
number of workers and across a resume. The eight flips/rotations of the square (dihedral
group) move the patch and the region together, and ``pos`` (the patch's cell in the 3x3
region grid) moves with them. Colour jitter (brightness, contrast, saturation, in that order)
uses the same factors for both views of a sample.
"""

from __future__ import annotations

import io
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from stcorpus import schema
from stcorpus.loaders.errors import BadSampleError
from stcorpus.loaders.settings import AugmentSettings

#: The patch/region size of schema stcorpus/1.
TILE: Final = 224

_GRID = np.arange(schema.REGION_GRID**2).reshape(schema.REGION_GRID, schema.REGION_GRID)


class JpegDecoder:
    """Decodes one JPEG into a ``(H, W, 3)`` uint8 slot, checking its size (picklable)."""

    def __init__(self, name: str = "simplejpeg") -> None:
        self.name = name
        self._decode: Any = None  # simplejpeg.decode_jpeg, bound on first use (not pickled)

    def __getstate__(self) -> dict[str, object]:
        return {"name": self.name, "_decode": None}

    def __call__(self, data: bytes | memoryview | None, out: npt.NDArray[np.uint8], *, key: str, view: str) -> None:
        if not data:
            raise BadSampleError(f"{key}: no {view} image in the sample", key=key)
        if self.name == "simplejpeg":
            decode = self._decode
            if decode is None:
                import simplejpeg

                decode = self._decode = simplejpeg.decode_jpeg
            try:
                image = decode(data, colorspace="RGB", buffer=out)
            except ValueError as exc:
                raise BadSampleError(
                    f"{key}: {view} is not a decodable JPEG{_size_note(data, out)}: {exc}", key=key
                ) from exc
            if image.shape != out.shape:  # a smaller image fills only the start of the slot
                raise BadSampleError(
                    f"{key}: {view} is {image.shape[1]}x{image.shape[0]}, expected {out.shape[1]}x{out.shape[0]}",
                    key=key,
                )
            return
        from PIL import Image, UnidentifiedImageError

        h, w = out.shape[:2]
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.size != (w, h):
                    raise BadSampleError(f"{key}: {view} is {image.size[0]}x{image.size[1]}, expected {w}x{h}", key=key)
                out[...] = np.asarray(image.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise BadSampleError(f"{key}: {view} is not a decodable JPEG: {exc}", key=key) from exc


def _size_note(data: bytes | memoryview, out: npt.NDArray[np.uint8]) -> str:
    """`` (WxH, expected ...)`` when the header is readable and the size is wrong, else nothing."""
    import simplejpeg

    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return ""
    if (height, width) == out.shape[:2]:
        return ""
    return f" into {out.shape[1]}x{out.shape[0]} (it is {width}x{height})"


class BufferPool:
    """Reusable ``(B, H, W, 3)`` uint8 batch buffers.

    A fresh 10 MB buffer per batch costs page faults that slow decoding by 10-20%; a buffer is
    handed out again only when nothing else refers to it any more (the batch tensors made from
    it were dropped, or copied to shared memory by a DataLoader worker), so reuse is safe.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.buffers: list[npt.NDArray[np.uint8]] = []

    def get(self, n: int) -> npt.NDArray[np.uint8]:
        """A buffer for ``n`` images, not referenced elsewhere."""
        import sys

        for buffer in self.buffers:
            # References: the pool's list, the loop variable and getrefcount's argument.
            if len(buffer) == n and sys.getrefcount(buffer) <= 3:
                return buffer
        buffer = np.empty((n, TILE, TILE, 3), dtype=np.uint8)
        if len(self.buffers) >= self.size:
            self.buffers.pop(0)
        self.buffers.append(buffer)
        return buffer

    def __getstate__(self) -> dict[str, object]:
        return {"size": self.size, "buffers": []}


def _dihedral(k: int, *, flip: bool) -> npt.NDArray[np.int64]:
    grid = np.rot90(_GRID, k)
    return np.fliplr(grid) if flip else grid


#: For each (rotations k, horizontal flip) the new cell of each old ``pos``.
_POS_MAP: Final = {
    (k, flip): np.argsort(_dihedral(k, flip=flip).ravel()).astype(np.int64) for k in range(4) for flip in (False, True)
}


class Augment:
    """Seeded batch augmentation of ``(B, H, W, 3)`` uint8 views (see the module docstring)."""

    def __init__(self, settings: AugmentSettings, *, seed: int) -> None:
        self.settings = settings
        self.seed = seed

    def __call__(
        self,
        views: dict[str, npt.NDArray[np.uint8]],
        pos: npt.NDArray[np.int64],
        *,
        epoch: int,
        rank: int,
        batch: int,
    ) -> tuple[dict[str, npt.NDArray[np.uint8]], npt.NDArray[np.int64]]:
        """Augmented ``views`` (in place where possible) and the new ``pos``."""
        s = self.settings
        n = len(pos)
        rng = np.random.default_rng([self.seed, epoch, rank, batch, 0xA061])
        k = rng.integers(0, 4, n) if s.rot90 else np.zeros(n, dtype=np.int64)
        hflip = rng.random(n) < 0.5 if s.hflip else np.zeros(n, dtype=bool)
        vflip = rng.random(n) < 0.5 if s.vflip else np.zeros(n, dtype=bool)
        # A vertical flip is a horizontal flip after two quarter turns: keep to (k, hflip) pairs.
        k = (k + 2 * vflip) % 4
        hflip = hflip ^ vflip
        factors = {
            name: rng.uniform(1 - amount, 1 + amount, n).astype(np.float32)
            for name, amount in (("brightness", s.brightness), ("contrast", s.contrast), ("saturation", s.saturation))
            if amount
        }
        new_pos = pos.copy()
        for i in np.flatnonzero((k != 0) | hflip):
            turns, flip = int(k[i]), bool(hflip[i])
            for array in views.values():
                # Pixels as 3-byte items: numpy moves 50k items instead of 150k bytes.
                pixels = array[i].view("V3")[..., 0]
                image = np.rot90(pixels.copy(), turns)  # a view of the copy: no overlap with array[i]
                pixels[...] = image[:, ::-1] if flip else image
            new_pos[i] = _POS_MAP[(turns, flip)][pos[i]]
        if factors:
            for array in views.values():
                _jitter(array, factors)
        return views, new_pos


_GREY: Final = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _jitter(images: npt.NDArray[np.uint8], factors: dict[str, npt.NDArray[np.float32]]) -> None:
    """Colour jitter in place.

    Brightness and contrast form one affine map per sample, ``c * (b * v - m) + m`` with ``m`` the
    mean grey of the brightened image (from every 4th pixel), applied through a 256-entry table
    and clipped once; saturation blends each pixel with its own grey, in float.
    """
    n = len(images)
    ones = np.ones(n, dtype=np.float32)
    b, c = factors.get("brightness", ones), factors.get("contrast", ones)
    if "brightness" in factors or "contrast" in factors:
        values = np.arange(256, dtype=np.float32)
        for i in range(n):
            mean = b[i] * float(images[i, ::4, ::4].reshape(-1, 3).mean(axis=0) @ _GREY)
            table = np.clip(np.rint(c[i] * (b[i] * values - mean) + mean), 0, 255).astype(np.uint8)
            images[i] = table[images[i]]
    if "saturation" in factors:
        s = factors["saturation"].reshape(n, 1, 1, 1)
        x = images.astype(np.float32)
        grey = (x[..., 0] * _GREY[0] + x[..., 1] * _GREY[1] + x[..., 2] * _GREY[2])[..., None]
        x -= grey
        x *= s
        x += grey
        np.clip(x, 0, 255, out=x)
        images[...] = np.rint(x)
