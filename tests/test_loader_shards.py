"""Shards held to shards.parquet: missing, short and corrupt shards are ShardErrors naming them (the
on_bad_sample policy applies), the optional sha256 check, and the local shard cache for remote corpora."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stcorpus.loaders import CorpusDataset, CorpusLoader, LoaderSettings
from stcorpus.loaders.errors import LoaderSettingsError, ShardError
from stcorpus.loaders.shard_cache import ShardCache, ShardRecord
from tests.corpus_fixture import FixtureCorpus, write_corpus
from tests.httpserver import LocalServer, serve


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> FixtureCorpus:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def corpus(pristine: FixtureCorpus, tmp_path: Path) -> FixtureCorpus:
    """A private copy to damage."""
    shutil.copytree(pristine.root, tmp_path / "c")
    return FixtureCorpus(tmp_path / "c", pristine.samples, pristine.shards, pristine.genes, pristine.slides)


@pytest.fixture
def server(corpus: FixtureCorpus) -> Iterator[LocalServer]:
    with serve(corpus.root) as running:
        yield running


def settings(**options: Any) -> LoaderSettings:
    base: dict[str, Any] = {
        "split": "train",
        "batch_size": 4,
        "shuffle_window": 8,
        "drop_last": False,
        "genes": {"transform": "counts"},
        "http": {"backoff_s": 0.0, "retries": 1},
    }
    base.update(options)
    return LoaderSettings.from_dict(base)


def epoch(location: Any, **options: Any) -> list[dict[str, Any]]:
    return list(CorpusLoader(CorpusDataset(location, settings(**options))))


def keys(batches: list[dict[str, Any]]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def in_shard(corpus: FixtureCorpus, fmt: str, index: int) -> set[str]:
    shard = next(s for s in corpus.shards if (s.format, s.split, s.index) == (fmt, "train", index))
    order = corpus.keys("train")
    start = sum(s.n_samples for s in corpus.shards if (s.format, s.split) == (fmt, "train") and s.index < index)
    return set(order[start : start + shard.n_samples])


# ---------------------------------------------------------------------------------------------
# Missing shards
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
@pytest.mark.parametrize("where", ["folder", "http"])
def test_a_missing_shard_is_a_shard_error_and_warn_skips_and_counts_it(
    corpus: FixtureCorpus, server: LocalServer, caplog: pytest.LogCaptureFixture, fmt: str, where: str
) -> None:
    victim = corpus.shard_paths(fmt, "train")[3]
    victim.unlink()
    location = corpus.root if where == "folder" else server.url
    with pytest.raises(ShardError, match=r"train-000003\.\w+ is listed in shards.parquet but missing from"):
        epoch(location, format=fmt)
    dataset = CorpusDataset(location, settings(format=fmt, on_bad_sample="warn"))
    with caplog.at_level(logging.WARNING):
        batches = list(CorpusLoader(dataset))
    lost = in_shard(corpus, fmt, 3)
    assert len(batches) == len(dataset)
    assert sorted(keys(batches)) == sorted(set(corpus.keys("train")) - lost)
    assert dataset.skipped()["shards"] == 1 and dataset.skipped()["samples"] == len(lost)
    assert f"skipping {len(lost)} samples of {victim.relative_to(corpus.root)}" in caplog.text


def test_a_short_parquet_shard_is_refused_before_any_of_its_samples(corpus: FixtureCorpus) -> None:
    victim = corpus.shard_paths("parquet", "train")[1]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(ShardError, match=r"train-000001\.parquet: \d+ bytes on disk, shards.parquet says"):
        epoch(corpus.root, format="parquet")


# ---------------------------------------------------------------------------------------------
# sha256
# ---------------------------------------------------------------------------------------------


def flip_inside_a_jpeg(corpus: FixtureCorpus, shard: Path) -> str:
    """Change one value of a patch JPEG's quantisation table in ``shard``: same size, decodes, other pixels."""
    raw = bytearray(shard.read_bytes())
    for key in sorted(corpus.by_key):
        patch = corpus.by_key[key].patch
        at = raw.find(patch)
        if at >= 0:
            table = at + patch.index(b"\xff\xdb") + 5  # marker, length, precision/id, then the first value
            raw[table] = raw[table] + 7 if raw[table] < 200 else raw[table] - 7
            shard.write_bytes(bytes(raw))
            return key
    raise AssertionError("no patch of the fixture in that shard")


