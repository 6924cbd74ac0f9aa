"""The torch corpus loader: an ``IterableDataset`` over the shards of a corpus, with exact resume.

>>> from stcorpus.loaders import CorpusDataset, CorpusLoader, GeneSettings, LoaderSettings  # doctest: +SKIP
>>> settings = LoaderSettings(split="train", batch_size=256, genes=GeneSettings(transform="cp10k_log1p"))
>>> dataset = CorpusDataset("hf://datasets/org/corpus", settings)        # or a folder, or http(s)://
>>> loader = CorpusLoader(dataset, num_workers=8, pin_memory=True)
>>> for epoch in range(start_epoch, epochs):
...     loader.set_epoch(epoch)
...     for batch in loader:                     # dicts as in loaders/batch.py
...         step(batch)
...         if time_to_checkpoint:
...             save({"loader": loader.state_dict(), ...})
>>> loader.load_state_dict(saved["loader"])       # later: continues with exactly the unseen batches

Rank and world size come from ``torch.distributed`` when it is initialised, else from the
arguments (default 0 of 1). The pipeline of one worker (``CorpusDataset._pipeline``) is a
visible list of stages; see ``stcorpus.loaders.plan`` for how samples are assigned to ranks and workers
and why that makes resume a matter of counting batches.

**Resume.** A batch's content is fixed by (corpus selection, seed, epoch, rank, batch index,
batch size, world size), never by the number of workers. ``CorpusLoader`` counts the batches
it hands out; since a DataLoader delivers worker batches round-robin, the count gives the exact
set of consumed batches (``stcorpus.loaders.plan.delivery_order``), and the state is that set. Loading
it with as many workers continues in exactly the order the interrupted run would have taken;
with another ``num_workers`` it re-splits the batches left: nothing is skipped or repeated, only
the delivery order of the remaining batches changes (``ResumeReport`` says so). Under DDP every
rank consumes the same number of batches, so one rank's state resumes every rank. torchdata's
``StatefulDataLoader`` works too (its per-worker snapshots hold our iterator state); it insists
on the same ``num_workers``, so to change that, convert its state with ``resume_state_from``
and give it to ``CorpusDataset.load_state_dict`` before making the new loader.

**Request budget (HTTP / Hub).** Each worker reads its shard visits in order, one GET per tar
visit, two (footer + row groups) per Parquet visit, with the next one opened in a background
thread while the current is parsed. Per epoch and rank with ``W`` workers: about
``S/R + W + 1`` visits (``S`` shards, ``R`` ranks; each worker's run may start inside a shard),
plus 4 metadata files when the dataset is made and, with filters that split shards, 1 + row
groups per such shard. For ``S=500`` tar shards and ``R=8`` ranks x ``W=8`` workers that is ~570
GETs per epoch over all ranks (~1,100 with Parquet): under the Hub's ~5,000 per 5 minutes
unless an epoch takes less than about 35 s (70 s with Parquet). See ``bench/LOADER.md``. With a
shard cache (``LoaderSettings.cache``, ``stcorpus.loaders.shard_cache``) a shard costs one GET
the first time a process of the node reads it, and none in later epochs or runs.

**Bad data.** ``on_bad_sample="error"`` (default) raises; ``"warn"``/``"skip"`` drop the sample
(or the unreadable rest of a shard), count it (``CorpusDataset.skipped()``, over all workers) and, for ``warn``, log
its key. A batch keeps its index even when samples are dropped; a batch with no readable sample
is yielded empty (``B == 0``) so batch counts, DDP lockstep and resume stay exact.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import IterableDataset

from stcorpus.loaders import batch as B
from stcorpus.loaders.corpus import Corpus, Selection
from stcorpus.loaders.errors import BadSampleError, EmptySelectionError, ResumeError, ShardError
from stcorpus.loaders.genes import Flat, GeneSpace, GeneTransform, load_means
from stcorpus.loaders.images import Augment, BufferPool, JpegDecoder
from stcorpus.loaders.plan import (
    STATE_FORMAT,
    EpochPlan,
    ResumePoint,
    ResumeReport,
    advance,
    expand,
    intervals,
    iter_window_batches,
)
from stcorpus.loaders.read import Columns, RawSample, ShardReader, parse_npz
from stcorpus.loaders.settings import LoaderSettings
from stcorpus.loaders.shard_cache import ShardCache, ShardSource, shard_records
from stcorpus.loaders.source import open_source

if TYPE_CHECKING:
    import os

log = logging.getLogger(__name__)

#: Extra batch entries of the rank transform on niche expression (not yet in loaders/batch.py).
NICHE_TOKENS: Final = "niche_tokens"
NICHE_TOKENS_MASK: Final = "niche_tokens_mask"

_SKIPPED, _BAD_SHARDS, _EMPTY_BATCHES = range(3)
_COUNTERS: Final = 3
#: Counter rows: row 0 for the main process, row ``1 + worker id`` for a DataLoader worker. One
#: writer per row, so no lock is needed (a lock could not travel into a process of another
#: start method than the one it was made in).
_COUNTER_ROWS: Final = 65


# ---------------------------------------------------------------------------------------------
# What flows between stages
# ---------------------------------------------------------------------------------------------


@dataclass
class RawBatch:
    """One batch of raw samples (None where a sample could not be read), in emitted order."""

    index: int
    samples: list[RawSample | None]


@dataclass
class DecodedBatch:
    """One batch after decoding: uint8 views, sparse expression, positions."""

    index: int
    keys: list[str]
    views: dict[str, npt.NDArray[np.uint8]]  # (B, H, W, 3) uint8
    pos: npt.NDArray[np.int64]
    genes: list[npt.NDArray[Any]]
    counts: list[npt.NDArray[Any]]
    niche_genes: list[npt.NDArray[Any]]
    niche_counts: list[npt.NDArray[Any]]
    n_neighbors: npt.NDArray[np.float64]


# ---------------------------------------------------------------------------------------------
# Error policy
# ---------------------------------------------------------------------------------------------


class Handler:
    """The ``on_bad_sample`` policy: raise, or count (shared across workers) and go on."""

    def __init__(self, policy: str, counters: Any) -> None:
        self.policy = policy
        self.counters = counters

    def _count(self, slot: int, n: int) -> None:
        if self.counters is not None:
            info = torch.utils.data.get_worker_info()
            row = 0 if info is None else 1 + info.id % (_COUNTER_ROWS - 1)
            self.counters[row * _COUNTERS + slot] += n

    def sample(self, exc: BadSampleError) -> None:
        """A sample that cannot be decoded."""
        if self.policy == "error":
            raise exc
        self._count(_SKIPPED, 1)
        if self.policy == "warn":
            log.warning("skipping sample %s: %s", exc.key, exc)

    def shard(self, exc: ShardError, path: str, lost: int) -> None:
        """A shard that cannot be read to its end: ``lost`` samples are missing."""
        if self.policy == "error":
            raise exc
        self._count(_BAD_SHARDS, 1)
        self._count(_SKIPPED, lost)
        if self.policy == "warn":
            log.warning("skipping %d samples of %s: %s", lost, path, exc)

    def empty(self, index: int) -> None:
        """A batch of which no sample could be read."""
        self._count(_EMPTY_BATCHES, 1)
        log.error("batch %d has no readable sample; yielding it empty to keep batch counts exact", index)


# ---------------------------------------------------------------------------------------------
# Stages (plain callables over iterators; picklable, no lambdas)
# ---------------------------------------------------------------------------------------------


def window_groups(batches: Iterator[int], *, plan: EpochPlan) -> Iterator[tuple[int, list[int]]]:
    """Batch ids -> ``(window, [batch ids])``, window by window."""
    yield from iter_window_batches(plan, np.fromiter(batches, dtype=np.int64))


class ReadWindows:
    """``(window, batch ids)`` -> ``RawBatch`` per batch; each window's samples are read once, in order."""

    def __init__(self, plan: EpochPlan, reader: ShardReader, windows: Sequence[int]) -> None:
        self.plan, self.reader, self.windows = plan, reader, list(windows)

    def __call__(self, groups: Iterator[tuple[int, list[int]]]) -> Iterator[RawBatch]:
        segments = [seg for u in self.windows for seg in self.plan.segments(*self.plan.window_span(u))]
        stream = self.reader.iter_samples(segments)
        try:
            expected = iter(self.windows)
            for u, batch_ids in groups:
                if next(expected) != u:
                    raise RuntimeError("windows out of order")  # a bug, not a data problem
                start, stop = self.plan.window_span(u)
                window = list(islice(stream, stop - start))
                if len(window) != stop - start:
                    raise RuntimeError(f"window {u}: the reader gave {len(window)} of {stop - start} samples")
                permutation = self.plan.window_permutation(u)
                for b in batch_ids:
                    offsets = self.plan.batch_offsets(b, permutation).tolist()
                    yield RawBatch(b, [window[o] for o in offsets])
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()


