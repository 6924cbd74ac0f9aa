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
(or the unreadable rest of a shard), count it (``CorpusDataset.skipped()``, over all workers) and,
for ``warn``, log its key: the first five one by one, then one line per 1,000 more and one at the
end of the epoch with the count (``RateLimitedLog``), so a corrupt shard does not flood the log.
A batch keeps its index even when samples are dropped; a batch with no readable sample is
yielded empty (``B == 0``) so batch counts, DDP lockstep and resume stay exact.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import IterableDataset

from stcorpus import schema
from stcorpus.loaders import batch as B
from stcorpus.loaders.buffers import ArrayPool
from stcorpus.loaders.corpus import Corpus, Selection
from stcorpus.loaders.errors import (
    BadSampleError,
    CorpusError,
    EmptySelectionError,
    LoaderSettingsError,
    ResumeError,
    ShardError,
)
from stcorpus.loaders.expression import ExpressionTransform
from stcorpus.loaders.genes import GeneSpace, load_means
from stcorpus.loaders.images import (
    Augment,
    AugmentParams,
    BatchDecoder,
    DeviceImages,
    JpegDecoder,
    apply_numpy,
    jpeg_size,
    pack_jpegs,
)
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
from stcorpus.loaders.read import Columns, RawSample, ShardReader
from stcorpus.loaders.settings import COUNT_TRANSFORMS, LoaderSettings
from stcorpus.loaders.shard_cache import ShardCache, ShardSource, shard_records
from stcorpus.loaders.source import open_source

if TYPE_CHECKING:
    import os

log = logging.getLogger(__name__)

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
    """One batch of raw samples (None where a sample could not be read or was refused), in order."""

    index: int
    samples: list[RawSample | None]


@dataclass
class ImageBatch:
    """One batch after the image stage: the samples kept, their views decoded (or JPEG bytes)."""

    index: int
    samples: list[RawSample]
    pos: npt.NDArray[np.int64]
    #: decode: cpu: (B, H, W, 3) uint8 per view.
    views: dict[str, npt.NDArray[np.uint8]] = field(default_factory=dict)
    #: decode: nvjpeg: (concatenated JPEG bytes, (B + 1) offsets) per view.
    jpegs: dict[str, tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]] = field(default_factory=dict)
    #: decode: nvjpeg: the augmentation drawn here, applied by the consumer after decoding.
    augment: AugmentParams | None = None


# ---------------------------------------------------------------------------------------------
# Error policy
# ---------------------------------------------------------------------------------------------


class RateLimitedLog:
    """Warnings of skipped samples, rate-limited with a count (a bad shard of 10k samples must not
    print 10k lines): the first ``burst`` one by one, then one line per ``every`` further samples
    saying how many were skipped and the last reason, and at the end (``close``) one line with the
    count of those not yet reported. Count-based, not timed, so what is logged does not depend on
    the machine's speed. One per process: each DataLoader worker reports its own."""

    def __init__(self, *, burst: int = 5, every: int = 1000) -> None:
        if burst < 0 or every < 1:
            raise ValueError(f"burst must be >= 0 and every >= 1, got burst={burst}, every={every}")
        self.burst, self.every = burst, every
        self.seen = 0
        self.pending = 0
        self.last = ""

    def __call__(self, message: str, n: int = 1) -> None:
        """Count ``n`` skipped samples for ``message``; log it if it is among the first or ends a run."""
        self.seen += n
        if self.seen - n < self.burst:
            log.warning("%s", message)
            return
        self.pending += n
        self.last = message
        if self.pending >= self.every:
            self._report("skipped %d more bad samples (%d in all in this process); the last: %s")

    def close(self) -> None:
        """Report the samples skipped since the last line (the end of a worker's epoch)."""
        if self.pending:
            self._report("skipped %d more bad samples (%d in all in this process, end of epoch); the last: %s")

    def _report(self, template: str) -> None:
        log.warning(template, self.pending, self.seen, self.last)
        self.pending = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"burst": self.burst, "every": self.every, "seen": 0, "pending": 0, "last": ""}


