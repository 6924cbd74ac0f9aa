"""Data sources of a run: batches in the ``loaders/batch.py`` format, with resumable state.

``data.source: synthetic``
    :class:`SyntheticSource`, an in-memory torch ``IterableDataset`` over a
    :class:`SyntheticBank`. Each spot has a latent vector; its expression is a fixed random
    log-linear function of the latent (Poisson counts, log1p) and its tiles' colour and texture
    are another, so the contrastive loss can really fall and retrieval can beat chance. The
    order is a function of ``(seed, epoch)``, ranks take disjoint slices, and ``state_dict()``
    (epoch, position) resumes at the very next batch. Batches are gathered from tensors held in
    memory, which makes it the "in-memory synthetic tensors" baseline of throughput runs.

``data.source: corpus``
    :func:`corpus_dataloader`, the one integration point with the torch corpus loader
    (``loaders``): :class:`CorpusSource` wraps a ``CorpusLoader`` for this rank (epochs, the
    loader's checkpoint state), :class:`CorpusPool` gives fixed-order evaluation passes (the
    validation pool; the probe's training spots), and :func:`corpus_sizes` reads G, the token
    vocabulary and the tile size from the corpus's metadata.

A source is anything with ``__iter__`` (one epoch of batches from the current position),
``state_dict()`` and ``load_state_dict()`` (:class:`BatchSource`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from stcorpus import schema
from stcorpus.loaders import batch as B
from stcorpus.schema import sample_key
from stcorpus.training.config import SyntheticSection, TrainConfig
from stcorpus.training.encoders import encoder_defaults
from stcorpus.training.errors import BatchContractError, CheckpointError, ConfigError, DataSourceUnavailableError

if TYPE_CHECKING:
    from stcorpus.loaders import CorpusDataset, CorpusLoader, LoaderSettings

Batch = dict[str, Any]

#: Token id of the first gene (0 is padding), as in ``loaders/batch.py``.
TOKEN_OFFSET: Final = 1
#: Entries of evaluation batches that carry the probe's log1p targets when ``expr`` is another
#: transform (or absent, with rank tokens).
PROBE_EXPR: Final = "probe_expr"
PROBE_EXPR_MASK: Final = "probe_expr_mask"


class BatchSource(Protocol):
    """What the training loop needs from a data source."""

    def __iter__(self) -> Iterator[Batch]:
        """Batches of the current epoch, from the current position; the next call starts the next epoch."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Plain containers of ints/strings/tensors (it goes into a ``weights_only`` checkpoint)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where the source that wrote ``state`` stopped."""
        ...


# ---------------------------------------------------------------------------------------------
# Synthetic source
# ---------------------------------------------------------------------------------------------


def _generator(*parts: int | str) -> torch.Generator:
    """A torch generator seeded from ``parts`` (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


@dataclass(frozen=True)
class SyntheticBank:
    """Every sample of one synthetic split, as tensors in memory (one row per spot)."""

    keys: list[str]
    slide_ids: list[str]
    patch: Tensor
    region: Tensor | None
    pos: Tensor
    expr: Tensor
    expr_mask: Tensor
    tokens: Tensor
    tokens_mask: Tensor
    #: The ground-truth latent of each spot (for tests and sanity checks; not in batches).
    latent: Tensor

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, index: Tensor) -> Batch:
        """The samples at ``index`` as a batch of ``loaders/batch.py``."""
        rows = index.tolist()
        index = index.to(self.patch.device)
        out: Batch = {
            B.KEY: [self.keys[i] for i in rows],
            B.SLIDE_ID: [self.slide_ids[i] for i in rows],
            B.PATCH: self.patch[index],
            B.POS: self.pos[index],
            B.EXPR: self.expr[index],
            B.EXPR_MASK: self.expr_mask[index],
            B.TOKENS: self.tokens[index],
            B.TOKENS_MASK: self.tokens_mask[index],
        }
        if self.region is not None:
            out[B.REGION] = self.region[index]
        return out

    def to(self, device: torch.device) -> SyntheticBank:
        """The same bank with its tensors on ``device`` (batches are then gathered there)."""
        moved = {
            name: getattr(self, name).to(device)
            for name in ("patch", "pos", "expr", "expr_mask", "tokens", "tokens_mask", "latent")
        }
        region = self.region.to(device) if self.region is not None else None
        return SyntheticBank(keys=self.keys, slide_ids=self.slide_ids, region=region, **moved)


@dataclass(frozen=True)
class _World:
    """The fixed random maps from a spot's latent to its expression and its look."""

    gene_weights: Tensor  # (G, d)
    gene_bias: Tensor  # (G,)
    colour: Tensor  # (3, d)
    frequency: Tensor  # (d,)
    angle: Tensor  # (d,)


