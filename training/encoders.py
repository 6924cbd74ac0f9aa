"""Image and gene encoders. Each is an ``nn.Module`` with an ``out_dim`` attribute (feature width).

Image encoders take float images (B,3,H,W), already normalised; gene encoders take the
batch tensors of ``loaders/batch.py`` (``expr``/``expr_mask`` or ``tokens``/``tokens_mask``).
The built-in ones are small enough for CPU tests; ``timm:<name>`` brings any timm model and a
Hub name (``MahmoodLab/UNI2-h``, ...) a pathology foundation model preset
(``stcorpus.training.pathology``; ``pip install 'stcorpus[timm]'``), imported only when asked for.
What of the image tower trains (all, nothing, the last blocks, LoRA adapters) is set by
:func:`apply_finetune`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from stcorpus.training.config import IMAGENET_MEAN, IMAGENET_STD, GeneEncoderSection, ImageEncoderSection
from stcorpus.training.errors import BatchContractError, ConfigError, MissingExtraError, TrainingError


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


class TowerEncoder(Encoder):
    """A timm model or a pathology preset (timm or transformers) as a feature extractor.

    ``pool`` reads the tile's feature off the model (see :func:`stcorpus.training.pathology.pooled_features`);
    ``input_size``/``mean``/``std`` are its pretrained config's. ``finetune`` says what trains
    (:func:`apply_finetune`); ``frozen_keys()`` are the ``state_dict`` keys of the frozen base
    weights, which checkpoints leave out (they hold the base's identity instead, ``identity``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        out_dim: int,
        backend: str = "timm",
        pool: str = "model",
        input_size: int = 0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        identity: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.out_dim = out_dim
        self.backend = backend
        self.pool = pool
        self.input_size = input_size
        self.mean = mean
        self.std = std
        #: The base weights: ``{"name", "weights", "sha256", "origin"}`` ({} for random init).
        self.identity: dict[str, str] = dict(identity or {})
        self.finetune = "full"

    def forward(self, images: Tensor) -> Tensor:
        """(B,3,H,W) float -> (B, out_dim)."""
        from stcorpus.training.pathology import pooled_features

        return pooled_features(self.model, images, backend=self.backend, pool=self.pool)  # type: ignore[arg-type]

    def train(self, mode: bool = True) -> TowerEncoder:  # noqa: FBT001, FBT002 (nn.Module's signature)
        """A frozen tower stays in eval mode (no dropout, no norm statistics updates) while the rest trains."""
        super().train(mode)
        if self.finetune == "frozen":
            self.model.eval()
        return self

    def frozen_keys(self) -> list[str]:
        """``state_dict`` keys (relative to this encoder) of parameters that do not train; [] when all train."""
        if self.finetune == "full":
            return []
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return [k for k in self.state_dict() if k not in trainable]


def build_timm_encoder(
    name: str,
    *,
    pretrained: str | None,
    kwargs: Mapping[str, Any] | None = None,
    image_size: int = 0,
) -> TowerEncoder:
    """A timm model by name (``vit_small_patch16_224``, ``hf-hub:org/repo``) as an image encoder.

    ``pretrained``: None (random init), ``"hub"`` (timm's own pretrained weights, fetched from the
    Hugging Face Hub when reachable) or the path of a local weights file, loaded strictly.
    ``kwargs`` reach ``timm.create_model`` (layer classes by name, see
    :func:`stcorpus.training.pathology.timm_kwargs`). ``image_size`` (0: the model's pretrained
    input size) is checked against what the model accepts.
    """
    timm = _import_timm(f"timm:{name}")
    from stcorpus.training.pathology import Preset, load_strict, read_state_dict, resolve_weights, timm_kwargs

    args: dict[str, Any] = {"num_classes": 0, **timm_kwargs(kwargs or {})}
    identity: dict[str, str] = {"name": f"timm:{name}"}
    if pretrained == "hub":
        args["pretrained"] = True
        identity.update(weights=f"timm:{name}", origin="timm-hub")
    try:
        model = timm.create_model(name, **args)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ConfigError(f"timm has no model {name!r} (see timm.list_models())") from exc
        raise
    except OSError as exc:  # huggingface_hub's offline / not-found errors are OSErrors
        raise TrainingError(
            f"could not fetch pretrained weights of timm model {name!r}: {exc}. Download them where the Hub is "
            "reachable and set model.image.pretrained to the local file"
        ) from exc
    except TypeError as exc:
        raise ConfigError(f"timm model {name!r} rejects model.image.timm_kwargs {sorted(kwargs or {})}: {exc}") from exc
    if pretrained is not None and pretrained != "hub":
        # A local file goes through the presets' strict loader: every key, no other.
        stand_in = Preset(
            hub_id=f"timm:{name}",
            backend="timm",
            architecture=name,
            kwargs={},
            input_size=0,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            out_dim=0,
            source="timm",
        )
        source = resolve_weights(stand_in, pretrained)
        load_strict(model, read_state_dict(source.path), preset=stand_in, where=str(source.path))
        identity.update(source.identity())
    out_dim = int(getattr(model, "num_features", 0))
    if out_dim <= 0:
        raise TrainingError(f"timm model {name!r} does not report num_features; it cannot be used as an encoder")
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    mean, std = _triple(cfg.get("mean"), IMAGENET_MEAN), _triple(cfg.get("std"), IMAGENET_STD)
    size = image_size or _pretrained_input_size(cfg)
    _check_input_size(model, size, what=f"timm:{name}")
    return TowerEncoder(
        model, name=f"timm:{name}", out_dim=out_dim, input_size=size, mean=mean, std=std, identity=identity
    )


def build_preset_encoder(cfg: ImageEncoderSection, *, image_size: int = 0) -> TowerEncoder:
    """A pathology preset (``cfg.name``) with its weights (``cfg.pretrained``), loaded strictly."""
    from stcorpus.training.pathology import (
        build_preset_model,
        find_preset,
        load_strict,
        load_transformers_strict,
        read_state_dict,
        resolve_weights,
    )

    preset = find_preset(cfg.name)
    if preset is None:  # the config validator refuses other names; a guard all the same
        raise ConfigError(f"no pathology preset {cfg.name!r}")
    if preset.backend == "timm":
        _import_timm(cfg.name)
    elif cfg.timm_kwargs:
        raise ConfigError(f"{preset.hub_id} is a transformers model: model.image.timm_kwargs does not apply")
    # The weights first: a missing file fails before a billion parameters are initialised.
    source = resolve_weights(preset, cfg.pretrained) if cfg.pretrained is not None else None
    identity = {"name": preset.hub_id}
    if source is not None and preset.backend == "transformers":
        model = load_transformers_strict(preset, source.path, small=cfg.small)
    else:
        model = build_preset_model(preset, small=cfg.small, extra=cfg.timm_kwargs)
        if source is not None:
            load_strict(model, read_state_dict(source.path), preset=preset, where=str(source.path))
    if source is not None:
        identity.update(source.identity())
    size = image_size or preset.input_size
    if preset.backend == "timm":
        _check_input_size(model, size, what=preset.hub_id)
    out_dim = preset.out_dim
    if cfg.small or cfg.timm_kwargs:
        width = int(getattr(model, "num_features", 0) or getattr(getattr(model, "config", None), "hidden_size", 0))
        out_dim = 2 * width if preset.pool == "cls_mean" else width
    return TowerEncoder(
        model,
        name=preset.hub_id,
        out_dim=out_dim,
        backend=preset.backend,
        pool=preset.pool,
        input_size=size,
        mean=preset.mean,
        std=preset.std,
        identity=identity,
    )


def _import_timm(name: str) -> Any:
    try:
        import timm
    except ImportError as exc:
        raise MissingExtraError(
            f"model.image.name={name!r} needs timm, which is not installed: pip install 'stcorpus[timm]' "
            "(or use model.image.name=small-cnn / small-vit)"
        ) from exc
    return timm


def _triple(value: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return (float(value[0]), float(value[1]), float(value[2]))
    return default


def _pretrained_input_size(cfg: Mapping[str, Any]) -> int:
    size = cfg.get("input_size")
    return int(size[-1]) if isinstance(size, (list, tuple)) and size else 0


def _check_input_size(model: nn.Module, size: int, *, what: str) -> None:
    """Refuse an input size the model cannot take, before the first batch trips timm's bare assertion."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or not size:
        return
    built = getattr(embed, "img_size", None)
    patch = getattr(embed, "patch_size", None)
    dynamic = bool(getattr(model, "dynamic_img_size", False))
    if dynamic and patch is not None and size % int(patch[0]) and not getattr(embed, "dynamic_img_pad", False):
        raise ConfigError(
            f"{what} takes images in multiples of its {patch[0]} px patches, but model.image.image_size is {size}; "
            f"set model.image.image_size to a multiple of {patch[0]} (or 0: its pretrained size)"
        )
    if not dynamic and getattr(embed, "strict_img_size", False) and built is not None and tuple(built) != (size, size):
        raise ConfigError(
            f"{what} was built for {built[0]} px input but model.image.image_size is {size}; set "
            f"model.image.image_size=0 (its pretrained size, {built[0]}) or {built[0]}, or rebuild it for {size} px "
            f"with model.image.timm_kwargs.img_size={size} (or dynamic_img_size: true)"
        )


def build_image_encoder(cfg: ImageEncoderSection, *, image_size: int) -> Encoder:
    """The image encoder the config names, with what of it trains set (``image_size``: its input size)."""
    encoder: Encoder
    if cfg.name == "small-cnn":
        encoder = SmallCNN(width=cfg.width, depth=cfg.depth)
    elif cfg.name == "small-vit":
        encoder = SmallViT(
            image_size=cfg.image_size or image_size,
            patch_size=cfg.patch_size,
            width=cfg.width,
            depth=cfg.depth,
            heads=cfg.heads,
        )
    elif cfg.name.startswith("timm:"):
        encoder = build_timm_encoder(
            cfg.name.removeprefix("timm:"), pretrained=cfg.pretrained, kwargs=cfg.timm_kwargs, image_size=cfg.image_size
        )
    else:
        encoder = build_preset_encoder(cfg, image_size=cfg.image_size)
    apply_finetune(encoder, cfg)
    return encoder


def encoder_defaults(cfg: ImageEncoderSection, *, tile: int) -> ImageEncoderSection:
    """``cfg`` with its input size and normalisation resolved (what a run records in its config).

    Size 0 becomes the preset's / timm model's pretrained input size (the tile size for the
    built-in encoders and for timm models that declare none); mean/std None become the preset's
    or timm model's pretrained config (ImageNet for the built-ins).
    """
    from stcorpus.training.pathology import find_preset

    size, mean, std = tile, IMAGENET_MEAN, IMAGENET_STD
    preset = find_preset(cfg.name) if not cfg.is_builtin() and not cfg.name.startswith("timm:") else None
    if preset is not None:
        size, mean, std = preset.input_size, preset.mean, preset.std
    elif cfg.name.startswith("timm:"):
        timm = _import_timm(cfg.name)
        try:
            pretrained_cfg = timm.models.get_pretrained_cfg(cfg.name.removeprefix("timm:"))
        except (RuntimeError, ValueError):
            pretrained_cfg = None
        found = pretrained_cfg.to_dict() if pretrained_cfg is not None else {}
        size = _pretrained_input_size(found) or tile
        mean, std = _triple(found.get("mean"), IMAGENET_MEAN), _triple(found.get("std"), IMAGENET_STD)
    return cfg.model_copy(
        update={
            "image_size": cfg.image_size or size,
            "mean": cfg.mean if cfg.mean is not None else mean,
            "std": cfg.std if cfg.std is not None else std,
        }
    )


# ---------------------------------------------------------------------------------------------
# What of the image tower trains
# ---------------------------------------------------------------------------------------------


def apply_finetune(encoder: Encoder, cfg: ImageEncoderSection) -> None:
    """Set ``requires_grad`` of the tower per ``cfg.finetune``; LoRA adapters are added here (peft).

    ``frozen``: no parameter trains; ``last_blocks``: the last ``cfg.train_blocks`` transformer
    blocks and the final norm; ``lora``: only the adapters (rank ``cfg.lora.rank``) on
    attention and MLP of every block.
    """
    if cfg.finetune == "full":
        return
    for param in encoder.parameters():
        param.requires_grad = False
    if isinstance(encoder, TowerEncoder):
        encoder.finetune = cfg.finetune
    if cfg.finetune == "frozen":
        encoder.train(encoder.training)
        return
    if not isinstance(encoder, TowerEncoder):
        raise ConfigError(f"finetune {cfg.finetune} needs a timm or preset tower, not {cfg.name!r}")
    if cfg.finetune == "last_blocks":
        from stcorpus.training.pathology import final_norms, transformer_blocks

        blocks = transformer_blocks(encoder.model)
        if cfg.train_blocks > len(blocks):
            raise ConfigError(f"model.image.train_blocks={cfg.train_blocks} but {cfg.name} has {len(blocks)} blocks")
        for module in [*list(blocks)[-cfg.train_blocks :], *final_norms(encoder.model)]:
            for param in module.parameters():
                param.requires_grad = True
        return
    add_lora(encoder, cfg)


def _lora_targets(encoder: TowerEncoder, cfg: ImageEncoderSection) -> str:
    from stcorpus.training.pathology import HF_LORA_TARGETS, TIMM_LORA_TARGETS

    if cfg.lora.targets:
        return cfg.lora.targets
    return HF_LORA_TARGETS if encoder.backend == "transformers" else TIMM_LORA_TARGETS


def add_lora(encoder: TowerEncoder, cfg: ImageEncoderSection) -> None:
    """Add LoRA adapters (``peft``) to ``encoder.model`` in place; only they train (B starts at zero)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise MissingExtraError("model.image.finetune=lora needs peft: pip install peft") from exc
    targets = _lora_targets(encoder, cfg)
    config = LoraConfig(
        r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets
    )
    try:
        inject_adapter_in_model(config, encoder.model)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise ConfigError(f"model.image.lora.targets {targets!r} matches no module of {cfg.name}: {exc}") from exc
    adapted = 0
    for name, param in encoder.model.named_parameters():
        is_adapter = "lora_" in name
        param.requires_grad = is_adapter
        adapted += is_adapter
    if not adapted:
        raise ConfigError(f"model.image.lora.targets {targets!r} put no adapter on {cfg.name}")
    encoder.finetune = "lora"


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRA adapter of ``module`` into its base weights and drop the adapters, in place.

    The result has the base model's own ``state_dict`` keys (a merged UNI loads into the UNI
    preset strictly) and computes what the adapted model did.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge(safe_merge=True)
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, layer.get_base_layer())
    return module