class Handler:
    """The ``on_bad_sample`` policy: raise, or count (shared across workers) and go on."""

    def __init__(self, policy: str, counters: Any) -> None:
        self.policy = policy
        self.counters = counters
        self.warn = RateLimitedLog()

    def _count(self, slot: int, n: int) -> None:
        if self.counters is not None:
            info = torch.utils.data.get_worker_info()
            row = 0 if info is None else 1 + info.id % (_COUNTER_ROWS - 1)
            self.counters[row * _COUNTERS + slot] += n

    def sample(self, exc: BadSampleError) -> None:
        """A sample that cannot be used."""
        if self.policy == "error":
            raise exc
        self._count(_SKIPPED, 1)
        if self.policy == "warn":
            self.warn(f"skipping sample {exc.key}: {exc}")

    def shard(self, exc: ShardError, path: str, lost: int) -> None:
        """A shard that cannot be read to its end: ``lost`` samples are missing."""
        if self.policy == "error":
            raise exc
        self._count(_BAD_SHARDS, 1)
        self._count(_SKIPPED, lost)
        if self.policy == "warn":
            self.warn(f"skipping {lost} samples of {path}: {exc}", lost)

    def close(self) -> None:
        """The end of this worker's epoch: report the skips not reported yet."""
        self.warn.close()

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


class CheckExpression:
    """``RawBatch`` -> ``RawBatch``: a sample with a fault or unusable expression goes to the policy.

    What the reader parsed (both formats alike) is checked here: the member faults a tar reader
    noted, gene and count arrays present and of equal length.
    """

    def __init__(self, *, columns: Columns, handler: Handler) -> None:
        self.columns, self.handler = columns, handler
        self.pairs = [
            (genes, counts)
            for genes, counts, wanted in (
                (schema.Expr.GENES.value, schema.Expr.COUNTS.value, columns.expression),
                (schema.Expr.NICHE_GENES.value, schema.Expr.NICHE_COUNTS.value, columns.niche),
            )
            if wanted
        ]

    def __call__(self, batches: Iterator[RawBatch]) -> Iterator[RawBatch]:
        for raw in batches:
            yield self.check(raw)

    def check(self, raw: RawBatch) -> RawBatch:
        """The batch with refused samples set to None (and counted by the policy)."""
        samples = raw.samples
        for i, sample in enumerate(samples):
            if sample is None:
                continue  # already counted by the shard handler
            problem = sample.fault
            if problem is None:
                for genes_name, counts_name in self.pairs:
                    genes, counts = getattr(sample, genes_name), getattr(sample, counts_name)
                    if genes is None or counts is None or len(genes) != len(counts):
                        problem = f"{genes_name}/{counts_name} missing or of unequal length"
                        break
            if problem is not None:
                self.handler.sample(BadSampleError(f"{sample.key}: {problem}", key=sample.key))
                samples[i] = None
        return raw


class DecodeImages:
    """``RawBatch`` -> ``ImageBatch`` (decode: cpu): JPEGs into one uint8 buffer per view."""

    def __init__(
        self, *, views: Mapping[str, schema.View], decoder: JpegDecoder, handler: Handler, pool: ArrayPool
    ) -> None:
        self.views = dict(views)
        self.decoder = decoder
        self.handler = handler
        self.pool = pool

    def __call__(self, batches: Iterator[RawBatch]) -> Iterator[ImageBatch]:
        for raw in batches:
            yield self.decode(raw)

    def decode(self, raw: RawBatch) -> ImageBatch:
        """Decode one batch; undecodable images go to the handler and their samples are left out."""
        n = len(raw.samples)
        buffers = {v: self.pool.get((n, view.size_px, view.size_px, 3), np.uint8) for v, view in self.views.items()}
        slots = list(buffers.items())
        decoder, handler = self.decoder, self.handler
        kept: list[RawSample] = []
        for sample in raw.samples:
            if sample is None:
                continue
            slot = len(kept)
            try:
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
        pos = np.fromiter((s.pos for s in kept), dtype=np.int64, count=n_kept)
        return ImageBatch(index=raw.index, samples=kept, pos=pos, views=views)