class Decode:
    """``RawBatch`` -> ``DecodedBatch``: JPEGs into one uint8 buffer per view, expression arrays."""

    def __init__(self, *, views: Sequence[str], columns: Columns, decoder: JpegDecoder, handler: Handler) -> None:
        self.views = tuple(views)
        self.columns = columns
        self.decoder = decoder
        self.handler = handler
        self.pools = {view: BufferPool() for view in self.views}

    def __call__(self, batches: Iterator[RawBatch]) -> Iterator[DecodedBatch]:
        for raw in batches:
            yield self.decode(raw)

    def decode(self, raw: RawBatch) -> DecodedBatch:
        """Decode one batch; bad samples go to the handler and are left out."""
        n = len(raw.samples)
        buffers = {v: self.pools[v].get(n) for v in self.views}
        slots = list(buffers.items())
        decoder, handler = self.decoder, self.handler
        kept: list[RawSample] = []
        for sample in raw.samples:
            if sample is None:
                continue  # already counted by the shard handler
            slot = len(kept)
            try:
                self._expression(sample)
                for view, buffer in slots:
                    decoder(getattr(sample, view), buffer[slot], key=sample.key, view=view)
            except BadSampleError as exc:
                handler.sample(exc)
                continue
            kept.append(sample)
        n_kept = len(kept)
        if n_kept == 0:
            handler.empty(raw.index)
        views = {view: array[:n_kept] if n_kept < n else array for view, array in buffers.items()}
        expression, niche = self.columns.expression, self.columns.niche
        return DecodedBatch(
            index=raw.index,
            keys=[s.key for s in kept],
            views=views,
            pos=np.fromiter([s.pos or 0 for s in kept], dtype=np.int64, count=n_kept),
            genes=[s.genes for s in kept] if expression else [],  # type: ignore[misc]
            counts=[s.counts for s in kept] if expression else [],  # type: ignore[misc]
            niche_genes=[s.niche_genes for s in kept] if niche else [],  # type: ignore[misc]
            niche_counts=[s.niche_counts for s in kept] if niche else [],  # type: ignore[misc]
            n_neighbors=np.fromiter([s.n_neighbors or 0 for s in kept] if niche else [], dtype=np.float64),
        )

    def _expression(self, sample: RawSample) -> None:
        """Fill the arrays of a tar sample from its ``expr.npz`` and ``json`` members; check them."""
        if sample.meta_blob is None and sample.expr_blob is None and sample.pos is not None:
            # A Parquet row: only check what the columns gave (the common case, kept cheap).
            columns = self.columns
            if columns.expression:
                genes, counts = sample.genes, sample.counts
                if genes is None or counts is None or len(genes) != len(counts):
                    raise BadSampleError(f"{sample.key}: genes/counts missing or of unequal length", key=sample.key)
            if columns.niche:
                genes, counts = sample.niche_genes, sample.niche_counts
                if genes is None or counts is None or len(genes) != len(counts):
                    raise BadSampleError(
                        f"{sample.key}: niche_genes/niche_counts missing or of unequal length", key=sample.key
                    )
            return
        if sample.meta_blob is not None:
            import json

            try:
                meta = json.loads(sample.meta_blob)
                sample.pos = int(meta["pos"])
                sample.n_neighbors = int(meta.get("n_neighbors") or 0)
            except (ValueError, KeyError, TypeError) as exc:
                raise BadSampleError(f"{sample.key}: malformed json member: {exc}", key=sample.key) from exc
        elif sample.pos is None:
            raise BadSampleError(f"{sample.key}: no json member (metadata)", key=sample.key)
        if sample.expr_blob is not None and (self.columns.expression or self.columns.niche):
            try:
                arrays = parse_npz(sample.expr_blob)
                sample.genes, sample.counts = arrays["genes"], arrays["counts"]
                sample.niche_genes, sample.niche_counts = arrays["niche_genes"], arrays["niche_counts"]
            except (ValueError, KeyError, OSError, EOFError) as exc:
                raise BadSampleError(f"{sample.key}: malformed expr.npz member: {exc}", key=sample.key) from exc
        for genes_name, counts_name, wanted in (
            ("genes", "counts", self.columns.expression),
            ("niche_genes", "niche_counts", self.columns.niche),
        ):
            if not wanted:
                continue
            genes, counts = getattr(sample, genes_name), getattr(sample, counts_name)
            if genes is None or counts is None or len(genes) != len(counts):
                raise BadSampleError(
                    f"{sample.key}: {genes_name}/{counts_name} missing or of unequal length", key=sample.key
                )


