"""The run config: one typed model with defaults; YAML files and ``--set`` overrides only fill it.

A config file is YAML with the sections of :class:`TrainConfig`::

    run:   {out_dir: runs/tiny, seed: 0, log_every: 10, ckpt_every: 100}
    data:  {source: synthetic, batch_size: 32, views: [patch]}
    model: {embed_dim: 64, image: {name: small-cnn}, gene: {name: mlp}}
    loss:  {kind: clip, patch_spot: 1.0}
    optim: {lr: 1.0e-3, warmup_steps: 10, max_steps: 200}
    eval:  {every: 100, pool_size: 256}

Overrides are dotted keys, ``optim.lr=1e-4 model.image.name=small-vit``; the value is read as
YAML (``[patch, region]`` is a list, ``1e-4`` a number, ``null`` is None). An unknown key, in a
file or an override, is an error that names the key and lists the valid ones.

>>> cfg = load_config(None, overrides=["optim.lr=1e-4", "model.image.name=small-vit"])
>>> cfg.optim.lr, cfg.model.image.name
(0.0001, 'small-vit')
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from stcorpus.settings import SettingsModel, format_validation_error, load_yaml
from stcorpus.training.errors import ConfigError

#: Built-in config files (``--config tiny-cpu`` finds ``training/configs/tiny-cpu.yaml``).
CONFIG_DIR: Final = Path(__file__).parent / "configs"

IMAGENET_MEAN: Final = (0.485, 0.456, 0.406)
IMAGENET_STD: Final = (0.229, 0.224, 0.225)

View = Literal["patch", "region"]


class _Section(SettingsModel):
    """A section of the run config: strict types, unknown keys refused (``stcorpus.settings``)."""


class RunSection(_Section):
    """Where the run writes, how often, and on what."""

    out_dir: str = "runs/default"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: ``auto``: bf16 autocast on CUDA, fp32 on CPU. ``fp16`` adds a gradient scaler.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    log_every: int = Field(default=10, ge=1)
    #: Checkpoint every this many optimiser steps (0: only at the end).
    ckpt_every: int = Field(default=500, ge=0)
    keep_last: int = Field(default=3, ge=1)
    #: ``torch.use_deterministic_algorithms(True)`` (and the cuBLAS workspace setting it needs).
    deterministic: bool = False
    #: Intra-op threads (None: torch's default).
    threads: int | None = Field(default=None, ge=1)
    #: Write every batch's sample keys to ``keys-rank<r>.jsonl`` (to audit sharding; costs I/O).
    log_keys: bool = False
    #: ``align``: image-gene alignment (CLIP/SigLIP, STAMP's multi-scale terms, SEAL's head);
    #: ``gene``: STAMP stage 1, the gene encoder alone by masked-expression modelling (no images).
    stage: Literal["align", "gene"] = "align"


class SyntheticSection(_Section):
    """The in-memory synthetic source: a learnable image <-> expression structure, see ``stcorpus.training.data``."""

    n_slides: int = Field(default=8, ge=2)
    spots_per_slide: int = Field(default=64, ge=1)
    #: Slides held out for validation (the rest are the training split).
    val_slides: int = Field(default=2, ge=1)
    n_genes: int = Field(default=128, ge=2)
    latent_dim: int = Field(default=8, ge=2)
    image_size: int = Field(default=48, ge=12)
    max_tokens: int = Field(default=32, ge=1)
    #: Fraction of genes each slide measures (the rest are masked, as with gene panels).
    measured_fraction: float = Field(default=0.9, gt=0.0, le=1.0)
    #: Pixel noise (fraction of the 0..255 range) on top of the latent-driven colour and texture.
    noise: float = Field(default=0.05, ge=0.0)
    #: Keep the training bank on the training device (no host gather, no host-to-device copy):
    #: the upper bound of throughput comparisons. Off: batches are gathered on the host and
    #: copied, as a loader's would be.
    on_device: bool = False

    @model_validator(mode="after")
    def _check_split(self) -> SyntheticSection:
        if self.val_slides >= self.n_slides:
            raise ValueError(f"val_slides ({self.val_slides}) must be smaller than n_slides ({self.n_slides})")
        return self


#: Loader settings that training decides itself, and the config key that sets each instead.
LOADER_OWNED: Final = {
    "split": "data.train_split / data.val_split",
    "batch_size": "data.batch_size",
    "seed": "data.seed",
    "shuffle": "nothing: training shuffles, evaluation pools keep the shard order",
    "drop_last": "nothing: training drops a short last batch, evaluation pools keep it",
    "views": "data.views",
}
#: Gene transforms of the loader that each gene encoder can read.
GENE_TRANSFORMS: Final = {"mlp": ("log1p", "cp10k_log1p", "counts"), "transformer": ("rank",)}


class DataSection(_Section):
    """Where batches come from. Batches follow ``loaders/batch.py`` whatever the source.

    ``loader`` holds ``loaders.LoaderSettings`` for ``source: corpus``, as in
    ``LoaderSettings.from_dict`` (``format``, ``shuffle_window``, ``on_bad_sample``, ``filters``,
    ``genes`` (``transform``, ``to_human``, ``panel``, ``genes``, ``context_length``, ...),
    ``augment``, ``http``), checked when the config is read. The keys of :data:`LOADER_OWNED`
    come from this section instead. ``genes.transform`` defaults to what the gene encoder
    reads: ``log1p`` for ``mlp``, ``rank`` for ``transformer``. Evaluation pools use the same
    settings except augmentation and ``filters.slide_ids`` (an allow-list of *training*
    slides; the probe's training slides are ``eval.probe_train_slides``).
    """

    source: Literal["synthetic", "corpus"] = "synthetic"
    #: Per process and micro-step; the contrastive batch is ``batch_size x world_size``.
    batch_size: int = Field(default=64, ge=2)
    #: Tile views to read; [] reads expression only (``run.stage: gene``).
    views: tuple[View, ...] = ("patch",)
    #: Seed of the data order (shuffles are a function of ``(seed, epoch)``).
    seed: int = 0
    #: Corpus folder, ``http(s)://`` URL or ``hf://`` repository (``source: corpus``).
    corpus: str | None = None
    train_split: str = "train"
    val_split: str = "validation"
    #: DataLoader worker processes of the training stream (evaluation pools are read in the
    #: main process, so that their content never depends on the number of workers).
    num_workers: int = Field(default=2, ge=0)
    #: Batches each worker keeps ready (None: torch's default of 2).
    prefetch_factor: int | None = Field(default=None, ge=1)
    loader: dict[str, Any] = Field(default_factory=dict)
    synthetic: SyntheticSection = SyntheticSection()

    @field_validator("loader")
    @classmethod
    def _check_loader(cls, loader: dict[str, Any]) -> dict[str, Any]:
        # an error here is located at data.loader: the loader's own message names the key below it
        owned = sorted(set(loader) & set(LOADER_OWNED))
        if owned:
            where = "; ".join(f"{key}: {LOADER_OWNED[key]}" for key in owned)
            raise ValueError(f"must not set {', '.join(owned)} (set by training; {where})")
        if loader:
            from stcorpus.loaders.settings import LoaderSettings

            settings = LoaderSettings.from_dict(loader)  # a LoaderSettingsError is a ValueError
            if settings.genes.transform == "none":
                raise ValueError("genes.transform 'none' leaves the gene encoder without input")
        return loader

    @model_validator(mode="after")
    def _check(self) -> DataSection:
        if self.views and "patch" not in self.views:
            raise ValueError("views must include 'patch' (the spot's own tile), or be [] (run.stage gene)")
        if len(set(self.views)) != len(self.views):
            raise ValueError(f"views has duplicates: {self.views}")
        if self.source == "corpus" and not self.corpus:
            raise ValueError("source 'corpus' needs data.corpus (a corpus folder, URL or hf:// repository)")
        for split in (self.train_split, self.val_split):
            if split not in ("train", "validation", "test"):
                raise ValueError(f"split {split!r} is not one of train, validation, test")
        if self.source == "corpus" and self.train_split == self.val_split:
            raise ValueError(
                f"train_split and val_split are both {self.train_split!r}: evaluation must use held-out slides"
            )
        return self

    def loader_genes(self) -> dict[str, Any]:
        """The ``genes`` mapping of ``loader`` (empty when not given)."""
        genes = self.loader.get("genes", {})
        return dict(genes) if isinstance(genes, Mapping) else {}


class LoraSection(_Section):
    """LoRA adapters on the image tower (``model.image.finetune: lora``), through the ``peft`` library."""

    rank: int = Field(default=8, ge=1)
    #: Scale numerator: the adapter's update is scaled by alpha / rank (peft's lora_alpha).
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    #: Modules to adapt, a full-match regex over module names (None: attention qkv/proj and the
    #: MLP of every block, for the tower's backend; see ``stcorpus.training.pathology``).
    targets: str | None = None


class ImageEncoderSection(_Section):
    """Image encoder: ``small-cnn``, ``small-vit``, ``timm:<model name>`` or a pathology preset by Hub name.

    Presets (``MahmoodLab/UNI``, ``MahmoodLab/UNI2-h``, ``paige-ai/Virchow``, ``paige-ai/Virchow2``,
    ``bioptimus/H-optimus-0``, ``bioptimus/H-optimus-1``, ``prov-gigapath/prov-gigapath``,
    ``owkin/phikon``, ``owkin/phikon-v2``, ``MahmoodLab/CONCH``) bring their architecture, input
    size and normalisation (``stcorpus.training.pathology``). timm and presets need the timm extra.
    """

    name: str = "small-cnn"
    #: Feature width of the built-in encoders (timm models bring their own).
    width: int = Field(default=64, ge=8)
    depth: int = Field(default=4, ge=1)
    #: small-vit only.
    patch_size: int = Field(default=8, ge=2)
    heads: int = Field(default=4, ge=1)
    #: The encoder's input size (0: the preset's or timm model's pretrained input size; the
    #: data's tile size for the built-in encoders). Tiles of another size are resized on the
    #: device (area averaging down, bilinear up): e.g. 224 px tiles into a 56 px CPU model.
    image_size: int = Field(default=0, ge=0)
    #: timm and presets: ``hub`` (the weights on the Hugging Face Hub, downloaded when
    #: reachable), a local weights file (.safetensors / .bin / .pth) or folder, or None for
    #: random initialisation. Preset weights are loaded strictly (every key, no other).
    pretrained: str | None = None
    #: Extra ``timm.create_model`` arguments (``init_values``, ``mlp_layer: SwiGLUPacked``,
    #: ``act_layer: silu``, ``dynamic_img_size``, ``img_size``, ...), over a preset's own.
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    #: Presets only: the same model family at a test size (smoke runs, CI; weights of that shape only).
    small: bool = False
    #: Per-channel normalisation (None: the preset's / the timm model's pretrained config; ImageNet
    #: for the built-in encoders).
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    #: What of the tower trains: ``full``; ``frozen`` (nothing; kept in eval mode); ``last_blocks``
    #: (the last ``train_blocks`` transformer blocks and the final norm); ``lora`` (adapters only,
    #: SEAL-style). Projection heads, the gene side and the temperature always train.
    finetune: Literal["full", "frozen", "last_blocks", "lora"] = "full"
    train_blocks: int = Field(default=0, ge=0)
    lora: LoraSection = LoraSection()

    def is_builtin(self) -> bool:
        """True for the small built-in encoders."""
        return self.name in ("small-cnn", "small-vit")

    def is_preset(self) -> bool:
        """True when ``name`` is a pathology preset."""
        from stcorpus.training.pathology import find_preset

        return find_preset(self.name) is not None

    @model_validator(mode="after")
    def _check(self) -> ImageEncoderSection:
        builtin = ("small-cnn", "small-vit")
        timm_name = self.name.startswith("timm:") and len(self.name) > len("timm:")
        preset = not self.is_builtin() and not timm_name and self.is_preset()
        if not (self.is_builtin() or timm_name or preset):
            from stcorpus.training.pathology import PRESETS

            raise ValueError(
                f"unknown image encoder {self.name!r}; use one of {builtin}, 'timm:<model name>' or a pathology "
                f"preset: {', '.join(PRESETS)}"
            )
        if self.is_builtin() and (self.pretrained is not None or self.timm_kwargs):
            raise ValueError(f"pretrained weights and timm_kwargs are for timm encoders and presets, not {self.name!r}")
        if self.small and not preset:
            raise ValueError("model.image.small is for the pathology presets only")
        if self.name == "small-vit" and self.width % self.heads:
            raise ValueError(f"small-vit width ({self.width}) must be divisible by heads ({self.heads})")
        if (self.mean is None) != (self.std is None):
            raise ValueError("set model.image.mean and model.image.std together (or neither: the model's own)")
        if self.finetune == "last_blocks" and self.train_blocks < 1:
            raise ValueError("finetune last_blocks needs model.image.train_blocks >= 1")
        if self.finetune != "last_blocks" and self.train_blocks:
            raise ValueError("model.image.train_blocks is for finetune: last_blocks")
        if self.finetune in ("last_blocks", "lora") and self.is_builtin():
            raise ValueError(f"finetune {self.finetune} is for timm encoders and presets, not {self.name!r}")
        return self


class GeneEncoderSection(_Section):
    """Gene encoder: ``mlp`` over ``expr``/``expr_mask``, or ``transformer`` over ``tokens``/``tokens_mask``."""

    name: Literal["mlp", "transformer"] = "mlp"
    #: mlp: length G of ``expr``; transformer: vocabulary size. 0: from the data source.
    n_genes: int = Field(default=0, ge=0)
    hidden: int = Field(default=256, ge=8)
    depth: int = Field(default=2, ge=1)
    heads: int = Field(default=4, ge=1)
    #: transformer: longest token sequence (size of the rank embedding). 0: from the data source.
    max_tokens: int = Field(default=0, ge=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    #: mlp: read the spot's niche too (the loader's ``niche``, summed neighbour expression, with
    #: ``data.loader.genes.niche: true``): STAMP's spatially aware gene encoder.
    niche: bool = False
    #: Start from the gene encoder of a checkpoint (STAMP stage 1's, ``run.stage: gene``); its gene
    #: settings must equal these.
    init: str | None = None

    @model_validator(mode="after")
    def _check(self) -> GeneEncoderSection:
        if self.name == "transformer" and self.hidden % self.heads:
            raise ValueError(f"transformer hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.niche and self.name != "mlp":
            raise ValueError("model.gene.niche is for the mlp gene encoder (dense niche expression)")
        return self


class ModelSection(_Section):
    """Encoders, projection heads to a shared dimension, and the position head."""

    embed_dim: int = Field(default=128, ge=2)
    #: Projection heads: one linear layer, or a two-layer MLP.
    proj: Literal["linear", "mlp"] = "linear"
    image: ImageEncoderSection = ImageEncoderSection()
    gene: GeneEncoderSection = GeneEncoderSection()


class LossSection(_Section):
    """Loss kind and the weights of STAMP's terms (a zero weight switches a term off)."""

    kind: Literal["clip", "siglip"] = "clip"
    #: Initial logit scale (None: 1/0.07 for clip, 10 for siglip) and its upper clamp.
    init_logit_scale: float | None = Field(default=None, gt=0.0)
    max_logit_scale: float = Field(default=100.0, gt=0.0)
    #: siglip: initial logit bias.
    init_logit_bias: float = -10.0
    #: Each rank's rows against the global batch (True) or every rank the whole matrix (False).
    local_loss: bool = True
    #: Gathered features carry gradients back to the rank that made them.
    gather_with_grad: bool = True
    patch_spot: float = Field(default=1.0, ge=0.0)
    region_spot: float = Field(default=0.0, ge=0.0)
    patch_region: float = Field(default=0.0, ge=0.0)
    pos: float = Field(default=0.0, ge=0.0)
    #: SEAL's gene-reconstruction head: predict the spot's (transformed) expression from the
    #: patch features, masked MSE over the measured genes, beside the contrastive terms.
    gene_recon: float = Field(default=0.0, ge=0.0)
    #: run.stage gene (STAMP stage 1): the fraction of each spot's measured genes hidden from the
    #: gene encoder and reconstructed (masked-expression modelling).
    mask_ratio: float = Field(default=0.3, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> LossSection:
        if not any(w > 0 for w in (self.patch_spot, self.region_spot, self.patch_region, self.pos, self.gene_recon)):
            raise ValueError("every loss weight is zero; set at least one of patch_spot, region_spot, ...")
        if self.init_logit_scale is not None and self.init_logit_scale > self.max_logit_scale:
            raise ValueError(f"init_logit_scale {self.init_logit_scale} exceeds max_logit_scale {self.max_logit_scale}")
        return self

    def uses_region(self) -> bool:
        """True when a term needs the region view."""
        return any(w > 0 for w in (self.region_spot, self.patch_region, self.pos))


class OptimSection(_Section):
    """AdamW, warm-up + cosine schedule, accumulation and clipping."""

    lr: float = Field(default=5e-4, gt=0.0)
    min_lr: float = Field(default=1e-5, ge=0.0)
    warmup_steps: int = Field(default=100, ge=0)
    max_steps: int = Field(default=1000, ge=1)
    weight_decay: float = Field(default=0.1, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(default=1e-6, gt=0.0)
    #: Clip the global gradient norm to this (0: no clipping).
    grad_clip: float = Field(default=1.0, ge=0.0)
    accum_steps: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> OptimSection:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) is larger than lr ({self.lr})")
        return self


class EvalSection(_Section):
    """Periodic evaluation on the validation split."""

    #: Evaluate every this many optimiser steps (0: only at the end).
    every: int = Field(default=500, ge=0)
    #: Held-out spots in the retrieval pool (chance recall@k is k / pool size).
    pool_size: int = Field(default=1000, ge=2)
    recall_ks: tuple[int, ...] = (1, 5, 10)
    probe: bool = True
    #: Training-split spots the probe is fitted on (the first ones in shard order).
    probe_train_size: int = Field(default=2000, ge=4)
    #: Corpus source: the training-split slides the probe is fitted on (empty: every one).
    probe_train_slides: tuple[str, ...] = ()
    probe_genes: int = Field(default=50, ge=1)
    probe_alphas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
    #: Fraction of the training slides held out to choose the ridge alpha.
    probe_alpha_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> EvalSection:
        if not self.recall_ks or any(k < 1 for k in self.recall_ks):
            raise ValueError(f"recall_ks must be positive integers, got {self.recall_ks}")
        if not self.probe_alphas or any(a <= 0 for a in self.probe_alphas):
            raise ValueError(f"probe_alphas must be positive, got {self.probe_alphas}")
        return self


class TrainConfig(_Section):
    """A whole run. Stored, resolved, in the run folder and in every checkpoint."""

    run: RunSection = RunSection()
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    loss: LossSection = LossSection()
    optim: OptimSection = OptimSection()
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.run.stage == "align" and not self.data.views:
            raise ValueError("data.views is empty: image-gene alignment needs [patch] (or run.stage=gene)")
        if self.run.stage == "gene" and self.model.gene.name != "mlp":
            raise ValueError(
                "run.stage gene (masked-expression modelling) needs model.gene.name=mlp (dense expression)"
            )
        if self.loss.gene_recon > 0 and self.model.gene.name != "mlp":
            raise ValueError("loss.gene_recon reconstructs dense expression: it needs model.gene.name=mlp")
        niche = bool(self.data.loader_genes().get("niche"))
        if self.model.gene.niche and self.data.source == "corpus" and not niche:
            raise ValueError("model.gene.niche reads the loader's niche: set data.loader.genes.niche=true")
        if self.model.gene.niche and self.data.source == "synthetic":
            raise ValueError("model.gene.niche needs a corpus (the synthetic source has no niche expression)")
        if self.loss.uses_region() and "region" not in self.data.views:
            raise ValueError(
                "loss terms region_spot / patch_region / pos need the region view: "
                "add it with data.views=[patch,region]"
            )
        genes = self.data.loader_genes()
        encoder = self.model.gene.name
        transform = genes.get("transform")
        if transform is not None and transform not in GENE_TRANSFORMS[encoder]:
            raise ValueError(
                f"data.loader.genes.transform={transform!r} does not feed the {encoder} gene encoder; "
                f"use one of {GENE_TRANSFORMS[encoder]}"
            )
        length = genes.get("context_length")
        tokens = self.model.gene.max_tokens
        if encoder == "transformer" and length is not None and tokens and length > tokens:
            raise ValueError(
                f"data.loader.genes.context_length ({length}) is above model.gene.max_tokens ({tokens}); "
                "set one of them only (the other follows)"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what checkpoints and ``config.yaml`` store)."""
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        """The config as one JSON string (stored in checkpoints: loadable with ``weights_only=True``)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_yaml(self) -> str:
        """The config as YAML that :func:`load_config` reads back to an equal config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or the name of a built-in config (``tiny-cpu`` -> ``training/configs/tiny-cpu.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    builtin = CONFIG_DIR / f"{name}.yaml"
    if builtin.is_file():
        return builtin
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {str(name)!r} is neither a file nor a built-in config (built-in: {', '.join(known)})")


def load_config(
    path: str | Path | None,
    *,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Read a config file (or start from the defaults), apply ``key=value`` overrides, validate.

    ``base`` is a dict merged under the file (used to resume from a checkpoint's config).
    """
    raw: dict[str, Any] = _deep_copy(base) if base is not None else {}
    where = "defaults"
    if path is not None:
        file = resolve_config_path(path)
        where = str(file)
        loaded = load_yaml(file.read_text(encoding="utf-8"), source=str(file), error=ConfigError)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{file}: a config is a mapping of sections (run, data, model, ...), not {type(loaded).__name__}"
            )
        _merge(raw, loaded)
    for item in overrides:
        apply_override(raw, item)
    if overrides:
        where = f"{where} + --set overrides"
    return config_from_dict(raw, where=where)


def config_from_dict(raw: Mapping[str, Any], *, where: str = "config") -> TrainConfig:
    """Validate a nested dict into a :class:`TrainConfig`; errors name every bad key."""
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=where, raw=raw, model=TrainConfig)) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override to a nested dict in place (the value is parsed as YAML)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=1e-4)")
    value = load_yaml(text, source=f"override {item!r}", error=ConfigError) if text.strip() else ""
    parts = key.split(".")
    node: dict[str, Any] = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            done = ".".join(parts[: depth + 1])
            raise ConfigError(
                f"override {item!r}: {done!r} is a value, not a section; it has no key {parts[depth + 1]!r}"
            )
        node = child
    node[parts[-1]] = value


def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = _deep_copy(value) if isinstance(value, Mapping) else value


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