class PassImages:
    """``RawBatch`` -> ``ImageBatch`` (decode: nvjpeg): each view's JPEG bytes, concatenated.

    The header of every JPEG is read (a microsecond) so that an image of the wrong size or with a
    broken header is refused here, by the policy, not on the device.
    """

    def __init__(self, *, views: Mapping[str, schema.View], handler: Handler) -> None:
        self.views = dict(views)
        self.handler = handler

    def __call__(self, batches: Iterator[RawBatch]) -> Iterator[ImageBatch]:
        for raw in batches:
            yield self.pass_on(raw)

    def pass_on(self, raw: RawBatch) -> ImageBatch:
        """The batch's JPEGs as one uint8 array (+ offsets) per view."""
        kept: list[RawSample] = []
        for sample in raw.samples:
            if sample is None:
                continue
            try:
                for name, view in self.views.items():
                    data = getattr(sample, name)
                    if not data:
                        raise BadSampleError(f"{sample.key}: no {name} image in the sample", key=sample.key)
                    size = jpeg_size(data)
                    if size != (view.size_px, view.size_px):
                        what = "not a readable JPEG" if size is None else f"{size[1]}x{size[0]}"
                        raise BadSampleError(
                            f"{sample.key}: {name} is {what}, expected {view.size_px}x{view.size_px}", key=sample.key
                        )
            except BadSampleError as exc:
                self.handler.sample(exc)
                continue
            kept.append(sample)
        if not kept:
            self.handler.empty(raw.index)
        jpegs = {name: pack_jpegs([getattr(s, name) for s in kept]) for name in self.views}
        pos = np.fromiter((s.pos for s in kept), dtype=np.int64, count=len(kept))
        return ImageBatch(index=raw.index, samples=kept, pos=pos, jpegs=jpegs)


class AugmentStage:
    """``ImageBatch`` -> ``ImageBatch``: seeded flips/rotations (``pos`` follows) and colour jitter.

    The parameters are drawn here on both paths; decoded views are augmented here, JPEG bytes
    (decode: nvjpeg) carry the parameters to the consumer, which applies them after decoding.
    """

    def __init__(self, augment: Augment, *, epoch: int, rank: int) -> None:
        self.augment, self.epoch, self.rank = augment, epoch, rank

    def __call__(self, batches: Iterator[ImageBatch]) -> Iterator[ImageBatch]:
        for batch in batches:
            if batch.samples:
                params = self.augment.draw(len(batch.samples), epoch=self.epoch, rank=self.rank, batch=batch.index)
                for array in batch.views.values():
                    apply_numpy(array, params)
                if batch.jpegs:
                    batch.augment = params
                batch.pos = Augment.move_pos(batch.pos, params)
            yield batch


def _sparse(
    arrays: Sequence[npt.NDArray[Any]], dtype: np.dtype[Any], pool: ArrayPool | None = None
) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
    """Per-sample arrays as one ``dtype`` array and ``(B + 1)`` offsets (into ``pool``'s memory if given).

    One pass: ``np.concatenate`` casts while it copies (``astype``'s casting), instead of
    concatenating in the stored dtype and casting the result (a second full copy; half the time at
    3,000 genes, bench/README.md "Where the worker's time goes").
    """
    lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    values = np.empty(total, dtype=dtype) if pool is None else pool.get(total, dtype)
    if arrays:
        np.concatenate(arrays, out=values, casting="unsafe")
    return values, offsets


class Collate:
    """``ImageBatch`` -> the batch dict of ``loaders/batch.py``: tensors to hand over.

    Expression leaves sparse (raw counts, ``genes.output: sparse``) or, with ``dense``, already
    through the gene transform (run here, on the CPU).
    """

    def __init__(
        self,
        transform: ExpressionTransform | None,
        *,
        counts_dtype: str,
        niche: bool,
        dense: bool,
        pool: ArrayPool | None = None,
    ) -> None:
        self.transform = transform
        self.counts_dtype = np.dtype(counts_dtype)
        self.niche = niche
        self.dense = dense
        self.pool = pool

    def __call__(self, batches: Iterator[ImageBatch]) -> Iterator[dict[str, Any]]:
        for batch in batches:
            yield self.collate(batch)

    def collate(self, batch: ImageBatch) -> dict[str, Any]:
        """One batch dict."""
        keys = [s.key for s in batch.samples]
        slide_ids = [k.partition(schema.KEY_SEPARATOR)[0] for k in keys]
        out: dict[str, Any] = {B.KEY: keys, B.SLIDE_ID: slide_ids}
        for view, array in batch.views.items():
            out[view] = torch.from_numpy(array).permute(0, 3, 1, 2)  # (B, 3, H, W), channels-last memory
        for view, (data, offsets) in batch.jpegs.items():
            out[f"{view}_jpeg"], out[f"{view}_jpeg_offsets"] = torch.from_numpy(data), torch.from_numpy(offsets)
        if batch.augment is not None:
            out[B.AUGMENT_ROT90] = torch.from_numpy(batch.augment.k)
            out[B.AUGMENT_HFLIP] = torch.from_numpy(batch.augment.hflip)
            out[B.AUGMENT_JITTER] = torch.from_numpy(batch.augment.jitter)
        out[B.POS] = torch.from_numpy(batch.pos)
        t = self.transform
        if t is None:
            return out
        samples = batch.samples
        genes, offsets = _sparse([s.genes for s in samples], np.dtype(np.int32), self.pool)  # type: ignore[misc]
        counts, _ = _sparse([s.counts for s in samples], self.counts_dtype, self.pool)  # type: ignore[misc]
        out[B.GENES], out[B.COUNTS], out[B.OFFSETS] = map(torch.from_numpy, (genes, counts, offsets))
        out[B.SLIDE_INDEX] = torch.from_numpy(t.slide_index(slide_ids))
        if self.niche:
            genes, offsets = _sparse([s.niche_genes for s in samples], np.dtype(np.int32), self.pool)  # type: ignore[misc]
            counts, _ = _sparse([s.niche_counts for s in samples], self.counts_dtype, self.pool)  # type: ignore[misc]
            out[B.NICHE_GENES], out[B.NICHE_COUNTS], out[B.NICHE_OFFSETS] = map(
                torch.from_numpy, (genes, counts, offsets)
            )
            neighbours = np.fromiter((s.n_neighbors for s in samples), dtype=np.float32, count=len(samples))
            out[B.N_NEIGHBORS] = torch.from_numpy(neighbours)
        if self.dense:
            t(out)
        return out


