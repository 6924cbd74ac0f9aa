"""The training loop on the synthetic source: learning, logging, evaluation, checkpoints, exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from stcorpus.training.checkpoint import CHECKPOINT_FORMAT, list_checkpoints, load_checkpoint, save_checkpoint
from stcorpus.training.config import load_config
from stcorpus.training.errors import CheckpointError
from stcorpus.training.model import build_model
from stcorpus.training.pretrain import main, train


def _cfg(out: Path, *overrides: str):
    return load_config("tiny-cpu", overrides=[f"run.out_dir={out}", "run.threads=1", *overrides])


def _records(run: Path, kind: str) -> list[dict]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_overfits_a_fixed_batch_and_logs(tmp_path) -> None:
    # 2 training slides x 16 spots = one batch of 32: every step sees the same pairs
    cfg = _cfg(
        tmp_path,
        "data.synthetic.n_slides=3",
        "data.synthetic.val_slides=1",
        "data.synthetic.spots_per_slide=16",
        "optim.max_steps=40",
        "run.log_every=2",
        "eval.pool_size=16",
        "eval.probe_train_size=32",
    )
    result = train(cfg)
    records = _records(tmp_path, "train")
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.3 * losses[0], losses
    assert losses[0] == pytest.approx(math.log(32), rel=0.2)  # starts near chance for a batch of 32
    last = records[-1]
    for name in ("lr", "temperature", "logit_scale", "samples_per_s", "data_wait_frac", "grad_norm", "loss/patch_spot"):
        assert name in last
    assert 0.0 <= last["data_wait_frac"] <= 1.0 and last["samples_per_s"] > 0
    assert last["temperature"] == pytest.approx(1 / last["logit_scale"])
    assert (last["logits_rows"], last["logits_cols"]) == (32, 32)
    assert result.step == 40


def test_checkpoint_loads_with_weights_only_and_holds_the_resolved_config(tmp_path) -> None:
    result = train(_cfg(tmp_path, "optim.max_steps=4", "eval.every=0", "eval.probe=false"))
    assert result.checkpoint == tmp_path / "checkpoints" / "step-00000004.pt"
    state = torch.load(tmp_path / "checkpoints" / "step-00000004.pt", weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT and state["step"] == 4
    saved = json.loads(state["config"])
    assert saved["model"]["gene"]["n_genes"] == 64  # resolved from the data (0 in the file)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == saved
    assert state["data"][0]["position"] > 0 and len(state["rng"]) == 1
    restored = build_model(load_config(tmp_path / "config.yaml"), image_size=48)
    restored.load_state_dict(state["model"])


def test_evaluation_beats_chance_after_training(tmp_path) -> None:
    result = train(_cfg(tmp_path, "optim.max_steps=60"))
    m = result.metrics
    assert m["pool_size"] == 128
    assert m["image_to_gene_r@1"] > 4 * m["chance_r@1"]
    assert m["gene_to_image_r@1"] > 4 * m["chance_r@1"]
    assert m["image_to_gene_r@10"] > 3 * m["chance_r@10"]
    assert m["probe_pearson"] > 0.1 and m["probe_genes"] > 0
    assert _records(tmp_path, "eval")[-1]["image_to_gene_r@1"] == m["image_to_gene_r@1"]


@pytest.mark.parametrize(
    "extra",
    [
        ["optim.accum_steps=1"],
        ["optim.accum_steps=2", "model.gene.dropout=0.2"],  # accumulation, and RNG that matters
    ],
)
def test_resume_is_bitwise_exact(tmp_path, extra: list[str]) -> None:
    common = ["optim.max_steps=9", "run.ckpt_every=0", "run.log_keys=true", "eval.probe=false", *extra]
    whole = train(_cfg(tmp_path / "whole", *common))
    stopped = train(_cfg(tmp_path / "parts", *common), stop_at=4)
    assert stopped.step == 4 and stopped.checkpoint is not None
    torch.manual_seed(1234)  # whatever the process did in between must not matter
    resumed = train(_cfg(tmp_path / "parts", *common), resume="latest")
    assert resumed.step == whole.step == 9

    assert whole.checkpoint is not None and resumed.checkpoint is not None
    a = load_checkpoint(whole.checkpoint)
    b = load_checkpoint(resumed.checkpoint)
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    assert a["data"] == b["data"]

    def keys(run: Path) -> list:
        return [json.loads(line)["keys"] for line in (run / "keys-rank0.jsonl").read_text().splitlines()]

    assert keys(tmp_path / "parts") == keys(tmp_path / "whole")  # the same batch after the resume point


def test_resume_refuses_a_different_model_and_missing_checkpoints(tmp_path) -> None:
    train(_cfg(tmp_path, "optim.max_steps=2", "eval.probe=false"))
    with pytest.raises(CheckpointError, match="different model"):
        train(_cfg(tmp_path, "optim.max_steps=4", "model.embed_dim=16"), resume="latest")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(_cfg(tmp_path / "empty", "optim.max_steps=2"), resume="latest")
    fresh = train(_cfg(tmp_path / "auto", "optim.max_steps=2", "eval.probe=false"), resume="auto")
    assert fresh.step == 2


def test_keeps_the_last_n_checkpoints(tmp_path) -> None:
    train(
        _cfg(tmp_path, "optim.max_steps=8", "run.ckpt_every=2", "run.keep_last=2", "eval.every=0", "eval.probe=false")
    )
    ckpt_dir = tmp_path / "checkpoints"
    assert [step for step, _ in list_checkpoints(ckpt_dir)] == [6, 8]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step-00000006.pt", "step-00000008.pt"]


def test_a_failed_write_leaves_no_partial_checkpoint(tmp_path, monkeypatch) -> None:
    good = save_checkpoint({"format": CHECKPOINT_FORMAT, "step": 1}, tmp_path, step=1, keep_last=3)

    def broken_save(obj, handle) -> None:
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"format": CHECKPOINT_FORMAT, "step": 2}, tmp_path, step=2, keep_last=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]
    assert load_checkpoint(good)["step"] == 1


def test_a_corrupt_checkpoint_is_a_checkpoint_error(tmp_path) -> None:
    path = tmp_path / "step-00000001.pt"
    path.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_stamp_terms_and_siglip_train(tmp_path) -> None:
    result = train(
        _cfg(
            tmp_path,
            "data.views=[patch,region]",
            "loss.kind=siglip",
            "loss.region_spot=0.5",
            "loss.patch_region=0.5",
            "loss.pos=0.5",
            "model.gene.name=transformer",
            "optim.max_steps=20",
            "run.log_every=5",
            "eval.probe=false",
            "eval.pool_size=64",
        )
    )
    records = _records(tmp_path, "train")
    for name in ("loss/patch_spot", "loss/region_spot", "loss/patch_region", "loss/pos", "pos_acc", "logit_bias"):
        assert all(math.isfinite(r[name]) for r in records), name
    assert records[-1]["loss"] < records[0]["loss"]
    assert result.metrics["image_to_gene_r@10"] > 0


def test_command_line_run(tmp_path) -> None:
    out = tmp_path / "cli"
    code = main(["--config", "tiny-cpu", "--set", f"run.out_dir={out}", "optim.max_steps=3", "eval.probe=false"])
    assert code == 0
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "step-00000003.pt").is_file()
    assert main(["--config", "tiny-cpu", "--set", f"run.out_dir={out}", "optim.max_steps=5", "--resume", "latest"]) == 0
    assert [r["step"] for r in _records(out, "event")] == [0, 3]  # a start and a resume, one log file


def test_an_empty_training_source_is_a_clear_error(tmp_path, monkeypatch) -> None:
    import stcorpus.training.pretrain as pretrain
    from stcorpus.training.data import build_run_data
    from stcorpus.training.errors import DataSourceUnavailableError

    class Empty:
        def __iter__(self):
            return iter(())

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state) -> None:
            pass

    def empty_data(cfg, *, rank, world_size, device=None):
        data = build_run_data(cfg, rank=rank, world_size=world_size)
        data.train = Empty()
        return data

    monkeypatch.setattr(pretrain, "build_run_data", empty_data)
    with pytest.raises(DataSourceUnavailableError, match="no batch in a whole epoch"):
        train(_cfg(tmp_path, "optim.max_steps=2"))


def test_short_and_empty_batches_train_or_are_passed_over(tmp_path, monkeypatch) -> None:
    # what a loader with on_bad_sample=warn yields: the same batch boundaries, fewer samples
    import stcorpus.training.pretrain as pretrain
    from stcorpus.training.data import build_run_data

    class Damaged:
        def __init__(self, inner) -> None:
            self.inner = inner

        def __iter__(self):
            for i, batch in enumerate(self.inner):
                keep = {0: 32, 1: 0}.get(i, 20)  # whole, empty, then short batches
                yield {k: v[:keep] for k, v in batch.items()}

        def state_dict(self) -> dict:
            return dict(self.inner.state_dict())

        def load_state_dict(self, state) -> None:
            self.inner.load_state_dict(state)

    def damaged_data(cfg, *, rank, world_size, device=None):
        data = build_run_data(cfg, rank=rank, world_size=world_size)
        data.train = Damaged(data.train)
        return data

    monkeypatch.setattr(pretrain, "build_run_data", damaged_data)
    train(_cfg(tmp_path, "optim.max_steps=3", "run.log_every=1", "run.log_keys=true", "eval.probe=false"))
    keys = [json.loads(line)["keys"] for line in (tmp_path / "keys-rank0.jsonl").read_text().splitlines()]
    assert [len(k) for k in keys] == [32, 20, 20]
    records = _records(tmp_path, "train")
    assert [r["skipped_batches"] for r in records] == [0, 1, 0]
    assert [r["logits_cols"] for r in records] == [32, 20, 20]
    assert all(math.isfinite(r["loss"]) for r in records)
