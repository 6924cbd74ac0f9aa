"""Image and gene encoders. Each is an ``nn.Module`` with an ``out_dim`` attribute (feature width).

Image encoders take float images (B,3,H,W), already normalised; gene encoders take the
batch tensors of ``loaders/batch.py`` (``expr``/``expr_mask`` or ``tokens``/``tokens_mask``).
The built-in ones are small enough for CPU tests; ``timm:<name>`` brings any timm model
(``pip install 'stcorpus[timm]'``), imported only when asked for.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from stcorpus.training.config import GeneEncoderSection, ImageEncoderSection
from stcorpus.training.errors import ConfigError, MissingExtraError, TrainingError


class Encoder(nn.Module):
    """Base of the encoders: an ``nn.Module`` that reports its feature width as ``out_dim``."""

    out_dim: int


# ---------------------------------------------------------------------------------------------
# Image encoders
# ---------------------------------------------------------------------------------------------


class SmallCNN(Encoder):
    """A strided conv stack with GroupNorm (no BatchNorm: no running statistics to sync or resume).

    ``depth`` stride-2 3x3 convolutions widening to ``width``, then global average pooling.
    """

    def __init__(self, *, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i in range(depth):
            out = width if i == depth - 1 else min(width, 16 * 2**i)
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(min(8, out), out), nn.GELU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, images: Tensor) -> Tensor:
        """(B,3,H,W) float -> (B, width)."""
        out: Tensor = self.features(images).mean(dim=(2, 3))
        return out


class SmallViT(Encoder):
    """A small pre-norm ViT: patch embedding, class token, learned position embedding."""

    def __init__(
        self, *, image_size: int, patch_size: int = 8, width: int = 64, depth: int = 4, heads: int = 4
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(
                f"small-vit: image size {image_size} is not a multiple of patch_size {patch_size}; "
                "set model.image.patch_size to a divisor of the tile size"
            )
        self.image_size = image_size
        n_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out_dim = width

    def forward(self, images: Tensor) -> Tensor:
        """(B,3,S,S) float -> (B, width), the class token."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise TrainingError(
                f"small-vit was built for {self.image_size}px images but got {tuple(images.shape[-2:])}; "
                "set model.image.image_size to the tile size"
            )
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        out: Tensor = self.norm(self.blocks(x)[:, 0])
        return out


class TimmEncoder(Encoder):
    """Any timm model as a feature extractor (``num_classes=0``: pooled features, no classifier)."""

    def __init__(self, model: nn.Module, *, out_dim: int) -> None:
        super().__init__()
        self.model = model
        self.out_dim = out_dim

    def forward(self, images: Tensor) -> Tensor:
        """(B,3,H,W) float -> (B, num_features)."""
        out: Tensor = self.model(images)
        return out


