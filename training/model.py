"""The image-gene model: encoders, projections to a shared space, temperature, position head.

``forward(batch)`` takes the tensors of a ``loaders/batch.py`` batch already on the device,
images still uint8: they are converted and normalised here, on the device (4x fewer bytes
through pinned memory than float images), with the image encoder's own normalisation.

Checkpoints keep what trained (:func:`trainable_state`): a frozen or LoRA-adapted tower's base
weights are left out and named instead (:func:`base_identity`: preset, file, sha256), and
:func:`restore_state` puts a checkpoint back onto a freshly loaded base, checking that it is
the same base. :func:`load_trained_model` does both from a checkpoint file alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stcorpus.loaders import batch as B
from stcorpus.training.config import IMAGENET_MEAN, IMAGENET_STD, GeneEncoderSection, ModelSection, TrainConfig
from stcorpus.training.encoders import Encoder, TowerEncoder, build_gene_encoder, build_image_encoder, projection_head
from stcorpus.training.errors import BatchContractError, CheckpointError


class ImageNormalize(nn.Module):
    """uint8 (B,3,H,W) -> float, scaled to [0,1], resized to the encoder's input, standardised per channel.

    ``size`` (0: none) is the encoder's input: tiles of another size are area-averaged down (or
    bilinearly scaled up) on the device, so 224 px corpus tiles can feed a small CPU model.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float], *, size: int = 0) -> None:
        super().__init__()
        # Non-persistent: constants of the config, not state; kept out of checkpoints and DDP broadcasts.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.size = size

    def forward(self, images: Tensor) -> Tensor:
        """Normalised float32 images of the encoder's input size."""
        if images.dtype != torch.uint8:
            raise BatchContractError(f"images must arrive as uint8 (B,3,H,W), got {images.dtype}")
        x = images.float()
        if self.size and tuple(x.shape[-2:]) != (self.size, self.size):
            down = x.shape[-1] > self.size or x.shape[-2] > self.size
            mode = "area" if down else "bilinear"
            x = F.interpolate(x, size=(self.size, self.size), mode=mode, **({} if down else {"align_corners": False}))
        return (x - self.mean) / self.std