class Finish:
    """What the consumer of a batch runs where it is consumed (``CorpusLoader(device=...)``).

    Tensors move to ``device`` (non-blocking from pinned memory), JPEG bytes are decoded there
    (decode: nvjpeg, with the worker's augmentation), and sparse raw counts go through the gene
    transform there. A batch that arrives finished (``genes.output: dense``, decode: cpu) is only moved.
    """

    def __init__(self, transform: ExpressionTransform | None, images: DeviceImages | None) -> None:
        self.transform = transform
        self.images = images

    def __call__(self, batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
        """The finished batch on ``device``."""
        device = torch.device(device)
        out: dict[str, Any] = dict(batch)
        if self.images is not None:
            out = dict(self.images(out, device))
        out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        if self.transform is not None and B.OFFSETS in out:
            out = dict(self.transform(out))
        return out


class ReportSkips:
    """Batches pass through unchanged; when they end (or the consumer stops early), the handler
    reports the skipped samples it has not reported yet (``RateLimitedLog.close``)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    def __call__(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        try:
            yield from batches
        finally:
            self.handler.close()


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
        try:
            corpus_views = schema.corpus_views(self.corpus.info)
        except ValueError as exc:
            raise CorpusError(f"{self.source.location}/{schema.CORPUS_FILE}: {exc}") from exc
        missing = [v for v in settings.views if v not in corpus_views]
        if missing:
            raise LoaderSettingsError(
                f"views {missing} are not in this corpus (corpus.json views: {sorted(corpus_views)}); "
                "ask for the views it has"
            )
        #: The views read, with their tile size and um/px from corpus.json.
        self.views = {v: corpus_views[v] for v in settings.views}
        self.counts_dtype = self.corpus.counts_dtype
        #: Vocabulary indices of the genes the corpus measured (``genes.parquet`` ``measured``), sorted.
        self.measured_genes: npt.NDArray[np.int64] = self.corpus.measured_indices()
        self.gene_transform: ExpressionTransform | None = None
        if g.transform != "none":
            self._check_count_kind()
            space = GeneSpace.build(self.corpus.genes, g)
            measured = self.corpus.measured_genes()
            if self.selection.slide_ids:
                measured = {k: v for k, v in measured.items() if k in self.selection.slide_ids}
            means = load_means(g.gene_means) if g.gene_means else None
            self.gene_transform = ExpressionTransform(space, g, measured=measured, means=means)
        #: Decodes JPEG bytes where batches are consumed (decode: nvjpeg); a test may set a CPU decoder.
        self.device_decoder: BatchDecoder | None = None
        self.epoch = 0
        self._resume: ResumePoint | None = None
        self.counters: Any = multiprocessing.RawArray("q", _COUNTERS * _COUNTER_ROWS)
        #: Memory of the per-batch arrays, reused across batches and epochs (per process, not pickled).
        self.buffers = ArrayPool(size=64)
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

    def _check_count_kind(self) -> None:
        """Count-based transforms refuse slides of normalized values unless the filters take them knowingly."""
        assert self.corpus is not None
        s = self.settings
        if s.genes.transform not in COUNT_TRANSFORMS or "normalized" in s.filters.count_kind:
            return
        slides = self.corpus.select_slides(splits=s.split, filters=s.filters)
        normalized = sorted(k for k, row in slides.items() if row.get("count_kind") == "normalized")
        if normalized:
            shown = ", ".join(normalized[:10]) + (f" and {len(normalized) - 10} more" if len(normalized) > 10 else "")
            raise LoaderSettingsError(
                f"genes.transform={s.genes.transform!r} treats values as raw counts, but {len(normalized)} selected "
                f"slides hold normalized values (slides.parquet count_kind): {shown}. Leave them out with "
                "filters.count_kind: [raw], take them in knowingly with filters.count_kind: [raw, normalized], "
                "or use genes.transform: counts"
            )
        if slides and all(row.get("count_kind") is None for row in slides.values()):
            log.warning(
                "%s: slides.parquet does not say whether the slides hold raw counts (no count_kind; a schema 1 "
                "corpus): genes.transform=%s treats them as raw",
                self.source.location,
                s.genes.transform,
            )

    def finish(self, batch: Mapping[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
        """A batch of this dataset made ready on ``device``: decoded (nvjpeg) and gene-transformed there.

        ``CorpusLoader(dataset, device=...)`` calls it for every batch; call it yourself when you
        iterate the dataset or a plain DataLoader over it.
        """
        return self.finisher()(batch, device)

    def finisher(self) -> Finish:
        """The :class:`Finish` step of this dataset (picklable)."""
        images = None
        if self.settings.decode == "nvjpeg":
            images = DeviceImages(self.views, decoder=self.device_decoder)
        transform = self.gene_transform if self.settings.genes.output == "sparse" else None
        return Finish(transform, images)

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
            parquet_decoder=s.parquet_decoder,
            pool=self.buffers,
        )
        stages: list[Callable[[Iterator[Any]], Iterator[Any]]] = [
            # shards.parquet (filtered) -> split by rank -> shuffled windows -> batches -> split by
            # worker: all decided in EpochPlan; what enters here is this worker's batch ids.
            # batch ids -> (window, [batch ids]) in ascending window order
            partial(window_groups, plan=plan),
            # (window, [batch ids]) -> RawBatch: each window's samples read once (read-ahead over
            # HTTP), permuted, cut into batches; JPEG bytes and expression arrays (tar members
            # taken apart), in one shape for both formats
            ReadWindows(plan, reader, plan.windows_for(batches)),
            # RawBatch -> RawBatch: faulty members or unusable expression go to on_bad_sample
            CheckExpression(columns=self.columns, handler=handler),
        ]
        if s.decode == "cpu":
            # RawBatch -> ImageBatch: JPEG -> uint8 (B,H,W,3) buffers; bad images go to on_bad_sample
            stages.append(
                DecodeImages(views=self.views, decoder=JpegDecoder(s.decoder), handler=handler, pool=self.buffers)
            )
        else:
            # RawBatch -> ImageBatch: JPEG bytes (headers checked) for the consumer's nvJPEG decode
            stages.append(PassImages(views=self.views, handler=handler))
        if s.augment.active():
            # ImageBatch -> ImageBatch: seeded flips/rotations (pos follows) and colour jitter,
            # applied to decoded views or carried with the JPEG bytes to the consumer
            stages.append(AugmentStage(Augment(s.augment, seed=s.seed), epoch=plan.epoch, rank=plan.rank))
        # ImageBatch -> dict of loaders/batch.py: tensors; expression sparse (raw counts) or, with
        # genes.output: dense, through the gene transform here
        stages.append(
            Collate(
                self.gene_transform,
                counts_dtype=self.counts_dtype,
                niche=s.genes.niche,
                dense=s.genes.output == "dense",
                pool=self.buffers,
            )
        )
        # dict -> the same dict; at the end, a last line counting the skips not logged one by one
        stages.append(ReportSkips(handler))
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

    ``device``: where batches are consumed. Given, every batch is finished there
    (``CorpusDataset.finish``: moved, JPEGs decoded with decode: nvjpeg, sparse raw counts through
    the gene transform) before it is yielded; None yields what the workers hand over (sparse
    expression by default, ``loaders/batch.py``).
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
        device: torch.device | str | None = None,
    ) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.device = torch.device(device) if device is not None else None
        self._finish = dataset.finisher() if device is not None else None
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
        finish, device = self._finish, self.device
        for item in iterator:
            self._delivered += 1
            yield finish(item, device) if finish is not None and device is not None else item

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
