"""Freezing, the last k blocks, LoRA (peft), SEAL's reconstruction head, and checkpoints onto the base."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from stcorpus.training.checkpoint import load_checkpoint
from stcorpus.training.config import ImageEncoderSection, LoraSection, load_config
from stcorpus.training.encoders import TowerEncoder, build_image_encoder, merge_lora
from stcorpus.training.errors import CheckpointError, ConfigError
from stcorpus.training.model import load_trained_model
from stcorpus.training.pretrain import train

UNI = "MahmoodLab/UNI"


def _tower(**options) -> TowerEncoder:
    torch.manual_seed(0)
    encoder = build_image_encoder(ImageEncoderSection(name=UNI, small=True, **options), image_size=0)
    assert isinstance(encoder, TowerEncoder)
    return encoder


def _trainable(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def test_a_frozen_tower_trains_nothing_and_stays_in_eval_mode() -> None:
    encoder = _tower(finetune="frozen")
    assert _trainable(encoder) == set()
    encoder.train()
    assert encoder.training and not encoder.model.training  # no dropout / drop-path in a frozen tower
    assert set(encoder.frozen_keys()) == set(encoder.state_dict())


def test_the_last_blocks_and_the_final_norm_train() -> None:
    encoder = _tower(finetune="last_blocks", train_blocks=1)
    trainable = _trainable(encoder)
    assert trainable and all(k.startswith(("model.blocks.1.", "model.norm.")) for k in trainable)
    assert any(k.startswith("model.norm.") for k in trainable)
    with pytest.raises(ConfigError, match="has 2 blocks"):
        _tower(finetune="last_blocks", train_blocks=3)
    with pytest.raises(ConfigError, match="train_blocks >= 1"):
        load_config(None, overrides=[f"model.image.name={UNI}", "model.image.finetune=last_blocks"])


def test_lora_trains_only_the_adapters_and_merges_to_the_same_function(tmp_path: Path) -> None:
    encoder = _tower(finetune="lora", lora=LoraSection(rank=4, alpha=8))
    trainable = _trainable(encoder)
    assert trainable and all("lora_" in k for k in trainable)
    adapted = {k.split(".lora_")[0] for k in trainable}
    assert {f"model.blocks.0.{m}" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")} <= adapted
    assert not any("patch_embed" in k for k in adapted)  # attention and MLP only

    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in encoder.parameters() if p.requires_grad], lr=0.5)
    images = torch.rand(4, 3, 224, 224)
    for _ in range(3):
        optimizer.zero_grad()
        encoder(images).pow(2).mean().backward()
        optimizer.step()
    after = encoder.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and changed <= {k for k in after if "lora_" in k}  # only adapters moved
    assert any("lora_B" in k for k in changed)  # B starts at zero, and trained

    encoder.eval()
    with torch.no_grad():
        adapted_out = encoder(images)
        merged = merge_lora(copy.deepcopy(encoder.model)).eval()
        from stcorpus.training.pathology import pooled_features

        merged_out = pooled_features(merged, images, backend="timm", pool="model")
    assert torch.allclose(adapted_out, merged_out, atol=1e-4)
    # The merged model has UNI's own keys: it loads strictly into the UNI preset.
    path = tmp_path / "merged.bin"
    torch.save(merged.state_dict(), path)
    reloaded = build_image_encoder(ImageEncoderSection(name=UNI, small=True, pretrained=str(path)), image_size=0)
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(images), adapted_out, atol=1e-4)


def _seal_cfg(out: Path, base: Path, *extra: str):
    return load_config(
        "tiny-cpu",
        overrides=[
            f"run.out_dir={out}",
            "run.threads=1",
            "run.ckpt_every=0",
            f"model.image.name={UNI}",
            "model.image.small=true",
            f"model.image.pretrained={base}",
            "model.image.finetune=lora",
            "model.image.lora.rank=2",
            "loss.gene_recon=1.0",
            "data.batch_size=16",
            "data.synthetic.spots_per_slide=16",
            "data.synthetic.n_slides=4",
            "optim.max_steps=3",
            "optim.warmup_steps=1",
            "eval.pool_size=16",
            "eval.probe_train_size=32",
            "eval.probe_genes=8",
            *extra,
        ],
    )


def test_a_seal_run_checkpoints_what_trained_and_loads_back_onto_the_base(tmp_path: Path) -> None:
    base = tmp_path / "uni-small.bin"
    torch.manual_seed(0)
    tower = build_image_encoder(ImageEncoderSection(name=UNI, small=True), image_size=0)
    torch.save(tower.model.state_dict(), base)  # type: ignore[union-attr]

    result = train(_seal_cfg(tmp_path / "run", base))
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any("loss/gene_recon" in r for r in records if r["kind"] == "train")
    assert "image_to_gene_r@1" in result.metrics
    assert result.checkpoint is not None
    state = load_checkpoint(result.checkpoint)
    keys = set(state["model"])
    assert state["format"] == "stcorpus-train-ckpt/2"
    # the base weights stay out; adapters, heads and the gene side are in; the base is named
    assert not any(k.startswith("image_encoder.") and "lora_" not in k for k in keys)
    assert any("lora_B" in k for k in keys) and "gene_head.weight" in keys and "image_proj.weight" in keys
    assert state["base"]["name"] == UNI and state["base"]["weights"] == str(base) and len(state["base"]["sha256"]) == 64

    model, cfg = load_trained_model(result.checkpoint)
    assert cfg.model.image.finetune == "lora"
    for k, v in state["model"].items():
        assert torch.equal(model.state_dict()[k], v)
    # the reloaded base is the file's
    assert torch.equal(model.state_dict()["image_encoder.model.cls_token"], tower.state_dict()["model.cls_token"])

    # the same run resumed after its base file changed (another model under the same name) is refused
    torch.manual_seed(5)
    other = build_image_encoder(ImageEncoderSection(name=UNI, small=True), image_size=0)
    torch.save(other.model.state_dict(), base)  # type: ignore[union-attr]
    with pytest.raises(CheckpointError, match="was trained on the base weights"):
        train(_seal_cfg(tmp_path / "run", base), resume="latest")


def test_gene_recon_needs_dense_expression() -> None:
    with pytest.raises(ConfigError, match="gene_recon"):
        load_config("tiny-cpu", overrides=["loss.gene_recon=1", "model.gene.name=transformer"])


def test_checkpoints_of_the_first_format_still_load(tmp_path: Path) -> None:
    from stcorpus.training.checkpoint import save_checkpoint

    old = save_checkpoint({"format": "stcorpus-train-ckpt/1", "step": 1}, tmp_path, step=1, keep_last=2)
    assert load_checkpoint(old)["step"] == 1
    newer = save_checkpoint({"format": "stcorpus-train-ckpt/9", "step": 2}, tmp_path, step=2, keep_last=2)
    with pytest.raises(CheckpointError, match="is not a stcorpus-train-ckpt/2 checkpoint"):
        load_checkpoint(newer)
