"""Bytes per pixel of real H&E stored the ways HEST-1k and STimage-1K4M store their slides (for ``build_scale``).

HEST-1k's WSIs are pyramidal TIFFs of 256 px tiles, JPEG (YCbCr 4:2:0) or LZW (RGB) coded, as
``bench/synth.py`` writes them; STimage-1K4M ships each slide as one PNG. The texture of
``synth.py`` is one small crop mirrored; here the real full-resolution H&E of two HER2ST sections
(B4 and C2, 9,272 x 9,923 px at about 0.69 um/px, HEST SPA145 and SPA141) is cut into 256 px tiles
and each tile coded as a HEST pyramid codes it, so glass, fat and dense tumour all count as
they come. Read from ``../shared/data/real/`` when that folder is there, else from the same
files in ``tests/data/her2st-legacy-st/``, else (said in the result) from the squidpy crop.

Also measured: bytes per cell of a dense count table as text (the HER2ST count TSVs: legacy ST's
spots x genes layout, which STimage-1K4M's ``<slide>_count.csv`` shares).

Known biases, said with the figures: the HER2ST images are JPEGs already (their 8x8 blocks
recompress a little better than a scan would, and LZW codes their artefacts as detail), and they
are 0.69 um/px, where a slide scanned at 0.25 um/px holds less detail per pixel.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

REPO: Final = Path(__file__).resolve().parent.parent
_HER2ST: Final = "data/ST-imgs"
#: The HER2ST sections, in the shared data folder and in tests/data (byte-identical copies).
SOURCES: Final = (
    REPO.parent / "shared" / "data" / "real" / "almaan-her2st__legacy-st-human-breast-her2pos-B4-C2-fullres",
    REPO / "tests" / "data" / "her2st-legacy-st",
)
#: Used only when neither copy is there: the small crop of bench/synth.py's texture.
FALLBACK: Final = REPO / "tests" / "data" / "mouse-brain-fullres-h5ad" / "test_img.jpg"
TILE: Final = 256
#: bench/synth.py's JPEG quality, the one the bench's HEST-like pyramids use.
QUALITY: Final = 80
#: A tile is tissue when more than half its pixels have a channel below this (glass is near white).
TISSUE_BELOW: Final = 200


def real_inputs() -> tuple[list[Path], list[Path], str]:
    """(H&E images, count tables, what they are): the first HER2ST copy found, else the fallback crop."""
    for root in SOURCES:
        images = sorted((root / _HER2ST).glob("*/*/*.jpg"))
        if images:
            return images, sorted((root / "data" / "ST-cnts").glob("*.tsv.gz")), f"HER2ST B4, C2 ({root})"
    return [FALLBACK], [], f"FALLBACK: the 950 x 1717 px squidpy crop ({FALLBACK}); no HER2ST sections found"


def _tile_bytes(tile: npt.NDArray[np.uint8]) -> tuple[int, int]:
    import imagecodecs
    import simplejpeg

    jpeg = simplejpeg.encode_jpeg(tile, quality=QUALITY, colorspace="RGB", colorsubsampling="420")
    return len(jpeg), len(imagecodecs.lzw_encode(tile.tobytes()))


def measure_image(path: Path) -> dict[str, Any]:
    """Bytes per pixel of one image: its 256 px tiles as JPEG q80 4:2:0 and LZW, and the whole as PNG."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # a trusted full-resolution slide, not a decompression bomb
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    height, width = pixels.shape[0] // TILE * TILE, pixels.shape[1] // TILE * TILE
    total = {"jpeg": 0, "lzw": 0}
    tissue = {"jpeg": 0, "lzw": 0}
    tiles = tissue_tiles = 0
    for y in range(0, height, TILE):
        for x in range(0, width, TILE):
            tile = np.ascontiguousarray(pixels[y : y + TILE, x : x + TILE])
            jpeg, lzw = _tile_bytes(tile)
            is_tissue = bool((tile.min(axis=2) < TISSUE_BELOW).mean() > 0.5)
            tiles += 1
            tissue_tiles += is_tissue
            total["jpeg"] += jpeg
            total["lzw"] += lzw
            if is_tissue:
                tissue["jpeg"] += jpeg
                tissue["lzw"] += lzw
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")  # Pillow's defaults (zlib level 6), as most writers
    px = tiles * TILE * TILE
    tissue_px = max(1, tissue_tiles * TILE * TILE)
    return {
        "image": path.name,
        "px": [int(pixels.shape[1]), int(pixels.shape[0])],
        "tissue_fraction": tissue_tiles / max(1, tiles),
        "jpeg_q80": total["jpeg"] / px,
        "lzw": total["lzw"] / px,
        "png": png.tell() / (pixels.shape[0] * pixels.shape[1]),
        "jpeg_q80_tissue": tissue["jpeg"] / tissue_px,
        "lzw_tissue": tissue["lzw"] / tissue_px,
    }


def count_table_bytes(paths: list[Path]) -> float | None:
    """Bytes per cell (spot x gene) of dense count tables as text, None without any."""
    cells = size = 0
    for path in paths:
        text = gzip.decompress(path.read_bytes())
        lines = text.splitlines()
        cells += (len(lines) - 1) * (len(lines[0].split(b"\t")) - 1)
        size += len(text)
    return size / cells if cells else None


def measure(*, cache: Path | None = None) -> dict[str, Any]:
    """Bytes per pixel of real H&E per codec (mean over the images, weighted by pixels), cached in ``cache``.

    The cache is keyed by the images' names and sha256, so it holds for the same inputs only.
    """
    images, tables, what = real_inputs()
    key = hashlib.sha256()
    for path in [*images, *tables]:
        key.update(path.name.encode())
        key.update(hashlib.sha256(path.read_bytes()).digest())
    if cache is not None and cache.is_file():
        saved: dict[str, Any] = json.loads(cache.read_text())
        if saved.get("key") == key.hexdigest():
            return saved
    start = time.perf_counter()
    per_image = [measure_image(path) for path in images]
    weights = np.array([p["px"][0] * p["px"][1] for p in per_image], dtype=float)
    mean = {
        name: float(np.average([p[name] for p in per_image], weights=weights))
        for name in ("tissue_fraction", "jpeg_q80", "lzw", "png", "jpeg_q80_tissue", "lzw_tissue")
    }
    result = {
        "key": key.hexdigest(),
        "source": what,
        "real": images[0] != FALLBACK,
        "tile": TILE,
        "jpeg_quality": QUALITY,
        "images": per_image,
        "bytes_per_px": mean,
        "count_table_bytes_per_cell": count_table_bytes(tables),
        "seconds": time.perf_counter() - start,
    }
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))
