"""Training on a corpus that ``curate build`` made from the real fixtures, read by the torch loader.

The corpus: four slides made from the real squidpy sample (``tests/build_fixtures.good_slides``,
integer counts), split by patient with seed 3 into train (GOOD-0, GOOD-1, GOOD-3: 126 spots)
and validation (GOOD-2: 42 spots). The slides are variants of one tissue section (each leaves
out another seventh of its 49 spots), so validation spots look like training spots: the probe
and retrieval numbers here check the plumbing, not generalisation.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from stcorpus import schema
from stcorpus.curate.build.pipeline import BuildSettings, build
from stcorpus.curate.build.splits import SplitSettings
from stcorpus.loaders import CorpusDataset, CorpusLoader
from stcorpus.training.checkpoint import load_checkpoint
from stcorpus.training.config import TrainConfig, load_config
from stcorpus.training.data import build_run_data, loader_settings
from stcorpus.training.pretrain import TrainResult, train
from tests.build_fixtures import good_slides, manifest
from tests.httpserver import LocalServer

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SLIDES = ["GOOD-0", "GOOD-1", "GOOD-3"]
VAL_SLIDES = ["GOOD-2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train-corpus")
    path = manifest(root / "manifest", good_slides(root / "data", 4, integer=True))
    splits = SplitSettings(train=0.6, validation=0.4, test=0.0, seed=3)
    build([path], out=root / "corpus", settings=BuildSettings(progress=False, name="train-corpus", splits=splits))
    slides = pq.read_table(root / "corpus" / schema.SLIDES_FILE).to_pylist()
    by_split = {s: sorted(r["slide_id"] for r in slides if r["split"] == s) for s in ("train", "validation")}
    assert by_split == {"train": TRAIN_SLIDES, "validation": VAL_SLIDES}, by_split
    assert all(r["n_spots_written"] == 42 for r in slides)
    return root / "corpus"


def _cfg(corpus: Path | str, out: Path, *overrides: str) -> TrainConfig:
    return load_config(
        "corpus-cpu",
        overrides=[f"data.corpus={corpus}", f"run.out_dir={out}", "run.threads=1", "data.num_workers=0", *overrides],
    )


def _records(run: Path, kind: str) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _keys(run: Path, rank: int = 0) -> list[list[str]]:
    return [json.loads(line)["keys"] for line in (run / f"keys-rank{rank}.jsonl").read_text().splitlines()]


def test_sizes_come_from_the_corpus(corpus: Path, tmp_path: Path) -> None:
    data = build_run_data(_cfg(corpus, tmp_path), rank=0, world_size=1)
    # The gene columns are the corpus's measured genes (genes.measured_only), not the references' ~128k.
    vocabulary = sum(pq.read_table(corpus / schema.GENES_FILE).column("measured").to_pylist())
    assert (data.image_size, data.n_genes, data.vocab_size) == (224, vocabulary, vocabulary + 1)
    batch = next(iter(data.train))
    assert batch["patch"].shape == (32, 3, 224, 224) and batch["expr"].shape == (32, vocabulary)
    ranked = build_run_data(
        _cfg(corpus, tmp_path, "model.gene.name=transformer", "model.gene.max_tokens=48"), rank=0, world_size=1
    )
    first = next(iter(ranked.train))
    tokens, mask = first["tokens"], first["tokens_mask"]
    assert ranked.max_tokens == 48 and tokens.shape == mask.shape == (32, 48)
    assert int(tokens[mask].min()) >= 1 and int(tokens.max()) <= vocabulary  # ids are column + 1
    assert torch.all(tokens[~mask] == 0)  # 0 pads
    # the transformer's evaluation passes carry log1p probe targets beside the tokens
    pool = next(ranked.val_batches())
    assert pool["probe_expr"].shape == (32, vocabulary) and "expr" not in pool
    assert torch.equal(pool["probe_expr"], next(data.val_batches())["expr"])


def test_overfits_a_batch_and_evaluates_on_held_out_slides(corpus: Path, tmp_path: Path) -> None:
    # Training reads one slide in batches of its 42 spots: every step sees the same pairs.
    cfg = _cfg(
        corpus,
        tmp_path,
        "data.loader.filters.slide_ids=[GOOD-0]",
        "data.batch_size=42",
        "optim.max_steps=40",
        "optim.warmup_steps=3",
        "run.log_every=4",
        "eval.every=0",
        "eval.pool_size=42",
        "eval.probe_train_size=126",
    )
    result = train(cfg)
    losses = [r["loss"] for r in _records(tmp_path, "train")]
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(42), rel=0.15)  # chance for a batch of 42
    assert losses[-1] < 0.4 * losses[0], losses
    assert _records(tmp_path, "train")[-1]["logits_cols"] == 42

    m = result.metrics
    assert m["pool_size"] == 42 and m["probe_train_spots"] == 126
    for direction in ("image_to_gene", "gene_to_image"):
        recalls = [m[f"{direction}_r@{k}"] for k in (1, 5, 10)]
        assert recalls == sorted(recalls) and all(0.0 <= r <= 1.0 for r in recalls)
    assert m["image_to_gene_r@5"] > m["chance_r@5"] and m["gene_to_image_r@5"] > m["chance_r@5"]
    assert math.isfinite(m["probe_pearson"]) and m["probe_genes"] > 0
    # the probe is fitted on the three training slides (not only the one trained on) and scored on
    # the validation slide; the record says which
    evaluation = _records(tmp_path, "eval")[-1]
    assert evaluation["probe_train_slides"] == TRAIN_SLIDES and evaluation["probe_test_slides"] == VAL_SLIDES

    assert result.checkpoint is not None
    state = torch.load(result.checkpoint, weights_only=True)
    data = state["data"][0]
    assert data["kind"] == "corpus" and data["loader"]["format"] == "stcorpus-loader/1"
    assert json.loads(json.dumps(data)) == data  # plain JSON types
    assert data["loader"]["epoch"] == 39 and data["loader"]["done"] == [[0, 1]]  # one batch per epoch


def test_stamp_terms_train_on_the_corpus_regions(corpus: Path, tmp_path: Path) -> None:
    cfg = _cfg(
        corpus,
        tmp_path,
        "data.views=[patch,region]",
        "data.batch_size=16",
        "loss.region_spot=0.5",
        "loss.patch_region=0.5",
        "loss.pos=0.5",
        "optim.max_steps=3",
        "run.log_every=1",
        "eval.probe=false",
        "eval.pool_size=16",
    )
    train(cfg)
    records = _records(tmp_path, "train")
    for name in ("loss/patch_spot", "loss/region_spot", "loss/patch_region", "loss/pos", "pos_acc"):
        assert all(math.isfinite(r[name]) for r in records), name
    # the loader's pos labels: the patch's cell in its region, 0..8
    batch = next(iter(build_run_data(cfg, rank=0, world_size=1).train))
    assert batch["region"].shape == batch["patch"].shape and 0 <= int(batch["pos"].min()) <= int(batch["pos"].max()) < 9


def _resume_case(corpus: Path, tmp_path: Path, *, workers: int, stop_at: int) -> tuple[TrainResult, TrainResult]:
    common = [
        f"data.num_workers={workers}",
        "data.batch_size=16",  # 7 batches per epoch
        "data.loader.augment.hflip=true",  # seeded by the loader from (seed, epoch, rank, batch)
        "data.loader.augment.rot90=true",
        "model.gene.dropout=0.1",  # the RNG state matters too
        "optim.max_steps=10",
        "run.deterministic=true",
        "run.ckpt_every=0",
        "run.log_keys=true",
        "eval.probe=false",
        "eval.pool_size=16",
    ]
    whole = train(_cfg(corpus, tmp_path / "whole", *common))
    stopped = train(_cfg(corpus, tmp_path / "parts", *common), stop_at=stop_at)
    assert stopped.step == stop_at
    torch.manual_seed(99)  # whatever happened in between must not matter
    resumed = train(_cfg(corpus, tmp_path / "parts", *common), resume="latest")
    return whole, resumed


@pytest.mark.parametrize(
    ("workers", "stop_at"),
    [(0, 7), (2, 4)],  # right after the last batch of epoch 0; mid-epoch with two workers
)
def test_resume_on_the_corpus_is_bitwise_exact(corpus: Path, tmp_path: Path, workers: int, stop_at: int) -> None:
    whole, resumed = _resume_case(corpus, tmp_path, workers=workers, stop_at=stop_at)
    assert whole.step == resumed.step == 10
    assert whole.checkpoint is not None and resumed.checkpoint is not None
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(resumed.checkpoint)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["data"] == b["data"] and a["data"][0]["loader"]["epoch"] == 1
    keys = _keys(tmp_path / "whole")
    assert _keys(tmp_path / "parts") == keys  # the batch after the stop is the one that followed
    assert len(keys) == 10 and len({k for batch in keys[:7] for k in batch}) == 7 * 16  # epoch 0 has no repeats
    assert sorted(keys[7]) != sorted(keys[0])  # epoch 1 is reshuffled


def test_streams_the_corpus_over_http(corpus: Path, tmp_path: Path, http_server: LocalServer) -> None:
    shutil.copytree(corpus, http_server.root / "corpus", ignore=shutil.ignore_patterns("qc", ".work"))
    url = f"{http_server.url}/corpus"
    options = ["optim.max_steps=2", "run.log_keys=true", "eval.pool_size=32", "eval.probe_train_size=64"]
    local = train(_cfg(corpus, tmp_path / "local", *options))
    remote = train(_cfg(url, tmp_path / "remote", *options))
    assert _keys(tmp_path / "remote") == _keys(tmp_path / "local")
    assert remote.metrics.keys() == local.metrics.keys() and "probe_pearson" in remote.metrics
    for split in ("train", "validation"):  # training and both evaluation passes read shards over HTTP
        assert http_server.count(f"/corpus/parquet/{split}/{split}-000000.parquet", method="GET") > 0
    assert remote.checkpoint is not None and local.checkpoint is not None
    remote_state = load_checkpoint(remote.checkpoint)["data"][0]["loader"]
    assert remote_state == load_checkpoint(local.checkpoint)["data"][0]["loader"]  # the same plan and position


# ---------------------------------------------------------------------------------------------
# Two processes under torchrun, with bad samples that make batches short and one empty
# ---------------------------------------------------------------------------------------------

DDP_SETTINGS = [
    "data.batch_size=16",  # 63 spots per rank: 3 batches per epoch
    "data.loader.format=wds",
    "data.loader.on_bad_sample=warn",
    "optim.max_steps=2",
    "run.log_every=1",
    "run.log_keys=true",
    "eval.pool_size=32",
    "eval.probe_train_size=64",
]


def _epoch_batches(cfg: TrainConfig, rank: int) -> list[list[str]]:
    """The keys of each batch of epoch 0 on ``rank`` of 2, as the run's own loader settings plan them."""
    settings = loader_settings(cfg, split="train", shuffle=True)
    dataset = CorpusDataset(str(cfg.data.corpus), settings, rank=rank, world_size=2)
    return [batch["key"] for batch in CorpusLoader(dataset)]


