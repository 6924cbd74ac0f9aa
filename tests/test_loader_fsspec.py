"""The loader over fsspec stores: the memory filesystem, file:// URLs and an S3-compatible server on
127.0.0.1 (moto), with exact resume, the request count per shard (1 per tar, 2 per Parquet file) and
the shard cache; credentials come from the store's own configuration and never reach a log or a state."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import fsspec
import pytest

from stcorpus.loaders import CorpusDataset, CorpusLoader, LoaderSettings
from stcorpus.loaders.errors import CorpusError, ShardError
from stcorpus.loaders.source import FsspecSource, LocalSource, open_source
from tests.corpus_fixture import FixtureCorpus, write_corpus
from tests.s3_standin import S3StandIn, serve_s3

BUCKET = "stcorpus-test"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> FixtureCorpus:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def memory(corpus: FixtureCorpus) -> Iterator[str]:
    fs = fsspec.filesystem("memory")
    fs.put(str(corpus.root), "/corpus", recursive=True)
    yield "memory://corpus"
    fs.rm("/corpus", recursive=True)


@pytest.fixture(scope="module")
def s3(corpus: FixtureCorpus) -> Iterator[S3StandIn]:
    with serve_s3() as server:
        fs = fsspec.filesystem("s3")
        fs.mkdir(BUCKET)
        fs.put(str(corpus.root), f"{BUCKET}/corpus", recursive=True)
        yield server


def settings(**options: Any) -> LoaderSettings:
    base: dict[str, Any] = {
        "split": "train",
        "batch_size": 4,
        "shuffle_window": 8,
        "drop_last": False,
        "genes": {"transform": "counts"},
        "http": {"backoff_s": 0.0, "retries": 2},
    }
    base.update(options)
    return LoaderSettings.from_dict(base)


def batches(location: Any, *, workers: int = 0, **options: Any) -> list[dict[str, Any]]:
    return list(CorpusLoader(CorpusDataset(location, settings(**options)), num_workers=workers))


def same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert [x["key"] for x in a] == [y["key"] for y in b]
    for x, y in zip(a, b, strict=True):
        for name in ("patch", "region", "pos", "genes", "counts", "offsets"):
            assert x[name].equal(y[name]), name


def resumed_equals_uninterrupted(location: str, *, fmt: str, k: int = 5) -> None:
    full = [b["key"] for b in batches(location, format=fmt, seed=3)]
    loader = CorpusLoader(CorpusDataset(location, settings(format=fmt, seed=3)))
    iterator = iter(loader)
    before = [b["key"] for b in islice(iterator, k)]
    state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint would store it
    iterator.close()  # type: ignore[attr-defined]
    again = CorpusLoader(CorpusDataset(location, settings(format=fmt, seed=3)))
    report = again.load_state_dict(state)
    assert report.consumed_batches == k
    assert before + [b["key"] for b in again] == full


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_memory_filesystem_round_trip_and_exact_resume(corpus: FixtureCorpus, memory: str, fmt: str) -> None:
    source = open_source(memory)
    assert isinstance(source, FsspecSource) and source.remote
    same(batches(memory, format=fmt), batches(corpus.root, format=fmt))
    resumed_equals_uninterrupted(memory, fmt=fmt)


def test_file_urls_read_the_folder(corpus: FixtureCorpus) -> None:
    url = corpus.root.as_uri()
    assert url.startswith("file://") and isinstance(open_source(url), LocalSource)
    same(batches(url, format="wds"), batches(corpus.root, format="wds"))
    with pytest.raises(CorpusError, match="does not exist"):
        open_source(url + "-gone")


def test_a_scheme_without_its_backend_says_what_to_install() -> None:
    with pytest.raises(CorpusError, match=r"no fsspec filesystem for nosuchfs:// is installed|not a location"):
        open_source("nosuchfs://bucket/corpus")


def shard_gets(s3: S3StandIn, corpus: FixtureCorpus, fmt: str) -> list[int]:
    return [
        s3.count(f"/{BUCKET}/corpus/{p.relative_to(corpus.root).as_posix()}", method="GET")
        for p in corpus.shard_paths(fmt, "train")
    ]


@pytest.mark.parametrize(("fmt", "per_shard"), [("wds", 1), ("parquet", 2)])
def test_s3_round_trip_with_the_request_count_per_shard_and_exact_resume(
    corpus: FixtureCorpus, s3: S3StandIn, fmt: str, per_shard: int, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"s3://{BUCKET}/corpus"
    stream = open_source(url).open_range(corpus.shard_paths(fmt, "train")[0].relative_to(corpus.root).as_posix())
    assert type(stream).__name__ == "_S3Range"  # one streamed GetObject, whatever the shard's size
    stream.close()
    local = batches(corpus.root, format=fmt)
    s3.clear()
    with caplog.at_level(logging.DEBUG, logger="stcorpus"):
        remote = batches(url, format=fmt)
    same(remote, local)
    # One worker reads each shard in one visit: one GET per tar, footer + row groups per Parquet file.
    assert shard_gets(s3, corpus, fmt) == [per_shard] * 14
    for name in ("corpus.json", "shards.parquet", "slides.parquet", "genes.parquet"):
        assert s3.count(f"/{BUCKET}/corpus/{name}", method="GET") == 1, name
    assert "testing" not in caplog.text  # the test credentials never reach a log line
    # Workers make their own S3 clients (fsspec's are not fork-safe); the batches are the same.
    same(batches(url, format=fmt, workers=2), batches(corpus.root, format=fmt, workers=2))
    resumed_equals_uninterrupted(url, fmt=fmt)


def test_s3_with_the_shard_cache_and_a_missing_object(corpus: FixtureCorpus, s3: S3StandIn, tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/corpus"
    cache = {"folder": str(tmp_path / "cache"), "max_gb": 1.0}
    s3.clear()
    first = batches(url, format="parquet", cache=cache)
    assert shard_gets(s3, corpus, "parquet") == [1] * 14  # one GET from the first byte, kept on disk
    s3.clear()
    same(batches(url, format="parquet", cache=cache), first)
    assert shard_gets(s3, corpus, "parquet") == [0] * 14
    # A shard gone from the bucket is a ShardError naming it; skip leaves its samples out and counts it.
    fs = fsspec.filesystem("s3")
    victim = corpus.shard_paths("wds", "train")[6].relative_to(corpus.root).as_posix()
    kept = fs.cat_file(f"{BUCKET}/corpus/{victim}")
    fs.rm_file(f"{BUCKET}/corpus/{victim}")
    try:
        with pytest.raises(ShardError, match=r"train-000006\.tar is listed in shards.parquet but missing"):
            batches(url, format="wds")
        dataset = CorpusDataset(url, settings(format="wds", on_bad_sample="skip"))
        list(CorpusLoader(dataset))
        assert dataset.skipped()["shards"] == 1
    finally:
        fs.pipe_file(f"{BUCKET}/corpus/{victim}", kept)


def test_state_and_settings_hold_no_credentials(corpus: FixtureCorpus, s3: S3StandIn) -> None:
    secret = "sk-not-for-disk-0123456789"
    dataset = CorpusDataset(
        f"s3://{BUCKET}/corpus",
        settings(format="wds"),
        storage_options={"key": "testing", "secret": "testing", "client_kwargs": {"aws_session_token": secret}},
    )
    loader = CorpusLoader(dataset)
    next(iter(loader))
    dumped = json.dumps(loader.state_dict()) + json.dumps(dataset.settings.to_dict()) + repr(dataset.source)
    assert secret not in dumped and "testing" not in dumped
