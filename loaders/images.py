"""JPEG decoding into batch buffers, and seeded torch-side augmentations (no torchvision).

Decoding writes straight into a preallocated ``(B, H, W, 3)`` uint8 array (libjpeg-turbo via
``simplejpeg``, or Pillow): no per-image allocation, and the batch tensor is a view of it in
channels-last memory layout, shape ``(B, 3, H, W)`` (``loaders/batch.py``).

Augmentations act on a whole batch, with one generator per batch seeded by
``(seed, epoch, rank, batch index)``: the same batch gets the same augmentation whatever the
number of workers and across a resume. The eight flips/rotations of the square (dihedral
group) move the patch and the region together, and ``pos`` (the patch's cell in the 3x3
region grid) moves with them. Colour jitter (brightness, contrast, saturation, in that order)
uses the same factors for both views of a sample.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from loaders.errors import BadSampleError
from loaders.settings import AugmentSettings
from stcorpus import schema

if TYPE_CHECKING:
    import torch

#: The patch/region size of schema stcorpus/1.
TILE: Final = 224

_GRID = np.arange(schema.REGION_GRID**2).reshape(schema.REGION_GRID, schema.REGION_GRID)


class JpegDecoder:
    """Decodes one JPEG into a ``(H, W, 3)`` uint8 slot, checking its size (picklable)."""

    def __init__(self, name: str = "simplejpeg") -> None:
        self.name = name

    def __call__(self, data: bytes | None, out: npt.NDArray[np.uint8], *, key: str, view: str) -> None:
        if not data:
            raise BadSampleError(f"{key}: no {view} image in the sample", key=key)
        h, w = out.shape[:2]
        if self.name == "simplejpeg":
            import simplejpeg

            try:
                height, width, _, _ = simplejpeg.decode_jpeg_header(data)
                if (height, width) != (h, w):
                    raise BadSampleError(f"{key}: {view} is {width}x{height}, expected {w}x{h}", key=key)
                simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
            except ValueError as exc:
                raise BadSampleError(f"{key}: {view} is not a decodable JPEG: {exc}", key=key) from exc
            return
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.size != (w, h):
                    raise BadSampleError(f"{key}: {view} is {image.size[0]}x{image.size[1]}, expected {w}x{h}", key=key)
                out[...] = np.asarray(image.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise BadSampleError(f"{key}: {view} is not a decodable JPEG: {exc}", key=key) from exc


def _dihedral(k: int, *, flip: bool) -> npt.NDArray[np.int64]:
    grid = np.rot90(_GRID, k)
    return np.fliplr(grid) if flip else grid


#: For each (rotations k, horizontal flip) the new cell of each old ``pos``.
_POS_MAP: Final = {
    (k, flip): np.argsort(_dihedral(k, flip=flip).ravel()).astype(np.int64) for k in range(4) for flip in (False, True)
}


class Augment:
    """Seeded batch augmentation of ``(B, 3, H, W)`` uint8 views (see the module docstring)."""

    def __init__(self, settings: AugmentSettings, *, seed: int) -> None:
        self.settings = settings
        self.seed = seed

    def __call__(
        self,
        views: dict[str, torch.Tensor],
        pos: npt.NDArray[np.int64],
        *,
        epoch: int,
        rank: int,
        batch: int,
    ) -> tuple[dict[str, torch.Tensor], npt.NDArray[np.int64]]:
        """Augmented copies of ``views`` and the new ``pos``."""
        import torch

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
            name: torch.from_numpy(rng.uniform(1 - amount, 1 + amount, n).astype(np.float32)).view(n, 1, 1, 1)
            for name, amount in (("brightness", s.brightness), ("contrast", s.contrast), ("saturation", s.saturation))
            if amount
        }
        out = {name: tensor.clone() for name, tensor in views.items()}
        new_pos = pos.copy()
        for (turns, flip), cells in _POS_MAP.items():
            if turns == 0 and not flip:
                continue
            idx = np.flatnonzero((k == turns) & (hflip == flip))
            if not len(idx):
                continue
            index = torch.from_numpy(idx)
            for name, tensor in views.items():
                sub = tensor[index]
                if turns:
                    sub = torch.rot90(sub, turns, dims=(2, 3))
                if flip:
                    sub = torch.flip(sub, dims=(3,))
                out[name][index] = sub
            new_pos[idx] = cells[pos[idx]]
        if factors:
            for name in out:
                out[name] = _jitter(out[name], factors)
        return out, new_pos


def _jitter(images: torch.Tensor, factors: dict[str, Any]) -> torch.Tensor:
    import torch

    x = images.float()
    if "brightness" in factors:
        x = x * factors["brightness"]
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    if "contrast" in factors:
        mean = (x.clamp(0, 255) * weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * factors["contrast"] + mean
    if "saturation" in factors:
        grey = (x.clamp(0, 255) * weights).sum(1, keepdim=True)
        x = (x - grey) * factors["saturation"] + grey
    out = x.clamp_(0, 255).round_().to(torch.uint8)
    return out.contiguous(memory_format=torch.channels_last)
