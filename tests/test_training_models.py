"""Encoders, the two-tower model, and the timm path (real timm models, test-sized)."""

from __future__ import annotations

import sys

import pytest
import torch

from stcorpus.loaders import batch as B
from stcorpus.training.config import GeneEncoderSection, ImageEncoderSection, load_config
from stcorpus.training.encoders import (
    GeneMLP,
    GeneTransformer,
    SmallCNN,
    SmallViT,
    build_image_encoder,
    build_timm_encoder,
)
from stcorpus.training.errors import BatchContractError, CheckpointError, ConfigError, MissingExtraError, TrainingError
from stcorpus.training.model import ImageNormalize, build_model


def test_image_encoders_give_feature_vectors() -> None:
    images = torch.randn(2, 3, 32, 32)
    assert SmallCNN(width=24, depth=3)(images).shape == (2, 24)
    assert SmallViT(image_size=32, patch_size=8, width=16, depth=1, heads=2)(images).shape == (2, 16)
    with pytest.raises(TrainingError, match="image_size"):
        SmallViT(image_size=32, patch_size=8, width=16, depth=1, heads=2)(torch.randn(1, 3, 40, 40))
    with pytest.raises(ConfigError, match="patch_size"):
        SmallViT(image_size=30, patch_size=8)


def test_gene_mlp_tells_unmeasured_from_zero() -> None:
    torch.manual_seed(0)
    mlp = GeneMLP(n_genes=5, hidden=16)
    expr = torch.zeros(1, 5)
    measured = torch.ones(1, 5, dtype=torch.bool)
    unmeasured = measured.clone()
    unmeasured[0, 2] = False
    assert not torch.allclose(mlp(expr, measured), mlp(expr, unmeasured))
    # the value of an unmeasured gene does not reach the encoder
    noisy = expr.clone()
    noisy[0, 2] = 7.0
    assert torch.allclose(mlp(expr, unmeasured), mlp(noisy, unmeasured))
    with pytest.raises(TrainingError, match="n_genes"):
        mlp(torch.zeros(1, 6), torch.ones(1, 6, dtype=torch.bool))


def test_gene_transformer_ignores_padding() -> None:
    torch.manual_seed(0)
    model = GeneTransformer(vocab_size=20, max_tokens=6, hidden=16, depth=1, heads=2).eval()
    tokens = torch.tensor([[3, 7, 1, 0, 0, 0]])
    mask = torch.tensor([[True, True, True, False, False, False]])
    other_padding = torch.tensor([[3, 7, 1, 19, 5, 2]])
    assert torch.allclose(model(tokens, mask), model(other_padding, mask), atol=1e-6)
    reordered = torch.tensor([[7, 3, 1, 0, 0, 0]])
    assert not torch.allclose(model(tokens, mask), model(reordered, mask))  # rank order matters
    with pytest.raises(TrainingError, match="max_tokens"):
        model(torch.zeros(1, 7, dtype=torch.int64), torch.ones(1, 7, dtype=torch.bool))


def test_normalisation_happens_on_uint8_only() -> None:
    norm = ImageNormalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(norm(images), torch.full((1, 3, 2, 2), 2.0))
    with pytest.raises(BatchContractError, match="uint8"):
        norm(images.float())


def _batch(n: int = 4, size: int = 48, genes: int = 64, tokens: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        B.PATCH: torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
        B.REGION: torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
        B.POS: torch.randint(0, 9, (n,), generator=g),
        B.EXPR: torch.rand(n, genes, generator=g),
        B.EXPR_MASK: torch.ones(n, genes, dtype=torch.bool),
        B.TOKENS: torch.randint(0, genes, (n, tokens), generator=g),
        B.TOKENS_MASK: torch.ones(n, tokens, dtype=torch.bool),
    }


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.image.name=small-vit", "model.gene.name=transformer", "model.gene.max_tokens=24", "model.proj=mlp"],
        ["data.views=[patch,region]", "loss.pos=1", "loss.region_spot=1", "loss.kind=siglip"],
    ],
)
def test_model_outputs_unit_embeddings(overrides: list[str]) -> None:
    cfg = load_config("tiny-cpu", overrides=["model.gene.n_genes=64", *overrides])
    model = build_model(cfg, image_size=48)
    out = model(_batch())
    assert out["patch"].shape == out["gene"].shape == (4, 32)
    assert torch.allclose(out["patch"].norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(out["gene"].norm(dim=-1), torch.ones(4), atol=1e-5)
    assert float(out["logit_scale"].detach()) == pytest.approx(1 / 0.07 if cfg.loss.kind == "clip" else 10.0, rel=1e-5)
    assert ("pos_logits" in out) == (cfg.loss.pos > 0)
    assert ("logit_bias" in out) == (cfg.loss.kind == "siglip")
    if cfg.loss.pos > 0:
        assert out["pos_logits"].shape == (4, 9)


def test_logit_scale_is_clamped() -> None:
    cfg = load_config("tiny-cpu", overrides=["model.gene.n_genes=64"])
    model = build_model(cfg, image_size=48)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale(100.0)
    assert float(model.logit_scale.detach().exp()) == pytest.approx(100.0, rel=1e-5)


def test_missing_timm_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(MissingExtraError, match=r"stcorpus\[timm\]"):
        build_image_encoder(ImageEncoderSection(name="timm:resnet18"), image_size=224)


def test_timm_encoder_by_name_with_local_weights(tmp_path) -> None:
    small = {"depth": 1}
    encoder = build_timm_encoder("vit_tiny_patch16_224", pretrained=None, kwargs=small)
    assert encoder.out_dim == 192 and encoder.input_size == 224
    weights = tmp_path / "model.pth"
    torch.save(encoder.model.state_dict(), weights)
    loaded = build_timm_encoder("vit_tiny_patch16_224", pretrained=str(weights), kwargs=small)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(images), encoder.eval()(images), atol=1e-5)
    assert loaded.identity["origin"] == "file" and loaded.identity["weights"] == str(weights)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1"):
        build_timm_encoder("vit_tiny_patch16_224", pretrained=str(weights), kwargs={"depth": 2})


def test_timm_errors_say_what_to_do(tmp_path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="no model 'nope'"):
        build_timm_encoder("nope", pretrained=None)
    with pytest.raises(ConfigError, match="neither 'hub' nor an existing weights file"):
        build_timm_encoder("resnet18", pretrained=str(tmp_path / "missing.pt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(TrainingError, match=r"set model\.image\.pretrained to the local file"):
        build_timm_encoder("resnet18", pretrained="hub")


def test_gene_encoder_needs_resolved_sizes() -> None:
    from stcorpus.training.encoders import build_gene_encoder

    with pytest.raises(ConfigError, match="n_genes"):
        build_gene_encoder(GeneEncoderSection())
    with pytest.raises(ConfigError, match="max_tokens"):
        build_gene_encoder(GeneEncoderSection(name="transformer", n_genes=10))
