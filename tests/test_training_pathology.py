"""Pathology foundation-model presets: real shapes, strict loading, Hub weights, input size, normalisation.

Real-shape checks build each preset on torch's ``meta`` device (no memory, no init time) and
compare with the published model sizes; loading checks use the same family at a small size
(``small``), with random weights saved to a file and loaded back.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from stcorpus.training.config import ImageEncoderSection, load_config
from stcorpus.training.encoders import TowerEncoder, build_image_encoder, encoder_defaults
from stcorpus.training.errors import CheckpointError, ConfigError, TrainingError
from stcorpus.training.model import build_model
from stcorpus.training.pathology import (
    HOPTIMUS_MEAN,
    OPENAI_MEAN,
    PRESETS,
    build_preset_model,
    find_preset,
    pooled_features,
)
from tests.httpserver import HubRepo, serve

#: Parameters (millions) as the model cards / papers publish them, and the feature width.
PUBLISHED = {
    "MahmoodLab/UNI": (303, 1024),  # ViT-L/16, 303M (UNI paper)
    "MahmoodLab/UNI2-h": (681, 1536),  # ViT-H/14-reg8, 681M (model card)
    "paige-ai/Virchow": (632, 2560),  # ViT-H/14, 632M (Virchow paper); class + mean patch token
    "paige-ai/Virchow2": (632, 2560),  # ViT-H/14 with 4 registers (Virchow2 paper)
    "bioptimus/H-optimus-0": (1100, 1536),  # ViT-g/14, 1.1B (model card)
    "bioptimus/H-optimus-1": (1100, 1536),
    "prov-gigapath/prov-gigapath": (1130, 1536),  # ViT-g, 1.13B (Prov-GigaPath paper)
    "owkin/phikon": (86, 768),  # ViT-B/16, 86M (model card)
    "owkin/phikon-v2": (300, 1024),  # ViT-L/16, 300M (model card)
    "MahmoodLab/CONCH": (86, 768),  # the ViT-B/16 trunk of CONCH's vision tower
}


def test_every_preset_has_its_published_shape() -> None:
    assert set(PRESETS) == set(PUBLISHED)
    for name, preset in PRESETS.items():
        with torch.device("meta"):
            model = build_preset_model(preset)
        millions = sum(p.numel() for p in model.parameters()) / 1e6
        published, width = PUBLISHED[name]
        assert abs(millions - published) / published < 0.04, (name, millions)
        assert preset.out_dim == width
        assert preset.source and preset.input_size in (224, 448)
        size = preset.input_size
        with torch.device("meta"):
            out = pooled_features(model, torch.zeros(1, 3, size, size), backend=preset.backend, pool=preset.pool)
        assert tuple(out.shape) == (1, width), name
    assert find_preset("mahmoodlab/uni2-h") is PRESETS["MahmoodLab/UNI2-h"]
    assert find_preset("uni") is None


def _small(name: str, tmp_path: Path, *, fmt: str = "bin") -> tuple[TowerEncoder, Path]:
    """A small member of the preset's family with random weights, and a file of them."""
    torch.manual_seed(0)
    encoder = build_image_encoder(ImageEncoderSection(name=name, small=True), image_size=0)
    assert isinstance(encoder, TowerEncoder)
    path = tmp_path / f"{name.replace('/', '_')}.{fmt}"
    state = encoder.model.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return encoder.eval(), path


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_loads_a_state_dict_saved_from_it(name: str, tmp_path: Path) -> None:
    original, path = _small(name, tmp_path, fmt="safetensors" if name.startswith("owkin") else "bin")
    preset = PRESETS[name]
    if preset.key_prefix:  # CONCH: the trunk's keys inside the whole model's file
        state = {preset.key_prefix + k: v for k, v in torch.load(path, weights_only=True).items()}
        state["text.token_embedding.weight"] = torch.zeros(3, 4)
        torch.save(state, path)
    torch.manual_seed(1)  # other random weights: only the file can make the outputs equal
    loaded = build_image_encoder(ImageEncoderSection(name=name, small=True, pretrained=str(path)), image_size=0)
    assert isinstance(loaded, TowerEncoder)
    assert loaded.identity["sha256"] and loaded.identity["name"] == name
    size = preset.input_size
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(images), original(images), atol=1e-5)


