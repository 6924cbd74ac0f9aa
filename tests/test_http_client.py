"""The one HTTP client below both wings (``stcorpus.http``): range reads, per-host limits, one retry set.

Against real servers on 127.0.0.1 (``tests/httpserver.py``).
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stcorpus.curate.errors import HttpStatusError
from stcorpus.curate.fetch import Fetcher
from stcorpus.errors import RemoteChangedError, RemoteNotFoundError, RemoteTruncatedError
from stcorpus.http import HttpClient, PerHostLimit, RetryPolicy, retryable_status
from stcorpus.loaders import CorpusDataset, LoaderSettings
from stcorpus.loaders.source import HttpSource, open_source
from tests.corpus_fixture import FixtureCorpus, write_corpus
from tests.httpserver import Fault, LocalServer, serve
from tests.test_fetch_http import make_sample, settings

FAST = RetryPolicy(retries=2, backoff_base=0.0, backoff_max=0.0)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalServer]:
    with serve(tmp_path / "www") as running:
        yield running


def test_range_reads_are_one_request_and_resume_after_a_drop(tmp_path: Path, server: LocalServer) -> None:
    data = bytes(range(256)) * 400
    (tmp_path / "www" / "slide.tif").write_bytes(data)
    client = HttpClient(FAST)
    url = server.file_url("slide.tif")
    assert client.read_range(url, 1000, 1016, what="slide.tif") == data[1000:1016]
    assert [r.headers["range"] for r in server.requests] == ["bytes=1000-1015"]
    # A drop mid-range: resumed where it broke, with If-Range so a replaced file is never spliced.
    server.requests.clear()
    server.add_fault("/slide.tif", Fault(drop_after=5000))
    assert client.read_range(url, 2000, 90_000, what="slide.tif") == data[2000:90_000]
    first, resume = server.requests
    assert first.headers["range"] == "bytes=2000-89999" and resume.headers["range"] == "bytes=7000-89999"
    assert resume.headers["if-range"] == first_etag(server, url)
    assert client.sent[url] == 3  # every attempt is counted per URL as asked


def first_etag(server: LocalServer, url: str) -> str:
    import hashlib

    return f'"{hashlib.sha256((server.root / url.rsplit("/", 1)[1]).read_bytes()).hexdigest()}"'


def test_range_read_errors(tmp_path: Path, server: LocalServer) -> None:
    (tmp_path / "www" / "a.bin").write_bytes(b"x" * 10_000)
    client = HttpClient(FAST)
    with pytest.raises(RemoteNotFoundError, match="HTTP 404"):
        client.read_range(server.file_url("missing.bin"), what="missing.bin")
    with pytest.raises(RemoteTruncatedError, match="416"):
        client.read_range(server.file_url("a.bin"), 20_000, 20_010, what="a.bin")
    stream = client.open_range(server.file_url("a.bin"), 0, 10_000, what="a.bin")
    server.add_fault("/a.bin", Fault(drop_after=100))
    assert len(stream.read(50)) == 50
    (tmp_path / "www" / "a.bin").write_bytes(b"y" * 10_000)  # replaced before the drop
    with pytest.raises(RemoteChangedError, match="changed on the server"):
        stream.read()


def test_the_per_host_limit_bounds_concurrent_streams(tmp_path: Path, server: LocalServer) -> None:
    (tmp_path / "www" / "b.bin").write_bytes(b"z" * 1000)
    server.add_fault("/b.bin", Fault(delay=0.2, times=None))
    client = HttpClient(FAST, limit=PerHostLimit(2))
    threads = [
        threading.Thread(target=client.read_range, args=(server.file_url("b.bin"),), kwargs={"what": "b"})
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert server.count("/b.bin") == 6 and server.max_in_flight == 2


def test_one_retry_set_for_both_wings(tmp_path: Path, server: LocalServer) -> None:
    assert [s for s in (408, 425, 429, 500, 501, 502, 503, 504, 505, 522) if retryable_status(s)] == [
        408,
        425,
        429,
        500,
        502,
        503,
        504,
        522,
    ]
    # The loader retries a 522 (a CDN's "origin timed out") like the fetch layer always did ...
    corpus: FixtureCorpus = write_corpus(tmp_path / "www" / "corpus")
    server.add_fault("/corpus/corpus.json", Fault(status=522, times=1))
    options = {"split": "train", "batch_size": 4, "http": {"backoff_s": 0.0, "retries": 2}}
    CorpusDataset(f"{server.url}/corpus", LoaderSettings.from_dict(options))
    assert server.count("/corpus/corpus.json") == 2
    assert corpus.root.is_dir()
    # ... and honours a Retry-After given as an HTTP date (it read only seconds before).
    source = open_source(f"{server.url}/corpus", http=LoaderSettings.from_dict(options).http)
    assert isinstance(source, HttpSource)
    slept: list[float] = []
    source.client.sleep = slept.append
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    server.add_fault("/corpus/corpus.json", Fault(status=503, retry_after=soon, times=1))
    source.read_bytes("corpus.json")
    assert len(slept) == 1 and 25 < slept[0] <= 60
    # The fetch layer no longer retries a 501 (Not Implemented: no retry can fix it).
    (tmp_path / "www" / "f.bin").write_bytes(b"abc")
    server.add_fault("/f.bin", Fault(status=501, times=None))
    sample = make_sample(tmp_path, {"f": server.file_url("f.bin")})
    with Fetcher(settings(tmp_path, retries=3)) as fetcher, pytest.raises(HttpStatusError, match="HTTP 501"):
        fetcher.fetch(sample.sources["f"], sample=sample)
    assert server.count("/f.bin") == 1
    # Both wings run on the same client class.
    with Fetcher(settings(tmp_path)) as fetcher:
        assert isinstance(fetcher._http.client, HttpClient) and isinstance(source.client, HttpClient)
