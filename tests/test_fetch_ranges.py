"""Range reads of remote pyramidal TIFFs (issue 17 item 3): only the tiles a build decodes are
downloaded, in few requests, and the corpus is byte-identical to a build from the whole file.

The slide is the real squidpy H&E crop and h5ad (tests/data/mouse-brain-fullres-h5ad), the crop
widened with its mirror images so the spots cover a third of level 0, written as a tiled
pyramid with JPEG (YCbCr, as pyvips writes HEST's) or LZW tiles, served by tests/httpserver.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from stcorpus import schema
from stcorpus.curate.cli import main
from stcorpus.curate.errors import FetchError
from stcorpus.curate.fetch import Fetcher
from stcorpus.curate.fetch.ranges import Coverage, RangeRecord, coalesce, open_partial, start_copy
from stcorpus.curate.imaging import SlideImage, TiffImage, Window, open_image
from tests.build_fixtures import H5AD, IMAGE, hest_entry, manifest
from tests.httpserver import LocalServer
from tests.test_build import digests
from tests.test_fetch_http import make_sample, settings
from tests.test_fetch_hub import COMMIT, TOKEN, add_repo, hub  # noqa: F401  (hub: the Hub stand-in fixture)

TILE = 128
COMPRESSIONS: dict[str, dict[str, Any]] = {
    "jpeg": {"compression": "jpeg", "photometric": "ycbcr", "subsampling": (2, 2)},
    "lzw": {"compression": "lzw", "photometric": "rgb"},
}


def write_slide(path: Path, compression: str) -> Path:
    """The real crop and four mirror copies side by side, as a tiled pyramid (levels as top-level pages)."""
    with Image.open(IMAGE) as im:
        crop = np.asarray(im.convert("RGB"))
    level = np.ascontiguousarray(np.concatenate([crop, crop[:, ::-1], crop, crop[:, ::-1], crop], axis=1))
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        index = 0
        while True:
            tif.write(
                level, tile=(TILE, TILE), subfiletype=1 if index else 0, metadata=None, **COMPRESSIONS[compression]
            )
            if min(level.shape[:2]) < 2 * TILE:
                break
            level = np.asarray(Image.fromarray(level).reduce(2))
            index += 1
    return path


def pixels(image: SlideImage, window: Window) -> np.ndarray:
    level, reduce, x0, y0, x1, y1 = window
    return image.read_region(level=level, x=x0, y=y0, width=x1 - x0, height=y1 - y0, reduce=reduce)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_coalesce_merges_near_ranges_and_coverage_lists_the_gaps() -> None:
    assert coalesce([(50, 60), (0, 10), (12, 20), (100, 100)], gap=2) == [(0, 20), (50, 60)]
    assert coalesce([(0, 10), (5, 8)], gap=0) == [(0, 10)]
    coverage = Coverage([(10, 20)])
    coverage.add(30, 40)
    coverage.add(20, 25)
    assert coverage.spans == [(10, 25), (30, 40)] and coverage.total == 25
    assert coverage.missing(0, 50) == [(0, 10), (25, 30), (40, 50)]
    assert coverage.missing(12, 24) == []
    assert coverage.missing(24, 31) == [(25, 30)]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_a_partial_copy_reads_the_pixels_of_the_whole_file(
    tmp_path: Path, http_server: LocalServer, compression: str
) -> None:
    served = write_slide(http_server.root / "slide.tif", compression)
    url = http_server.file_url("slide.tif")
    copy = tmp_path / "copy" / "slide.tif"
    start_copy(
        copy, RangeRecord(url=url, get_url=url, size=served.stat().st_size, validator=None, sha256=None, hub=False)
    )
    assert copy.stat().st_blocks == 0  # sparse: nothing is stored before it is read

    with open_image(served) as whole, open_image(copy) as part:
        assert isinstance(part, TiffImage) and part.is_remote and part.remote is not None
        assert [lvl.width for lvl in part.levels] == [lvl.width for lvl in whole.levels]
        header = part.remote.fetched_bytes
        windows: list[Window] = [(0, 1, 100, 200, 700, 900), (1, 1, 40, 50, 300, 333)]
        fetched = part.prefetch(windows)
        requests = part.remote.requests
        for window in windows:
            assert np.array_equal(pixels(part, window), pixels(whole, window))
        assert part.remote.requests == requests  # every tile read was prefetched
        # A window nobody prefetched is downloaded as it is read, and still right.
        far = (0, 1, 2000, 1500, 2064, 1564)
        assert np.array_equal(pixels(part, far), pixels(whole, far))
        assert part.remote.requests > requests
        total = part.remote.fetched_bytes
    assert 0 < header + fetched < total == http_server.bytes_sent < served.stat().st_size / 2
    # The copy remembers what it holds: reopened, the same windows need no request.
    reopened = open_partial(copy)
    assert reopened is not None
    try:
        assert reopened.prefetch([(a, b) for a, b in reopened.coverage.spans]) == 0
        assert reopened.requests == 0
        # Ranges further apart than the gap are separate requests, and only their bytes come.
        held = reopened.coverage.total
        a, b = max(reopened.coverage.missing(0, served.stat().st_size), key=lambda gap: gap[1] - gap[0])
        assert b - a > 3000
        assert reopened.prefetch([(a, a + 1000), (a + 2000, a + 2990)], gap=100) == 1990
        assert reopened.requests == 2 and reopened.coverage.total == held + 1990
    finally:
        reopened.close()


def test_two_openers_of_one_copy_never_download_the_same_range_twice(tmp_path: Path, http_server: LocalServer) -> None:
    """A prefetch (the build process) and the slide's unit (a worker) hold the same partial copy open:
    what one downloads, the other finds, though its own view of the copy was read before."""
    served = write_slide(http_server.root / "slide.tif", "jpeg")
    url, size = http_server.file_url("slide.tif"), served.stat().st_size
    copy = tmp_path / "copy" / "slide.tif"
    start_copy(copy, RangeRecord(url=url, get_url=url, size=size, validator=None, sha256=None, hub=False))
    first, second = open_partial(copy), open_partial(copy)
    assert first is not None and second is not None
    try:
        spans = [(10_000, 60_000), (200_000, 260_000)]
        assert first.prefetch(spans) == 110_000
        sent = http_server.bytes_sent
        assert second.prefetch(spans) == 0 and second.requests == 0  # it read the record before the download
        assert http_server.bytes_sent == sent
        # a span partly held: only the rest comes
        assert second.prefetch([(50_000, 70_000)]) == 10_000
        with copy.open("rb") as whole_copy, served.open("rb") as original:
            whole_copy.seek(10_000)
            original.seek(10_000)
            assert whole_copy.read(60_000) == original.read(60_000)
    finally:
        first.close()
        second.close()


def test_range_reads_hold_the_per_host_cap_the_other_downloads_share(tmp_path: Path, http_server: LocalServer) -> None:
    served = write_slide(http_server.root / "slide.tif", "jpeg")
    url = http_server.file_url("slide.tif")
    copy = tmp_path / "copy" / "slide.tif"
    size = served.stat().st_size
    start_copy(copy, RangeRecord(url=url, get_url=url, size=size, validator=None, sha256=None, hub=False))
    # Resumed by a run with --per-host 1: the copy takes that run's cap (a slot under the cache's locks/).
    cache = tmp_path / "cache"
    capped = RangeRecord(url=url, get_url=url, size=size, validator=None, sha256=None, hub=False, host_cap=1)
    capped.cap_root = str(cache)
    start_copy(copy, capped)
    partial = open_partial(copy)
    assert partial is not None
    try:
        assert partial.prefetch([(0, 1000)]) == 1000
    finally:
        partial.close()
    assert [p.name.startswith("host-") for p in (cache / "locks").iterdir()] == [True]


def test_a_file_that_changes_on_the_server_fails_instead_of_splicing(tmp_path: Path, http_server: LocalServer) -> None:
    served = write_slide(http_server.root / "slide.tif", "lzw")
    url = http_server.file_url("slide.tif")
    copy = tmp_path / "slide.tif"
    record = RangeRecord(
        url=url, get_url=url, size=served.stat().st_size, validator=f'"{sha256(served)}"', sha256=None, hub=False
    )
    start_copy(copy, record)
    with open_image(copy) as image:
        data = bytearray(served.read_bytes())
        data[-1] ^= 0xFF  # another version of the file under the same URL
        served.write_bytes(bytes(data))
        with pytest.raises(FetchError, match="changed on the server"):
            image.read_region(level=0, x=0, y=0, width=900, height=900)


def _build(tmp_path: Path, wsi_url: str, wsi_sha256: str, *, name: str, extra: list[str]) -> Path:
    folder = tmp_path / name
    entry = hest_entry("slide-1", st=H5AD, wsi=Path("WSI"))
    entry = entry.replace("wsi: 'WSI'", f"wsi: {{url: '{wsi_url}', sha256: {wsi_sha256}}}")
    path = manifest(folder, [entry])
    out = folder / "corpus"
    args = ["build", str(path), "--out", str(out), "--cache", str(folder / "cache"), "--no-progress"]
    assert main([*args, "--holdout", "none", *extra]) == 0
    return out


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_a_build_by_range_reads_is_byte_identical_and_downloads_a_part(
    tmp_path: Path, http_server: LocalServer, compression: str
) -> None:
    served = write_slide(http_server.root / "slide.tif", compression)
    url, digest, size = http_server.file_url("slide.tif"), sha256(served), served.stat().st_size

    whole = _build(tmp_path, url, digest, name="whole", extra=["--no-range-reads"])
    assert http_server.bytes_sent >= size
    sent = http_server.bytes_sent
    ranged = _build(tmp_path, url, digest, name="ranged", extra=[])
    by_ranges = http_server.bytes_sent - sent

    assert digests(ranged) == digests(whole)  # shards, slides, card: the same bytes
    corpus = json.loads((ranged / schema.CORPUS_FILE).read_text())
    wsi = next(s for s in corpus["sources"] if s["name"] == "wsi")
    assert (wsi["sha256"], wsi["size"]) == (digest, size)
    assert by_ranges < size / 2, (by_ranges, size)
    # nothing was downloaded whole, and the partial copy was released with the slide's other inputs
    cache = tmp_path / "ranged" / "cache"
    assert not (cache / "blobs" / "sha256" / digest[:2] / digest).exists()
    assert not list((cache / "ranges").glob("*/*"))


def test_an_unpinned_tiff_is_downloaded_whole_and_then_used_whole(tmp_path: Path, http_server: LocalServer) -> None:
    from stcorpus.curate.fetch import FetchSettings
    from stcorpus.curate.manifest import load_manifest

    served = write_slide(http_server.root / "slide.tif", "lzw")
    url, digest = http_server.file_url("slide.tif"), sha256(served)
    entry = hest_entry("slide-1", st=H5AD, wsi=Path("WSI")).replace("wsi: 'WSI'", f"wsi: '{url}'")
    unpinned = load_manifest(manifest(tmp_path / "m", [entry])).samples[0]
    with Fetcher(FetchSettings(cache_dir=tmp_path / "cache")) as fetcher:
        # no sha256 in the manifest: the unit's recorded digest must come from the whole file
        assert fetcher.open_ranged(unpinned.sources["wsi"], sample=unpinned, name="wsi") is None
        got = fetcher.fetch(unpinned.sources["wsi"], sample=unpinned, name="wsi")
        assert got.sha256 == digest
        # now whole in the cache: a range read would only cost requests, so the cached file is used
        sent = http_server.bytes_sent
        assert fetcher.open_ranged(unpinned.sources["wsi"], sample=unpinned, name="wsi") is None
        again = fetcher.fetch(unpinned.sources["wsi"], sample=unpinned, name="wsi")
        assert again.cache_hit and (again.path, again.sha256) == (got.path, got.sha256)
        assert http_server.bytes_sent == sent


def test_an_hf_tiff_is_read_by_range_through_the_cdn_with_the_hub_digest(
    tmp_path: Path,
    hub: LocalServer,  # noqa: F811  (the fixture imported above)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    local = write_slide(tmp_path / "slide.tif", "jpeg")
    add_repo(hub, tmp_path, {"wsis/S1.tif": local.read_bytes()})
    sample = make_sample(tmp_path, {"wsi": "hf://datasets/MahmoodLab/hest-mini/wsis/S1.tif"})
    with Fetcher(settings(tmp_path)) as fetcher:
        got = fetcher.open_ranged(sample.sources["wsi"], sample=sample, name="wsi")
    assert got is not None and (got.sha256, got.size, got.commit) == (sha256(local), local.stat().st_size, COMMIT)
    window: Window = (0, 1, 300, 200, 700, 500)
    with open_image(got.path) as part, open_image(local) as whole:
        assert part.is_remote and part.prefetch([window]) > 0
        assert np.array_equal(pixels(part, window), pixels(whole, window))
    assert 0 < hub.bytes_sent < local.stat().st_size / 2
    # Range GETs ask the Hub for the commit the HEAD saw, with the token; the CDN never sees it.
    gets = [r for r in hub.requests if r.method == "GET"]
    assert gets and all(COMMIT in r.path or "authorization" not in r.headers for r in gets)
    assert any(r.path.startswith(f"/datasets/MahmoodLab/hest-mini/resolve/{COMMIT}/") for r in gets)
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in gets if COMMIT in r.path)
