"""Issue 17: a slide's fetched inputs are released once its unit is committed (reference-counted)."""

from __future__ import annotations

from pathlib import Path

from stcorpus.curate.fetch import Fetcher
from stcorpus.curate.fetch.evict import pin, release
from tests.httpserver import serve
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