def _corrupt_patches(corpus: Path, keys: set[str]) -> None:
    """Overwrite the patch JPEGs of ``keys`` in the train tar shards with zeros (same size, undecodable)."""
    found = set()
    for shard in sorted((corpus / "wds" / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            spans = [(m.offset_data, m.size) for m in tar if m.name.split(".", 1)[0] in keys and "patch" in m.name]
            found |= {m.name.split(".", 1)[0] for m in tar if m.name.split(".", 1)[0] in keys}
        with shard.open("r+b") as handle:
            for offset, size in spans:
                handle.seek(offset)
                handle.write(bytes(size))
    assert found == keys


@pytest.mark.slow
def test_torchrun_on_the_corpus_with_short_and_empty_batches(corpus: Path, tmp_path: Path) -> None:
    broken = tmp_path / "corpus"
    shutil.copytree(corpus, broken, ignore=shutil.ignore_patterns("qc", ".work"))
    run = tmp_path / "run"
    cfg = _cfg(broken, run, *DDP_SETTINGS)
    planned = [_epoch_batches(cfg, rank) for rank in (0, 1)]
    assert [len(p) for p in planned] == [3, 3]
    # rank 0 loses one sample of its first batch; every sample of rank 1's second batch is bad
    lost = {planned[0][0][5], *planned[1][1]}
    _corrupt_patches(broken, lost)

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    overrides = [f"data.corpus={broken}", f"run.out_dir={run}", "run.threads=1", "data.num_workers=1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "stcorpus.training.pretrain", "--config", "corpus-cpu", "--set", *overrides, *DDP_SETTINGS]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    rank0, rank1 = _keys(run, 0), _keys(run, 1)
    # both ranks took two steps: batch 0, then batch 2 (batch 1 is empty on rank 1, so passed over by both)
    assert rank0 == [[k for k in planned[0][0] if k not in lost], planned[0][2]]
    assert rank1 == [planned[1][0], planned[1][2]]
    assert not {k for b in rank0 for k in b} & {k for b in rank1 for k in b}  # disjoint data
    steps = _records(run, "train")
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)
    # rank 0's rows against the global batch: 15 + 16 columns, then 16 + 16
    assert [(r["logits_rows"], r["logits_cols"]) for r in steps] == [(15, 31), (16, 32)]
    assert [r["skipped_batches"] for r in steps] == [0, 1]
    assert steps[-1]["bad_samples"] == len(lost) == 17 and steps[-1]["empty_batches"] == 1
    assert _records(run, "eval")[-1]["probe_test_slides"] == VAL_SLIDES
    state = load_checkpoint(run / "checkpoints" / "step-00000002.pt")
    assert [d["loader"]["rank"] for d in state["data"]] == [0, 1]
    assert [d["loader"]["done"] for d in state["data"]] == [[[0, 3]], [[0, 3]]]  # both consumed batches 0-2


def test_throughput_benchmark_compares_both_sources(corpus: Path, tmp_path: Path) -> None:
    from bench.train_throughput import main as throughput

    options = ["--warmup", "2", "--interval", "2", "--steps", "4", "--repeat", "1"]
    settings = ["--set", "run.threads=1", "data.num_workers=0", "data.batch_size=16"]
    report = throughput(["--corpus", str(corpus), "--out", str(tmp_path / "t.json"), *options, *settings])
    assert json.loads((tmp_path / "t.json").read_text()) == report
    for source in ("corpus", "synthetic"):
        measured = report["results"][source]
        assert measured["steps"] == 4 and measured["samples"] == 4 * 16  # the warm-up steps left out
        assert measured["samples_per_s"] > 0 and 0.0 <= measured["data_wait_frac"] <= 1.0
    assert report["ratio"] == pytest.approx(
        report["results"]["corpus"]["samples_per_s"] / report["results"]["synthetic"]["samples_per_s"]
    )