def test_a_uni_shaped_state_dict_loads_only_into_the_uni_preset(tmp_path: Path) -> None:
    _, uni = _small("MahmoodLab/UNI", tmp_path)
    for name in sorted(set(PRESETS) - {"MahmoodLab/UNI"}):
        with pytest.raises(CheckpointError, match=f"does not hold {name} weights"):
            build_image_encoder(ImageEncoderSection(name=name, small=True, pretrained=str(uni)), image_size=0)
    # The case: a UNI file in a plain ViT-L of timm without LayerScale names the keys ...
    plain = {"embed_dim": 48, "depth": 2, "num_heads": 2, "dynamic_img_size": True}
    with pytest.raises(CheckpointError, match=r"unexpected keys: .*ls1\.gamma"):
        build_image_encoder(
            ImageEncoderSection(name="timm:vit_large_patch16_224", timm_kwargs=plain, pretrained=str(uni)), image_size=0
        )
    # ... and init_values (now passed through to timm) makes it load.
    layerscale = {**plain, "init_values": 1e-5}
    ok = build_image_encoder(
        ImageEncoderSection(name="timm:vit_large_patch16_224", timm_kwargs=layerscale, pretrained=str(uni)),
        image_size=0,
    )
    assert isinstance(ok, TowerEncoder) and ok.identity["origin"] == "file"


def test_timm_kwargs_reach_timm() -> None:
    from timm.layers.mlp import GluMlp

    encoder = build_image_encoder(
        ImageEncoderSection(
            name="timm:vit_small_patch16_224",
            timm_kwargs={"depth": 1, "init_values": 1e-5, "mlp_layer": "SwiGLUPacked", "act_layer": "silu"},
        ),
        image_size=0,
    )
    assert isinstance(encoder, TowerEncoder)
    block: Any = encoder.model.blocks[0]  # type: ignore[index]
    assert isinstance(block.mlp, GluMlp) and isinstance(block.mlp.act, torch.nn.SiLU)
    assert "blocks.0.ls1.gamma" in encoder.model.state_dict()
    with pytest.raises(ConfigError, match=r"not a class of timm\.layers"):
        build_image_encoder(
            ImageEncoderSection(name="timm:vit_small_patch16_224", timm_kwargs={"mlp_layer": "Nope"}), image_size=0
        )


def test_weights_come_from_the_hub_when_it_is_reachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    original, path = _small("MahmoodLab/UNI", tmp_path)
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(path.read_bytes())
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with serve(tmp_path / "www") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        server.add_repo("MahmoodLab/UNI", HubRepo(folder=folder, cdn=False))
        loaded = build_image_encoder(
            ImageEncoderSection(name="MahmoodLab/UNI", small=True, pretrained="hub"), image_size=0
        )
        assert isinstance(loaded, TowerEncoder) and loaded.identity["origin"] == "hub:MahmoodLab/UNI"
        images = torch.rand(1, 3, 224, 224)
        with torch.no_grad():
            assert torch.allclose(loaded.eval()(images), original(images), atol=1e-5)
        # A gated repository without a token: the error says to accept the licence or give a file.
        server.add_repo("MahmoodLab/UNI2-h", HubRepo(folder=folder, token="secret", cdn=False))
        with pytest.raises(TrainingError, match=r"Accept the model's licence.*model\.image\.pretrained"):
            build_image_encoder(
                ImageEncoderSection(name="MahmoodLab/UNI2-h", small=True, pretrained="hub"), image_size=0
            )


def test_a_missing_weights_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="huggingface-cli download MahmoodLab/UNI"):
        build_image_encoder(ImageEncoderSection(name="MahmoodLab/UNI", pretrained=str(tmp_path)), image_size=0)
    with pytest.raises(ConfigError, match="neither 'hub' nor an existing weights file"):
        build_image_encoder(
            ImageEncoderSection(name="MahmoodLab/UNI", pretrained=str(tmp_path / "x.bin")), image_size=0
        )