class ImageGeneModel(nn.Module):
    """CLIP-style two-tower model over (tile, expression) pairs, with STAMP's multi-scale extras.

    Outputs of :meth:`forward` (a dict):

    - ``patch``, ``gene`` (and ``region``): L2-normalised embeddings (B, embed_dim)
    - ``patch_features``: the image encoder's features of the patch (what a linear probe uses)
    - ``pos_logits``: (B, 9) scores of the patch's cell in its region (with ``pos_head``)
    - ``gene_pred`` with ``gene_target``/``gene_target_mask`` (with ``gene_recon``): SEAL's
      reconstruction of the spot's expression from the patch features
    - ``logit_scale`` (and ``logit_bias`` for SigLIP): the loss's temperature terms
    """

    def __init__(
        self,
        cfg: ModelSection,
        *,
        image_size: int,
        init_logit_scale: float,
        init_logit_bias: float | None = None,
        use_region: bool = False,
        pos_head: bool = False,
        gene_recon: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder: Encoder = build_image_encoder(cfg.image, image_size=cfg.image.image_size or image_size)
        tower = self.image_encoder if isinstance(self.image_encoder, TowerEncoder) else None
        input_size = tower.input_size if tower is not None else cfg.image.image_size or image_size
        mean = cfg.image.mean or (tower.mean if tower is not None else IMAGENET_MEAN)
        std = cfg.image.std or (tower.std if tower is not None else IMAGENET_STD)
        self.normalize = ImageNormalize(mean, std, size=input_size)
        self.gene_encoder = build_gene_encoder(cfg.gene)
        image_dim = self.image_encoder.out_dim
        gene_dim = self.gene_encoder.out_dim
        self.image_proj = projection_head(image_dim, cfg.embed_dim, kind=cfg.proj)
        self.gene_proj = projection_head(gene_dim, cfg.embed_dim, kind=cfg.proj)
        # The temperature is learned as log(scale) (open_clip): positive, and well-conditioned.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(init_logit_bias)) if init_logit_bias is not None else None
        self.use_region = use_region or pos_head
        self.pos_head = nn.Linear(2 * image_dim, 9) if pos_head else None
        # SEAL's head: the spot's expression from its patch features (n_genes: the mlp's G).
        self.gene_head = nn.Linear(image_dim, cfg.gene.n_genes) if gene_recon else None
        self.gene_input = "expr" if cfg.gene.name == "mlp" else "tokens"

    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images -> (encoder features, normalised embedding)."""
        features = self.image_encoder(self.normalize(images))
        return features, F.normalize(self.image_proj(features), dim=-1)

    def encode_gene(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Gene inputs of a batch -> (encoder features, normalised embedding)."""
        if self.gene_input == "expr":
            features = self.gene_encoder(batch[B.EXPR], batch[B.EXPR_MASK], batch.get(B.NICHE))
        else:
            features = self.gene_encoder(batch[B.TOKENS], batch[B.TOKENS_MASK])
        return features, F.normalize(self.gene_proj(features), dim=-1)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Embeddings and loss inputs of a batch (see the class docstring)."""
        patch_features, patch = self.encode_image(batch[B.PATCH])
        _, gene = self.encode_gene(batch)
        out = {"patch": patch, "gene": gene, "patch_features": patch_features, "logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        if self.gene_head is not None:
            out["gene_pred"] = self.gene_head(patch_features)
            out["gene_target"] = batch[B.EXPR]
            out["gene_target_mask"] = batch[B.EXPR_MASK]
        if self.use_region:
            if B.REGION not in batch:
                raise BatchContractError("the loss needs the region view but the batch has no 'region'")
            region_features, region = self.encode_image(batch[B.REGION])
            out["region"] = region
            if self.pos_head is not None:
                out["pos_logits"] = self.pos_head(torch.cat([patch_features, region_features], dim=-1))
        return out

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float) -> None:
        """Clamp the learned scale to ``[0, log(max_scale)]`` in place (after each optimiser step)."""
        self.logit_scale.clamp_(0.0, math.log(max_scale))


def build_model(cfg: TrainConfig, *, image_size: int) -> ImageGeneModel:
    """The image-gene model a run config describes (``cfg.model.gene`` sizes resolved, see ``stcorpus.training.data``).

    ``model.gene.init`` starts the gene encoder from a checkpoint's (:func:`init_gene_encoder`).
    """
    loss = cfg.loss
    default_scale = 1.0 / 0.07 if loss.kind == "clip" else 10.0
    model = ImageGeneModel(
        cfg.model,
        image_size=image_size,
        init_logit_scale=loss.init_logit_scale or default_scale,
        init_logit_bias=loss.init_logit_bias if loss.kind == "siglip" else None,
        use_region=loss.uses_region(),
        pos_head=loss.pos > 0,
        gene_recon=loss.gene_recon > 0,
    )
    if cfg.model.gene.init:
        init_gene_encoder(model.gene_encoder, Path(cfg.model.gene.init), gene=cfg.model.gene)
    return model


def build_run_model(cfg: TrainConfig, *, image_size: int) -> nn.Module:
    """The model of the run's stage: ``align`` the :class:`ImageGeneModel` (:func:`build_model`),
    ``gene`` STAMP's stage-1 :class:`stcorpus.training.stamp.MaskedGeneModel`."""
    if cfg.run.stage == "align":
        return build_model(cfg, image_size=image_size)
    from stcorpus.training.stamp import MaskedGeneModel

    model = MaskedGeneModel(cfg.model.gene, mask_ratio=cfg.loss.mask_ratio)
    if cfg.model.gene.init:
        init_gene_encoder(model.gene_encoder, Path(cfg.model.gene.init), gene=cfg.model.gene)
    return model


# ---------------------------------------------------------------------------------------------
# What a checkpoint keeps, and putting it back
# ---------------------------------------------------------------------------------------------

#: Gene settings that may differ between a stage-1 checkpoint and the run it initialises.
_GENE_FREE: tuple[str, ...] = ("init", "dropout")


def frozen_state_keys(model: nn.Module) -> set[str]:
    """``state_dict`` keys of frozen base weights (of the image tower), left out of checkpoints."""
    encoder = getattr(model, "image_encoder", None)
    if not isinstance(encoder, TowerEncoder):
        return set()
    return {f"image_encoder.{key}" for key in encoder.frozen_keys()}


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` less the frozen base weights (:func:`frozen_state_keys`)."""
    skip = frozen_state_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def base_identity(model: nn.Module) -> dict[str, str]:
    """The image tower's base weights (name, file, sha256, origin); {} for built-in or random towers."""
    encoder = getattr(model, "image_encoder", None)
    return dict(encoder.identity) if isinstance(encoder, TowerEncoder) else {}


def restore_state(model: nn.Module, state: Mapping[str, Any], *, where: str | Path) -> None:
    """Load a checkpoint's ``model`` (and check its ``base``) into a model built from its config.

    The model's frozen base must be the checkpoint's (same sha256 of the weights file); every
    other key must be in the checkpoint, and nothing else.
    """
    saved_base = dict(state.get("base") or {})
    now_base = base_identity(model)
    if saved_base.get("sha256") != now_base.get("sha256") and frozen_state_keys(model):
        raise CheckpointError(
            f"{where} was trained on the base weights {saved_base.get('weights') or 'random init'} "
            f"(sha256 {saved_base.get('sha256', '-')}) but this model loads {now_base.get('weights') or 'random init'} "
            f"(sha256 {now_base.get('sha256', '-')}); set model.image.pretrained to the checkpoint's base"
        )
    frozen = frozen_state_keys(model)
    result = model.load_state_dict(dict(state["model"]), strict=False)
    missing = sorted(set(result.missing_keys) - frozen)
    unexpected = sorted(result.unexpected_keys)
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not fit this model: missing {missing[:8]} ({len(missing)}), unexpected "
            f"{unexpected[:8]} ({len(unexpected)}); load it with the config it was written with"
        )


def load_trained_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """A trained model from a checkpoint alone: built from its config, base weights loaded, state restored.

    The model is in eval mode on ``device``; the config is the checkpoint's resolved one.
    """
    from stcorpus.training.checkpoint import load_checkpoint
    from stcorpus.training.config import config_from_dict

    path = Path(path)
    state = load_checkpoint(path)
    cfg = config_from_dict(json.loads(state["config"]), where=str(path))
    gene = cfg.model.gene.model_copy(update={"init": None})  # the state holds the trained gene encoder
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"gene": gene})})
    model = build_run_model(cfg, image_size=cfg.model.image.image_size)
    restore_state(model, state, where=path)
    return model.to(device).eval(), cfg


def init_gene_encoder(encoder: nn.Module, path: Path, *, gene: GeneEncoderSection) -> None:
    """Load the gene encoder of a checkpoint (STAMP stage 1's) into ``encoder``; gene settings must match.

    ``path``: a checkpoint file, or a run folder (its latest checkpoint).
    """
    from stcorpus.training.checkpoint import latest_checkpoint, load_checkpoint

    if path.is_dir():  # a run folder: its latest checkpoint
        found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"model.gene.init={str(path)!r}: the folder holds no checkpoint (run stage 1 first)")
        path = found
    state = load_checkpoint(path)
    saved = json.loads(state["config"])["model"]["gene"]
    now = gene.model_dump(mode="json")
    differ = sorted(k for k in now if k not in _GENE_FREE and saved.get(k) != now[k])
    if differ:
        raise CheckpointError(
            f"model.gene.init={str(path)!r}: the checkpoint's gene encoder differs in "
            + ", ".join(f"{k} ({saved.get(k)!r} there, {now[k]!r} here)" for k in differ)
            + "; use the gene settings of the stage that wrote it"
        )
    prefix = "gene_encoder."
    weights = {k.removeprefix(prefix): v for k, v in state["model"].items() if k.startswith(prefix)}
    if not weights:
        raise CheckpointError(f"model.gene.init={str(path)!r}: the checkpoint holds no gene encoder")
    try:
        encoder.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"model.gene.init={str(path)!r}: {exc}") from exc
