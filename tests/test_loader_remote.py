"""The loader over HTTP and the Hub stand-in (127.0.0.1), and ``datasets.load_dataset`` on the same corpus."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from stcorpus.loaders import CorpusDataset, CorpusLoader, LoaderSettings
from stcorpus.loaders.errors import RemoteAuthError, ShardError
from tests.corpus_fixture import FixtureCorpus, write_corpus
from tests.httpserver import Fault, HubRepo, LocalServer, serve

TOKEN = "hf_loaderTestSecret0123456789"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> FixtureCorpus:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


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
        "http": {"backoff_s": 0.0, "retries": 3},
    }
    base.update(options)
    return LoaderSettings.from_dict(base)


def epoch(location: Any, *, workers: int = 0, **options: Any) -> list[dict[str, Any]]:
    return list(CorpusLoader(CorpusDataset(location, settings(**options)), num_workers=workers, device="cpu"))


def same_batches(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert [x["key"] for x in a] == [y["key"] for y in b]
    for x, y in zip(a, b, strict=True):
        for name in ("patch", "region", "pos", "expr", "expr_mask"):
            assert x[name].equal(y[name]), name


def shard_requests(server: LocalServer, corpus: FixtureCorpus, fmt: str) -> list[int]:
    return [server.count("/" + str(p.relative_to(corpus.root))) for p in corpus.shard_paths(fmt, "train")]


@pytest.mark.parametrize(("fmt", "per_shard"), [("wds", 1), ("parquet", 2)])
def test_http_streams_like_the_folder_with_few_requests(
    corpus: FixtureCorpus, server: LocalServer, fmt: str, per_shard: int
) -> None:
    local = epoch(corpus.root, format=fmt)
    same_batches(epoch(server.url, format=fmt), local)
    # One worker reads each shard in one visit: one GET per tar, footer + row groups per Parquet file.
    assert shard_requests(server, corpus, fmt) == [per_shard] * 14
    for name in ("corpus.json", "shards.parquet", "slides.parquet", "genes.parquet"):
        assert server.count(f"/{name}") == 1, name
    same_batches(epoch(server.url, format=fmt, workers=2), epoch(corpus.root, format=fmt, workers=2))


@pytest.mark.parametrize(("fmt", "per_shard"), [("wds", 1), ("parquet", 2)])
def test_a_dropped_connection_is_resumed_with_range(
    corpus: FixtureCorpus, server: LocalServer, caplog: pytest.LogCaptureFixture, fmt: str, per_shard: int
) -> None:
    victim = "/" + str(corpus.shard_paths(fmt, "train")[5].relative_to(corpus.root))
    server.add_fault(victim, Fault(drop_after=3000))
    with caplog.at_level(logging.WARNING, logger="stcorpus.loaders"):
        same_batches(epoch(server.url, format=fmt), epoch(corpus.root, format=fmt))
    counts = shard_requests(server, corpus, fmt)
    assert counts[5] == per_shard + 1 and counts[:5] + counts[6:] == [per_shard] * 13
    first, retry = server.requests_for(victim)[:2]
    start = int(first.headers.get("range", "bytes=0-").split("=")[1].split("-")[0])
    assert retry.headers["range"].startswith(f"bytes={start + 3000}-")
    assert "connection dropped" in caplog.text and "resuming with Range" in caplog.text


def test_server_errors_are_retried_and_a_short_shard_is_an_error(corpus: FixtureCorpus, server: LocalServer) -> None:
    server.add_fault("/corpus.json", Fault(status=503, retry_after="0", times=2))
    dataset = CorpusDataset(server.url, settings(format="wds"))
    assert server.count("/corpus.json") == 3
    # A connection that always drops: resumed with Range, then given up.
    flaky = "/" + str(corpus.shard_paths("wds", "train")[3].relative_to(corpus.root))
    server.add_fault(flaky, Fault(drop_after=1000, times=None))
    with pytest.raises(ShardError, match=r"train-000003\.tar: connection dropped.*gave up after 3 resumes"):
        list(CorpusLoader(dataset))
    assert server.count(flaky) == 4
    # A server whose file is shorter than shards.parquet recorded: the short body is not taken as the shard.
    short = corpus.shard_paths("wds", "train")[6]
    server.add_fault("/" + str(short.relative_to(corpus.root)), Fault(body=short.read_bytes()[:5000], times=None))
    with pytest.raises(ShardError, match=r"train-000006\.tar.*416.*shorter than recorded"):
        list(CorpusLoader(CorpusDataset(server.url, settings(format="wds"))))
    lenient = CorpusDataset(server.url, settings(format="wds", on_bad_sample="skip"))
    batches = list(CorpusLoader(lenient, device="cpu"))
    assert len(batches) == len(lenient), "lost samples never change the number of batches"
    assert sum(len(b["key"]) for b in batches) == 94 - 7 - 7
    assert lenient.skipped() == {"samples": 14, "shards": 2, "empty_batches": 1}
    (empty,) = [b for b in batches if not b["key"]]  # all four samples of one batch were in the lost shards
    assert empty["patch"].shape == (0, 3, 224, 224) and empty["expr"].shape == (0, len(corpus.genes))


def test_hub_stand_in_with_a_gated_repo(
    corpus: FixtureCorpus, server: LocalServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server.add_repo("stcorpus/fixture", HubRepo(folder=corpus.root, token=TOKEN))
    monkeypatch.setenv("HF_ENDPOINT", server.url)  # read when each URL is made, not at import
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    with monkeypatch.context() as patched:  # no token at all, even from a login on this machine
        patched.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
        with pytest.raises(RemoteAuthError, match="answered 401: the dataset is gated or private") as no_token:
            CorpusDataset("hf://datasets/stcorpus/fixture", settings())
    monkeypatch.setenv("HF_TOKEN", "hf_wrongWrongWrong")
    with pytest.raises(RemoteAuthError, match="answered 403") as wrong:
        CorpusDataset("hf://datasets/stcorpus/fixture", settings())
    assert "hf_wrong" not in str(wrong.value) and TOKEN not in str(no_token.value)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    server.requests.clear()
    with caplog.at_level(logging.DEBUG):
        remote = epoch("hf://datasets/stcorpus/fixture", format="wds")
    same_batches(remote, epoch(corpus.root, format="wds"))
    resolves = [r for r in server.requests if "/resolve/main/" in r.path]
    cdn = [r for r in server.requests if r.path.startswith("/cdn/")]
    assert len(resolves) == len(cdn) == 4 + 14, "one resolve + one CDN request per file"
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in resolves)
    assert not any("authorization" in r.headers for r in cdn), "the token must not follow the redirect"
    assert TOKEN not in caplog.text


# ---------------------------------------------------------------------------------------------
# datasets.load_dataset on the same corpus
# ---------------------------------------------------------------------------------------------


def ours_in_order(location: Any, fmt: str) -> list[tuple[str, dict[str, Any]]]:
    """(key, sample) in file order from our loader (no shuffle, one rank)."""
    out = []
    for batch in epoch(location, format=fmt, shuffle=False):
        for i, key in enumerate(batch["key"]):
            out.append((key, {name: batch[name][i] for name in ("patch", "region", "expr", "pos")}))
    return out


def test_load_dataset_parquet_default_config_matches(corpus: FixtureCorpus) -> None:
    import datasets

    rows = list(datasets.load_dataset(str(corpus.root), split="train", streaming=True))
    ours = ours_in_order(corpus.root, "parquet")
    assert [r["__key__"] for r in rows] == [k for k, _ in ours] == corpus.keys("train")
    for row, (_, sample) in zip(rows, ours, strict=True):
        assert np.array_equal(np.asarray(row["patch"]), sample["patch"].permute(1, 2, 0).numpy())
        assert np.array_equal(np.asarray(row["region"]), sample["region"].permute(1, 2, 0).numpy())
        expr = sample["expr"].numpy()
        assert np.flatnonzero(expr).tolist() == row["genes"]
        assert expr[row["genes"]].tolist() == row["counts"]
        assert int(sample["pos"]) == row["pos"]


def test_load_dataset_webdataset_over_http_matches(corpus: FixtureCorpus, server: LocalServer) -> None:
    import datasets

    urls = [f"{server.url}/{p.relative_to(corpus.root)}" for p in corpus.shard_paths("wds", "train")]
    rows = list(datasets.load_dataset("webdataset", data_files={"train": urls}, split="train", streaming=True))
    ours = ours_in_order(server.url, "wds")
    assert [r["__key__"] for r in rows] == [k for k, _ in ours] == corpus.keys("train")
    for row, (_, sample) in zip(rows, ours, strict=True):
        assert np.array_equal(np.asarray(row["patch.jpg"]), sample["patch"].permute(1, 2, 0).numpy())
        assert np.array_equal(np.asarray(row["region.jpg"]), sample["region"].permute(1, 2, 0).numpy())
        expr = sample["expr"].numpy()
        genes = np.asarray(row["expr.npz"]["genes"])
        assert np.array_equal(np.flatnonzero(expr), genes)
        assert np.array_equal(expr[genes], np.asarray(row["expr.npz"]["counts"]))
        assert int(sample["pos"]) == row["json"]["pos"]


def test_filters_over_http_never_touch_shards_without_a_selected_slide(tmp_path: Path) -> None:
    packed = write_corpus(tmp_path / "packed", pack="slide")  # slide by slide: few shards mix slides
    chosen = sorted(k for k in packed.keys("train") if k.startswith("heart-b__"))
    index = pq.read_table(packed.root / "shards.parquet").to_pylist()
    train = [r for r in index if r["split"] == "train" and r["format"] == "wds"]
    touched = [r["path"] for r in train if "heart-b" in r["slide_ids"]]
    mixed = {r["index"] for r in train if "heart-b" in r["slide_ids"] and len(r["slide_ids"]) > 1}
    assert 0 < len(touched) < len(train) and mixed
    with serve(packed.root) as server:
        dataset = CorpusDataset(server.url, settings(format="wds", filters={"licence": ["CC-BY-NC-4.0"]}))
        got = sorted(k for b in CorpusLoader(dataset) for k in b["key"])
        assert got == chosen
        for r in train:
            tar = server.count(f"/{r['path']}")
            twin = server.count(f"/{r['path'].replace('wds/', 'parquet/').replace('.tar', '.parquet')}")
            if r["path"] not in touched:
                assert tar == twin == 0, r["path"]
            else:
                assert tar == 1
                # Rows of a mixed shard come from its Parquet twin's slide_id column: footer + 1 per row group.
                assert twin == (1 + 3 if r["index"] in mixed else 0), r["path"]


def test_readahead_opens_the_next_stream_while_the_current_one_is_read() -> None:
    import threading

    from stcorpus.loaders.source import Readahead

    opened: list[int] = []
    second_opened = threading.Event()

    def job(i: int) -> Any:
        def open_fn() -> tuple[int, Any]:
            opened.append(i)
            if i == 1:
                second_opened.set()
            return i, io.BytesIO(bytes([i]) * 10_000)

        return open_fn

    ahead = Readahead([(f"job{i}", job(i)) for i in range(3)], max_bytes=1 << 20, chunk_bytes=1000)
    info, stream = ahead.take(0)
    assert info == 0 and stream.read(10) == bytes(10)
    assert second_opened.wait(timeout=10), "job 1 was not opened while job 0 was being read"
    stream.close()  # abandon the rest of job 0
    info, stream = ahead.take(1)
    assert info == 1 and stream.read() == bytes([1]) * 10_000
    info, stream = ahead.take(2)
    assert stream.read(3) == bytes([2]) * 3
    ahead.close()
    assert opened == [0, 1, 2]


def test_a_file_replaced_during_a_resumed_read_is_an_error(tmp_path: Path) -> None:
    import hashlib

    from stcorpus.loaders.settings import HttpSettings
    from stcorpus.loaders.source import HttpSource

    (tmp_path / "www").mkdir()
    shard = tmp_path / "www" / "shard.tar"
    shard.write_bytes(bytes(range(256)) * 40)
    with serve(tmp_path / "www") as server:
        server.add_fault("/shard.tar", Fault(drop_after=2000))
        source = HttpSource(server.url, http=HttpSettings(backoff_s=0.0))
        stream = source.open_range("shard.tar", size=10240)
        assert stream.read(1000) == shard.read_bytes()[:1000]
        shard.write_bytes(bytes(reversed(range(256))) * 40)  # replaced before the connection drops
        with pytest.raises(ShardError, match="changed on the server while it was being read"):
            while stream.read(4096):
                pass
        first, resume = server.requests
        assert "if-range" not in first.headers and resume.headers["range"] == "bytes=2000-10239"
        assert resume.headers["if-range"] == f'"{hashlib.sha256(bytes(range(256)) * 40).hexdigest()}"'
