"""JPEG decoding into batch buffers (CPU) or on the GPU (nvJPEG), and seeded augmentations.

CPU decoding writes straight into a preallocated ``(B, H, W, 3)`` uint8 array (libjpeg-turbo via
``simplejpeg``, or Pillow): no per-image allocation; the tile size is the corpus's
(``corpus.json`` ``views``). Augmentations work on that array; the batch tensor is a view of it in
channels-last memory layout, shape ``(B, 3, H, W)`` (``loaders/batch.py``).

With ``decode: nvjpeg`` the workers hand over each view's JPEG bytes, concatenated into one uint8
tensor with offsets (``pack_jpegs``), and :class:`DeviceImages` decodes them batched where the
batch is consumed (torchvision's ``decode_jpeg`` on CUDA) and applies the augmentation the worker
drew: the parameters (``AugmentParams``) come from the same generator on both paths.

Augmentations act on a whole batch, with one generator per batch seeded by
``(seed, epoch, rank, batch index)``: the same batch gets the same augmentation whatever the
number of workers and across a resume. The eight flips/rotations of the square (dihedral
group) move the patch and the region together, and ``pos`` (the patch's cell in the 3x3
region grid) moves with them. Colour jitter (brightness, contrast, saturation, in that order)
uses the same factors for both views of a sample.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from stcorpus import schema
from stcorpus.loaders.errors import BadSampleError, LoaderSettingsError
from stcorpus.loaders.settings import AugmentSettings

if TYPE_CHECKING:
    import torch

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


def _dihedral(k: int, *, flip: bool) -> npt.NDArray[np.int64]:
    grid = np.rot90(_GRID, k)
    return np.fliplr(grid) if flip else grid


#: For each (rotations k, horizontal flip) the new cell of each old ``pos``.
_POS_MAP: Final = {
    (k, flip): np.argsort(_dihedral(k, flip=flip).ravel()).astype(np.int64) for k in range(4) for flip in (False, True)
}


@dataclass(frozen=True)
class AugmentParams:
    """The augmentation of one batch: quarter turns, horizontal flips and colour factors per sample."""

    k: npt.NDArray[np.int64]  # quarter turns (counter-clockwise), after folding vertical flips in
    hflip: npt.NDArray[np.bool_]
    #: (B, 3) float32 brightness, contrast, saturation factors (1 where that jitter is off).
    jitter: npt.NDArray[np.float32]
    #: Which of brightness, contrast, saturation are on (a factor of 1 still costs work).
    active: tuple[bool, bool, bool]


class Augment:
    """Seeded batch augmentation of ``(B, H, W, 3)`` uint8 views (see the module docstring)."""

    def __init__(self, settings: AugmentSettings, *, seed: int) -> None:
        self.settings = settings
        self.seed = seed

    def draw(self, n: int, *, epoch: int, rank: int, batch: int) -> AugmentParams:
        """The parameters of batch ``batch``: a pure function of (seed, epoch, rank, batch)."""
        s = self.settings
        rng = np.random.default_rng([self.seed, epoch, rank, batch, 0xA061])
        k = rng.integers(0, 4, n) if s.rot90 else np.zeros(n, dtype=np.int64)
        hflip = rng.random(n) < 0.5 if s.hflip else np.zeros(n, dtype=bool)
        vflip = rng.random(n) < 0.5 if s.vflip else np.zeros(n, dtype=bool)
        # A vertical flip is a horizontal flip after two quarter turns: keep to (k, hflip) pairs.
        k = (k + 2 * vflip) % 4
        hflip = hflip ^ vflip
        jitter = np.ones((n, 3), dtype=np.float32)
        amounts = (s.brightness, s.contrast, s.saturation)
        for j, amount in enumerate(amounts):
            if amount:
                jitter[:, j] = rng.uniform(1 - amount, 1 + amount, n).astype(np.float32)
        return AugmentParams(
            k=k.astype(np.int64),
            hflip=hflip,
            jitter=jitter,
            active=tuple(bool(a) for a in amounts),  # type: ignore[arg-type]
        )

    @staticmethod
    def move_pos(pos: npt.NDArray[np.int64], params: AugmentParams) -> npt.NDArray[np.int64]:
        """``pos`` after the geometric part of ``params`` (the patch's cell moves with the region)."""
        new_pos = pos.copy()
        for i in np.flatnonzero((params.k != 0) | params.hflip):
            new_pos[i] = _POS_MAP[(int(params.k[i]), bool(params.hflip[i]))][pos[i]]
        return new_pos

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
        params = self.draw(len(pos), epoch=epoch, rank=rank, batch=batch)
        for array in views.values():
            apply_numpy(array, params)
        return views, self.move_pos(pos, params)


def apply_numpy(images: npt.NDArray[np.uint8], params: AugmentParams) -> None:
    """Apply ``params`` to ``(B, H, W, 3)`` uint8 ``images`` in place."""
    for i in np.flatnonzero((params.k != 0) | params.hflip):
        turns, flip = int(params.k[i]), bool(params.hflip[i])
        # Pixels as 3-byte items: numpy moves 50k items instead of 150k bytes.
        pixels = images[i].view("V3")[..., 0]
        image = np.rot90(pixels.copy(), turns)  # a view of the copy: no overlap with images[i]
        pixels[...] = image[:, ::-1] if flip else image
    if any(params.active):
        _jitter(images, params)


def apply_torch(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Apply ``params`` to ``(B, 3, H, W)`` uint8 ``images`` (any device); the same pixels as ``apply_numpy``.

    The arithmetic is the CPU path's, step by step in float32 (brightness and contrast through a
    256-entry table per sample, saturation by blending with the pixel's grey), so on the CPU both
    give identical bytes; on a GPU only the image decode itself may differ.
    """
    import torch

    out = images
    moved = (params.k != 0) | params.hflip
    if moved.any():
        out = images.clone()
        for turns in range(4):
            for flip in (False, True):
                chosen = np.flatnonzero(moved & (params.k == turns) & (params.hflip == flip))
                if not len(chosen):
                    continue
                index = torch.from_numpy(chosen).to(images.device)
                part = torch.rot90(images[index], turns, dims=(2, 3))
                out[index] = torch.flip(part, dims=(3,)) if flip else part
    if not any(params.active):
        return out
    n = out.shape[0]
    jitter = torch.from_numpy(params.jitter).to(out.device)
    b, c, sat = jitter[:, 0], jitter[:, 1], jitter[:, 2]
    brightness, contrast, saturation = params.active
    if brightness or contrast:
        grey = torch.from_numpy(_GREY.astype(np.float64)).to(out.device)
        sampled = out[:, :, ::4, ::4].to(torch.float64).mean(dim=(2, 3))  # (B, 3), exact sums
        mean = b * (sampled[:, 0] * grey[0] + sampled[:, 1] * grey[1] + sampled[:, 2] * grey[2]).to(torch.float32)
        values = torch.arange(256, dtype=torch.float32, device=out.device)
        table = torch.round(c[:, None] * (b[:, None] * values[None, :] - mean[:, None]) + mean[:, None])
        table = table.clamp(0, 255).to(torch.uint8)  # (B, 256)
        flat = out.reshape(n, -1).long()
        out = torch.gather(table, 1, flat).view_as(out)
    if saturation:
        x = out.to(torch.float32)
        grey_f = torch.from_numpy(_GREY).to(out.device)
        g = (x[:, 0] * grey_f[0] + x[:, 1] * grey_f[1] + x[:, 2] * grey_f[2])[:, None]
        x = ((x - g) * sat.view(n, 1, 1, 1) + g).clamp(0, 255)
        out = torch.round(x).to(torch.uint8)
    return out


_GREY: Final = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _jitter(images: npt.NDArray[np.uint8], params: AugmentParams) -> None:
    """Colour jitter in place.

    Brightness and contrast form one affine map per sample, ``c * (b * v - m) + m`` with ``m`` the
    mean grey of the brightened image (from every 4th pixel), applied through a 256-entry table
    and clipped once; saturation blends each pixel with its own grey, in float.
    """
    n = len(images)
    b, c, s = params.jitter[:, 0], params.jitter[:, 1], params.jitter[:, 2]
    brightness, contrast, saturation = params.active
    if brightness or contrast:
        values = np.arange(256, dtype=np.float32)
        grey = _GREY.astype(np.float64)
        for i in range(n):
            sampled = images[i, ::4, ::4].reshape(-1, 3).mean(axis=0)
            mean = b[i] * np.float32(sampled[0] * grey[0] + sampled[1] * grey[1] + sampled[2] * grey[2])
            table = np.clip(np.rint(c[i] * (b[i] * values - mean) + mean), 0, 255).astype(np.uint8)
            images[i] = table[images[i]]
    if saturation:
        x = images.astype(np.float32)
        g = (x[..., 0] * _GREY[0] + x[..., 1] * _GREY[1] + x[..., 2] * _GREY[2])[..., None]
        x -= g
        x *= s.reshape(n, 1, 1, 1)
        x += g
        np.clip(x, 0, 255, out=x)
        images[...] = np.rint(x)


# ---------------------------------------------------------------------------------------------
# JPEG bytes for the consumer's decoder (decode: nvjpeg)
# ---------------------------------------------------------------------------------------------


def pack_jpegs(images: Sequence[bytes | memoryview]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """The JPEGs of a batch as one uint8 array and ``(B + 1)`` offsets (one tensor to hand over)."""
    lengths = np.fromiter((len(x) for x in images), dtype=np.int64, count=len(images))
    offsets = np.zeros(len(images) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = np.empty(int(offsets[-1]), dtype=np.uint8)
    for i, image in enumerate(images):
        data[offsets[i] : offsets[i + 1]] = np.frombuffer(image, dtype=np.uint8)
    return data, offsets


def jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """``(height, width)`` from a JPEG's header, None when the header is unreadable."""
    import simplejpeg

    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return int(height), int(width)


#: Decodes a list of 1-D uint8 CPU tensors (JPEG files) into ``(3, H, W)`` uint8 tensors on a device.
BatchDecoder = Callable[[list["torch.Tensor"], "torch.device"], list["torch.Tensor"]]


def nvjpeg_decoder(images: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched ``decode_jpeg`` on ``device`` (nvJPEG on CUDA)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as exc:
        raise LoaderSettingsError(
            "decode: nvjpeg needs torchvision (pip install 'stcorpus[nvjpeg]', with the torchvision "
            "build that matches your torch); or use decode: cpu"
        ) from exc
    decoded = decode_jpeg(images, mode=ImageReadMode.RGB, device=device)
    return list(decoded) if isinstance(decoded, list) else [decoded]


class DeviceImages:
    """Decodes a batch's JPEG bytes where it is consumed, then applies the worker's augmentation.

    ``views`` maps each view to its ``schema.View`` (the tile size a decoded image must have);
    ``decoder`` is :func:`nvjpeg_decoder` unless given (tests give a CPU one). The workers have
    read every JPEG's header (size and markers) under the ``on_bad_sample`` policy; a file whose
    body still fails to decode here raises ``BadSampleError`` naming the batch.
    """

    def __init__(self, views: Mapping[str, schema.View], *, decoder: BatchDecoder | None = None) -> None:
        self.views = dict(views)
        self.decoder = decoder

    def __call__(self, batch: MutableMapping[str, Any], device: torch.device) -> MutableMapping[str, Any]:
        """Replace ``<view>_jpeg`` (+ offsets) by decoded ``(B, 3, H, W)`` uint8 ``<view>`` on ``device``."""
        import torch

        decode = self.decoder or nvjpeg_decoder
        params = _params_of(batch)
        for view, spec in self.views.items():
            data_key, offsets_key = f"{view}_jpeg", f"{view}_jpeg_offsets"
            if data_key not in batch:
                continue
            data, offsets = batch.pop(data_key), batch.pop(offsets_key).tolist()
            files = [data[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
            if not files:
                batch[view] = torch.zeros((0, 3, spec.size_px, spec.size_px), dtype=torch.uint8, device=device)
                continue
            try:
                images = decode(files, device)
            except RuntimeError as exc:
                raise BadSampleError(
                    f"batch of {batch.get('key', ['?'])[0]}...: a {view} JPEG failed to decode on {device}: {exc}"
                ) from exc
            for key, image in zip(batch[schema.Batch.KEY.value], images, strict=True):
                if tuple(image.shape) != (3, spec.size_px, spec.size_px):
                    raise BadSampleError(
                        f"{key}: {view} decoded to {tuple(image.shape)}, expected (3, {spec.size_px}, {spec.size_px})",
                        key=key,
                    )
            stacked = torch.stack(images)
            batch[view] = apply_torch(stacked, params) if params is not None else stacked
        for name in (schema.Batch.AUGMENT_ROT90, schema.Batch.AUGMENT_HFLIP, schema.Batch.AUGMENT_JITTER):
            batch.pop(name.value, None)
        return batch


def _params_of(batch: Mapping[str, Any]) -> AugmentParams | None:
    """The augmentation a worker drew and put into ``batch`` (decode: nvjpeg), if any."""
    if schema.Batch.AUGMENT_ROT90.value not in batch:
        return None
    jitter = batch[schema.Batch.AUGMENT_JITTER.value].cpu().numpy()
    # A factor of exactly 1 changes no pixel (the table and the blend round back to the input):
    # which jitters are on follows from the factors.
    active = tuple(bool((jitter[:, j] != 1).any()) for j in range(3))
    return AugmentParams(
        k=batch[schema.Batch.AUGMENT_ROT90.value].cpu().numpy(),
        hflip=batch[schema.Batch.AUGMENT_HFLIP.value].cpu().numpy(),
        jitter=jitter,
        active=active,  # type: ignore[arg-type]
    )