def decoded_patch(batches: list[dict[str, Any]], key: str) -> np.ndarray:
    for b in batches:
        if key in b["key"]:
            return np.asarray(b["patch"][b["key"].index(key)].numpy())
    raise KeyError(key)


@pytest.mark.parametrize("where", ["folder", "http"])
def test_sha256_check_refuses_a_shard_whose_bytes_changed(
    corpus: FixtureCorpus, server: LocalServer, tmp_path: Path, where: str
) -> None:
    pristine = epoch(corpus.root, format="wds", shuffle=False)
    victim = corpus.shard_paths("wds", "train")[2]
    key = flip_inside_a_jpeg(corpus, victim)
    location = corpus.root if where == "folder" else server.url
    # Off (the default): the damage passes every structural check, and the patch comes out different.
    damaged = epoch(location, format="wds", shuffle=False)
    assert keys(damaged) == keys(pristine)
    assert not np.array_equal(decoded_patch(damaged, key), decoded_patch(pristine, key))
    # On: the shard is refused before any of its samples, by name; warn skips it and counts it.
    with pytest.raises(ShardError, match=r"train-000002\.tar: .*sha256 [0-9a-f]{64}, shards.parquet says"):
        epoch(location, format="wds", verify_sha256=True)
    dataset = CorpusDataset(location, settings(format="wds", verify_sha256=True, on_bad_sample="skip"))
    batches = list(CorpusLoader(dataset))
    assert sorted(keys(batches)) == sorted(set(corpus.keys("train")) - in_shard(corpus, "wds", 2))
    assert dataset.skipped()["shards"] == 1
    # Undamaged shards read exactly as without the check (the Parquet twins were not touched).
    assert keys(epoch(location, format="parquet", verify_sha256=True, shuffle=False)) == keys(pristine)


def test_settings_of_the_check_and_the_cache_are_validated() -> None:
    assert LoaderSettings().verify_sha256 is False and LoaderSettings().cache.folder is None
    with pytest.raises(LoaderSettingsError, match=r"cache\.max_gb must be > 0"):
        LoaderSettings.from_dict({"cache": {"folder": "/tmp/x", "max_gb": 0}})
    with pytest.raises(LoaderSettingsError, match=r"unknown key\(s\)"):
        LoaderSettings.from_dict({"cache": {"dir": "/tmp/x"}})


# ---------------------------------------------------------------------------------------------
# The shard cache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "per_shard"), [("wds", 1), ("parquet", 1)])
def test_a_second_epoch_reads_from_the_cache_and_needs_no_network(
    corpus: FixtureCorpus, server: LocalServer, tmp_path: Path, fmt: str, per_shard: int
) -> None:
    cache = {"folder": str(tmp_path / "cache"), "max_gb": 1.0}
    local = epoch(corpus.root, format=fmt)
    dataset = CorpusDataset(server.url, settings(format=fmt, cache=cache))
    first = list(CorpusLoader(dataset))
    shard_paths = ["/" + str(p.relative_to(corpus.root)) for p in corpus.shard_paths(fmt, "train")]
    # With a cache, a shard not yet cached is one GET from its first byte (a Parquet file too).
    assert [server.count(p) for p in shard_paths] == [per_shard] * len(shard_paths)
    entries = sorted(p.name for p in (tmp_path / "cache" / "shards").glob("*/*"))
    expected = sorted(hashlib.sha256((corpus.root / p.lstrip("/")).read_bytes()).hexdigest() for p in shard_paths)
    assert entries == expected
    server.requests.clear()
    loader = CorpusLoader(dataset)
    loader.set_epoch(1)
    second = list(loader)
    assert not [r for r in server.requests if r.path in shard_paths], "the second epoch streamed shards again"
    assert sorted(keys(second)) == sorted(keys(first)) == sorted(keys(local))
    # A new run (a resume, another job on the node) reads the cache too; same batches as the folder.
    server.requests.clear()
    again = epoch(server.url, format=fmt, cache=cache)
    assert not [r for r in server.requests if r.path in shard_paths]
    assert [b["key"] for b in again] == [b["key"] for b in local]
    for x, y in zip(again, local, strict=True):
        assert x["patch"].equal(y["patch"]) and x["counts"].equal(y["counts"])


