"""Large synthetic whole-slide images made from the real H&E crop, for benchmarks and tests.

The texture is the real full-resolution H&E crop of ``tests/data/mouse-brain-fullres-h5ad``
mirrored into a seamless periodic pattern; a pyramid is written tile by tile as a BigTIFF with
JPEG (YCbCr 4:2:0) tiles, each level the 2x2 area average of the one above, stored as top-level
pages like pyvips and most scanners write them (OpenSlide's "generic tiled TIFF" reads them, and
so does tifffile as one series with levels). Nothing is held in memory beyond one period of
texture per level and the encoded tiles met so far, so slides of any size can be written.

The crop is 0.615 um/px; written as a 0.25 um/px "40x" slide, its nuclei look 2.5x too large,
which matters for how a slide looks, not for how fast it decodes (JPEG cost follows the
texture's detail, which is real).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "data" / "mouse-brain-fullres-h5ad" / "test_img.jpg"

#: The crop is cut to these sizes (multiples of 256) before mirroring, so the texture period
#: (twice these) stays a multiple of the tile size at every level and few tiles are distinct.
_PERIOD_CROP = (1536, 768)  # (height, width) of the crop used, before mirroring

TileMask = Callable[[int, int, int, int], bool]


def he_texture(path: Path = FIXTURE) -> npt.NDArray[np.uint8]:
    """One period of the seamless texture: the crop and its mirror images, 2x its size."""
    from PIL import Image

    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    height, width = _PERIOD_CROP
    crop = pixels[-height:, -width:]  # the bottom-right of the crop is nearly all tissue
    top = np.concatenate([crop, crop[:, ::-1]], axis=1)
    return np.ascontiguousarray(np.concatenate([top, top[::-1]], axis=0))


def _halve(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    h, w = pixels.shape[0] // 2 * 2, pixels.shape[1] // 2 * 2
    blocks = pixels[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.uint16)
    halved: npt.NDArray[np.uint8] = ((blocks.sum(axis=(1, 3)) + 2) // 4).astype(np.uint8)
    return halved


@dataclass(frozen=True)
class SyntheticSlide:
    """What :func:`write_pyramid_tiff` wrote."""

    path: Path
    width: int
    height: int
    mpp: float
    levels: int
    tile: int
    bytes: int


def write_pyramid_tiff(
    path: Path,
    *,
    width: int,
    height: int,
    mpp: float = 0.25,
    levels: int | None = None,
    tile: int = 256,
    quality: int = 80,
    tissue: TileMask | None = None,
    jpegtables: bool = False,
    step: int = 2,
    compression: str = "jpeg",
) -> SyntheticSlide:
    """Write a ``width`` x ``height`` pyramidal BigTIFF of real H&E texture at ``mpp`` um/px.

    ``levels``: how many levels, each ``step`` (2 or 4) times smaller than the one above
    (default: down to the first level under 1,024 px; ``step=4`` is Aperio SVS's pyramid).
    ``tissue(level, x, y, size) -> bool`` says whether the tile at level pixel ``(x, y)`` holds
    tissue; tiles without are plain white (as glass is), which keeps huge test slides small on
    disk. ``jpegtables=True`` stores the quantisation and Huffman tables once in the JPEGTables
    tag and abbreviated streams in the tiles, as Aperio and Hamamatsu scanners do.
    ``compression="lzw"`` writes RGB tiles LZW-coded instead (as some HEST-1k pyramids are).
    """
    import tifffile

    if step not in (2, 4):
        raise ValueError(f"step must be 2 or 4, not {step}")
    if compression not in ("jpeg", "lzw"):
        raise ValueError(f"compression must be 'jpeg' or 'lzw', not {compression!r}")
    if levels is None:
        levels = 1
        while max(width, height) // step ** (levels - 1) >= 1024:
            levels += 1
    texture = he_texture()
    white = np.full((tile, tile, 3), 255, dtype=np.uint8)

    tables = _split_tables(_plain(white, quality))[0] if jpegtables else None

    def encode(pixels: npt.NDArray[np.uint8]) -> bytes:
        if compression == "lzw":
            import imagecodecs

            lzw = bytes(imagecodecs.lzw_encode(np.ascontiguousarray(pixels).tobytes()))
            return lzw
        data = _plain(np.ascontiguousarray(pixels), quality)
        if tables is None:
            return data
        # libjpeg-turbo uses the standard Huffman tables and quality-scaled quantisation tables,
        # so every tile's tables are the same and can be shared.
        head, body = _split_tables(data)
        if head != tables:
            raise ValueError("tiles encoded with different JPEG tables cannot share a JPEGTables tag")
        return body

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(levels):
            w, h = -(-width // step**level), -(-height // step**level)
            tiles = _level_tiles(texture, level=level, width=w, height=h, tile=tile, tissue=tissue, encode=encode)
            # Resolution tags are written but never trusted by readers (CORPUS.md §5).
            tif.write(
                tiles,
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                compression=compression,
                photometric="ycbcr" if compression == "jpeg" else "rgb",
                subsampling=(2, 2) if compression == "jpeg" else None,
                jpegtables=tables,
                subfiletype=1 if level else 0,
                resolution=(1e4 / (mpp * step**level), 1e4 / (mpp * step**level)),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
            for _ in range(step // 2):
                texture = _halve(texture)
    return SyntheticSlide(
        path=path, width=width, height=height, mpp=mpp, levels=levels, tile=tile, bytes=path.stat().st_size
    )


def _level_tiles(
    texture: npt.NDArray[np.uint8],
    *,
    level: int,
    width: int,
    height: int,
    tile: int,
    tissue: TileMask | None,
    encode: Callable[[npt.NDArray[np.uint8]], bytes],
) -> Iterator[bytes]:
    """The encoded tiles of one level in row-major order; each distinct tile is encoded once."""
    period_h, period_w = texture.shape[:2]
    wrapped = np.pad(texture, ((0, tile), (0, tile), (0, 0)), mode="wrap")
    white = np.full((tile, tile, 3), 255, dtype=np.uint8)
    memo: dict[tuple[int, int] | None, bytes] = {}
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            key = None if tissue is not None and not tissue(level, x, y, tile) else (y % period_h, x % period_w)
            if key not in memo:
                pixels = white if key is None else wrapped[key[0] : key[0] + tile, key[1] : key[1] + tile]
                memo[key] = encode(pixels)
            yield memo[key]


def _plain(pixels: npt.NDArray[np.uint8], quality: int) -> bytes:
    import simplejpeg

    data: bytes = simplejpeg.encode_jpeg(pixels, quality=quality, colorspace="RGB", colorsubsampling="420")
    return data


def _split_tables(data: bytes) -> tuple[bytes, bytes]:
    """Split a full JPEG stream into (tables-only stream, abbreviated stream without tables)."""
    assert data[:2] == b"\xff\xd8", "not a JPEG stream"
    tables = bytearray(b"\xff\xd8")
    body = bytearray(b"\xff\xd8")
    i = 2
    while i < len(data):
        marker = data[i + 1]
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        segment = data[i : i + 2 + length]
        if marker in (0xDB, 0xC4):  # DQT, DHT
            tables += segment
        elif marker == 0xDA:  # start of scan: the rest is entropy-coded data and EOI
            body += data[i:]
            break
        else:
            body += segment
        i += 2 + length
    tables += b"\xff\xd9"
    return bytes(tables), bytes(body)


def visium_spots(
    *,
    width: int,
    height: int,
    mpp: float,
    pitch_um: float = 100.0,
    margin_um: float = 200.0,
    every: int = 1,
    origin: tuple[float, float] = (0.0, 0.0),
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """A Visium hex lattice over a ``width`` x ``height`` px area at ``origin``: ``(x_px, y_px,
    array_row, array_col)``.

    Rows are ``pitch * sqrt(3) / 2`` apart, odd rows shifted by half a pitch, array columns
    step by 2 (Visium's convention). ``every`` keeps every n-th row and every n-th spot in a row.
    """
    pitch = pitch_um / mpp
    row_step = pitch * np.sqrt(3) / 2
    margin = margin_um / mpp
    xs: list[float] = []
    ys: list[float] = []
    rows: list[int] = []
    cols: list[int] = []
    n_rows = int((height - 2 * margin) / row_step) + 1
    n_cols = int((width - 2 * margin) / pitch)
    for r in range(0, n_rows, every):
        shift = (r % 2) * pitch / 2
        for c in range(0, n_cols, every):
            xs.append(margin + shift + c * pitch)
            ys.append(margin + r * row_step)
            rows.append(r)
            cols.append(2 * c + (r % 2))
    return (
        np.asarray(xs) + origin[0],
        np.asarray(ys) + origin[1],
        np.asarray(rows, dtype=np.int32),
        np.asarray(cols, dtype=np.int32),
    )
