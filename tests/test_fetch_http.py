"""The fetch layer over real HTTP (a server on 127.0.0.1): cache, resume, retries, checksums, locks."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from stcorpus.curate.errors import (
    ChecksumMismatchError,
    FetchError,
    HttpStatusError,
    RemoteNotFoundError,
    SettingsError,
    SizeMismatchError,
    UnsupportedSchemeError,
)
from stcorpus.curate.fetch import Fetcher, FetchSettings, default_cache_dir
from stcorpus.curate.manifest import Sample, Source, parse_manifest
from stcorpus.http import backoff_delay, parse_retry_after, redact_url
from tests.httpserver import Fault, LocalServer, serve


@pytest.fixture
def server(tmp_path: Path):
    with serve(tmp_path / "www") as running:
        yield running


def make_sample(tmp_path: Path, sources: dict[str, Any], *, allow_local: bool = False, sample_id: str = "S1") -> Sample:
    """A sample read from a real manifest file (so describe() and base_dir are the real thing)."""
    text = yaml.safe_dump(
        {
            "manifest": "stcorpus-manifest/1",
            "name": "t",
            "allow_local": allow_local,
            "defaults": {"source": "10x", "technology": "spaceranger", "species": "human", "licence": "CC-BY-4.0"},
            "studies": [{"id": "study", "samples": [{"id": sample_id, "sources": sources}]}],
        }
    )
    path = tmp_path / "manifest.yaml"
    path.write_text(text)
    return parse_manifest(text, path=path).samples[0]


def settings(tmp_path: Path, **overrides: Any) -> FetchSettings:
    values: dict[str, Any] = {
        "cache_dir": tmp_path / "cache",
        "retries": 3,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "connect_timeout": 5.0,
        "read_timeout": 5.0,
        "chunk_size": 16 * 1024,
    }
    values.update(overrides)
    return FetchSettings(**values)


def put(server: LocalServer, name: str, data: bytes) -> str:
    path = server.root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return server.file_url(name)


def payload(size: int, seed: int = 0) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size] if seed else os.urandom(size)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ---------------------------------------------------------------------------------------------


def test_download_is_verified_cached_and_named_like_the_url(tmp_path: Path, server: LocalServer) -> None:
    data = payload(300_000)
    url = put(server, "data/filtered_feature_bc_matrix.h5", data)
    sample = make_sample(tmp_path, {"matrix": url})
    with Fetcher(settings(tmp_path)) as fetcher:
        first = fetcher.fetch(sample.sources["matrix"], sample=sample)
        assert first.sha256 == hashlib.sha256(data).hexdigest() and first.size == len(data)
        assert not first.cache_hit and first.url == url
        assert first.path.name == "filtered_feature_bc_matrix.h5" and first.path.read_bytes() == data
        blob = tmp_path / "cache" / "blobs" / "sha256" / first.sha256[:2] / first.sha256
        assert blob.read_bytes() == data and blob.stat().st_mode & 0o222 == 0  # read-only
        second = fetcher.fetch(sample.sources["matrix"], sample=sample)
    assert second.cache_hit and second.sha256 == first.sha256 and second.path == first.path
    assert server.count("/data/filtered_feature_bc_matrix.h5") == 1  # the second fetch used no network
    assert files_under(tmp_path / "cache" / "partial") == []


def test_manifest_sha256_hit_needs_no_network(tmp_path: Path, server: LocalServer) -> None:
    data = payload(5000)
    digest = hashlib.sha256(data).hexdigest()
    url = put(server, "a.bin", data)
    with Fetcher(settings(tmp_path)) as fetcher:
        fetcher.fetch(Source(url=url), sample=make_sample(tmp_path, {"a": url}))
        # Another URL with the same pinned digest is served from the cache, without a request.
        other = make_sample(tmp_path, {"a": {"url": f"{server.url}/elsewhere/a.bin", "sha256": digest}})
        hit = fetcher.fetch(other.sources["a"], sample=other)
    assert hit.cache_hit and hit.sha256 == digest and hit.path.read_bytes() == data
    assert server.count("/elsewhere/a.bin") == 0


def test_interrupted_body_resumes_with_a_range_request(tmp_path: Path, server: LocalServer) -> None:
    data = payload(400_000)
    url = put(server, "big.bin", data)
    server.add_fault("/big.bin", Fault(drop_after=150_000))
    sample = make_sample(tmp_path, {"image": {"url": url, "sha256": hashlib.sha256(data).hexdigest()}})
    with Fetcher(settings(tmp_path)) as fetcher:
        fetched = fetcher.fetch(sample.sources["image"], sample=sample)
    assert fetched.path.read_bytes() == data
    gets = server.requests_for("/big.bin", method="GET")
    assert len(gets) == 2
    assert "range" not in gets[0].headers
    resumed_at = int(gets[1].headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 150_000 and gets[1].headers["range"] == f"bytes={resumed_at}-"
    assert gets[1].headers["if-range"] == f'"{hashlib.sha256(data).hexdigest()}"'


def test_partial_download_survives_a_failed_run_and_resumes_in_the_next(tmp_path: Path, server: LocalServer) -> None:
    data = payload(300_000)
    url = put(server, "x.tif", data)
    server.add_fault("/x.tif", Fault(drop_after=100_000))
    sample = make_sample(tmp_path, {"image": url})
    with Fetcher(settings(tmp_path, retries=0)) as fetcher, pytest.raises(SizeMismatchError) as info:
        fetcher.fetch(sample.sources["image"], sample=sample)
    assert "S1" in str(info.value) and "'image'" in str(info.value) and url in str(info.value)
    assert "resumes on the next run" in str(info.value)
    # Nothing is visible under a final name; the bytes wait in partial/.
    assert files_under(tmp_path / "cache" / "blobs") == [] and files_under(tmp_path / "cache" / "named") == []
    partials = [p for p in files_under(tmp_path / "cache" / "partial") if p.suffix != ".json"]
    assert len(partials) == 1 and 0 < partials[0].stat().st_size <= 100_000
    kept = partials[0].stat().st_size
    with Fetcher(settings(tmp_path)) as fetcher:
        fetched = fetcher.fetch(sample.sources["image"], sample=sample)
    assert fetched.path.read_bytes() == data and fetched.sha256 == hashlib.sha256(data).hexdigest()
    assert server.requests_for("/x.tif", method="GET")[-1].headers["range"] == f"bytes={kept}-"
    assert files_under(tmp_path / "cache" / "partial") == []


def test_retry_after_on_429_is_waited_out(tmp_path: Path, server: LocalServer) -> None:
    url = put(server, "rate.bin", b"limited" * 100)
    server.add_fault("/rate.bin", Fault(status=429, retry_after="1"))
    sample = make_sample(tmp_path, {"f": url})
    start = time.monotonic()
    with Fetcher(settings(tmp_path)) as fetcher:
        fetched = fetcher.fetch(sample.sources["f"], sample=sample)
    elapsed = time.monotonic() - start
    assert fetched.path.read_bytes() == b"limited" * 100
    assert server.count("/rate.bin") == 2
    assert elapsed >= 0.95  # Retry-After: 1 (the backoff alone would be under 0.05 s)


def test_server_errors_are_retried_then_reported(tmp_path: Path, server: LocalServer) -> None:
    url = put(server, "flaky.bin", b"x")
    server.add_fault("/flaky.bin", Fault(status=503, times=2))
    sample = make_sample(tmp_path, {"f": url})
    with Fetcher(settings(tmp_path)) as fetcher:
        assert fetcher.fetch(sample.sources["f"], sample=sample).path.read_bytes() == b"x"
    assert server.count("/flaky.bin") == 3

    url = put(server, "down.bin", b"y")
    server.add_fault("/down.bin", Fault(status=500, times=None))
    sample = make_sample(tmp_path, {"f": url})
    with Fetcher(settings(tmp_path, retries=2)) as fetcher, pytest.raises(HttpStatusError) as info:
        fetcher.fetch(sample.sources["f"], sample=sample)
    assert info.value.status == 500 and "gave up after 3 attempts" in str(info.value)
    assert server.count("/down.bin") == 3


def test_not_found_is_not_retried(tmp_path: Path, server: LocalServer) -> None:
    sample = make_sample(tmp_path, {"f": f"{server.url}/missing.h5"})
    with Fetcher(settings(tmp_path)) as fetcher, pytest.raises(RemoteNotFoundError) as info:
        fetcher.fetch(sample.sources["f"], sample=sample)
    assert info.value.status == 404 and "missing.h5" in str(info.value)
    assert server.count("/missing.h5") == 1


def test_wrong_sha256_names_the_file_and_both_digests_and_keeps_nothing(tmp_path: Path, server: LocalServer) -> None:
    data = payload(100_000)
    url = put(server, "m.h5", data)
    wrong = hashlib.sha256(b"something else").hexdigest()
    sample = make_sample(tmp_path, {"matrix": {"url": url, "sha256": wrong}}, sample_id="HEART-1")
    with Fetcher(settings(tmp_path)) as fetcher, pytest.raises(ChecksumMismatchError) as info:
        fetcher.fetch(sample.sources["matrix"], sample=sample)
    message = str(info.value)
    assert "HEART-1" in message and "'matrix'" in message and url in message
    assert wrong in message and hashlib.sha256(data).hexdigest() in message
    for folder in ("blobs", "named", "partial", "urls"):
        assert files_under(tmp_path / "cache" / folder) == [], folder


def test_bytes_corrupted_in_transit_fail_against_the_manifest_digest(tmp_path: Path, server: LocalServer) -> None:
    data = payload(50_000)
    url = put(server, "c.bin", data)
    corrupted = bytearray(data)
    corrupted[1000] ^= 0xFF
    server.add_fault("/c.bin", Fault(body=bytes(corrupted)))
    sample = make_sample(tmp_path, {"f": {"url": url, "sha256": hashlib.sha256(data).hexdigest()}})
    with Fetcher(settings(tmp_path)) as fetcher:
        with pytest.raises(ChecksumMismatchError):
            fetcher.fetch(sample.sources["f"], sample=sample)
        assert files_under(tmp_path / "cache" / "partial") == []
        # The next attempt starts from scratch (no partial resumed into the same wrong bytes).
        assert fetcher.fetch(sample.sources["f"], sample=sample).path.read_bytes() == data
    assert "range" not in server.requests_for("/c.bin")[-1].headers


def test_truncated_body_is_an_error_never_a_short_file(tmp_path: Path, server: LocalServer) -> None:
    data = payload(80_000)
    url = put(server, "t.bin", data)
    # Every answer announces the full length and sends 30,000 bytes fewer.
    server.add_fault("/t.bin", Fault(body=data[:-30_000], content_length=len(data), times=None))
    sample = make_sample(tmp_path, {"f": url})
    with Fetcher(settings(tmp_path, retries=3)) as fetcher, pytest.raises(SizeMismatchError) as info:
        fetcher.fetch(sample.sources["f"], sample=sample)
    assert "t.bin" in str(info.value)
    assert files_under(tmp_path / "cache" / "blobs") == [] and files_under(tmp_path / "cache" / "urls") == []
    assert server.count("/t.bin") <= 5  # retries are bounded even though each attempt "progresses"


def test_short_body_once_is_completed_by_a_resume(tmp_path: Path, server: LocalServer) -> None:
    data = payload(80_000)
    url = put(server, "s.bin", data)
    server.add_fault("/s.bin", Fault(body=data[:50_000], content_length=len(data)))
    sample = make_sample(tmp_path, {"f": url})
    with Fetcher(settings(tmp_path)) as fetcher:
        assert fetcher.fetch(sample.sources["f"], sample=sample).path.read_bytes() == data
    assert server.requests_for("/s.bin")[-1].headers["range"] == "bytes=50000-"


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path, server: LocalServer) -> None:
    data = payload(200_000)
    url = put(server, "r.bin", data)
    server.add_fault("/r.bin", Fault(drop_after=60_000))
    server.add_fault("/r.bin", Fault(ignore_range=True))
    sample = make_sample(tmp_path, {"f": url})
    with Fetcher(settings(tmp_path)) as fetcher:
        fetched = fetcher.fetch(sample.sources["f"], sample=sample)
    assert fetched.path.read_bytes() == data and fetched.sha256 == hashlib.sha256(data).hexdigest()
    assert "range" in server.requests_for("/r.bin")[1].headers


def test_file_changed_on_the_server_is_restarted_not_spliced(tmp_path: Path, server: LocalServer) -> None:
    old, new = payload(200_000, seed=1), payload(200_000, seed=2)
    url = put(server, "v.bin", old)
    server.add_fault("/v.bin", Fault(drop_after=70_000))
    sample = make_sample(tmp_path, {"f": url})
    with Fetcher(settings(tmp_path, retries=0)) as fetcher, pytest.raises(SizeMismatchError):
        fetcher.fetch(sample.sources["f"], sample=sample)
    put(server, "v.bin", new)  # a new version with a new ETag
    with Fetcher(settings(tmp_path)) as fetcher:
        fetched = fetcher.fetch(sample.sources["f"], sample=sample)
    # If-Range carried the old ETag, so the server sent the whole new file instead of its tail.
    assert fetched.path.read_bytes() == new
    last = server.requests_for("/v.bin")[-1]
    assert last.headers["if-range"] == f'"{hashlib.sha256(old).hexdigest()}"'


def test_size_in_manifest_is_checked_against_content_length(tmp_path: Path, server: LocalServer) -> None:
    url = put(server, "z.bin", b"0123456789")
    sample = make_sample(tmp_path, {"f": {"url": url, "size": 11}})
    with Fetcher(settings(tmp_path)) as fetcher, pytest.raises(SizeMismatchError) as info:
        fetcher.fetch(sample.sources["f"], sample=sample)
    assert "10 bytes" in str(info.value) and "size 11" in str(info.value)
    assert files_under(tmp_path / "cache" / "blobs") == [] and files_under(tmp_path / "cache" / "partial") == []


def test_threads_fetching_one_url_download_it_once(tmp_path: Path, server: LocalServer) -> None:
    data = payload(500_000)
    url = put(server, "shared.bin", data)
    server.add_fault("/shared.bin", Fault(delay=0.2))
    sample = make_sample(tmp_path, {"f": url})
    results: list[Any] = []
    with Fetcher(settings(tmp_path)) as fetcher:
        threads = [
            threading.Thread(target=lambda: results.append(fetcher.fetch(sample.sources["f"], sample=sample)))
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(results) == 6 and {r.sha256 for r in results} == {hashlib.sha256(data).hexdigest()}
    assert sum(not r.cache_hit for r in results) == 1
    assert server.count("/shared.bin") == 1


def _fetch_in_child(cache_dir: str, manifest_path: str, queue: Any) -> None:
    from stcorpus.curate.manifest import load_manifest

    sample = load_manifest(manifest_path).samples[0]
    settings = FetchSettings(cache_dir=Path(cache_dir), retries=1, backoff_base=0.01)
    with Fetcher(settings) as fetcher:
        fetched = fetcher.fetch(sample.sources["f"], sample=sample)
    queue.put((fetched.sha256, fetched.path.read_bytes() == Path(manifest_path).with_name("expected.bin").read_bytes()))


def test_processes_sharing_a_cache_download_once(tmp_path: Path, server: LocalServer) -> None:
    data = payload(300_000)
    url = put(server, "p.bin", data)
    server.add_fault("/p.bin", Fault(delay=0.5))
    sample = make_sample(tmp_path, {"f": url})
    (tmp_path / "expected.bin").write_bytes(data)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    children = [
        context.Process(target=_fetch_in_child, args=(str(tmp_path / "cache"), str(sample.manifest_path), queue))
        for _ in range(3)
    ]
    for child in children:
        child.start()
    outcomes = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    assert outcomes == [(hashlib.sha256(data).hexdigest(), True)] * 3
    assert server.count("/p.bin") == 1


def test_per_host_limit_caps_concurrent_requests(tmp_path: Path, server: LocalServer) -> None:
    def fetch_all(per_host: int, tag: str) -> int:
        urls = [put(server, f"{tag}{i}.bin", payload(1000)) for i in range(4)]
        for i in range(4):
            server.add_fault(f"/{tag}{i}.bin", Fault(delay=0.15))
        sample = make_sample(tmp_path, {f"f{i}": u for i, u in enumerate(urls)})
        server.max_in_flight = 0
        with Fetcher(settings(tmp_path, per_host=per_host)) as fetcher:
            threads = [
                threading.Thread(target=fetcher.fetch, args=(src,), kwargs={"sample": sample})
                for src in sample.sources.values()
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert all(server.count(f"/{tag}{i}.bin") == 1 for i in range(4))
        return server.max_in_flight

    assert fetch_all(1, "one") == 1
    assert fetch_all(4, "four") >= 2  # the same threads do overlap when the limit allows it


def test_other_schemes_are_refused_by_the_fetch_layer_itself(tmp_path: Path) -> None:
    sample = make_sample(tmp_path, {"f": "https://example.org/x"})
    source = Source.model_construct(url="ftp://example.org/x.h5", sha256=None, size=None, unpack=None)
    with Fetcher(settings(tmp_path)) as fetcher, pytest.raises(UnsupportedSchemeError) as info:
        fetcher.fetch(source, sample=sample, name="f")
    assert "ftp://" in str(info.value) and "https://" in str(info.value)


def test_connection_refused_is_retried_then_reported(tmp_path: Path) -> None:
    with serve(tmp_path / "gone") as gone:
        url = f"{gone.url}/x.bin"
    sample = make_sample(tmp_path, {"f": url})  # nothing listens on that port any more
    with Fetcher(settings(tmp_path, retries=1)) as fetcher, pytest.raises(FetchError) as info:
        fetcher.fetch(sample.sources["f"], sample=sample)
    assert "connection failed" in str(info.value) and "gave up after 2 attempts" in str(info.value)


def test_failures_are_logged_without_credentials(tmp_path: Path, server: LocalServer, caplog) -> None:
    url = put(server, "secret.bin", b"abc")
    server.add_fault("/secret.bin", Fault(status=503))
    credentialed = url.replace("http://", "http://alice:hunter2@") + "?token=t0ps3cret&part=1"
    sample = make_sample(tmp_path, {"f": credentialed})
    caplog.set_level(logging.DEBUG)
    with Fetcher(settings(tmp_path)) as fetcher:
        fetcher.fetch(sample.sources["f"], sample=sample)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("stcorpus."))
    assert "HTTP 503" in ours and "alice:***@" in ours and "token=***" in ours
    assert "hunter2" not in ours and "t0ps3cret" not in ours


# --- pure helpers ------------------------------------------------------------------------------


def test_redact_url() -> None:
    assert redact_url("https://u:p@h.org/a?X-Amz-Signature=s&Expires=1&file=x.h5") == (
        "https://u:***@h.org/a?X-Amz-Signature=***&Expires=1&file=x.h5"
    )
    assert redact_url("https://h.org/a?token=abc") == "https://h.org/a?token=***"
    assert redact_url("https://h.org/a/b.h5") == "https://h.org/a/b.h5"


def test_parse_retry_after_and_backoff() -> None:
    import random

    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now=784111767.0) == 10.0
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now=784111787.0) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    rng = random.Random(0)
    delays = [backoff_delay(n, base=1.0, maximum=8.0, rng=rng) for n in range(1, 7)]
    assert all(0.5 * min(8.0, 2 ** (n - 1)) <= d <= min(8.0, 2 ** (n - 1)) for n, d in enumerate(delays, start=1))


def test_cache_dir_defaults_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STCORPUS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "stcorpus"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "stcorpus"
    monkeypatch.setenv("STCORPUS_CACHE", str(tmp_path / "explicit"))
    assert FetchSettings().cache_dir == tmp_path / "explicit"
    assert FetchSettings(cache_dir=tmp_path / "opt").cache_dir == tmp_path / "opt"
    with pytest.raises(SettingsError, match="per_host"):
        FetchSettings(per_host=0)
    with pytest.raises(SettingsError, match="retries"):
        FetchSettings(retries=-1)