class AugmentStage:
    """``DecodedBatch`` -> ``DecodedBatch`` with augmented views and moved ``pos``."""

    def __init__(self, augment: Augment, *, epoch: int, rank: int) -> None:
        self.augment, self.epoch, self.rank = augment, epoch, rank

    def __call__(self, batches: Iterator[DecodedBatch]) -> Iterator[DecodedBatch]:
        for batch in batches:
            if batch.keys:
                batch.views, batch.pos = self.augment(
                    batch.views, batch.pos, epoch=self.epoch, rank=self.rank, batch=batch.index
                )
            yield batch


class Collate:
    """``DecodedBatch`` -> the batch dict of ``loaders/batch.py`` (gene transform applied)."""

    def __init__(self, transform: GeneTransform | None, *, niche_average: bool) -> None:
        self.transform = transform
        self.niche_average = niche_average

    def __call__(self, batches: Iterator[DecodedBatch]) -> Iterator[dict[str, Any]]:
        for batch in batches:
            yield self.collate(batch)

    def collate(self, batch: DecodedBatch) -> dict[str, Any]:
        """One batch dict."""
        slide_ids = [k.partition("__")[0] for k in batch.keys]
        out: dict[str, Any] = {B.KEY: batch.keys, B.SLIDE_ID: slide_ids}
        for view, array in batch.views.items():
            out[view] = torch.from_numpy(array).permute(0, 3, 1, 2)  # (B, 3, H, W), channels-last memory
        out[B.POS] = torch.from_numpy(batch.pos)
        t = self.transform
        if t is None:
            return out
        flat = Flat.of(batch.genes, batch.counts)
        niche = Flat.of(batch.niche_genes, batch.niche_counts) if t.settings.niche else None
        scale = np.maximum(batch.n_neighbors, 1.0) if self.niche_average else None
        if t.kind == "rank":
            tokens, mask = t.tokens(flat)
            out[B.TOKENS], out[B.TOKENS_MASK] = torch.from_numpy(tokens), torch.from_numpy(mask)
            if niche is not None:
                tokens, mask = t.tokens(niche)
                out[NICHE_TOKENS], out[NICHE_TOKENS_MASK] = torch.from_numpy(tokens), torch.from_numpy(mask)
            return out
        out[B.EXPR] = torch.from_numpy(t.dense(flat))
        out[B.EXPR_MASK] = torch.from_numpy(t.mask(slide_ids))
        if niche is not None:
            out[B.NICHE] = torch.from_numpy(t.dense(niche, scale=scale))
        return out


