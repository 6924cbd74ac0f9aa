"""Memory stays bounded by the tile cache, not by the slide: peak RSS of a subprocess cutting tiles.

Linux only (peak RSS is read from /proc/self/status).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bench.synth import he_texture, visium_spots, write_pyramid_tiff

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc (Linux)")

ROOT = Path(__file__).resolve().parent.parent

#: Cuts every spot of a lattice in a fresh process and reports its peak RSS before and after.
CUT_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import numpy as np
from stcorpus.curate.imaging import open_image
from stcorpus.curate.tiles import Tiler, TileSettings
spots = np.load({spots!r})
image = open_image({path!r})
tiler = Tiler(image, mpp={mpp}, settings=TileSettings(cache_bytes={cache}, regions={regions}))
# Warm up imports and allocators on one spot, then take the baseline.
def peak():  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's at fork)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
tiler.cut(float(spots[0, 0]), float(spots[0, 1]), key="S__warmup")
before = peak()
run = tiler.cut_many(spots[:, 0], spots[:, 1], [f"S__B{{i}}" for i in range(len(spots))])
accepted = sum(r.accepted for r in run)
after = peak()
print(json.dumps({{"before": before, "after": after, "accepted": accepted, "n": len(spots),
                  "decoded": run.stats.tiles_decoded, "cache_peak": run.stats.cache_peak_bytes}}))
"""


def peak_rss(tmp_path: Path, path: Path, *, mpp: float, spots: np.ndarray, cache: int, regions: bool) -> dict[str, int]:
    np.save(tmp_path / "spots.npy", spots)
    script = CUT_SCRIPT.format(
        root=str(ROOT), spots=str(tmp_path / "spots.npy"), path=str(path), mpp=mpp, cache=cache, regions=regions
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result: dict[str, int] = json.loads(done.stdout)
    return result


@pytest.mark.slow
def test_a_7_gb_pyramid_is_tiled_in_a_few_hundred_mb(tmp_path: Path) -> None:
    """49,152 x 49,152 px at 0.25 um/px (12 mm; 7.2 GB decoded at level 0), tissue in a 7.4 mm
    disc of real H&E texture: cutting patch + region for spots across the whole disc stays
    under 250 MB of peak RSS with a 64 MB tile cache (measured here: 52 MB before, 124 MB after)."""
    size, mpp = 49152, 0.25
    radius = 0.3 * size

    def tissue(level: int, x: int, y: int, tile: int) -> bool:
        scale = 2**level
        cx, cy = (x + tile / 2) * scale, (y + tile / 2) * scale
        return bool(np.hypot(cx - size / 2, cy - size / 2) < radius + tile * scale)

    slide = write_pyramid_tiff(tmp_path / "big.tif", width=size, height=size, mpp=mpp, tissue=tissue)
    xs, ys, _, _ = visium_spots(width=size, height=size, mpp=mpp, every=3)
    inside = np.hypot(xs - size / 2, ys - size / 2) < radius - 1000
    spots = np.stack([xs[inside], ys[inside]], axis=1)
    assert len(spots) > 400
    rss = peak_rss(tmp_path, slide.path, mpp=mpp, spots=spots, cache=64 * 2**20, regions=True)
    decoded = size * size * 3
    assert rss["accepted"] == len(spots)
    assert rss["decoded"] > 1000  # the spots really span the slide: thousands of tiles decoded
    assert rss["cache_peak"] <= 64 * 2**20
    assert rss["after"] < 250 * 2**20, rss
    assert rss["after"] - rss["before"] < 64 * 2**20 + 64 * 2**20, rss  # the cache + working arrays
    assert decoded > 25 * rss["after"]


def test_an_uncompressed_single_strip_tiff_is_read_row_by_row(tmp_path: Path) -> None:
    """A plain TIFF stored as one 216 MB strip: windows are read without loading the strip."""
    height, width = 6000, 12000
    texture = he_texture()
    rows = np.pad(texture, ((0, 0), (0, width - texture.shape[1]), (0, 0)), mode="wrap")

    def image_rows() -> Iterator[np.ndarray]:
        for y in range(height):
            yield rows[y % rows.shape[0]]

    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, image_rows(), shape=(height, width, 3), dtype=np.uint8, photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages[0].dataoffsets) == 1  # one strip
    xs, ys = np.meshgrid(np.arange(1000, width - 1000, 1500.0), np.arange(1000, height - 1000, 1500.0))
    spots = np.stack([xs.ravel(), ys.ravel()], axis=1)
    rss = peak_rss(tmp_path, path, mpp=0.5, spots=spots, cache=16 * 2**20, regions=False)
    assert rss["accepted"] == len(spots)
    assert rss["after"] - rss["before"] < 40 * 2**20, rss  # the strip alone is 216 MB (measured: +14 MB)