def build_timm_encoder(name: str, *, pretrained: str | None) -> TimmEncoder:
    """A timm model by name (``vit_small_patch16_224``, ``hf-hub:org/repo``) as an image encoder.

    ``pretrained``: None (random init), ``"hub"`` (timm's own pretrained weights, fetched from the
    Hugging Face Hub when reachable) or the path of a local weights file.
    """
    try:
        import timm
    except ImportError as exc:
        raise MissingExtraError(
            f"model.image.name='timm:{name}' needs timm, which is not installed: pip install 'stcorpus[timm]' "
            "(or use model.image.name=small-cnn / small-vit)"
        ) from exc
    kwargs: dict[str, object] = {"num_classes": 0}
    if pretrained == "hub":
        kwargs["pretrained"] = True
    elif pretrained is not None:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"model.image.pretrained={pretrained!r} is neither 'hub' nor an existing weights file; "
                "download the weights (e.g. with huggingface-cli download) and give their path"
            )
        kwargs["pretrained"] = True
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        model = timm.create_model(name, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ConfigError(f"timm has no model {name!r} (see timm.list_models())") from exc
        raise
    except OSError as exc:  # huggingface_hub's offline / not-found errors are OSErrors
        raise TrainingError(
            f"could not fetch pretrained weights of timm model {name!r}: {exc}. Download them where the Hub is "
            "reachable and set model.image.pretrained to the local file"
        ) from exc
    out_dim = int(getattr(model, "num_features", 0))
    if out_dim <= 0:
        raise TrainingError(f"timm model {name!r} does not report num_features; it cannot be used as an encoder")
    return TimmEncoder(model, out_dim=out_dim)


def build_image_encoder(cfg: ImageEncoderSection, *, image_size: int) -> Encoder:
    """The image encoder the config names (``image_size``: the tile size, for encoders that need it)."""
    if cfg.name == "small-cnn":
        return SmallCNN(width=cfg.width, depth=cfg.depth)
    if cfg.name == "small-vit":
        return SmallViT(
            image_size=cfg.image_size or image_size,
            patch_size=cfg.patch_size,
            width=cfg.width,
            depth=cfg.depth,
            heads=cfg.heads,
        )
    return build_timm_encoder(cfg.name.removeprefix("timm:"), pretrained=cfg.pretrained)


# ---------------------------------------------------------------------------------------------
# Gene encoders
# ---------------------------------------------------------------------------------------------


class GeneMLP(Encoder):
    """An MLP over the transformed expression and the measured mask.

    The input is ``[expr * mask, mask]`` (2G values): an unmeasured gene is not a zero, and the
    encoder sees which is which.
    """

    def __init__(self, *, n_genes: int, hidden: int = 256, depth: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(2 * n_genes, hidden), nn.GELU(), nn.Dropout(dropout)]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout)]
        layers.append(nn.LayerNorm(hidden))
        self.net = nn.Sequential(*layers)
        self.n_genes = n_genes
        self.out_dim = hidden

    def forward(self, expr: Tensor, expr_mask: Tensor) -> Tensor:
        """(B,G) float + (B,G) bool -> (B, hidden)."""
        if expr.shape[-1] != self.n_genes:
            raise TrainingError(
                f"the gene MLP was built for {self.n_genes} genes but the batch has {expr.shape[-1]}; "
                "set model.gene.n_genes to the loader's gene count (or 0 to take it from the data)"
            )
        mask = expr_mask.to(expr.dtype)
        out: Tensor = self.net(torch.cat([expr * mask, mask], dim=-1))
        return out


class GeneTransformer(Encoder):
    """A small transformer over rank tokens (gene ids by descending expression), Geneformer style.

    Token embedding + rank (position) embedding, a class token, padding masked out; the class
    token's final state is the feature.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        max_tokens: int,
        hidden: int = 256,
        depth: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.max_tokens = max_tokens
        self.token_embed = nn.Embedding(vocab_size, hidden)
        self.rank_embed = nn.Parameter(torch.randn(1, max_tokens, hidden) * 0.02)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        layer = nn.TransformerEncoderLayer(
            hidden,
            heads,
            dim_feedforward=4 * hidden,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.out_dim = hidden

    def forward(self, tokens: Tensor, tokens_mask: Tensor) -> Tensor:
        """(B,L) int64 + (B,L) bool -> (B, hidden)."""
        length = tokens.shape[1]
        if length > self.max_tokens:
            raise TrainingError(
                f"the gene transformer holds {self.max_tokens} tokens but the batch has {length}; "
                "raise model.gene.max_tokens (or set it to 0 to take it from the data)"
            )
        ids = tokens.masked_fill(~tokens_mask, 0)
        x = self.token_embed(ids) + self.rank_embed[:, :length]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        padding = torch.cat([torch.zeros_like(tokens_mask[:, :1]), ~tokens_mask], dim=1)
        out: Tensor = self.norm(self.blocks(x, src_key_padding_mask=padding)[:, 0])
        return out


def build_gene_encoder(cfg: GeneEncoderSection) -> Encoder:
    """The gene encoder the config names; ``cfg.n_genes`` (and ``max_tokens``) must be resolved (> 0)."""
    if cfg.n_genes <= 0:
        raise ConfigError("model.gene.n_genes is not set; set it to the loader's gene count / vocabulary size")
    if cfg.name == "mlp":
        return GeneMLP(n_genes=cfg.n_genes, hidden=cfg.hidden, depth=cfg.depth, dropout=cfg.dropout)
    if cfg.max_tokens <= 0:
        raise ConfigError("model.gene.max_tokens is not set; set it to the loader's token length")
    return GeneTransformer(
        vocab_size=cfg.n_genes,
        max_tokens=cfg.max_tokens,
        hidden=cfg.hidden,
        depth=cfg.depth,
        heads=cfg.heads,
        dropout=cfg.dropout,
    )


def projection_head(in_dim: int, out_dim: int, *, kind: str = "linear") -> nn.Module:
    """A projection to the shared embedding space: one linear layer, or Linear-GELU-Linear."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))
