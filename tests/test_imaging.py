"""The image reading layer: windows of pyramidal/strip TIFFs, PNG and JPEG, read tile by tile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from bench.synth import write_pyramid_tiff
from stcorpus.curate.errors import CorruptSourceError
from stcorpus.curate.imaging import TileCache, level_downsample, open_image
from tests.conftest import FULLRES

HE = FULLRES / "test_img.jpg"


@pytest.fixture(scope="module")
def he() -> np.ndarray:
    """The real full-resolution H&E crop (950 x 1717 RGB)."""
    pixels: np.ndarray = np.asarray(Image.open(HE).convert("RGB"))
    return pixels


def halve(pixels: np.ndarray) -> np.ndarray:
    h, w = pixels.shape[0] // 2 * 2, pixels.shape[1] // 2 * 2
    halved: np.ndarray = pixels[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).mean(axis=(1, 3)).round().astype(np.uint8)
    return halved


def write_tiff(path: Path, levels: list[np.ndarray], **kwargs: Any) -> Path:
    """A pyramid with each level as a top-level page, as pyvips and scanners write them."""
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index, level in enumerate(levels):
            tif.write(level, subfiletype=1 if index else 0, metadata=None, **kwargs)
    return path


# ---------------------------------------------------------------------------------------------
# Pixels equal what tifffile decodes, for every layout the reader has a path for
# ---------------------------------------------------------------------------------------------

LAYOUTS: dict[str, dict[str, Any]] = {
    "jpeg-ycbcr-tiles": {"tile": (256, 256), "compression": "jpeg", "photometric": "rgb"},
    "jpeg-rgb-tiles": {"tile": (128, 128), "compression": "jpeg", "photometric": "rgb", "subsampling": (1, 1)},
    "lzw-tiles": {"tile": (256, 256), "compression": "lzw", "photometric": "rgb"},
    "deflate-tiles-predictor": {"tile": (128, 128), "compression": "zlib", "predictor": True, "photometric": "rgb"},
    "jpeg2000-tiles": {"tile": (256, 256), "compression": "jpeg2000", "photometric": "rgb"},
    "lzw-strips": {"rowsperstrip": 37, "compression": "lzw", "photometric": "rgb"},
    "raw-one-strip": {"photometric": "rgb"},
    "raw-strips": {"rowsperstrip": 100, "photometric": "rgb"},
    "raw-tiles": {"tile": (64, 64), "photometric": "rgb"},
    "planar-lzw": {"planarconfig": "separate", "compression": "lzw", "photometric": "rgb"},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiff_windows_equal_tifffile(tmp_path: Path, he: np.ndarray, layout: str) -> None:
    kwargs = dict(LAYOUTS[layout])
    if layout.startswith("planar"):  # one level: tifffile reads planar RGB through its zarr store
        levels = [np.ascontiguousarray(np.moveaxis(he, -1, 0))]
    else:
        levels = [he, halve(he)]
    path = write_tiff(tmp_path / "slide.tif", levels, **kwargs)
    truth = tifffile.imread(path)
    if truth.shape[0] == 3:
        truth = np.moveaxis(truth, 0, -1)
    with open_image(path) as image:
        assert (image.width, image.height) == (950, 1717)
        # Windows inside one tile, across tiles and strips, and reaching past the edges (white).
        for x, y, w, h in ((10, 20, 50, 40), (200, 250, 300, 333), (0, 0, 950, 1717), (900, 1700, 120, 64)):
            window = image.read_region(level=0, x=x, y=y, width=w, height=h)
            assert window.shape == (h, w, 3) and window.dtype == np.uint8
            inside = truth[y : y + h, x : x + w]
            np.testing.assert_array_equal(window[: inside.shape[0], : inside.shape[1]], inside)
            assert (window[inside.shape[0] :] == 255).all() and (window[:, inside.shape[1] :] == 255).all()
        left_of_image = image.read_region(level=0, x=-30, y=5, width=40, height=10)
        assert (left_of_image[:, :30] == 255).all()
        np.testing.assert_array_equal(left_of_image[:, 30:], truth[5:15, :10])


def test_jpegtables_tiles_decode_like_tifffile(tmp_path: Path) -> None:
    """Abbreviated JPEG tiles with shared tables (Aperio, Hamamatsu) are spliced correctly."""
    slide = write_pyramid_tiff(tmp_path / "tables.tif", width=1500, height=1100, jpegtables=True)
    with tifffile.TiffFile(slide.path) as tif:
        assert tif.pages[0].jpegtables is not None
    truth = tifffile.imread(slide.path, level=1)
    with open_image(slide.path) as image:
        assert [lvl.downsample for lvl in image.levels] == [1.0, 2.0]
        np.testing.assert_array_equal(
            image.read_region(level=1, x=100, y=37, width=500, height=400), truth[37:437, 100:600]
        )


def test_grey_16bit_and_alpha(tmp_path: Path, he: np.ndarray) -> None:
    grey = he.mean(axis=2).astype(np.uint16) * 257
    path = write_tiff(tmp_path / "grey.tif", [grey], tile=(64, 64), compression="zlib")
    with open_image(path) as image:
        window = image.read_region(level=0, x=3, y=4, width=20, height=10)
    np.testing.assert_array_equal(window, np.repeat((grey[4:14, 3:23] >> 8).astype(np.uint8)[..., None], 3, axis=2))
    rgba = np.concatenate([he, np.full((*he.shape[:2], 1), 200, np.uint8)], axis=2)
    path = write_tiff(tmp_path / "rgba.tif", [rgba], tile=(64, 64), compression="lzw", photometric="rgb")
    with open_image(path) as image:
        assert image.has_alpha
        np.testing.assert_array_equal(image.read_region(level=0, x=0, y=0, width=8, height=8), he[:8, :8])
        with_alpha = image.read_region(level=0, x=-4, y=0, width=8, height=8, keep_alpha=True)
        assert (with_alpha[:, :4, 3] == 0).all() and (with_alpha[:, 4:, 3] == 200).all()


def test_png_and_jpeg(tmp_path: Path, he: np.ndarray) -> None:
    Image.fromarray(he).save(tmp_path / "slide.png")
    with open_image(tmp_path / "slide.png") as image:
        np.testing.assert_array_equal(image.read_region(level=0, x=5, y=6, width=70, height=80), he[6:86, 5:75])
        assert image.reductions(0) == (1,)
    with open_image(HE) as image:
        assert (image.width, image.height) == (950, 1717)
        np.testing.assert_array_equal(image.read_region(level=0, x=0, y=0, width=950, height=1717), he)


# ---------------------------------------------------------------------------------------------
# Pyramids, reductions, thumbnails
# ---------------------------------------------------------------------------------------------


def test_level_downsample_snaps_rounded_level_sizes() -> None:
    assert level_downsample(1001, 777, 500, 388) == 2.0  # floor
    assert level_downsample(1001, 777, 501, 389) == 2.0  # ceil
    assert level_downsample(100000, 80000, 25000, 20000) == 4.0
    assert level_downsample(1000, 1000, 300, 300) == pytest.approx(1000 / 300)  # not an integer shrink


def test_jpeg_reduction_is_an_area_downscale(tmp_path: Path) -> None:
    slide = write_pyramid_tiff(tmp_path / "one.tif", width=2048, height=1536, levels=1)
    level0 = tifffile.imread(slide.path)
    with open_image(slide.path) as image:
        assert image.reductions(0) == (1, 2, 4, 8)
        assert image.level_size(0, reduce=4) == (512, 384)
        for reduce in (2, 4):
            window = image.read_region(level=0, x=40, y=30, width=200, height=150, reduce=reduce).astype(float)
            span = level0[30 * reduce : 180 * reduce, 40 * reduce : 240 * reduce].astype(float)
            area = span.reshape(150, reduce, 200, reduce, 3).mean(axis=(1, 3))
            assert np.abs(window - area).mean() < 2.0
        with pytest.raises(ValueError, match="reductions"):
            image.read_region(level=0, x=0, y=0, width=8, height=8, reduce=3)


def test_non_jpeg_levels_have_no_reductions(tmp_path: Path, he: np.ndarray) -> None:
    path = write_tiff(tmp_path / "lzw.tif", [he], tile=(64, 64), compression="lzw", photometric="rgb")
    with open_image(path) as image:
        assert image.reductions(0) == (1,)


def test_thumbnail_is_an_area_downscale_read_in_bands(tmp_path: Path) -> None:
    slide = write_pyramid_tiff(tmp_path / "thumb.tif", width=3000, height=2000, levels=2)
    level1 = tifffile.imread(slide.path, level=1).astype(float)
    with open_image(slide.path, cache_bytes=2**20) as image:
        thumb = image.thumbnail(max_size=375)  # 8x: level 1 (2x) at 1/4 JPEG scale
        assert thumb.shape == (250, 375, 3)
        expected = level1.reshape(250, 4, 375, 4, 3).mean(axis=(1, 3))
        assert np.abs(thumb - expected).mean() < 2.0
        assert image.cache.stats.peak_bytes <= 2**20
    with open_image(HE) as image:
        assert image.thumbnail(max_size=200).shape == (200, 111, 3)


# ---------------------------------------------------------------------------------------------
# The tile cache
# ---------------------------------------------------------------------------------------------


def test_tile_cache_is_lru_and_bounded() -> None:
    cache = TileCache(max_bytes=300)
    for key in "abc":
        cache.put(key, np.zeros(100, np.uint8))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", np.zeros(100, np.uint8))  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("c") is not None and cache.get("a") is not None
    assert cache.stats.bytes == 300 and cache.stats.evictions == 1
    cache.put("huge", np.zeros(1000, np.uint8))  # larger than the bound: not kept
    assert cache.get("huge") is None and cache.stats.bytes == 300
    cache.resize(100)  # keeps the most recently used: a
    assert len(cache) == 1 and cache.stats.bytes == 100 and cache.get("d") is None
    with pytest.raises(ValueError, match="read-only"):
        value = cache.get("a")
        assert value is not None
        value[0] = 1


def test_reads_decode_each_tile_once_while_cached(tmp_path: Path) -> None:
    slide = write_pyramid_tiff(tmp_path / "cache.tif", width=2048, height=2048, levels=1)
    with open_image(slide.path, cache_bytes=64 * 2**20) as image:
        for x in range(0, 1800, 100):  # overlapping windows sweeping a band
            image.read_region(level=0, x=x, y=300, width=224, height=224)
        # The band touches 2 tile rows x 8 tile columns: each decoded once.
        assert image.cache.stats.misses == 16
        assert image.cache.stats.hits > 16
        # A bound of 4 tiles still gives right pixels, re-decoding as needed.
        small = open_image(slide.path, cache_bytes=4 * 256 * 256 * 3)
        window = small.read_region(level=0, x=100, y=100, width=700, height=300)
        np.testing.assert_array_equal(window, image.read_region(level=0, x=100, y=100, width=700, height=300))
        assert small.cache.stats.bytes <= 4 * 256 * 256 * 3
        small.close()


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_open_errors_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(CorruptSourceError, match="not found"):
        open_image(tmp_path / "missing.tif")
    (tmp_path / "slide.bmp").write_bytes(b"BM")
    with pytest.raises(CorruptSourceError, match="unsupported image type"):
        open_image(tmp_path / "slide.bmp")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(CorruptSourceError, match="not a readable TIFF"):
        open_image(tmp_path / "broken.tif")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(CorruptSourceError, match="not a readable image"):
        open_image(tmp_path / "broken.png")


def test_corrupt_tile_data_is_a_corrupt_source(tmp_path: Path) -> None:
    slide = write_pyramid_tiff(tmp_path / "bad.tif", width=512, height=512, levels=1)
    with tifffile.TiffFile(slide.path) as tif:
        offset = tif.pages[0].dataoffsets[0]
    data = bytearray(slide.path.read_bytes())
    data[offset : offset + 64] = b"\x00" * 64  # the first tile's JPEG header is gone
    slide.path.write_bytes(bytes(data))
    with open_image(slide.path) as image:
        with pytest.raises(CorruptSourceError, match="cannot be decoded"):
            image.read_region(level=0, x=0, y=0, width=10, height=10)
        assert image.read_region(level=0, x=300, y=300, width=10, height=10).shape == (10, 10, 3)


def test_the_pixel_budget_bounds_what_is_decoded_at_once(tmp_path: Path) -> None:
    from stcorpus.curate.errors import ImageTooLargeError, SettingsError
    from stcorpus.curate.imaging import DEFAULT_MAX_PIXELS, ImageSettings

    pixels = np.full((600, 800, 3), 200, dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "whole.png")
    with pytest.raises(ImageTooLargeError, match=r"whole\.png: the PNG is 800 x 600 px .* budget of 479,999 px"):
        open_image(tmp_path / "whole.png", max_pixels=479_999)
    assert open_image(tmp_path / "whole.png", max_pixels=480_000).width == 800
    # a flat TIFF in one strip is decoded whole; a tiled one tile by tile, whatever its size
    flat = write_tiff(tmp_path / "flat.tif", [pixels], compression="zlib", rowsperstrip=600)
    with pytest.raises(ImageTooLargeError, match=r"flat\.tif: one strip of level 0 is 800 x 600 px"):
        open_image(flat, max_pixels=100_000)
    tiled = write_tiff(tmp_path / "tiled.tif", [pixels], compression="zlib", tile=(128, 128))
    with open_image(tiled, max_pixels=128 * 128) as image:
        assert image.read_region(level=0, x=0, y=0, width=800, height=600).shape == (600, 800, 3)
    with pytest.raises(ImageTooLargeError, match=r"one tile of level 0 is 128 x 128 px"):
        open_image(tiled, max_pixels=128 * 128 - 1)
    # uncompressed strips are read row by row: never more than a 512 px virtual tile at once
    raw = write_tiff(tmp_path / "raw.tif", [pixels], rowsperstrip=600)
    assert open_image(raw, max_pixels=512 * 512).height == 600
    assert ImageSettings().max_pixels == DEFAULT_MAX_PIXELS == 2**29
    with pytest.raises(SettingsError, match="max_pixels must be a positive number"):
        ImageSettings(max_pixels=0)


def test_a_jpeg_decodes_to_pillows_pixels_and_a_truncated_one_is_corrupt(tmp_path: Path) -> None:
    expected_pixels = np.asarray(Image.open(HE).convert("RGB"))
    with open_image(HE) as image:
        whole = image.read_region(level=0, x=0, y=0, width=image.width, height=image.height)
    np.testing.assert_array_equal(whole, expected_pixels)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(HE.read_bytes()[: HE.stat().st_size // 2])
    with open_image(truncated) as image, pytest.raises(CorruptSourceError, match=r"cut\.jpg: image data cannot be"):
        image.read_region(level=0, x=0, y=0, width=10, height=10)