def test_the_cache_keeps_only_verified_shards(corpus: FixtureCorpus, server: LocalServer, tmp_path: Path) -> None:
    victim = corpus.shard_paths("wds", "train")[4]
    flip_inside_a_jpeg(corpus, victim)  # the server now serves other bytes than shards.parquet recorded
    cache = {"folder": str(tmp_path / "cache")}
    epoch(server.url, format="wds", cache=cache)
    kept = {p.name for p in (tmp_path / "cache" / "shards").glob("*/*")}
    assert hashlib.sha256(victim.read_bytes()).hexdigest() not in kept and len(kept) == 13
    assert not list((tmp_path / "cache" / "partial").glob("*"))
    # With the check on, the bad shard is refused before any sample; the cache still holds only good ones.
    with pytest.raises(ShardError, match=r"train-000004\.tar: sha256"):
        epoch(server.url, format="wds", cache=cache, verify_sha256=True)
    assert {p.name for p in (tmp_path / "cache" / "shards").glob("*/*")} == kept


def test_eviction_is_least_recently_used_within_the_budget(tmp_path: Path) -> None:
    import time

    cache = ShardCache(tmp_path / "cache", max_bytes=250)

    def put(i: int) -> ShardRecord:
        data = bytes([i]) * 100
        record = ShardRecord(f"s{i}", 100, hashlib.sha256(data).hexdigest())
        fill = cache.reserve(record, wait=False)
        assert fill is not None
        fill.write(data)
        assert fill.problem() is None
        fill.commit().close()
        time.sleep(0.02)  # distinct modification times
        return record

    def held() -> set[str]:
        return {r.path for r in records if cache.path(str(r.sha256)).exists()}

    records = [put(0), put(1)]
    assert cache.lookup(records[0]) is not None  # s0 is read again: s1 is now the least recently used
    time.sleep(0.02)
    records.append(put(2))
    assert held() == {"s0", "s2"} and cache.usage() == 200
    records.append(put(3))
    assert held() == {"s2", "s3"}
    assert cache.reserve(ShardRecord("big", 300, "0" * 64), wait=False) is None  # larger than the budget


def _fill_in_another_process(folder: str, data: bytes, sha: str, started: Any, release: Any) -> None:
    cache = ShardCache(folder, max_bytes=1 << 20)
    fill = cache.reserve(ShardRecord("s", len(data), sha), wait=False)
    assert fill is not None
    fill.write(data[:10])
    started.set()
    release.wait(30)
    fill.write(data[10:])
    fill.commit().close()


def test_one_process_fills_a_shard_while_the_others_stream_it(tmp_path: Path) -> None:
    data = b"shard bytes" * 100
    sha = hashlib.sha256(data).hexdigest()
    context = multiprocessing.get_context("spawn")
    started, release = context.Event(), context.Event()
    other = context.Process(target=_fill_in_another_process, args=(str(tmp_path), data, sha, started, release))
    other.start()
    try:
        assert started.wait(60)
        cache = ShardCache(tmp_path, max_bytes=1 << 20)
        record = ShardRecord("s", len(data), sha)
        assert cache.reserve(record, wait=False) is None  # busy: this one streams uncached
        assert cache.lookup(record) is None  # nothing under the final name until it is complete
    finally:
        release.set()
        other.join(60)
    assert other.exitcode == 0
    hit = cache.lookup(record)
    assert hit is not None and hit.read_bytes() == data


def test_workers_share_one_cache_folder(corpus: FixtureCorpus, server: LocalServer, tmp_path: Path) -> None:
    """Two DataLoader worker processes fill one folder (each shard once), and the next epoch reads it."""
    cache = {"folder": str(tmp_path / "cache")}
    dataset = CorpusDataset(server.url, settings(format="wds", cache=cache))
    first = list(CorpusLoader(dataset, num_workers=2))
    shard_paths = ["/" + str(p.relative_to(corpus.root)) for p in corpus.shard_paths("wds", "train")]
    assert len(list((tmp_path / "cache" / "shards").glob("*/*"))) == len(shard_paths)
    assert not list((tmp_path / "cache" / "partial").glob("*"))
    server.requests.clear()
    loader = CorpusLoader(dataset, num_workers=2)
    loader.set_epoch(1)
    second = list(loader)
    assert not [r for r in server.requests if r.path in shard_paths]
    assert sorted(keys(first)) == sorted(keys(second)) == sorted(corpus.keys("train"))