# ---------------------------------------------------------------------------------------------
# Gene encoders
# ---------------------------------------------------------------------------------------------


class GeneMLP(Encoder):
    """An MLP over the transformed expression and the measured mask (and the spot's niche).

    The input is ``[expr * mask, mask]`` (2G values): an unmeasured gene is not a zero, and the
    encoder sees which is which. With ``niche`` (STAMP's spatially aware encoder) the summed
    neighbour expression on the same genes follows (``[..., niche * mask]``, 3G values).
    """

    def __init__(
        self, *, n_genes: int, hidden: int = 256, depth: int = 2, dropout: float = 0.0, niche: bool = False
    ) -> None:
        super().__init__()
        width = (3 if niche else 2) * n_genes
        layers: list[nn.Module] = [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout)]
        layers.append(nn.LayerNorm(hidden))
        self.net = nn.Sequential(*layers)
        self.n_genes = n_genes
        self.niche = niche
        self.out_dim = hidden

    def forward(self, expr: Tensor, expr_mask: Tensor, niche: Tensor | None = None) -> Tensor:
        """(B,G) float + (B,G) bool (+ (B,G) float niche) -> (B, hidden)."""
        if expr.shape[-1] != self.n_genes:
            raise TrainingError(
                f"the gene MLP was built for {self.n_genes} genes but the batch has {expr.shape[-1]}; "
                "set model.gene.n_genes to the loader's gene count (or 0 to take it from the data)"
            )
        mask = expr_mask.to(expr.dtype)
        parts = [expr * mask, mask]
        if self.niche:
            if niche is None:
                raise BatchContractError(
                    "the gene MLP reads the niche (model.gene.niche) but the batch has none; "
                    "set data.loader.genes.niche=true"
                )
            parts.append(niche * mask)
        out: Tensor = self.net(torch.cat(parts, dim=-1))
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
        return GeneMLP(n_genes=cfg.n_genes, hidden=cfg.hidden, depth=cfg.depth, dropout=cfg.dropout, niche=cfg.niche)
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
