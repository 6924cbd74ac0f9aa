"""Data-parallel training on CPU: ``torchrun --nproc_per_node 2`` with gloo, in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _torchrun(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


@pytest.mark.slow
def test_two_rank_losses_and_gradients_equal_the_global_batch(tmp_path) -> None:
    out = tmp_path / "gather.json"
    _torchrun(str(ROOT / "tests" / "_train_gather.py"), str(out))
    results = json.loads(out.read_text())
    assert results["world_size"] == 2
    for name in ("clip_local", "clip_global", "siglip", "clip_local_uneven", "clip_global_uneven", "siglip_uneven"):
        case = results[name]
        assert case["loss"] == pytest.approx(case["reference"], rel=1e-6), name
        assert case["max_grad_diff"] < 1e-5 * max(1.0, case["grad_scale"]), name
    assert results["clip_local"]["logits_shape"] == [4, 8]  # local rows x global columns
    assert results["clip_global"]["logits_shape"] == [8, 8]
    # ranks holding 3 and 5 rows (a loader that skipped bad samples): rank 0's 3 rows x all 8
    assert results["clip_local_uneven"]["logits_shape"] == [3, 8]
    assert results["siglip_uneven"]["logits_shape"] == [3, 8]


def _pretrain(run: Path, *extra: str) -> None:
    _torchrun(
        "-m",
        "stcorpus.training.pretrain",
        "--config",
        "tiny-cpu",
        "--set",
        f"run.out_dir={run}",
        "data.batch_size=16",
        "optim.max_steps=4",
        "optim.accum_steps=2",
        "model.gene.dropout=0.1",
        "run.log_every=2",
        "run.log_keys=true",
        "run.ckpt_every=2",
        "eval.probe=false",
        "eval.pool_size=32",
        *extra,
    )


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """One uninterrupted 2-rank run (4 steps x 2 micro-batches), shared by the tests below."""
    run: Path = tmp_path_factory.mktemp("ddp") / "whole"
    _pretrain(run)
    return run


@pytest.mark.slow
def test_torchrun_pretrain_gathers_and_shards(ddp_run: Path) -> None:
    run = ddp_run
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and all(r["logits_rows"] == 16 and r["logits_cols"] == 32 for r in train)  # global batch 2 x 16
    assert "world size 2" in records[0]["message"]
    assert any(r["kind"] == "eval" for r in records)

    def keys(rank: int) -> list[list[str]]:
        lines = (run / f"keys-rank{rank}.jsonl").read_text().splitlines()
        return [json.loads(line)["keys"] for line in lines]

    rank0, rank1 = keys(0), keys(1)
    assert len(rank0) == len(rank1) == 4 * 2  # steps x accumulation micro-batches
    assert all(len(batch) == 16 for batch in rank0 + rank1)
    flat0 = {k for batch in rank0 for k in batch}
    flat1 = {k for batch in rank1 for k in batch}
    assert len(flat0) == 128 and len(flat1) == 128  # one epoch of 256 training spots, split in two
    assert not flat0 & flat1

    state = torch.load(run / "checkpoints" / "step-00000004.pt", weights_only=True)
    assert state["world_size"] == 2
    assert [d["rank"] for d in state["data"]] == [0, 1]


@pytest.mark.slow
def test_torchrun_resume_is_exact_on_every_rank(ddp_run: Path, tmp_path) -> None:
    # fresh processes continue from the step-2 checkpoint of the uninterrupted run
    resumed = tmp_path / "resumed"
    _pretrain(resumed, "--resume", str(ddp_run / "checkpoints" / "step-00000002.pt"))
    a = torch.load(ddp_run / "checkpoints" / "step-00000004.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "step-00000004.pt", weights_only=True)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["data"] == b["data"]
    for rank in (0, 1):
        lines = (ddp_run / f"keys-rank{rank}.jsonl").read_text().splitlines()
        after = [line for line in lines if json.loads(line)["step"] >= 2]
        assert (resumed / f"keys-rank{rank}.jsonl").read_text().splitlines() == after
