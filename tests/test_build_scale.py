"""Issue 17: a slide's fetched inputs are released once its unit is committed (reference-counted)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from stcorpus.curate.build.pipeline import BuildSettings, build
from stcorpus.curate.fetch import Fetcher
from stcorpus.curate.fetch.budget import disk_bytes
from stcorpus.curate.fetch.cache import Cache
from stcorpus.curate.fetch.evict import hold, pin, reclaim, release
from tests.build_fixtures import IMAGE, hest_entry, manifest, variant_h5ad
from tests.httpserver import LocalServer, serve
from tests.test_fetch_http import make_sample, settings


def test_shared_input_is_kept_until_the_last_slide_releases_it(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "shared.bin").write_bytes(b"shared archive bytes" * 1000)
    (www / "own.bin").write_bytes(b"only slide A" * 500)
    with serve(www) as server:
        fetch = settings(tmp_path)
        a = make_sample(
            _dir(tmp_path / "a"),
            {"matrix": {"url": server.file_url("shared.bin")}, "image": {"url": server.file_url("own.bin")}},
            sample_id="A",
        )
        b = make_sample(_dir(tmp_path / "b"), {"matrix": {"url": server.file_url("shared.bin")}}, sample_id="B")
        with Fetcher(fetch) as fetcher:
            shared = fetcher.fetch(a.sources["matrix"], sample=a)
            own = fetcher.fetch(a.sources["image"], sample=a)
        assert pin(fetcher.cache, [a, b]) == 3
        freed = release(fetcher.cache, a)
        assert freed == own.size  # only A's own input goes; B still pins the shared one
        assert not fetcher.cache.has_blob(own.sha256)
        assert fetcher.cache.has_blob(shared.sha256) and shared.path.exists()
        assert release(fetcher.cache, b) == shared.size
        assert not fetcher.cache.has_blob(shared.sha256)
        assert fetcher.cache.lookup_url(a.sources["matrix"].url) is None
        # Released inputs are fetched again when needed (one more request), never served stale.
        before = server.count("/shared.bin", method="GET")
        with Fetcher(fetch) as fetcher:
            again = fetcher.fetch(b.sources["matrix"], sample=b)
        assert again.sha256 == shared.sha256 and server.count("/shared.bin", method="GET") == before + 1


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_two_urls_with_the_same_pinned_bytes_share_one_pin(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    data = b"the same archive under two datasets" * 300
    (www / "copy-a.bin").write_bytes(data)
    (www / "copy-b.bin").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    with serve(www) as server:
        a = make_sample(
            _dir(tmp_path / "a"), {"m": {"url": server.file_url("copy-a.bin"), "sha256": sha}}, sample_id="A"
        )
        b = make_sample(
            _dir(tmp_path / "b"), {"m": {"url": server.file_url("copy-b.bin"), "sha256": sha}}, sample_id="B"
        )
        with Fetcher(settings(tmp_path)) as fetcher:
            assert pin(fetcher.cache, [a, b]) == 2
            fetcher.fetch(a.sources["m"], sample=a)
            assert release(fetcher.cache, a) == 0  # B pins the same content under another URL
            got = fetcher.fetch(b.sources["m"], sample=b)
        assert got.cache_hit and server.count("/copy-b.bin", method="GET") == 0
        assert release(fetcher.cache, b) == len(data) and not fetcher.cache.has_blob(sha)


def test_slides_pinned_by_url_keep_bytes_another_slide_fetched_and_released(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "shared.tar").write_bytes(b"not yet known to anyone" * 100)
    with serve(www) as server:
        url = server.file_url("shared.tar")
        a = make_sample(_dir(tmp_path / "a"), {"m": {"url": url, "unpack": False}}, sample_id="A")
        b = make_sample(_dir(tmp_path / "b"), {"m": {"url": url, "unpack": False}}, sample_id="B")
        with Fetcher(settings(tmp_path)) as fetcher:
            pin(fetcher.cache, [a, b])  # by URL: nobody knows the bytes yet
            got = fetcher.fetch(a.sources["m"], sample=a)
            assert hold(fetcher.cache, "A", url=url, sha256=got.sha256, paths=[got.path])
            assert release(fetcher.cache, a, digests=[got.sha256]) == 0
            assert fetcher.fetch(b.sources["m"], sample=b).cache_hit
        assert server.count("/shared.tar", method="GET") == 1
        assert release(fetcher.cache, b, digests=[got.sha256]) == got.size


def test_hold_says_when_the_bytes_went_before_the_pin(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    sha = hashlib.sha256(b"gone").hexdigest()
    assert not hold(cache, "A", url="http://h/gone", sha256=sha, paths=[tmp_path / "deleted-meanwhile"])
    assert (cache.root / "pins" / f"sha256-{sha}").is_dir()  # pinned now: the download that follows stays


def test_keep_sources_unpins_without_deleting(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "kept.bin").write_bytes(b"kept" * 1000)
    with serve(www) as server:
        a = make_sample(_dir(tmp_path / "a"), {"m": server.file_url("kept.bin")}, sample_id="A")
        with Fetcher(settings(tmp_path, keep_sources=True)) as fetcher:
            got = fetcher.fetch(a.sources["m"], sample=a)
            pin(fetcher.cache, [a])
            assert release(fetcher.cache, a, delete=False) == 0
        assert fetcher.cache.has_blob(got.sha256) and not list((fetcher.cache.root / "pins").rglob("*"))


def test_a_build_releases_inputs_by_default_and_reruns_without_fetching(tmp_path: Path) -> None:
    www = _served_slides(tmp_path / "www", 2)
    with serve(www) as server:
        path = _http_manifest(tmp_path, server, 2)
        fetch = settings(tmp_path)
        summary = build([path], out=tmp_path / "out", settings=BuildSettings(progress=False), fetch=fetch)
        assert summary.exit_code == 0
        assert server.count("/img.jpg", method="GET") == 1  # shared by both slides, fetched once
        assert disk_bytes(Cache(fetch.cache_dir)) == 0  # every input released
        before = len(server.requests)
        again = build([path], out=tmp_path / "out", settings=BuildSettings(progress=False), fetch=fetch)
        assert again.exit_code == 0 and len(server.requests) == before  # finished units are reused


def _served_slides(www: Path, n: int) -> Path:
    www.mkdir(parents=True)
    for i in range(n):
        variant_h5ad(www, f"st{i}", drop=i)
    shutil.copyfile(IMAGE, www / "img.jpg")
    return www


def _http_manifest(tmp_path: Path, server: LocalServer, n: int) -> Path:
    entries = [
        hest_entry(f"HTTP-{i}", st=server.file_url(f"st{i}.h5ad"), wsi=server.file_url("img.jpg"), patient=f"P{i}")
        for i in range(n)
    ]
    return manifest(tmp_path / "manifests", entries, name="http")


def test_reclaim_keeps_bytes_a_slide_pins_by_url_before_it_pins_them_by_content(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "fresh.bin").write_bytes(b"just downloaded, not yet held" * 100)
    with serve(www) as server:
        a = make_sample(
            _dir(tmp_path / "a"), {"m": {"url": server.file_url("fresh.bin"), "unpack": False}}, sample_id="A"
        )
        with Fetcher(settings(tmp_path)) as fetcher:
            pin(fetcher.cache, [a])  # by URL: its bytes were unknown when the build pinned them
            got = fetcher.fetch(a.sources["m"], sample=a)
            # Another slide's wait for room (or a prefetch's) between this download and its `hold`:
            assert reclaim(fetcher.cache, 10**9) == 0
            assert fetcher.cache.has_blob(got.sha256)
            assert hold(fetcher.cache, "A", url=got.url, sha256=got.sha256, paths=[got.path])
