"""The torch corpus loader on a real-data fixture corpus: coverage, contents, resume, policies."""

from __future__ import annotations

import io
import logging
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from stcorpus.loaders import CorpusDataset, CorpusLoader, LoaderSettings, resume_state_from
from stcorpus.loaders.errors import EmptySelectionError, ResumeError, ShardError
from tests.corpus_fixture import FixtureCorpus, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> FixtureCorpus:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def settings(**options: Any) -> LoaderSettings:
    base: dict[str, Any] = {"split": "train", "batch_size": 4, "shuffle_window": 8, "drop_last": False}
    base.update(options)
    return LoaderSettings.from_dict(base)


def keys_of(batches: Iterator[dict[str, Any]]) -> list[tuple[str, ...]]:
    return [tuple(b["key"]) for b in batches]


def pil(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ---------------------------------------------------------------------------------------------
# Coverage across ranks and workers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "wds"])
def test_every_sample_once_across_two_ranks_and_three_workers(corpus: FixtureCorpus, fmt: str) -> None:
    per_rank = []
    seen: Counter[str] = Counter()
    for rank in range(2):
        dataset = CorpusDataset(corpus.root, settings(format=fmt), rank=rank, world_size=2)
        batches = keys_of(iter(CorpusLoader(dataset, num_workers=3)))
        assert len(batches) == len(dataset) == 12
        per_rank.append(sum(map(len, batches)))
        seen.update(k for b in batches for k in b)
    assert per_rank == [47, 47], "ranks must yield equal counts (94 train samples)"
    assert sorted(seen) == sorted(corpus.keys("train"))
    assert set(seen.values()) == {1}


def test_uneven_counts_drop_or_wrap_and_every_rank_yields_as_many_batches(corpus: FixtureCorpus) -> None:
    # 94 samples over 3 ranks: drop leaves out 1 sample, wrap repeats 2.
    for uneven, per_rank, total in (("drop", 31, 93), ("wrap", 32, 94)):
        counts = []
        seen: set[str] = set()
        for rank in range(3):
            dataset = CorpusDataset(corpus.root, settings(uneven=uneven), rank=rank, world_size=3)
            keys = [k for b in keys_of(iter(CorpusLoader(dataset))) for k in b]
            counts.append(len(keys))
            seen.update(keys)
        assert counts == [per_rank] * 3, uneven
        assert len(seen) == total, uneven


def test_batches_hold_what_was_written(corpus: FixtureCorpus) -> None:
    for fmt in ("parquet", "wds"):
        dataset = CorpusDataset(corpus.root, settings(format=fmt, genes={"transform": "counts"}))
        vocab = dataset.gene_transform.space.indices  # type: ignore[union-attr]
        assert vocab.tolist() == list(range(len(corpus.genes)))
        sparse = next(iter(CorpusLoader(dataset)))  # what workers hand over: raw counts, sparse
        assert "expr" not in sparse and sparse["genes"].dtype == torch.int32 and sparse["offsets"].shape == (5,)
        first = corpus.by_key[sparse["key"][0]]
        assert sparse["genes"][: int(sparse["offsets"][1])].tolist() == first.genes.tolist()
        assert sparse["counts"][: int(sparse["offsets"][1])].tolist() == first.counts.tolist()
        batches = list(CorpusLoader(dataset, device="cpu"))  # finished where consumed
        batch = batches[0]
        assert batch["patch"].shape == (4, 3, 224, 224) and batch["patch"].dtype == torch.uint8
        assert batch["pos"].dtype == torch.int64 and batch["expr"].dtype == torch.float32
        for b in batches[:5]:
            for i, key in enumerate(b["key"]):
                sample = corpus.by_key[key]
                assert b["slide_id"][i] == sample.meta["slide_id"]
                assert int(b["pos"][i]) == sample.meta["pos"]
                assert np.array_equal(b["patch"][i].permute(1, 2, 0).numpy(), pil(sample.patch))
                assert np.array_equal(b["region"][i].permute(1, 2, 0).numpy(), pil(sample.region))
                expected = np.zeros(len(corpus.genes), dtype=np.float32)
                expected[sample.genes] = sample.counts
                assert np.array_equal(b["expr"][i].numpy(), expected)
                slide = next(s for s in corpus.slides if s["slide_id"] == sample.meta["slide_id"])
                assert np.flatnonzero(b["expr_mask"][i].numpy()).tolist() == slide["measured_genes"]


def test_a_parquet_row_group_read_in_several_record_batches_gives_every_sample_whole(
    corpus: FixtureCorpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stcorpus.loaders import batch as B
    from stcorpus.loaders import read

    # The fixture's row groups hold 3 rows: batches of 2 split every one of them (2 + 1).
    monkeypatch.setattr(read, "PARQUET_READ_BATCH", 2)
    options = {"format": "parquet", "genes": {"transform": "counts", "niche": True}}
    batches = list(CorpusLoader(CorpusDataset(corpus.root, settings(**options))))
    seen = [k for b in batches for k in b[B.KEY]]
    assert sorted(seen) == sorted(corpus.keys("train"))
    for b in batches:
        for i, key in enumerate(b[B.KEY]):
            sample = corpus.by_key[key]
            assert int(b[B.POS][i]) == sample.meta["pos"]
            assert np.array_equal(b[B.PATCH][i].permute(1, 2, 0).numpy(), pil(sample.patch))
            for genes, counts, offsets, want_genes, want_counts in (
                (B.GENES, B.COUNTS, B.OFFSETS, sample.genes, sample.counts),
                (B.NICHE_GENES, B.NICHE_COUNTS, B.NICHE_OFFSETS, sample.niche_genes, sample.niche_counts),
            ):
                lo, hi = int(b[offsets][i]), int(b[offsets][i + 1])
                assert b[genes][lo:hi].tolist() == want_genes.tolist()
                assert b[counts][lo:hi].tolist() == want_counts.tolist()


def test_epochs_differ_and_repeat_with_the_seed(corpus: FixtureCorpus) -> None:
    def epoch(seed: int, number: int) -> list[tuple[str, ...]]:
        dataset = CorpusDataset(corpus.root, settings(seed=seed, genes={"transform": "none"}, views=["patch"]))
        dataset.set_epoch(number)
        return keys_of(iter(CorpusLoader(dataset)))

    first = epoch(0, 0)
    assert first == epoch(0, 0)
    assert first != epoch(0, 1)
    assert first != epoch(1, 0)
    assert sorted(k for b in first for k in b) == sorted(k for b in epoch(0, 1) for k in b)


def test_too_many_workers_is_a_clear_error(corpus: FixtureCorpus) -> None:
    dataset = CorpusDataset(corpus.root, settings(batch_size=32, drop_last=True))
    assert len(dataset) == 2
    with pytest.raises(EmptySelectionError, match="2 batches per epoch cannot feed 3 workers"):
        next(iter(CorpusLoader(dataset, num_workers=3)))


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


def take(loader: CorpusLoader, k: int) -> list[tuple[str, ...]]:
    it = iter(loader)
    out = [tuple(next(it)["key"]) for _ in range(k)]
    it.close()  # type: ignore[attr-defined]
    return out


def make(corpus: FixtureCorpus, seed: int) -> CorpusDataset:
    return CorpusDataset(
        corpus.root, settings(seed=seed, batch_size=3, shuffle_window=7, genes={"transform": "none"}, views=["patch"])
    )


@pytest.mark.parametrize(("k", "workers", "seed"), [(1, 0, 0), (5, 2, 1), (11, 3, 7), (31, 2, 3)])
def test_resume_continues_with_exactly_the_unseen_batches(
    corpus: FixtureCorpus, k: int, workers: int, seed: int
) -> None:
    full = keys_of(iter(CorpusLoader(make(corpus, seed), num_workers=workers)))
    assert len(full) == 32
    loader = CorpusLoader(make(corpus, seed), num_workers=workers)
    before = take(loader, k)
    state = loader.state_dict()
    resumed = CorpusLoader(make(corpus, seed), num_workers=workers)
    report = resumed.load_state_dict(state)
    assert (report.consumed_batches, report.remaining_batches) == (k, 32 - k)
    after = keys_of(iter(resumed))
    assert before + after == full


def test_resume_twice_and_with_another_worker_count(corpus: FixtureCorpus, caplog: pytest.LogCaptureFixture) -> None:
    full = keys_of(iter(CorpusLoader(make(corpus, 5), num_workers=2)))
    first = CorpusLoader(make(corpus, 5), num_workers=2)
    part1 = take(first, 7)
    second = CorpusLoader(make(corpus, 5), num_workers=3)
    with caplog.at_level(logging.INFO, logger="stcorpus.loaders"):
        report = second.load_state_dict(first.state_dict())
    assert "saved with 2 workers, resuming with 3" in caplog.text
    assert "0 samples skipped, 0 repeated" in caplog.text
    assert (report.skipped_samples, report.repeated_samples, report.saved_workers) == (0, 0, 2)
    part2 = take(second, 6)
    third = CorpusLoader(make(corpus, 5), num_workers=0)
    third.load_state_dict(second.state_dict())
    part3 = keys_of(iter(third))
    got = part1 + part2 + part3
    assert len(got) == len(full) and sorted(got) == sorted(full), "a batch was skipped or repeated"
    assert part1 == full[:7], "same worker count: same order"


def test_resume_state_is_checked(corpus: FixtureCorpus) -> None:
    loader = CorpusLoader(make(corpus, 0))
    take(loader, 2)
    state = loader.state_dict()
    with pytest.raises(ResumeError, match="another corpus selection or order"):
        CorpusLoader(make(corpus, 1)).load_state_dict(state)
    other_rank_count = CorpusDataset(corpus.root, make(corpus, 0).settings, rank=0, world_size=2)
    with pytest.raises(ResumeError, match="world size 1, this run has 2"):
        other_rank_count.load_state_dict(state)
    # A state saved on rank 0 resumes rank 1 (ranks consume batches in lockstep).
    rank1 = CorpusDataset(corpus.root, make(corpus, 0).settings, rank=1, world_size=2)
    state2 = CorpusLoader(rank1).state_dict()
    CorpusDataset(corpus.root, make(corpus, 0).settings, rank=0, world_size=2).load_state_dict(state2)


def test_stateful_dataloader_resumes_and_converts(corpus: FixtureCorpus) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    full = keys_of(iter(StatefulDataLoader(make(corpus, 2), batch_size=None, num_workers=2)))
    assert full == keys_of(iter(CorpusLoader(make(corpus, 2), num_workers=2)))
    loader = StatefulDataLoader(make(corpus, 2), batch_size=None, num_workers=2)
    it = iter(loader)
    before = [tuple(next(it)["key"]) for _ in range(9)]
    state = loader.state_dict()
    del it
    again = StatefulDataLoader(make(corpus, 2), batch_size=None, num_workers=2)
    again.load_state_dict(state)
    assert before + keys_of(iter(again)) == full
    # Another worker count: StatefulDataLoader refuses, so convert its state for the dataset.
    dataset = make(corpus, 2)
    report = dataset.load_state_dict(resume_state_from(state), num_workers=3)
    assert report.consumed_batches == 9
    rest = keys_of(iter(StatefulDataLoader(dataset, batch_size=None, num_workers=3)))
    assert sorted(before + rest) == sorted(full)


# ---------------------------------------------------------------------------------------------
# Bad data
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def damaged(corpus: FixtureCorpus, tmp_path: Path) -> FixtureCorpus:
    shutil.copytree(corpus.root, tmp_path / "c")
    return FixtureCorpus(tmp_path / "c", corpus.samples, corpus.shards, corpus.genes, corpus.slides)


def corrupt_jpeg(shard: Path, data: bytes) -> None:
    raw = shard.read_bytes()
    at = raw.index(data)
    shard.write_bytes(raw[:at] + b"\0" * len(data) + raw[at + len(data) :])


def test_truncated_tar_raises_by_default_and_warn_skips_and_counts(
    damaged: FixtureCorpus, caplog: pytest.LogCaptureFixture
) -> None:
    shard = damaged.shard_paths("wds", "train")[2]
    with tarfile.open(shard) as tar:
        names = [m.name for m in tar.getmembers()]
        cut = tar.getmember(names[9]).offset_data + 100  # inside sample 2's third member
    shard.write_bytes(shard.read_bytes()[:cut])
    shard_keys = [damaged.by_key[n.split(".")[0]].key for n in names[::4]]
    with pytest.raises(ShardError, match=r"train-000002.tar: truncated"):
        list(CorpusLoader(CorpusDataset(damaged.root, settings(format="wds"))))
    # Counted across worker processes...
    dataset = CorpusDataset(damaged.root, settings(format="wds", on_bad_sample="skip"))
    batches = keys_of(iter(CorpusLoader(dataset, num_workers=2)))
    got = [k for b in batches for k in b]
    assert len(batches) == len(dataset), "batch count must not change"
    assert sorted(got) == sorted(set(damaged.keys("train")) - set(shard_keys[2:]))
    assert dataset.skipped() == {"samples": 5, "shards": 1, "empty_batches": 0}
    # ... and logged (in this process, where caplog sees it).
    dataset = CorpusDataset(damaged.root, settings(format="wds", on_bad_sample="warn"))
    with caplog.at_level(logging.WARNING, logger="stcorpus.loaders"):
        assert len(keys_of(iter(CorpusLoader(dataset)))) == len(dataset)
    assert "skipping 5 samples of wds/train/train-000002.tar" in caplog.text


def test_skips_are_counted_from_spawned_workers_too(damaged: FixtureCorpus) -> None:
    victim = damaged.samples["train"][3]
    for path in damaged.shard_paths("parquet", "train"):
        if victim.region in path.read_bytes():
            corrupt_jpeg(path, victim.region)
    dataset = CorpusDataset(damaged.root, settings(on_bad_sample="skip"))
    loader = CorpusLoader(dataset, num_workers=1, multiprocessing_context="spawn")
    assert sum(len(b["key"]) for b in loader) == 93
    assert dataset.skipped()["samples"] == 1


@pytest.mark.parametrize("fmt", ["parquet", "wds"])
def test_corrupt_jpeg_policy(damaged: FixtureCorpus, caplog: pytest.LogCaptureFixture, fmt: str) -> None:
    victim = damaged.samples["train"][10]
    for path in damaged.shard_paths(fmt, "train"):
        if victim.patch in path.read_bytes():
            corrupt_jpeg(path, victim.patch)
    from stcorpus.loaders.errors import BadSampleError

    with pytest.raises(BadSampleError, match=f"{victim.key}: patch is not a decodable JPEG"):
        list(CorpusLoader(CorpusDataset(damaged.root, settings(format=fmt))))
    dataset = CorpusDataset(damaged.root, settings(format=fmt, on_bad_sample="warn"))
    with caplog.at_level(logging.WARNING, logger="stcorpus.loaders"):
        got = [k for b in keys_of(iter(CorpusLoader(dataset))) for k in b]
    assert victim.key not in got and len(got) == 93
    assert dataset.skipped()["samples"] == 1
    assert f"skipping sample {victim.key}" in caplog.text
    quiet = CorpusDataset(damaged.root, settings(format=fmt, on_bad_sample="skip", views=["region"]))
    assert len([k for b in keys_of(iter(CorpusLoader(quiet))) for k in b]) == 94, "region view is intact"


def test_many_bad_samples_in_an_epoch_log_a_few_lines_and_a_final_count(
    damaged: FixtureCorpus, caplog: pytest.LogCaptureFixture
) -> None:
    victims = damaged.samples["train"][:12]
    for path in damaged.shard_paths("wds", "train"):
        for victim in victims:
            if victim.patch in path.read_bytes():
                corrupt_jpeg(path, victim.patch)
    dataset = CorpusDataset(damaged.root, settings(format="wds", on_bad_sample="warn"))
    with caplog.at_level(logging.WARNING, logger="stcorpus.loaders"):
        got = [k for b in keys_of(iter(CorpusLoader(dataset))) for k in b]
    assert len(got) == 94 - 12 and dataset.skipped()["samples"] == 12
    lines = [r.getMessage() for r in caplog.records if "skip" in r.getMessage()]
    assert len(lines) == 6, lines  # five one by one, then the epoch's end counts the rest
    assert lines[-1].startswith("skipped 7 more bad samples (12 in all in this process, end of epoch)")


# ---------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "slides"),
    [
        ({"organ": ["brain"]}, {"mbrain-a"}),
        ({"species": ["human"], "licence": ["CC-BY-NC-4.0"]}, {"heart-b"}),
        ({"slide_ids": ["heart-a", "mbrain-a"]}, {"heart-a", "mbrain-a"}),
        ({"exclude_slide_ids": ["heart-a"]}, {"heart-b", "mbrain-a"}),
    ],
)
def test_filters_select_slides_and_count_exactly(
    corpus: FixtureCorpus, filters: dict[str, Any], slides: set[str]
) -> None:
    expected = sorted(k for k in corpus.keys("train") if corpus.by_key[k].meta["slide_id"] in slides)
    for fmt in ("parquet", "wds"):
        dataset = CorpusDataset(corpus.root, settings(format=fmt, filters=filters))
        assert dataset.selection.n_samples == len(expected)
        assert dataset.selection.shards_mixed > 0, "the shuffled fixture mixes slides in shards"
        got = sorted(k for b in keys_of(iter(CorpusLoader(dataset, num_workers=2))) for k in b)
        assert got == expected, fmt


def test_filter_with_nothing_left_is_an_error(corpus: FixtureCorpus) -> None:
    with pytest.raises(EmptySelectionError, match="no sample of split"):
        CorpusDataset(corpus.root, settings(filters={"organ": ["liver"]}))


def test_rank_and_world_size_come_from_torch_distributed(corpus: FixtureCorpus) -> None:
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        dataset = CorpusDataset(corpus.root, settings())
        assert (dataset.rank, dataset.world_size) == (0, 1)
        explicit = CorpusDataset(corpus.root, settings(), rank=1, world_size=2)
        assert (explicit.rank, explicit.world_size) == (1, 2), "arguments win over torch.distributed"
    finally:
        dist.destroy_process_group()


def test_several_splits_are_read_as_one(corpus: FixtureCorpus) -> None:
    dataset = CorpusDataset(corpus.root, settings(split=["train", "validation"], genes={"transform": "none"}))
    got = sorted(k for b in keys_of(iter(CorpusLoader(dataset))) for k in b)
    assert got == sorted(corpus.keys("train") + corpus.keys("validation"))