def run_stages(items: Iterator[Any], stages: Sequence[Callable[[Iterator[Any]], Iterator[Any]]]) -> Iterator[Any]:
    """Chain ``stages`` over ``items``."""
    for stage in stages:
        items = stage(items)
    return items


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


def as_is(batch: Any) -> Any:
    """The DataLoader ``collate_fn`` for a dataset that yields finished batches."""
    return batch


def _distributed() -> tuple[int, int] | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None


class CorpusDataset(IterableDataset[dict[str, Any]]):
    """Batches of a corpus split for one rank: an ``IterableDataset`` yielding batch dicts.

    Use it with ``CorpusLoader`` (a DataLoader that tracks consumed batches) or with a
    DataLoader/StatefulDataLoader given ``batch_size=None`` (the dataset batches itself).
    ``location`` is a corpus folder, ``file://``, an ``http(s)://`` base URL, ``hf://datasets/<org>/<name>``
    or any fsspec URL (``s3://``, ``gs://``, ``az://``, ...; ``storage_options`` go to its filesystem,
    and are kept in memory only: leave them out to use the store's own configuration).
    """

    def __init__(
        self,
        location: str | os.PathLike[str],
        settings: LoaderSettings | Mapping[str, Any] | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if settings is None:
            settings = LoaderSettings()
        elif not isinstance(settings, LoaderSettings):
            settings = LoaderSettings.from_dict(settings)
        self.settings = settings
        dist = _distributed()
        self.rank = rank if rank is not None else (dist[0] if dist else 0)
        self.world_size = world_size if world_size is not None else (dist[1] if dist else 1)
        self.source = open_source(location, http=settings.http, storage_options=storage_options)
        self.corpus: Corpus | None = Corpus(self.source)
        self.selection: Selection = self.corpus.select(
            splits=settings.split, fmt=settings.format, filters=settings.filters
        )
        # What the shard reader reads through: shards held to shards.parquet, cached when remote.
        self.shard_source = ShardSource(
            self.source,
            shard_records(self.corpus.shards),
            verify=settings.verify_sha256,
            cache=ShardCache.from_settings(settings.cache),
        )
        g = settings.genes
        self.columns = Columns(
            patch="patch" in settings.views,
            region="region" in settings.views,
            expression=g.transform != "none",
            niche=g.niche,
        )
        self.gene_transform: GeneTransform | None = None
        if g.transform != "none":
            space = GeneSpace.build(self.corpus.genes, g)
            measured = self.corpus.measured_genes()
            if self.selection.slide_ids:
                measured = {k: v for k, v in measured.items() if k in self.selection.slide_ids}
            means = load_means(g.gene_means) if g.gene_means else None
            self.gene_transform = GeneTransform(space, g, measured=measured, means=means)
        self.epoch = 0
        self._resume: ResumePoint | None = None
        self.counters: Any = multiprocessing.RawArray("q", _COUNTERS * _COUNTER_ROWS)
        plan = self.plan(0)
        log.info(
            "%s: split %s, %d samples in %d %s shards (%d skipped by filters, %d filtered by row); rank %d/%d: "
            "%d batches of %d per epoch (%d samples dropped, %d repeated to even out ranks)",
            self.source.location,
            ",".join(settings.split),
            self.selection.n_samples,
            len(self.selection.shards),
            settings.format,
            self.selection.shards_skipped,
            self.selection.shards_mixed,
            self.rank,
            self.world_size,
            plan.n_batches,
            settings.batch_size,
            plan.dropped,
            plan.repeated,
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["corpus"] = None  # workers need the selection, not the metadata tables
        if multiprocessing.context.get_spawning_popen() is None:
            state["counters"] = None  # shared counters only travel to worker processes being started
        return state

    # -- epochs and plans --------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration reads (like ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The order of ``epoch`` (default: the current one) on this rank."""
        s = self.settings
        return EpochPlan(
            self.selection.shards,
            seed=s.seed,
            epoch=self.epoch if epoch is None else epoch,
            shuffle=s.shuffle,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=s.batch_size,
            window=s.window,
            drop_last=s.drop_last,
            uneven=s.uneven,
        )

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.plan().n_batches

    @property
    def n_samples(self) -> int:
        """Samples per epoch on this rank."""
        return self.plan().n_samples

    def skipped(self) -> dict[str, int]:
        """Counts of the ``on_bad_sample`` policy so far, over all workers."""
        if self.counters is None:
            return {"samples": 0, "shards": 0, "empty_batches": 0}
        return {
            "samples": self._total(_SKIPPED),
            "shards": self._total(_BAD_SHARDS),
            "empty_batches": self._total(_EMPTY_BATCHES),
        }

    def _total(self, slot: int) -> int:
        return int(sum(self.counters[row * _COUNTERS + slot] for row in range(_COUNTER_ROWS)))

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> EpochIterator:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        resume = self.resume_point()
        self._resume = None  # a loaded state applies to one iteration
        return EpochIterator(self, resume, worker=worker, num_workers=num_workers)

    def resume_point(self) -> ResumePoint:
        """Where the next iteration starts: a loaded state of the current epoch, else its beginning."""
        if self._resume is not None and self._resume.epoch == self.epoch:
            return self._resume
        return ResumePoint(self.epoch, [])

    def _pipeline(self, plan: EpochPlan, batches: npt.NDArray[np.int64]) -> Iterator[dict[str, Any]]:
        """The stages one worker runs over its batches, as a visible list."""
        s = self.settings
        handler = Handler(s.on_bad_sample, self.counters)
        reader = ShardReader(
            self.shard_source,
            self.selection.shards,
            fmt=s.format,
            columns=self.columns,
            http=s.http,
            on_shard_error=handler.shard,
        )
        stages: list[Callable[[Iterator[Any]], Iterator[Any]]] = [
            # shards.parquet (filtered) -> split by rank -> shuffled windows -> batches -> split by
            # worker: all decided in EpochPlan; what enters here is this worker's batch ids.
            # batch ids -> (window, [batch ids]) in ascending window order
            partial(window_groups, plan=plan),
            # (window, [batch ids]) -> RawBatch: each window's samples read once (read-ahead over
            # HTTP), permuted, cut into batches; JPEG bytes and expression blobs, nothing decoded
            ReadWindows(plan, reader, plan.windows_for(batches)),
            # RawBatch -> DecodedBatch: JPEG -> uint8 (B,3,H,W), expression -> arrays; bad samples
            # go to the on_bad_sample policy
            Decode(views=s.views, columns=self.columns, decoder=JpegDecoder(s.decoder), handler=handler),
        ]
        if s.augment.active():
            # DecodedBatch -> DecodedBatch: seeded flips/rotations (pos follows) and colour jitter
            stages.append(AugmentStage(Augment(s.augment, seed=s.seed), epoch=plan.epoch, rank=plan.rank))
        # DecodedBatch -> dict of loaders/batch.py: gene transform, tensors
        stages.append(Collate(self.gene_transform, niche_average=s.genes.niche_average))
        return run_stages(iter(batches.tolist()), stages)

    # -- state -------------------------------------------------------------------------------

    def state_for(
        self,
        point: ResumePoint,
        *,
        num_workers: int | None,
    ) -> dict[str, Any]:
        """The resume state of ``point`` (consumed batches, and each worker's rest when known)."""
        plan = self.plan(point.epoch)
        return {
            "format": STATE_FORMAT,
            "fingerprint": plan.fingerprint(),
            "epoch": point.epoch,
            "n_batches": plan.n_batches,
            "done": [[int(a), int(b)] for a, b in point.done],
            "runs": point.runs,
            "num_workers": num_workers,
            "world_size": self.world_size,
            "rank": self.rank,
            "batch_size": self.settings.batch_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """The state at the start of the next iteration (the epoch and any loaded resume point).

        Batches consumed from a running iteration are known to the loader, not to the dataset:
        take ``CorpusLoader.state_dict()`` (or torchdata's ``StatefulDataLoader.state_dict()``).
        """
        point = self.resume_point()
        return self.state_for(point, num_workers=len(point.runs) if point.runs is not None else None)

    def load_state_dict(self, state: Mapping[str, Any], *, num_workers: int | None = None) -> ResumeReport:
        """Resume from ``state``: the next iteration of its epoch yields only the batches not consumed."""
        if state.get("format") != STATE_FORMAT:
            raise ResumeError(f"not a {STATE_FORMAT} loader state (format {state.get('format')!r})")
        if int(state["world_size"]) != self.world_size:
            raise ResumeError(
                f"the state was saved with world size {state['world_size']}, this run has {self.world_size}: "
                "mid-epoch resume needs the same world size (or start the next epoch afresh)"
            )
        if int(state["batch_size"]) != self.settings.batch_size:
            raise ResumeError(
                f"the state was saved with batch size {state['batch_size']}, this run has {self.settings.batch_size}"
            )
        epoch = int(state["epoch"])
        plan = self.plan(epoch)
        if state["fingerprint"] != plan.fingerprint():
            raise ResumeError(
                "the state belongs to another corpus selection or order (shards, filters, seed, shuffle, "
                "window, drop_last or uneven differ): resume with the settings it was saved with"
            )
        done = intervals(expand(state["done"]))
        remaining = plan.remaining(done)
        runs = state.get("runs")
        if runs is not None:
            listed = np.sort(np.concatenate([expand(r) for r in runs])) if runs else np.zeros(0, dtype=np.int64)
            if not np.array_equal(listed, remaining):
                raise ResumeError("the state's worker runs do not match its consumed batches: a corrupt state")
        self.epoch = epoch
        self._resume = ResumePoint(epoch, done, runs)
        report = ResumeReport(
            epoch=epoch,
            consumed_batches=plan.n_batches - len(remaining),
            remaining_batches=len(remaining),
            saved_workers=state.get("num_workers"),
            num_workers=num_workers,
        )
        log.info("%s", report.message())
        return report


class EpochIterator:
    """One worker's iteration of one epoch; its state is what torchdata snapshots per worker."""

    def __init__(self, dataset: CorpusDataset, point: ResumePoint, *, worker: int, num_workers: int) -> None:
        self.dataset = dataset
        self.worker, self.num_workers = worker, num_workers
        self._setup(point)
        if not point.done and self.plan.n_batches < num_workers:
            raise EmptySelectionError(
                f"{self.plan.n_batches} batches per epoch cannot feed {num_workers} workers: "
                "use fewer workers or a smaller batch size"
            )
        self.yielded = 0
        self._items: Iterator[dict[str, Any]] | None = None

    def _setup(self, point: ResumePoint) -> None:
        self.point = point
        self.plan = self.dataset.plan(point.epoch)
        self.runs = point.worker_runs(self.plan, self.num_workers)
        self.batches = self.runs[self.worker]

    def __iter__(self) -> EpochIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._items is None:
            self._items = self.dataset._pipeline(self.plan, self.batches[self.yielded :])
        item = next(self._items)
        self.yielded += 1
        return item

    def state_dict(self) -> dict[str, Any]:
        """This worker's progress: the runs of all workers at the start, and its own count."""
        point = ResumePoint(self.point.epoch, self.point.done, [intervals(r) for r in self.runs])
        state = self.dataset.state_for(point, num_workers=self.num_workers)
        state.update(worker=self.worker, yielded=self.yielded)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a state saved by the same worker of a loader with as many workers."""
        if int(state["num_workers"]) != self.num_workers or int(state["worker"]) != self.worker:
            raise ResumeError(
                f"iterator state of worker {state['worker']}/{state['num_workers']} given to worker "
                f"{self.worker}/{self.num_workers}: convert it with loaders.resume_state_from instead"
            )
        if state["fingerprint"] != self.dataset.plan(int(state["epoch"])).fingerprint():
            raise ResumeError("the iterator state belongs to another corpus selection or order")
        self._setup(ResumePoint(int(state["epoch"]), [list(r) for r in state["done"]], state["runs"]))
        self.yielded = int(state["yielded"])
        self._items = None


def resume_state_from(stateful_state: Mapping[str, Any]) -> dict[str, Any]:
    """A ``CorpusDataset`` resume state from a torchdata ``StatefulDataLoader.state_dict()``.

    Collects every worker's iterator state (our states carry ``format``, ``worker`` and
    ``yielded``), and returns the consumed batches of all of them as one state, which
    ``CorpusDataset.load_state_dict`` accepts with any number of workers.
    """
    found: list[Mapping[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            if node.get("format") == STATE_FORMAT and "yielded" in node:
                found.append(node)
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(stateful_state)
    if not found:
        raise ResumeError("no stcorpus iterator state in this StatefulDataLoader state (did it iterate at all?)")
    first = found[0]
    if any(s["fingerprint"] != first["fingerprint"] or s["epoch"] != first["epoch"] for s in found):
        raise ResumeError("worker states of different epochs or plans in one StatefulDataLoader state")
    n_workers = int(first["num_workers"])
    if sorted(int(s["worker"]) for s in found) != list(range(n_workers)):
        raise ResumeError(f"expected the states of {n_workers} workers, found workers {[s['worker'] for s in found]}")
    runs = [expand(r) for r in first["runs"]]
    yielded = {int(s["worker"]): int(s["yielded"]) for s in found}
    prefixes = {int(b) for w, run in enumerate(runs) for b in run[: yielded[w]]}
    done = set(expand(first["done"]).tolist()) | prefixes
    # If the workers were asked in turn (they are), the total count also gives the delivery
    # order of the rest; keep it when it accounts for exactly the same batches.
    consumed, rest = advance(runs, sum(yielded.values()))
    exact = rest is not None and set(consumed.tolist()) == prefixes
    state = {k: v for k, v in first.items() if k not in ("worker", "yielded")}
    state["done"] = intervals(sorted(done))
    state["runs"] = [intervals(r) for r in rest] if exact and rest is not None else None
    return state


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


class CorpusLoader:
    """A ``torch.utils.data.DataLoader`` over a ``CorpusDataset`` that knows which batches it delivered.

    Workers are started per epoch (``persistent_workers`` would keep a stale epoch and resume
    point in the workers). ``state_dict()`` at any point between batches, ``load_state_dict()``
    before iterating; see the module docstring.
    """

    def __init__(
        self,
        dataset: CorpusDataset,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        timeout: float = 0.0,
        multiprocessing_context: str | None = None,
        worker_init_fn: Callable[[int], None] | None = None,
    ) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.options: dict[str, Any] = {
            "num_workers": num_workers,
            "pin_memory": pin_memory,
            "timeout": timeout,
            "worker_init_fn": worker_init_fn,
        }
        if num_workers > 0:
            self.options["prefetch_factor"] = prefetch_factor or 2
            self.options["multiprocessing_context"] = multiprocessing_context
        self._start(dataset.resume_point())

    def _start(self, point: ResumePoint) -> None:
        """Runs of each worker from ``point``; nothing delivered yet."""
        self._point = point
        self._runs = point.worker_runs(self.dataset.plan(point.epoch), max(self.num_workers, 1))
        self._delivered = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next iteration."""
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches the next iteration yields on this rank."""
        point = self.dataset.resume_point()
        return len(self.dataset.plan(point.epoch).remaining(point.done))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import DataLoader

        ds = self.dataset
        point = ds.resume_point()
        plan = ds.plan(point.epoch)
        if not point.done and plan.n_batches < self.num_workers:
            raise EmptySelectionError(
                f"{plan.n_batches} batches per epoch cannot feed {self.num_workers} workers: "
                "use fewer workers or a smaller batch size"
            )
        self._start(point)
        # The dataset yields finished batches: no collate/convert pass over them (it would walk
        # every key string of every batch).
        loader = DataLoader(ds, batch_size=None, collate_fn=as_is, in_order=True, **self.options)
        iterator = iter(loader)  # workers start here, with the dataset (and resume point) as it is now
        ds._resume = None
        for item in iterator:
            self._delivered += 1
            yield item

    def state_dict(self) -> dict[str, Any]:
        """The resume state: the batches delivered so far in this epoch (plus those of a loaded state)."""
        consumed, rest = advance(self._runs, self._delivered)
        done = intervals(expand(self._point.done).tolist() + consumed.tolist())
        runs = [intervals(r) for r in rest] if rest is not None else None
        point = ResumePoint(self._point.epoch, done, runs)
        return self.dataset.state_for(point, num_workers=self.num_workers)

    def load_state_dict(self, state: Mapping[str, Any]) -> ResumeReport:
        """Resume from ``state`` (also one saved with another number of workers)."""
        report = self.dataset.load_state_dict(state, num_workers=self.num_workers)
        self._start(self.dataset.resume_point())
        return report
