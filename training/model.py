"""The image-gene model: encoders, projections to a shared space, temperature, position head.

``forward(batch)`` takes the tensors of a ``loaders/batch.py`` batch already on the device,
images still uint8: they are converted and normalised here, on the device (4x fewer bytes
through pinned memory than float images).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stcorpus.loaders import batch as B
from stcorpus.training.config import ModelSection, TrainConfig
from stcorpus.training.encoders import build_gene_encoder, build_image_encoder, projection_head
from stcorpus.training.errors import BatchContractError


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
    ) -> None:
        super().__init__()
        self.cfg = cfg
        input_size = cfg.image.image_size or image_size
        self.normalize = ImageNormalize(cfg.image.mean, cfg.image.std, size=input_size)
        self.image_encoder = build_image_encoder(cfg.image, image_size=input_size)
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
        self.gene_input = "expr" if cfg.gene.name == "mlp" else "tokens"

    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images -> (encoder features, normalised embedding)."""
        features = self.image_encoder(self.normalize(images))
        return features, F.normalize(self.image_proj(features), dim=-1)

    def encode_gene(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Gene inputs of a batch -> (encoder features, normalised embedding)."""
        if self.gene_input == "expr":
            features = self.gene_encoder(batch[B.EXPR], batch[B.EXPR_MASK])
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
    """The model a run config describes (``cfg.model.gene`` sizes resolved, see ``stcorpus.training.data``)."""
    loss = cfg.loss
    default_scale = 1.0 / 0.07 if loss.kind == "clip" else 10.0
    return ImageGeneModel(
        cfg.model,
        image_size=image_size,
        init_logit_scale=loss.init_logit_scale or default_scale,
        init_logit_bias=loss.init_logit_bias if loss.kind == "siglip" else None,
        use_region=loss.uses_region(),
        pos_head=loss.pos > 0,
    )
