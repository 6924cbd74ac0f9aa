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
    :func:`corpus_dataloader`, the one integration point with the torch corpus loader.

A source is anything with ``__iter__`` (one epoch of batches from the current position),
``state_dict()`` and ``load_state_dict()`` (:class:`BatchSource`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from loaders import batch as B
from stcorpus.schema import sample_key
from training.config import SyntheticSection, TrainConfig
from training.errors import BatchContractError, CheckpointError, ConfigError, DataSourceUnavailableError

Batch = dict[str, Any]


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
    """Gene ids by descending expression (measured, non-zero genes only), padded with 0 / False."""
    score = torch.where(mask & (expr > 0), expr, torch.full_like(expr, -1.0))
    ordered, order = torch.sort(score, dim=1, descending=True, stable=True)
    tokens = order[:, :length].to(torch.int64)
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
        patch=torch.cat(patches),
        region=torch.cat(regions) if regions else None,
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


def corpus_dataloader(cfg: TrainConfig, *, split: str, rank: int, world_size: int, shuffle: bool) -> BatchSource:
    """THE integration point with the torch corpus loader (``loaders``; issue 8).

    What training needs from it, whatever its constructor looks like:

    - built from ``cfg.data.corpus`` (folder, HTTP URL or ``hf://`` repo), ``split``,
      ``cfg.data.batch_size`` (per process), ``cfg.data.views`` (always ``patch``; ``region`` for
      STAMP's terms), the gene transform the gene encoder needs (dense ``log1p`` -> ``expr`` /
      ``expr_mask`` for ``mlp``; rank tokens of length ``model.gene.max_tokens`` -> ``tokens`` /
      ``tokens_mask`` for ``transformer``; evaluation batches need the dense ``log1p`` ``expr``
      for the probe), ``cfg.data.num_workers``, ``cfg.data.seed``;
    - sharded disjointly by ``(rank, world_size)`` and by DataLoader worker, with equal batch
      counts per rank (or an agreed stop) so that collectives never hang;
    - yields collated batches of ``loaders/batch.py`` with uint8 images;
    - ``__iter__`` = the rest of the current epoch; the next ``iter()`` = the next epoch, reshuffled
      from ``(seed, epoch)``; ``shuffle=False`` = a fixed order (evaluation pools);
    - ``state_dict()`` -> plain containers (ints, strings, lists, dicts, tensors: it is stored
      in a ``torch.load(weights_only=True)`` checkpoint) describing the position after the last
      batch *handed to the caller* (not the last one prefetched by workers);
      ``load_state_dict(state)`` -> the next batch is exactly the one that followed;
    - the sizes training resolves the model with: the gene count G of ``expr`` (or vocabulary
      size for tokens), the token length, and the tile size.
    """
    raise DataSourceUnavailableError(
        f"data.source='corpus' ({cfg.data.corpus}, split {split!r}, rank {rank}/{world_size}, shuffle={shuffle}) "
        "needs the torch corpus loader, which has not landed yet (issue 8); use data.source=synthetic meanwhile"
    )


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
    n_genes: int
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


class _CorpusPass:
    """A callable returning one fixed-order pass over a corpus split (evaluation pools)."""

    def __init__(self, cfg: TrainConfig, *, split: str) -> None:
        self.cfg = cfg
        self.split = split

    def __call__(self) -> Iterator[Batch]:
        return iter(corpus_dataloader(self.cfg, split=self.split, rank=0, world_size=1, shuffle=False))


def build_run_data(cfg: TrainConfig, *, rank: int, world_size: int, device: torch.device | None = None) -> RunData:
    """The data of a run on this rank (synthetic banks are generated here, corpus loaders opened).

    ``device``: where a synthetic training bank lives with ``data.synthetic.on_device``.
    """
    data = cfg.data
    if data.source == "corpus":
        gene = cfg.model.gene
        return RunData(
            train=corpus_dataloader(cfg, split=data.train_split, rank=rank, world_size=world_size, shuffle=True),
            val_batches=_CorpusPass(cfg, split=data.val_split),
            probe_train_batches=_CorpusPass(cfg, split=data.train_split),
            # Until the loader reports them, the sizes come from the config (tiles are 224 px).
            image_size=cfg.model.image.image_size or 224,
            n_genes=gene.n_genes,
            max_tokens=gene.max_tokens,
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
        max_tokens=syn.max_tokens,
    )


def resolve_config(cfg: TrainConfig, data: RunData) -> TrainConfig:
    """Fill the sizes left at 0 in the config from the data; a size set in the config must match."""
    gene = cfg.model.gene
    image = cfg.model.image
    if gene.n_genes and gene.n_genes != data.n_genes:
        raise ConfigError(
            f"model.gene.n_genes is {gene.n_genes} but the data has {data.n_genes} genes; "
            "set it to 0 to follow the data"
        )
    if gene.name == "transformer" and gene.max_tokens and gene.max_tokens < data.max_tokens:
        raise ConfigError(
            f"model.gene.max_tokens ({gene.max_tokens}) is below the data's token length ({data.max_tokens})"
        )
    new_gene = gene.model_copy(update={"n_genes": data.n_genes, "max_tokens": gene.max_tokens or data.max_tokens})
    new_image = image.model_copy(update={"image_size": image.image_size or data.image_size})
    model = cfg.model.model_copy(update={"gene": new_gene, "image": new_image})
    return cfg.model_copy(update={"model": model})


def check_batch(batch: Mapping[str, Any], *, needs: Sequence[str]) -> None:
    """Check a batch against ``loaders/batch.py`` (present keys, dtypes, one batch size); raise with what is off."""
    missing = [name for name in needs if name not in batch]
    if missing:
        raise BatchContractError(
            f"the batch lacks {missing} (it has {sorted(batch)}); check the loader's views/transform"
        )
    expected = {
        B.PATCH: torch.uint8,
        B.REGION: torch.uint8,
        B.POS: torch.int64,
        B.EXPR: torch.float32,
        B.EXPR_MASK: torch.bool,
        B.NICHE: torch.float32,
        B.TOKENS: torch.int64,
        B.TOKENS_MASK: torch.bool,
    }
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
