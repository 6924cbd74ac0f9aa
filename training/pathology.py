"""Pathology foundation models as image encoders: named presets, weights, strict loading.

A preset is keyed by the model's Hugging Face Hub name (``MahmoodLab/UNI2-h``; the lower-case
name matches too) and holds what its pretrained config says: the architecture and its
arguments, the input size, the normalisation and how a tile's feature is read off the tokens.
``model.image.name: MahmoodLab/UNI2-h`` builds it; ``model.image.pretrained`` gives the weights:
``hub`` (downloaded from the Hub when it is reachable and the licence was accepted there) or a
local file (``.bin``/``.pth``/``.pt``/``.safetensors``, or a folder holding one). Whatever the
source, the model is built with random weights first and the file is loaded *strictly*: a
missing or unexpected key, or a tensor of another shape, is an error that names them, so a
UNI-shaped file never trains silently inside another architecture (or with its LayerScale
weights dropped).

This module imports torch only inside the functions that need it: the config validates preset
names against :data:`PRESETS` without loading torch.

Where each preset's numbers come from is cited beside it. The two reference loaders used
throughout are the model cards and Mahmood Lab's TRIDENT (``trident/patch_encoder_models/load.py``,
the loader HEST-Bench uses for local weights), which builds each model from a local file with
``strict=True``. ``small`` arguments shrink a preset to the same family at a size CPU tests can
run (same blocks, LayerScale, SwiGLU, register tokens; fewer and narrower layers).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from stcorpus.training.config import IMAGENET_MEAN, IMAGENET_STD
from stcorpus.training.errors import CheckpointError, ConfigError, MissingExtraError, TrainingError

if TYPE_CHECKING:
    from torch import Tensor, nn

logger = logging.getLogger("stcorpus.training")
#: CONCH's normalisation (conch/open_clip_custom/constants.py, set in factory.create_model).
OPENAI_MEAN: Final = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: Final = (0.26862954, 0.26130258, 0.27577711)
#: H-optimus-0/1's normalisation (bioptimus/H-optimus-0 config.json ``pretrained_cfg``).
HOPTIMUS_MEAN: Final = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD: Final = (0.211883, 0.230117, 0.177517)

#: LoRA targets by backend: attention (qkv / q,k,v and the output projection) and MLP, in
#: every transformer block (peft ``target_modules`` as a full-match regex).
TIMM_LORA_TARGETS: Final = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
#: transformers 5 names the blocks ``layers.<i>`` (ViT) / ``encoder.layer.<i>`` (Dinov2) with
#: ``attention.{q,k,v,o}_proj`` and ``mlp.fc1/fc2``; transformers 4 ``encoder.layer.<i>`` with
#: ``attention.attention.{query,key,value}``, ``attention.output.dense``, ``intermediate.dense``,
#: ``output.dense``. Both are matched.
HF_LORA_TARGETS: Final = (
    r".*(layers|encoder\.layer)\.\d+\.(attention\.(q_proj|k_proj|v_proj|o_proj)"
    r"|attention\.attention\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense"
    r"|mlp\.(fc1|fc2|weights_in|weights_out))"
)

Pool = Literal["model", "cls_mean", "cls"]


@dataclass(frozen=True)
class Preset:
    """One pathology foundation model: how to build it and read its features.

    ``kwargs`` are ``timm.create_model`` arguments (``backend: timm``) or the fields of a
    ``transformers`` config (``backend: transformers``, ``architecture`` its ``model_type``);
    layer classes are named by string (``mlp_layer: SwiGLUPacked``, ``act_layer: silu``).
    ``pool``: ``model`` (the model's own pooled output), ``cls_mean`` (class token joined with
    the mean of the patch tokens after the register tokens, as Virchow's card does), ``cls``
    (``last_hidden_state[:, 0]``, transformers models). ``key_prefix``: the weights file holds
    more than this tower and these keys are it (CONCH's ``visual.trunk.``); ``dropped_keys``:
    key prefixes the published file holds that the feature extractor does not use.
    """

    hub_id: str
    backend: Literal["timm", "transformers"]
    architecture: str
    kwargs: Mapping[str, Any]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    out_dim: int
    source: str
    pool: Pool = "model"
    weights_files: tuple[str, ...] = ("pytorch_model.bin", "model.safetensors")
    key_prefix: str = ""
    dropped_keys: tuple[str, ...] = ()
    small: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def lora_targets(self) -> str:
        """The default LoRA target regex of this preset's backend."""
        return TIMM_LORA_TARGETS if self.backend == "timm" else HF_LORA_TARGETS


_SMALL_VIT: Final = {"embed_dim": 48, "depth": 2, "num_heads": 2}

PRESETS: Final[dict[str, Preset]] = {
    p.hub_id: p
    for p in (
        # UNI: model card (huggingface.co/MahmoodLab/UNI) and TRIDENT UNIInferenceEncoder:
        # vit_large_patch16_224, img_size 224, patch 16, init_values 1e-5 (LayerScale),
        # dynamic_img_size; Resize(224) + ImageNet mean/std; the class token (1024).
        Preset(
            hub_id="MahmoodLab/UNI",
            backend="timm",
            architecture="vit_large_patch16_224",
            kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            out_dim=1024,
            source="huggingface.co/MahmoodLab/UNI model card; mahmoodlab/TRIDENT patch_encoder_models/load.py",
            small=_SMALL_VIT,
        ),
        # UNI2-h: model card timm_kwargs (huggingface.co/MahmoodLab/UNI2-h), the same in TRIDENT
        # UNIv2InferenceEncoder: ViT-H/14 with 8 register tokens, SwiGLU (packed), LayerScale.
        Preset(
            hub_id="MahmoodLab/UNI2-h",
            backend="timm",
            architecture="vit_giant_patch14_224",
            kwargs={
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "num_classes": 0,
                "no_embed_class": True,
                "mlp_layer": "SwiGLUPacked",
                "act_layer": "silu",
                "reg_tokens": 8,
                "dynamic_img_size": True,
            },
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            out_dim=1536,
            source="huggingface.co/MahmoodLab/UNI2-h model card; mahmoodlab/TRIDENT patch_encoder_models/load.py",
            small={"embed_dim": 48, "depth": 2, "num_heads": 2},
        ),
        # Virchow: paige-ai/Virchow config.json model_args (in TRIDENT VirchowInferenceEncoder):
        # vit_huge_patch14_224, mlp_ratio 5.3375 with SwiGLUPacked + SiLU (the card: "need to
        # specify MLP layer and activation function for proper init"), global_pool "" (tokens);
        # the embedding is the class token joined with the mean patch token (2 x 1280).
        Preset(
            hub_id="paige-ai/Virchow",
            backend="timm",
            architecture="vit_huge_patch14_224",
            kwargs={
                "img_size": 224,
                "init_values": 1e-5,
                "num_classes": 0,
                "mlp_ratio": 5.3375,
                "global_pool": "",
                "dynamic_img_size": True,
                "mlp_layer": "SwiGLUPacked",
                "act_layer": "silu",
            },
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            out_dim=2560,
            pool="cls_mean",
            source="huggingface.co/paige-ai/Virchow model card + config.json; mahmoodlab/TRIDENT load.py",
            small=_SMALL_VIT,
        ),
        # Virchow2: paige-ai/Virchow2 config.json model_args: as Virchow plus 4 register tokens;
        # the card's embedding: class token + mean of output[:, 5:] (2 x 1280).
        Preset(
            hub_id="paige-ai/Virchow2",
            backend="timm",
            architecture="vit_huge_patch14_224",
            kwargs={
                "img_size": 224,
                "init_values": 1e-5,
                "num_classes": 0,
                "reg_tokens": 4,
                "mlp_ratio": 5.3375,
                "global_pool": "",
                "dynamic_img_size": True,
                "mlp_layer": "SwiGLUPacked",
                "act_layer": "silu",
            },
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            out_dim=2560,
            pool="cls_mean",
            source="huggingface.co/paige-ai/Virchow2 model card + config.json; mahmoodlab/TRIDENT load.py",
            small=_SMALL_VIT,
        ),
        # H-optimus-0: bioptimus/H-optimus-0 config.json (architecture vit_giant_patch14_reg4_dinov2,
        # global_pool token, input 224, its own mean/std) and TRIDENT HOptimus0InferenceEncoder
        # (init_values 1e-5, dynamic_img_size False). TRIDENT pins timm 0.9.16 for it.
        Preset(
            hub_id="bioptimus/H-optimus-0",
            backend="timm",
            architecture="vit_giant_patch14_reg4_dinov2",
            kwargs={
                "num_classes": 0,
                "img_size": 224,
                "global_pool": "token",
                "init_values": 1e-5,
                "dynamic_img_size": False,
            },
            input_size=224,
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            out_dim=1536,
            source="huggingface.co/bioptimus/H-optimus-0 config.json; mahmoodlab/TRIDENT load.py",
            small=_SMALL_VIT,
            note="TRIDENT asserts timm==0.9.16 for the H-optimus models",
        ),
        # H-optimus-1: the same architecture and normalisation (TRIDENT HOptimus1InferenceEncoder).
        Preset(
            hub_id="bioptimus/H-optimus-1",
            backend="timm",
            architecture="vit_giant_patch14_reg4_dinov2",
            kwargs={
                "num_classes": 0,
                "img_size": 224,
                "global_pool": "token",
                "init_values": 1e-5,
                "dynamic_img_size": False,
            },
            input_size=224,
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            out_dim=1536,
            source="huggingface.co/bioptimus/H-optimus-1 model card; mahmoodlab/TRIDENT load.py",
            small=_SMALL_VIT,
            note="TRIDENT asserts timm==0.9.16 for the H-optimus models",
        ),
        # Prov-GigaPath tile encoder: prov-gigapath/prov-gigapath config.json model_args (in
        # TRIDENT GigaPathInferenceEncoder): vit_giant_patch14_dinov2 at patch 16, 40 blocks;
        # Resize(256, bicubic) + CenterCrop(224) + ImageNet mean/std.
        Preset(
            hub_id="prov-gigapath/prov-gigapath",
            backend="timm",
            architecture="vit_giant_patch14_dinov2",
            kwargs={
                "img_size": 224,
                "in_chans": 3,
                "patch_size": 16,
                "embed_dim": 1536,
                "depth": 40,
                "num_heads": 24,
                "mlp_ratio": 5.33334,
                "num_classes": 0,
            },
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            out_dim=1536,
            source="huggingface.co/prov-gigapath/prov-gigapath config.json; mahmoodlab/TRIDENT load.py",
            small=_SMALL_VIT,
            note="TRIDENT asserts timm==0.9.16 for Prov-GigaPath",
        ),
        # Phikon: owkin/phikon config.json (a transformers ViTModel: ViT-B/16, 224 px, layer_norm_eps
        # 1e-12); HEST-Bench/TRIDENT take last_hidden_state[:, 0] with ImageNet mean/std and load it
        # with add_pooling_layer=False (the pooler is not part of the feature extractor).
        Preset(
            hub_id="owkin/phikon",
            backend="transformers",
            architecture="vit",
            kwargs={
                "hidden_size": 768,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "intermediate_size": 3072,
                "hidden_act": "gelu",
                "image_size": 224,
                "patch_size": 16,
                "num_channels": 3,
                "qkv_bias": True,
                "layer_norm_eps": 1e-12,
                "encoder_stride": 16,
            },
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            out_dim=768,
            pool="cls",
            dropped_keys=("pooler.",),
            source="huggingface.co/owkin/phikon config.json; mahmoodlab/HEST inference_models.py; TRIDENT load.py",
            small={"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 96},
        ),
        # Phikon-v2: owkin/phikon-v2 (a transformers Dinov2Model, ViT-L/16, 1024-d, per the model
        # card); TRIDENT Phikonv2InferenceEncoder: last_hidden_state[:, 0], Resize(224) +
        # CenterCrop(224) + ImageNet mean/std. A local folder's own config.json is not read: the
        # preset is the architecture, and a file of another shape fails the strict load.
        Preset(
            hub_id="owkin/phikon-v2",
            backend="transformers",
            architecture="dinov2",
            kwargs={
                "hidden_size": 1024,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "mlp_ratio": 4,
                "image_size": 224,
                "patch_size": 16,
                "num_channels": 3,
                "qkv_bias": True,
                "layer_norm_eps": 1e-6,
                "use_swiglu_ffn": False,
            },
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            out_dim=1024,
            pool="cls",
            weights_files=("model.safetensors", "pytorch_model.bin"),
            source="huggingface.co/owkin/phikon-v2 model card; mahmoodlab/TRIDENT load.py",
            small={"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2},
        ),
        # CONCH's vision tower as timm builds it: conch/open_clip_custom/coca_model.py builds the
        # trunk as timm's VisionTransformer(embed_dim 768, depth 12, heads 12, mlp_ratio 4,
        # patch 16, img_size 448 (model_configs/conch_ViT-B-16.json), num_classes 0,
        # dynamic_img_size), i.e. vit_base_patch16_224 at 448 px; its weights are the
        # ``visual.trunk.`` keys of the CONCH checkpoint; OpenAI mean/std. CONCH's own image
        # embedding adds an attentional pooler that timm does not build: this preset's feature
        # is the trunk's class token.
        Preset(
            hub_id="MahmoodLab/CONCH",
            backend="timm",
            architecture="vit_base_patch16_224",
            kwargs={"img_size": 448, "num_classes": 0, "dynamic_img_size": True},
            input_size=448,
            mean=OPENAI_MEAN,
            std=OPENAI_STD,
            out_dim=768,
            weights_files=("pytorch_model.bin",),
            key_prefix="visual.trunk.",
            source="mahmoodlab/CONCH open_clip_custom (coca_model.py, model_configs/conch_ViT-B-16.json, factory.py)",
            small=_SMALL_VIT,
            note="the trunk only: CONCH's attentional pooler and projection are not part of it",
        ),
    )
}


def find_preset(name: str) -> Preset | None:
    """The preset of a Hub name (case-insensitive), or None."""
    lowered = name.lower()
    for hub_id, preset in PRESETS.items():
        if hub_id.lower() == lowered:
            return preset
    return None


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

#: timm keyword arguments that name a layer class, and where the class is looked up.
_LAYER_KWARGS: Final = ("mlp_layer", "norm_layer", "block_fn", "embed_layer")


def timm_kwargs(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``timm.create_model`` arguments from JSON values: layer classes given by name are resolved.

    ``mlp_layer``/``norm_layer``/``block_fn``/``embed_layer`` name a class of ``timm.layers``
    (``SwiGLUPacked``, ``Mlp``, ...); ``act_layer`` an activation (``silu``, ``gelu``).
    """
    import timm.layers
    from timm.layers.create_act import get_act_layer

    out = dict(raw)
    for key in _LAYER_KWARGS:
        if isinstance(out.get(key), str):
            layer = getattr(timm.layers, out[key], None)
            if layer is None:
                raise ConfigError(f"timm argument {key}={out[key]!r} is not a class of timm.layers (e.g. SwiGLUPacked)")
            out[key] = layer
    if isinstance(out.get("act_layer"), str):
        try:
            out["act_layer"] = get_act_layer(out["act_layer"])
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"timm argument act_layer={out['act_layer']!r} is not an activation timm knows") from exc
    return out


def build_preset_model(preset: Preset, *, small: bool = False, extra: Mapping[str, Any] | None = None) -> nn.Module:
    """The preset's architecture with random weights (``small``: the same family, test-sized)."""
    args = {**preset.kwargs, **(preset.small if small else {}), **(extra or {})}
    if preset.backend == "timm":
        import timm

        try:
            return timm.create_model(preset.architecture, pretrained=False, **timm_kwargs(args))
        except TypeError as exc:
            raise ConfigError(f"{preset.hub_id}: timm rejects the arguments {sorted(args)}: {exc}") from exc
    try:
        import transformers
    except ImportError as exc:
        raise MissingExtraError(
            f"{preset.hub_id} is a transformers model: pip install transformers (or 'stcorpus[timm]' plus transformers)"
        ) from exc
    if preset.architecture == "vit":
        return transformers.ViTModel(transformers.ViTConfig(**args), add_pooling_layer=False)
    if preset.architecture == "dinov2":
        return transformers.Dinov2Model(transformers.Dinov2Config(**args))
    raise ConfigError(f"{preset.hub_id}: no transformers architecture {preset.architecture!r} (vit, dinov2)")


def load_transformers_strict(
    preset: Preset, path: Path, *, small: bool = False, extra: Mapping[str, Any] | None = None
) -> nn.Module:
    """A transformers preset with the weights of ``path``, every key accounted for.

    Through ``from_pretrained`` (the preset's config, the file under its canonical name): it maps
    the key names of files written by other transformers versions (Phikon's were written by 4.x,
    whose ``attention.attention.query`` is 5.x's ``attention.q_proj``). Its loading report must
    be empty: a missing, unexpected (beyond ``preset.dropped_keys``) or mis-shaped key is a
    :class:`CheckpointError` naming them.
    """
    import tempfile

    import transformers

    args = {**preset.kwargs, **(preset.small if small else {}), **(extra or {})}
    name = "model.safetensors" if path.suffix == ".safetensors" else "pytorch_model.bin"
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / name).symlink_to(path.resolve())
        loaded: Any
        try:
            if preset.architecture == "vit":
                loaded = transformers.ViTModel.from_pretrained(
                    folder, config=transformers.ViTConfig(**args), add_pooling_layer=False, output_loading_info=True
                )
            else:
                loaded = transformers.Dinov2Model.from_pretrained(
                    folder, config=transformers.Dinov2Config(**args), output_loading_info=True
                )
        except (RuntimeError, ValueError, OSError) as exc:  # shape mismatches raise here
            raise CheckpointError(f"{path} does not hold {preset.hub_id} weights: {exc}") from exc
    model: nn.Module = loaded[0]
    info: dict[str, Any] = loaded[1]
    unexpected = [k for k in info.get("unexpected_keys", []) if not any(k.startswith(p) for p in preset.dropped_keys)]
    problems = []
    for label, keys in (
        ("missing keys", sorted(info.get("missing_keys", []))),
        ("unexpected keys", sorted(unexpected)),
        ("shape mismatches", sorted(str(k) for k in info.get("mismatched_keys", []))),
    ):
        if keys:
            problems.append(f"{label}: {_sample(list(keys))}")
    if problems:
        raise CheckpointError(
            f"{path} does not hold {preset.hub_id} weights ({'; '.join(problems)}). Give the weights file published "
            f"at huggingface.co/{preset.hub_id}, or the preset that matches this file"
        )
    return model


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsSource:
    """Where an encoder's weights came from: the file, and its sha256 (the base model's identity)."""

    path: Path
    sha256: str
    origin: str  # "hub:<repo>" or "file"

    def identity(self) -> dict[str, str]:
        """Plain strings for checkpoints."""
        return {"weights": str(self.path), "sha256": self.sha256, "origin": self.origin}


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


_WEIGHT_SUFFIXES: Final = (".safetensors", ".bin", ".pth", ".pt")


def resolve_weights(preset: Preset, pretrained: str) -> WeightsSource:
    """The weights file of ``pretrained``: ``hub`` (downloaded from the Hub) or a local file or folder."""
    if pretrained == "hub":
        return _from_hub(preset)
    path = Path(pretrained).expanduser()
    if path.is_dir():
        found = [path / name for name in preset.weights_files if (path / name).is_file()]
        if not found:
            raise ConfigError(
                f"model.image.pretrained={pretrained!r} is a folder without {' or '.join(preset.weights_files)}; "
                f"download {preset.hub_id}'s weights there (huggingface-cli download {preset.hub_id}) or give the file"
            )
        path = found[0]
    if not path.is_file():
        raise ConfigError(
            f"model.image.pretrained={pretrained!r} is neither 'hub' nor an existing weights file or folder; "
            f"download {preset.hub_id}'s weights where the Hub is reachable and give their path"
        )
    if path.suffix not in _WEIGHT_SUFFIXES:
        raise ConfigError(f"{path}: not a weights file ({', '.join(_WEIGHT_SUFFIXES)})")
    return WeightsSource(path=path, sha256=sha256_of(path), origin="file")


def _from_hub(preset: Preset) -> WeightsSource:
    import os

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    # The endpoint read now (huggingface_hub reads HF_ENDPOINT once, at its import).
    endpoint = os.environ.get("HF_ENDPOINT") or None
    missing: list[str] = []
    for name in preset.weights_files:
        try:
            path = Path(hf_hub_download(preset.hub_id, filename=name, endpoint=endpoint))
        except LocalEntryNotFoundError as exc:  # offline, and not in the local cache
            raise _unreachable(preset, exc) from exc
        except EntryNotFoundError:  # the repo publishes the other file format
            missing.append(name)
            continue
        except (OSError, ValueError) as exc:  # gated (licence not accepted), no token, HTTP errors
            raise _unreachable(preset, exc) from exc
        return WeightsSource(path=path, sha256=sha256_of(path), origin=f"hub:{preset.hub_id}")
    raise TrainingError(f"{preset.hub_id} on the Hub holds none of {', '.join(missing)}")


def _unreachable(preset: Preset, exc: Exception) -> TrainingError:
    return TrainingError(
        f"could not download {preset.hub_id}'s weights from the Hub: {exc}. Accept the model's licence on "
        f"huggingface.co/{preset.hub_id} and log in (huggingface-cli login), or download the weights where the "
        "Hub is reachable and set model.image.pretrained to the local file"
    )


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A weights file as a flat ``{key: tensor}`` (safetensors, or a torch file read with ``weights_only``)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable weights file ({exc})") from exc
    # A training checkpoint around the weights (CONCH's read_state_dict unwraps the same).
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path}: holds {type(loaded).__name__}, not a state dict of tensors")
    if loaded and all(k.startswith("module.") for k in loaded):  # saved from a DDP-wrapped model
        loaded = {k.removeprefix("module."): v for k, v in loaded.items()}
    return dict(loaded)


def _sample(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > n else shown


def load_strict(model: nn.Module, state: Mapping[str, Tensor], *, preset: Preset, where: str) -> None:
    """Load ``state`` into ``model``: every key, no other, every shape, or a :class:`CheckpointError` naming them.

    ``preset.key_prefix`` selects the tower's keys out of a larger file; ``preset.dropped_keys``
    are the published file's keys the feature extractor does not use (dropped, logged).
    """
    if preset.key_prefix:
        others = [k for k in state if not k.startswith(preset.key_prefix)]
        state = {k.removeprefix(preset.key_prefix): v for k, v in state.items() if k.startswith(preset.key_prefix)}
        if others:
            logger.info(
                "%s: %d keys outside %s (the other towers) are not part of the encoder",
                where,
                len(others),
                preset.key_prefix,
            )
    dropped = [k for k in state if any(k.startswith(p) for p in preset.dropped_keys)]
    if dropped:
        logger.info("%s: dropping %s (not part of %s's feature extractor)", where, _sample(dropped), preset.hub_id)
        state = {k: v for k, v in state.items() if k not in set(dropped)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing keys: {_sample(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_sample(unexpected)}")
        if shapes:
            problems.append(f"shape mismatches: {_sample(shapes, 4)}")
        raise CheckpointError(
            f"{where} does not hold {preset.hub_id} weights ({'; '.join(problems)}). Give the weights file published "
            f"at huggingface.co/{preset.hub_id}, or the preset that matches this file"
        )
    model.load_state_dict(dict(state), strict=True)


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


def pooled_features(model: nn.Module, images: Tensor, *, backend: str, pool: Pool) -> Tensor:
    """(B,3,S,S) normalised images -> (B, D) features, read off the model as its preset says."""
    import torch

    if backend == "transformers":
        hidden: Tensor = model(pixel_values=images).last_hidden_state
        return hidden[:, 0]
    out: Tensor = model(images)
    if pool == "cls_mean":
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        return torch.cat([out[:, 0], out[:, prefix:].mean(dim=1)], dim=-1)
    return out


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: timm ``blocks``, transformers ``layers`` (ViT) / ``encoder.layer`` (Dinov2)."""
    from torch import nn

    blocks = getattr(model, "blocks", None) or getattr(model, "layers", None)
    if blocks is None and hasattr(model, "encoder"):
        blocks = getattr(model.encoder, "layer", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ConfigError(
            f"{type(model).__name__} has no transformer blocks (blocks / encoder.layer) to train the last of; "
            "use model.image.finetune=frozen or full"
        )
    return nn.ModuleList(list(blocks))


def final_norms(model: nn.Module) -> list[nn.Module]:
    """The norms after the last block (timm ``norm``/``fc_norm``, transformers ``layernorm``)."""
    from torch import nn

    return [m for name in ("norm", "fc_norm", "layernorm") if isinstance(m := getattr(model, name, None), nn.Module)]