def _make_world(cfg: SyntheticSection, seed: int) -> _World:
    gen = _generator(seed, "world")
    d = cfg.latent_dim
    return _World(
        gene_weights=torch.randn(cfg.n_genes, d, generator=gen) / math.sqrt(d),
        gene_bias=torch.randn(cfg.n_genes, generator=gen) * 0.75 + 0.25,
        colour=torch.randn(3, d, generator=gen) / math.sqrt(d) * 1.5,
        frequency=torch.randn(d, generator=gen) / math.sqrt(d) * 1.5,
        angle=torch.randn(d, generator=gen) / math.sqrt(d) * 1.5,
    )


def _render(latent: Tensor, world: _World, *, size: int, noise: float, gen: torch.Generator) -> Tensor:
    """(n,d) latents -> (n,3,size,size) float images in [0,1]: colour and a grating from the latent."""
    n = latent.shape[0]
    colour = torch.sigmoid(latent @ world.colour.T)  # (n,3)
    cycles = 1.5 + 4.0 * torch.sigmoid(latent @ world.frequency)  # per tile
    theta = math.pi * torch.sigmoid(latent @ world.angle)
    phase = torch.rand(n, generator=gen) * 2 * math.pi  # a nuisance the encoder must ignore
    axis = torch.linspace(0.0, 1.0, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    along = xx[None] * torch.cos(theta)[:, None, None] + yy[None] * torch.sin(theta)[:, None, None]
    wave = torch.sin(2 * math.pi * cycles[:, None, None] * along + phase[:, None, None])
    image = 0.15 + 0.7 * colour[:, :, None, None] + 0.15 * wave[:, None] * (1.0 - colour[:, :, None, None])
    if noise > 0:
        image = image + noise * torch.randn(n, 3, size, size, generator=gen)
    return image.clamp(0.0, 1.0)


def _to_uint8(image: Tensor) -> Tensor:
    return (image * 255.0).round().to(torch.uint8)


def _rank_tokens(expr: Tensor, mask: Tensor, *, length: int) -> tuple[Tensor, Tensor]:
    """Gene ids (``column + 1``, as the loader's) by descending expression, padded with 0 / False.

    Only measured, non-zero genes become tokens; the vocabulary of the ids is ``G + 1``.
    """
    score = torch.where(mask & (expr > 0), expr, torch.full_like(expr, -1.0))
    ordered, order = torch.sort(score, dim=1, descending=True, stable=True)
    tokens = order[:, :length].to(torch.int64) + TOKEN_OFFSET
    tokens_mask = ordered[:, :length] > 0
    return tokens.masked_fill(~tokens_mask, 0), tokens_mask


def make_synthetic_bank(
    cfg: SyntheticSection, *, split: str, seed: int = 0, views: Sequence[str] = ("patch",), chunk: int = 256
) -> SyntheticBank:
    """Generate one split (``train``: the first ``n_slides - val_slides`` slides; ``val``: the rest).

    Everything is a function of ``(seed, slide)``: the same slide has the same spots whatever
    the split sizes, and the latent -> data maps are shared by both splits.
    """
    if split not in ("train", "val"):
        raise ConfigError(f"synthetic split must be 'train' or 'val', got {split!r}")
    n_train = cfg.n_slides - cfg.val_slides
    slides = range(n_train) if split == "train" else range(n_train, cfg.n_slides)
    world = _make_world(cfg, seed)
    size = cfg.image_size
    keys: list[str] = []
    slide_ids: list[str] = []
    patches, regions, positions, exprs, masks, latents = [], [], [], [], [], []
    for slide in slides:
        gen = _generator(seed, "slide", slide)
        slide_id = f"synth-{slide:04d}"
        n = cfg.spots_per_slide
        shift = 0.5 * torch.randn(cfg.latent_dim, generator=gen)
        latent = shift + torch.randn(n, cfg.latent_dim, generator=gen)
        measured = torch.rand(cfg.n_genes, generator=gen) < cfg.measured_fraction
        measured[torch.randint(cfg.n_genes, (1,), generator=gen)] = True  # at least one gene per slide
        rate = torch.exp(latent @ world.gene_weights.T + world.gene_bias)
        counts = torch.poisson(rate, generator=gen)
        expr = torch.log1p(counts) * measured
        pos = torch.randint(9, (n,), generator=gen)
        for start in range(0, n, chunk):
            z = latent[start : start + chunk]
            patch = _render(z, world, size=size, noise=cfg.noise, gen=gen)
            patches.append(_to_uint8(patch))
            if "region" in views:
                regions.append(_to_uint8(_region(z, patch, pos[start : start + chunk], world, cfg=cfg, gen=gen)))
        keys += [sample_key(slide_id, f"{spot:06d}-1") for spot in range(n)]
        slide_ids += [slide_id] * n
        latents.append(latent)
        exprs.append(expr.float())
        masks.append(measured.expand(n, -1).clone())
        positions.append(pos)
    expr_all = torch.cat(exprs)
    mask_all = torch.cat(masks)
    tokens, tokens_mask = _rank_tokens(expr_all, mask_all, length=cfg.max_tokens)
    return SyntheticBank(
        keys=keys,
        slide_ids=slide_ids,
        # Channels-last memory, as the loader's decoded JPEGs: throughput comparisons then
        # differ in how batches arrive, not in the layout the model computes on.
        patch=torch.cat(patches).contiguous(memory_format=torch.channels_last),
        region=torch.cat(regions).contiguous(memory_format=torch.channels_last) if regions else None,
        pos=torch.cat(positions).to(torch.int64),
        expr=expr_all,
        expr_mask=mask_all,
        tokens=tokens,
        tokens_mask=tokens_mask,
        latent=torch.cat(latents),
    )


def _region(
    latent: Tensor, patch: Tensor, pos: Tensor, world: _World, *, cfg: SyntheticSection, gen: torch.Generator
) -> Tensor:
    """The 3x3 region of each spot: its own (downscaled) patch in cell ``pos``, similar neighbours around it."""
    n, size = latent.shape[0], cfg.image_size
    cell = size // 3
    grid = torch.empty(n, 3, 3 * cell, 3 * cell)
    own = F.interpolate(patch, size=(cell, cell), mode="area")
    for index in range(9):
        row, col = divmod(index, 3)
        neighbour = _render(
            latent + 0.7 * torch.randn(latent.shape, generator=gen), world, size=cell, noise=cfg.noise, gen=gen
        )
        here = (pos == index)[:, None, None, None]
        grid[:, :, row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = torch.where(here, own, neighbour)
    if 3 * cell != size:
        grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    return grid.clamp(0.0, 1.0)


class SyntheticSource(torch.utils.data.IterableDataset[Batch]):
    """Batches over a :class:`SyntheticBank`, deterministic from ``(seed, epoch, position)``.

    Each epoch permutes the bank with a generator seeded by ``(seed, epoch)`` (or keeps bank
    order with ``shuffle=False``); rank ``r`` of ``world_size`` takes positions ``r::world_size``
    of the permutation, cut to an equal count per rank, so ranks never share a sample. Iterating
    yields the rest of the current epoch; the next ``iter()`` starts the next epoch.
    """

    def __init__(
        self,
        bank: SyntheticBank,
        *,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in range(world_size={world_size})")
        self.bank = bank
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.per_rank = len(bank) // world_size
        if self.per_rank < batch_size and drop_last:
            raise ConfigError(
                f"the synthetic split has {len(bank)} samples, fewer than one batch of {batch_size} per rank "
                f"(world size {world_size}); raise data.synthetic.spots_per_slide or lower data.batch_size"
            )
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        full, rest = divmod(self.per_rank, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def order(self, epoch: int) -> Tensor:
        """Indices into the bank that this rank visits in ``epoch``, in order."""
        n = len(self.bank)
        perm = torch.randperm(n, generator=_generator(self.seed, "epoch", epoch)) if self.shuffle else torch.arange(n)
        return perm[self.rank :: self.world_size][: self.per_rank]

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        order = self.order(epoch)
        n_batches = len(self)
        while self.position < n_batches:
            p = self.position
            index = order[p * self.batch_size : (p + 1) * self.batch_size]
            # Advance before yielding: a checkpoint taken while the consumer holds this batch
            # must resume at the next one.
            self.position = p + 1
            yield self.bank.batch(index)
        self.epoch = epoch + 1
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        """``epoch`` and ``position`` (batches already handed out this epoch) plus what must match."""
        return {
            "kind": "synthetic",
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "n_samples": len(self.bank),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at the batch after the last one handed out when ``state`` was taken."""
        mine = self.state_dict()
        for name in ("kind", "seed", "world_size", "batch_size", "n_samples"):
            if state.get(name) != mine[name]:
                raise CheckpointError(
                    f"the saved data state has {name}={state.get(name)!r} but this run has {mine[name]!r}; "
                    "an exact resume needs the same data settings and number of processes"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


# ---------------------------------------------------------------------------------------------
# The corpus loader (integration point)
# ---------------------------------------------------------------------------------------------


def gene_transform(cfg: TrainConfig) -> str:
    """The loader's gene transform for this run: ``data.loader.genes.transform``, else what the encoder reads."""
    chosen = cfg.data.loader_genes().get("transform")
    if chosen:
        return str(chosen)
    return "log1p" if cfg.model.gene.name == "mlp" else "rank"


def loader_settings(
    cfg: TrainConfig,
    *,
    split: str,
    shuffle: bool,
    views: Sequence[str] | None = None,
    transform: str | None = None,
    slide_ids: Sequence[str] | None = None,
) -> LoaderSettings:
    """The ``loaders.LoaderSettings`` of one stream of a run.

    ``data.loader`` plus what training decides: ``split``, ``batch_size``, ``seed``, ``views``,
    the gene transform (:func:`gene_transform`, or ``transform``) and, for rank tokens, the
    context length ``model.gene.max_tokens`` when that is set. ``shuffle=True`` is the training
    stream (drop a short last batch); ``shuffle=False`` an evaluation pool: shard order, every
    sample, no augmentation, and the slide allow-list (``filters.slide_ids``, a choice of
    *training* slides) replaced by ``slide_ids`` (None: no allow-list).
    """
    from stcorpus.loaders.errors import LoaderSettingsError
    from stcorpus.loaders.settings import LoaderSettings

    raw = json.loads(json.dumps(cfg.data.loader))  # a deep copy of plain data
    genes = dict(raw.get("genes") or {})
    genes["transform"] = transform or gene_transform(cfg)
    if genes["transform"] == "rank" and "context_length" not in genes and cfg.model.gene.max_tokens:
        genes["context_length"] = cfg.model.gene.max_tokens
    raw["genes"] = genes
    if not shuffle:
        raw.pop("augment", None)
        filters = dict(raw.get("filters") or {})
        filters.pop("slide_ids", None)
        if slide_ids:
            filters["slide_ids"] = list(slide_ids)
        raw["filters"] = filters
    raw.update(
        split=split,
        batch_size=cfg.data.batch_size,
        seed=cfg.data.seed,
        shuffle=shuffle,
        drop_last=shuffle,
        views=list(cfg.data.views if views is None else views),
    )
    try:
        return LoaderSettings.from_dict(raw)
    except LoaderSettingsError as exc:
        raise ConfigError(f"data.loader: {exc}") from exc


def open_corpus_dataset(
    cfg: TrainConfig, settings: LoaderSettings, *, rank: int = 0, world_size: int = 1
) -> CorpusDataset:
    """A ``loaders.CorpusDataset`` over ``cfg.data.corpus``; loader errors become training errors."""
    from stcorpus.loaders import CorpusDataset
    from stcorpus.loaders.errors import LoaderError, LoaderSettingsError

    try:
        return CorpusDataset(str(cfg.data.corpus), settings, rank=rank, world_size=world_size)
    except LoaderSettingsError as exc:
        raise ConfigError(f"data.loader: {exc}") from exc
    except LoaderError as exc:
        raise DataSourceUnavailableError(
            f"cannot read split {','.join(settings.split)} of the corpus {cfg.data.corpus} "
            f"(rank {rank}/{world_size}): {exc}"
        ) from exc


class CorpusSource:
    """One rank's training stream over a corpus split: a ``loaders.CorpusLoader``, epoch after epoch.

    ``iter()`` yields the rest of the current epoch, then moves the dataset to the next epoch
    (reshuffled by the loader from ``(seed, epoch)``); ``state_dict()`` is the loader's own
    JSON-clean state (the batches handed out so far this epoch, counted by the loader, not the
    ones its workers prefetched), so a resume continues with exactly the next batch, with
    workers or without. Every rank has the same number of batches per epoch (the loader's
    plan evens ranks out), which keeps data-parallel steps in lockstep.
    """

    def __init__(
        self,
        dataset: CorpusDataset,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        device: torch.device | None = None,
    ) -> None:
        n_batches = len(dataset)
        if num_workers > n_batches:
            raise ConfigError(
                f"data.num_workers={num_workers} but this rank has {n_batches} batches per epoch; "
                "every worker needs at least one: lower data.num_workers or data.batch_size"
            )
        self.dataset = dataset
        self.options: dict[str, Any] = {
            "num_workers": num_workers,
            "pin_memory": pin_memory,
            "prefetch_factor": prefetch_factor,
            # Workers hand over images and sparse raw counts; the loader finishes each batch on
            # this device (gene transform there, JPEG decode too with decode: nvjpeg).
            "device": device or torch.device("cpu"),
        }
        self.loader = self._new_loader()

    def _new_loader(self) -> CorpusLoader:
        from stcorpus.loaders import CorpusLoader

        return CorpusLoader(self.dataset, **self.options)

    @property
    def epoch(self) -> int:
        """The epoch being read (or about to be)."""
        return self.dataset.epoch

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.dataset)

    def __iter__(self) -> Iterator[Batch]:
        batches = iter(self.loader)
        # The DataLoader iterator made at the first next() draws its workers' base seed from the
        # global torch RNG. Keep that draw out of the training's random stream (dropout, ...):
        # a resume makes its iterator at another step, and must still replay the same stream.
        # The batches do not depend on it (the loader seeds from (seed, epoch, rank, batch)).
        with torch.random.fork_rng(devices=[]):
            first = next(batches, None)
        if first is not None:
            yield first
            yield from batches
        self.dataset.set_epoch(self.dataset.epoch + 1)
        self.loader = self._new_loader()

    def skipped(self) -> dict[str, int]:
        """Samples, shards and whole batches the loader's ``on_bad_sample`` policy left out so far."""
        return self.dataset.skipped()

    def state_dict(self) -> dict[str, Any]:
        """``{"kind": "corpus", "loader": CorpusLoader.state_dict()}``: plain JSON types only."""
        return {"kind": "corpus", "loader": self.loader.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after the last batch handed out when ``state`` was taken."""
        from stcorpus.loaders.errors import ResumeError

        if state.get("kind") != "corpus":
            raise CheckpointError(
                f"the checkpoint's data state is from a {state.get('kind')!r} source, this run reads a corpus; "
                "resume with the data settings the checkpoint was written with"
            )
        loader_state = state["loader"]
        try:
            self.loader.load_state_dict(loader_state)
        except ResumeError as exc:
            raise CheckpointError(f"the checkpoint's loader state does not fit this run: {exc}") from exc
        consumed = sum(int(b) - int(a) for a, b in loader_state["done"])
        if consumed >= int(loader_state["n_batches"]):
            # Taken right after the last batch of an epoch: what follows is the next epoch's first batch.
            self.dataset.set_epoch(int(loader_state["epoch"]) + 1)
            self.loader = self._new_loader()


def corpus_dataloader(
    cfg: TrainConfig,
    *,
    split: str,
    rank: int,
    world_size: int,
    shuffle: bool,
    slide_ids: Sequence[str] | None = None,
    device: torch.device | None = None,
) -> CorpusSource:
    """THE integration point with the torch corpus loader (``loaders``).

    Opens ``cfg.data.corpus`` (folder, ``http(s)://`` URL or ``hf://datasets/...``) for
    ``split`` with :func:`loader_settings`: ``data.batch_size`` per process, ``data.views``,
    the gene transform the gene encoder reads (dense ``log1p``/``cp10k_log1p``/``counts`` ->
    ``expr``/``expr_mask`` for ``mlp``; rank tokens of ``model.gene.max_tokens`` ->
    ``tokens``/``tokens_mask`` for ``transformer``), ``data.seed``, ``data.loader`` (format,
    on_bad_sample, filters, ``to_human``, panel, augmentation, HTTP). ``shuffle=True`` is the
    training stream of rank ``rank`` of ``world_size`` with ``data.num_workers`` workers (pinned
    memory on CUDA); ``shuffle=False`` a fixed-order pass read in this process.

    Batches follow ``loaders/batch.py``; under ``on_bad_sample: warn``/``skip`` they may be
    short or empty, which the training loop handles (``stcorpus.training.pretrain``). The
    workers hand over images and sparse raw counts; each batch is finished on ``device`` (the
    training device; default CPU): the gene transform runs there as tensor operations, so the
    gene encoders receive ``expr``/``expr_mask`` or ``tokens``/``tokens_mask`` already on the device.
    """
    settings = loader_settings(cfg, split=split, shuffle=shuffle, slide_ids=slide_ids)
    dataset = open_corpus_dataset(cfg, settings, rank=rank, world_size=world_size)
    pin = cfg.run.device != "cpu" and torch.cuda.is_available()
    return CorpusSource(
        dataset,
        num_workers=cfg.data.num_workers if shuffle else 0,
        pin_memory=pin and shuffle,
        prefetch_factor=cfg.data.prefetch_factor if shuffle else None,
        device=device,
    )


class CorpusPool:
    """Fresh fixed-order passes over a corpus split: the evaluation pools.

    Each call returns one pass from the first sample in shard order (``shuffle: false``,
    ``drop_last: false``, no augmentation, patches only), read in this process so that the
    first N spots are the same whatever ``data.num_workers`` is. With a gene transform other than ``log1p``
    a second, expression-only pass (no image decoded) adds the probe's ``log1p`` targets as
    ``probe_expr``/``probe_expr_mask``. The datasets are opened on first use (only the rank
    that evaluates reads their metadata).
    """

    def __init__(self, cfg: TrainConfig, *, split: str, slide_ids: Sequence[str] = ()) -> None:
        self.cfg = cfg
        self.split = split
        self.slide_ids = tuple(slide_ids)
        self._main: CorpusDataset | None = None
        self._targets: CorpusDataset | None = None

    def _open(self) -> CorpusDataset:
        if self._main is None:
            cfg = self.cfg
            # Evaluation encodes patches only: the region view is not decoded for it (nor any
            # image for a run without views: STAMP's gene stage).
            views = ("patch",) if cfg.data.views else ()
            main = loader_settings(cfg, split=self.split, shuffle=False, views=views, slide_ids=self.slide_ids)
            self._main = open_corpus_dataset(cfg, main)
            if main.genes.transform != "log1p":
                targets = loader_settings(
                    cfg, split=self.split, shuffle=False, views=(), transform="log1p", slide_ids=self.slide_ids
                )
                self._targets = open_corpus_dataset(cfg, targets)
        return self._main

    def __call__(self) -> Iterator[Batch]:
        from stcorpus.loaders import CorpusLoader

        # Evaluation gathers its batches on the host: finish them there.
        main = iter(CorpusLoader(self._open(), device="cpu"))
        if self._targets is None:
            return main
        return _with_targets(main, iter(CorpusLoader(self._targets, device="cpu")))


def _with_targets(batches: Iterator[Batch], targets: Iterator[Batch]) -> Iterator[Batch]:
    """Add the ``log1p`` expression of ``targets`` (same order, no images) to ``batches`` as probe targets."""
    for batch, target in zip(batches, targets, strict=True):
        row = {key: i for i, key in enumerate(target[B.KEY])}
        try:
            index = torch.tensor([row[key] for key in batch[B.KEY]], dtype=torch.int64)
        except KeyError as exc:
            raise BatchContractError(
                f"the probe-target pass lacks sample {exc.args[0]}: the two passes over the pool disagree"
            ) from None
        yield {**batch, PROBE_EXPR: target[B.EXPR][index], PROBE_EXPR_MASK: target[B.EXPR_MASK][index]}


def corpus_sizes(dataset: CorpusDataset, *, views: Sequence[str]) -> tuple[int, int, int, int]:
    """``(tile size, G, token vocabulary, token length)`` of a corpus stream, from its metadata."""
    transform = dataset.gene_transform
    if transform is None:  # the config validators refuse genes.transform=none; a guard all the same
        raise ConfigError("the corpus stream has no gene transform; set data.loader.genes.transform")
    # The tile sizes the corpus records (corpus.json views), never assumed.
    patch = dataset.views[schema.PATCH_COLUMN].size_px if schema.PATCH_COLUMN in dataset.views else 0
    region = dataset.views[schema.REGION_COLUMN].size_px if schema.REGION_COLUMN in dataset.views else patch
    if "region" in views and region != patch:
        raise ConfigError(
            f"the corpus's region tiles are {region}px but its patches {patch}px; one image encoder reads both, "
            "so train on patches only (data.views=[patch]) or rebuild with equal tile sizes"
        )
    return patch, transform.space.size, transform.vocab_size, dataset.settings.genes.context_length


# ---------------------------------------------------------------------------------------------
# What a run uses
# ---------------------------------------------------------------------------------------------


@dataclass
class RunData:
    """The training source of this rank, evaluation batch factories, and the sizes the data fixes."""

    train: BatchSource
    #: Fresh iterators over the validation pool / probe training spots, in a fixed order.
    val_batches: Callable[[], Iterator[Batch]]
    probe_train_batches: Callable[[], Iterator[Batch]]
    image_size: int
    #: Width G of ``expr``.
    n_genes: int
    #: Token ids are below this (``G + 1``: 0 is padding).
    vocab_size: int
    max_tokens: int


class _EpochZero:
    """A callable returning a fresh one-epoch iterator over a fixed-order synthetic source."""

    def __init__(self, bank: SyntheticBank, *, batch_size: int, seed: int) -> None:
        self.bank = bank
        self.batch_size = batch_size
        self.seed = seed

    def __call__(self) -> Iterator[Batch]:
        source = SyntheticSource(self.bank, batch_size=self.batch_size, seed=self.seed, drop_last=False)
        return iter(source)


def build_run_data(cfg: TrainConfig, *, rank: int, world_size: int, device: torch.device | None = None) -> RunData:
    """The data of a run on this rank (synthetic banks are generated here, corpus loaders opened).

    ``device``: where a synthetic training bank lives with ``data.synthetic.on_device``.
    """
    data = cfg.data
    if data.source == "corpus":
        train = corpus_dataloader(
            cfg, split=data.train_split, rank=rank, world_size=world_size, shuffle=True, device=device
        )
        image_size, n_genes, vocab_size, max_tokens = corpus_sizes(train.dataset, views=data.views)
        return RunData(
            train=train,
            val_batches=CorpusPool(cfg, split=data.val_split),
            probe_train_batches=CorpusPool(cfg, split=data.train_split, slide_ids=cfg.eval.probe_train_slides),
            image_size=image_size,
            n_genes=n_genes,
            vocab_size=vocab_size,
            max_tokens=max_tokens,
        )
    syn = data.synthetic
    train_bank = make_synthetic_bank(syn, split="train", seed=data.seed, views=data.views)
    val_bank = make_synthetic_bank(syn, split="val", seed=data.seed, views=data.views)
    # The upper bound of throughput runs: batches gathered on the device itself, no copy at all.
    on_device = train_bank.to(device) if syn.on_device and device is not None else train_bank
    source = SyntheticSource(on_device, batch_size=data.batch_size, seed=data.seed, rank=rank, world_size=world_size)
    return RunData(
        train=source,
        # Evaluation visits a fixed shuffle (epoch 0) so that pools mix slides.
        val_batches=_EpochZero(val_bank, batch_size=data.batch_size, seed=data.seed + 1),
        probe_train_batches=_EpochZero(train_bank, batch_size=data.batch_size, seed=data.seed + 2),
        image_size=syn.image_size,
        n_genes=syn.n_genes,
        vocab_size=syn.n_genes + TOKEN_OFFSET,
        max_tokens=syn.max_tokens,
    )


def resolve_config(cfg: TrainConfig, data: RunData) -> TrainConfig:
    """Fill the sizes left at 0 in the config from the data; a size set in the config must match.

    ``model.gene.n_genes`` becomes G for the ``mlp`` and the token vocabulary (``G + 1``) for the
    ``transformer``; ``model.gene.max_tokens`` the data's token length; ``model.image.image_size``
    and ``mean``/``std`` the encoder's own (its pretrained config's; the tile size and ImageNet
    for the built-in encoders, :func:`stcorpus.training.encoders.encoder_defaults`).
    """
    gene = cfg.model.gene
    image = cfg.model.image
    size = data.n_genes if gene.name == "mlp" else data.vocab_size
    if gene.n_genes and gene.n_genes != size:
        what = "genes" if gene.name == "mlp" else "token ids (G + 1, 0 is padding)"
        raise ConfigError(
            f"model.gene.n_genes is {gene.n_genes} but the data has {size} {what}; set it to 0 to follow the data"
        )
    if gene.name == "transformer" and gene.max_tokens and gene.max_tokens < data.max_tokens:
        raise ConfigError(
            f"model.gene.max_tokens ({gene.max_tokens}) is below the data's token length ({data.max_tokens})"
        )
    new_gene = gene.model_copy(update={"n_genes": size, "max_tokens": gene.max_tokens or data.max_tokens})
    new_image = encoder_defaults(image, tile=data.image_size)
    model = cfg.model.model_copy(update={"gene": new_gene, "image": new_image})
    return cfg.model_copy(update={"model": model})


def check_batch(batch: Mapping[str, Any], *, needs: Sequence[str]) -> None:
    """Check a batch against ``loaders/batch.py`` (present keys, dtypes, one batch size); raise with what is off."""
    missing = [name for name in needs if name not in batch]
    if missing:
        raise BatchContractError(
            f"the batch lacks {missing} (it has {sorted(batch)}); check the loader's views/transform"
        )
    # The dtypes of the contract (stcorpus.schema.BATCH_DTYPES) for what a training step reads.
    checked = (B.PATCH, B.REGION, B.POS, B.EXPR, B.EXPR_MASK, B.NICHE, B.TOKENS, B.TOKENS_MASK)
    expected = {name: getattr(torch, schema.BATCH_DTYPES[name]) for name in checked}
    sizes = {len(batch[B.KEY])} if B.KEY in batch else set()
    for name, dtype in expected.items():
        if name not in batch:
            continue
        value = batch[name]
        if not isinstance(value, Tensor) or value.dtype != dtype:
            got = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise BatchContractError(f"batch[{name!r}] must be a {dtype} tensor, got {got}")
        sizes.add(value.shape[0])
    for name in (B.PATCH, B.REGION):
        if name in batch and (batch[name].ndim != 4 or batch[name].shape[1] != 3):
            raise BatchContractError(f"batch[{name!r}] must be (B,3,H,W), got {tuple(batch[name].shape)}")
    if len(sizes) > 1:
        raise BatchContractError(f"batch entries disagree on the batch size: {sorted(sizes)}")
    if B.POS in batch and batch[B.POS].numel() and not bool(((batch[B.POS] >= 0) & (batch[B.POS] < 9)).all()):
        raise BatchContractError("batch['pos'] must be in 0..8 (cell of the patch in the 3x3 region)")


def to_device(batch: Mapping[str, Any], device: torch.device) -> Batch:
    """Tensors to ``device`` (non-blocking from pinned memory); the lists of strings stay on the host."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