def test_input_size_follows_the_model_or_fails_clearly() -> None:
    # The corpus-cpu config's 56 px for the small CNN, with a timm ViT of fixed 224 px input:
    cfg = load_config(
        "tiny-cpu",
        overrides=["model.gene.n_genes=64", "model.image.name=timm:vit_tiny_patch16_224", "model.image.image_size=56"],
    )
    with pytest.raises(ConfigError, match=r"built for 224 px input but model\.image\.image_size is 56"):
        build_model(cfg, image_size=48)
    # image_size 0 follows the model's pretrained config (not the 48 px tiles) ...
    resolved = encoder_defaults(cfg.model.image.model_copy(update={"image_size": 0}), tile=48)
    assert resolved.image_size == 224
    # ... and a preset's: CONCH's trunk takes 448 px, with OpenAI's normalisation.
    conch = encoder_defaults(ImageEncoderSection(name="MahmoodLab/CONCH"), tile=224)
    assert (conch.image_size, conch.mean) == (448, OPENAI_MEAN)
    with pytest.raises(ConfigError, match="multiples of its 16 px patches"):
        build_image_encoder(ImageEncoderSection(name="MahmoodLab/UNI", small=True, image_size=56), image_size=0)


def test_normalisation_follows_the_pretrained_config() -> None:
    cfg = load_config(
        "tiny-cpu",
        overrides=["model.gene.n_genes=64", "model.image.name=bioptimus/H-optimus-0", "model.image.small=true"],
    )
    image = encoder_defaults(cfg.model.image, tile=48)
    assert image.mean == HOPTIMUS_MEAN and image.image_size == 224
    model = build_model(cfg.model_copy(update={"model": cfg.model.model_copy(update={"image": image})}), image_size=48)
    assert torch.allclose(model.normalize.mean.flatten() / 255.0, torch.tensor(HOPTIMUS_MEAN))
    assert model.normalize.size == 224
    # built-ins keep ImageNet; a given mean/std wins
    assert encoder_defaults(ImageEncoderSection(), tile=48).mean == (0.485, 0.456, 0.406)
    given = ImageEncoderSection(name="MahmoodLab/UNI", mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    assert encoder_defaults(given, tile=224).mean == (0.5, 0.5, 0.5)
    with pytest.raises(ConfigError, match="unknown image encoder 'uni'"):
        load_config(None, overrides=["model.image.name=uni"])


def _transformers4_name(key: str, *, vit: bool) -> str:
    """The key a transformers 4.x ViT/Dinov2 wrote (Phikon's files are 4.x's) for a 5.x key."""
    key = re.sub(r"^layers\.", "encoder.layer.", key)
    for new, old in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        key = key.replace(f"attention.{new}", f"attention.attention.{old}")
    key = key.replace("attention.o_proj", "attention.output.dense")
    if vit:
        key = key.replace(".mlp.fc1.", ".intermediate.dense.").replace(".mlp.fc2.", ".output.dense.")
    return key


@pytest.mark.parametrize("name", ["owkin/phikon", "owkin/phikon-v2"])
def test_phikon_files_written_by_transformers_4_load(name: str, tmp_path: Path) -> None:
    original, _ = _small(name, tmp_path)
    vit = name == "owkin/phikon"
    state = {_transformers4_name(k, vit=vit): v for k, v in original.model.state_dict().items()}
    assert "encoder.layer.0.attention.attention.query.weight" in state
    if vit:  # the published ViTModel file carries its pooler, which the feature extractor drops
        state |= {"pooler.dense.weight": torch.zeros(48, 48), "pooler.dense.bias": torch.zeros(48)}
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    torch.manual_seed(3)
    loaded = build_image_encoder(ImageEncoderSection(name=name, small=True, pretrained=str(tmp_path)), image_size=0)
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(images), original(images), atol=1e-5)
    del state[next(k for k in state if "attention.attention.query.weight" in k)]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=f"does not hold {name} weights .*missing keys"):
        build_image_encoder(ImageEncoderSection(name=name, small=True, pretrained=str(path)), image_size=0)


@pytest.mark.parametrize("name", ["owkin/phikon", "owkin/phikon-v2", "paige-ai/Virchow2", "MahmoodLab/CONCH"])
def test_lora_adapts_attention_and_mlp_of_every_block(name: str) -> None:
    from stcorpus.training.config import LoraSection

    encoder = build_image_encoder(
        ImageEncoderSection(name=name, small=True, finetune="lora", lora=LoraSection(rank=2)), image_size=0
    )
    adapted = {n.split(".lora_")[0] for n, p in encoder.named_parameters() if p.requires_grad}
    per_block = {re.sub(r"\.\d+\.", ".N.", n) for n in adapted}
    assert len(adapted) == 2 * len(per_block) and len(per_block) in (4, 6)  # 2 blocks; qkv fused in timm
    assert all("patch_embed" not in n and "embeddings" not in n for n in adapted)
