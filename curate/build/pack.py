"""Pack: finished units -> equal-count shards of every split, in both formats.

The pack reads each built slide's samples (memory-mapped Arrow in the unit work format of ``workdir``), maps the slide's
local gene indices onto the corpus vocabulary, orders the samples of each split, and writes
them with ``stcorpus.curate.shards.ShardWriter``.

Order (``PackSettings.order``):

- ``shuffled`` (default): one seeded permutation of all samples of a split across all its
  slides, so a streaming reader's batches mix slides (what CLIP-style training needs).
- ``slide``: slides by id, each slide's spots in lattice order (as the unit wrote them), for
  neighbourhood and same-slide training.

Shard size: every shard of a split holds exactly ``n`` samples but the last, where ``n`` is
``samples_per_shard`` or fewer so that a shard stays under ``max_shard_bytes`` on average.
The pack is deterministic and cheap next to the units, so a killed pack is simply redone.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from stcorpus import schema
from stcorpus.curate.build.workdir import UNIT_IMAGES, UNIT_KEY, UNIT_LISTS, UNIT_SAMPLE_FIELDS, UnitResult, WorkDir
from stcorpus.curate.errors import SettingsError
from stcorpus.curate.shards import ShardInfo, ShardSample, ShardSettings, ShardWriter, lossless_cast

if TYPE_CHECKING:
    import pyarrow as pa

    from stcorpus.curate.genes import GeneIndex

Order = Literal["shuffled", "slide"]

SLIDE_SAMPLE_FIELDS = ("slide_id", "study_id", "species", "organ", "technology", "assay")


@dataclass(frozen=True)
class PackSettings:
    """How the shards are cut and ordered."""

    order: Order = "shuffled"
    samples_per_shard: int = 10_000
    #: Shards aim at ~0.5-1 GB on the Hub: large enough to stream efficiently, small enough to retry.
    max_shard_bytes: int = 768 * 1024**2
    row_group_size: int = 1_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.order not in ("shuffled", "slide"):
            raise SettingsError(f"order must be 'shuffled' or 'slide', not {self.order!r}")
        if self.samples_per_shard < 1 or self.max_shard_bytes < 1 or self.row_group_size < 1:
            raise SettingsError(
                f"shards need at least one sample and one byte (curate build --samples-per-shard, --max-shard-mb): "
                f"samples_per_shard={self.samples_per_shard!r}, max_shard_bytes={self.max_shard_bytes!r}, "
                f"row_group_size={self.row_group_size!r}"
            )


def corpus_counts_dtype(units: Sequence[UnitResult]) -> str:
    """int32 when every slide has integer counts, else float32 for the whole corpus."""
    return "int32" if all(u.counts_dtype == "int32" for u in units) else "float32"


def corpus_tar_dtypes(
    work: WorkDir, units: Sequence[UnitResult], *, gene_index: GeneIndex, counts_dtype: str
) -> schema.TarDtypes:
    """The smallest ``expr.npz`` dtypes that hold every gene index and count of ``units`` (one choice per corpus).

    The gene index dtype follows the largest index the slides' genes take, not the vocabulary's
    size: the vocabulary is the references' ~128k genes, but a human corpus's genes mostly sit
    below 65,536 and keep two bytes each. One pass over the memory-mapped ``counts`` /
    ``niche_counts`` values of every unit: a few milliseconds per slide next to the seconds the
    pack spends writing it.
    """
    import pyarrow.compute as pc

    counts, niche = schema.Expr.COUNTS.value, schema.Expr.NICHE_COUNTS.value
    highest = {counts: 0.0, niche: 0.0}
    top_index = -1
    for unit in units:
        positions = gene_index.positions(np.asarray(unit.gene_ids, dtype=np.str_))
        if positions.size:
            top_index = max(top_index, int(positions.max()))
        table = work.samples(unit.slide_id)
        for name in highest:
            values = table.column(name).combine_chunks().flatten()
            if len(values):
                top = pc.max(values).as_py()
                highest[name] = max(highest[name], float(top))
    return schema.TarDtypes.smallest(
        n_genes=top_index + 1, max_count=highest[counts], max_niche_count=highest[niche], counts_dtype=counts_dtype
    )


def shard_size(units: Sequence[UnitResult], settings: PackSettings) -> int:
    """Samples per shard: the setting, reduced so an average shard stays under the byte limit."""
    samples = sum(u.n_samples for u in units)
    if samples == 0:
        return settings.samples_per_shard
    mean_bytes = sum(u.sample_bytes for u in units) / samples
    by_bytes = max(1, int(settings.max_shard_bytes // max(mean_bytes, 1.0)))
    return min(settings.samples_per_shard, by_bytes)


def _seed_for(seed: int, split: str) -> int:
    return int.from_bytes(hashlib.sha256(f"stcorpus-order:{seed}:{split}".encode()).digest()[:8], "big")


def sample_order(
    n_per_slide: Sequence[int], *, order: Order, seed: int, split: str
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]:
    """(slide position, row) of every sample of a split, in the order they are written."""
    slide_pos = np.repeat(np.arange(len(n_per_slide), dtype=np.int32), n_per_slide)
    rows = np.concatenate([np.arange(n, dtype=np.int64) for n in n_per_slide]) if n_per_slide else np.zeros(0, np.int64)
    if order == "shuffled":
        permutation = np.random.default_rng(_seed_for(seed, split)).permutation(len(rows))
        slide_pos, rows = slide_pos[permutation], rows[permutation]
    return slide_pos, rows


class _Rows:
    """Zero-copy row access to a (memory-mapped) chunked column: no ``take``, which concatenates chunks."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        lengths = [len(chunk) for chunk in column.chunks]
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.chunks = column.chunks

    def locate(self, row: int) -> tuple[int, int]:
        chunk = int(np.searchsorted(self.starts, row, side="right") - 1)
        return chunk, row - int(self.starts[chunk])


class _ListRows(_Rows):
    """Rows of a ``list<number>`` column as numpy views into the mapped file."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        super().__init__(column)
        self.offsets = [chunk.offsets.to_numpy() for chunk in self.chunks]
        self.values = [chunk.values.to_numpy(zero_copy_only=False) for chunk in self.chunks]

    def __getitem__(self, row: int) -> npt.NDArray[Any]:
        chunk, i = self.locate(row)
        offsets = self.offsets[chunk]
        view: npt.NDArray[Any] = self.values[chunk][offsets[i] : offsets[i + 1]]
        return view


class _BinaryRows(_Rows):
    """Rows of a ``binary`` column as bytes copied straight out of the mapped file."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        super().__init__(column)
        self.offsets = []
        self.data = []
        for chunk in self.chunks:
            _, offsets, data = chunk.buffers()
            self.offsets.append(np.frombuffer(offsets, dtype=np.int32)[chunk.offset : chunk.offset + len(chunk) + 1])
            self.data.append(memoryview(data))

    def __getitem__(self, row: int) -> bytes:
        chunk, i = self.locate(row)
        offsets = self.offsets[chunk]
        return bytes(self.data[chunk][offsets[i] : offsets[i + 1]])


class _SlideSource:
    """One built slide as the pack reads it: row access to its samples and its gene index map."""

    def __init__(
        self, unit: UnitResult, table: pa.Table, *, local_to_vocab: npt.NDArray[np.int32], counts_dtype: str
    ) -> None:
        self.unit = unit
        self.table = table  # keeps the memory map alive while the views below point into it
        self.local_to_vocab = local_to_vocab
        #: Genes outside the vocabulary (-1 in the map; an append keeps the corpus's vocabulary) are dropped.
        self.outside = bool(np.any(local_to_vocab < 0))
        self.counts_dtype = np.dtype(counts_dtype)
        self.fixed = {name: unit.slide.get(name) for name in SLIDE_SAMPLE_FIELDS}
        self.keys = table.column(UNIT_KEY).to_pylist()
        self.images = {name: _BinaryRows(table.column(name)) for name in UNIT_IMAGES}
        self.lists = {name: _ListRows(table.column(name)) for name in UNIT_LISTS}
        self.meta = {name: table.column(name).to_pylist() for name in UNIT_SAMPLE_FIELDS}

    def samples(self, rows: npt.NDArray[np.int64], *, split: str) -> list[ShardSample]:
        """The samples at ``rows`` (in that order), ready to write."""
        fixed = self.fixed | {"split": split}
        out = []
        for row in rows.tolist():
            genes = self.local_to_vocab[self.lists[schema.Expr.GENES.value][row]]
            niche_genes = self.local_to_vocab[self.lists[schema.Expr.NICHE_GENES.value][row]]
            counts = lossless_cast(self.lists[schema.Expr.COUNTS.value][row], self.counts_dtype)
            niche_counts = lossless_cast(self.lists[schema.Expr.NICHE_COUNTS.value][row], self.counts_dtype)
            meta = dict(fixed)
            meta.update({name: self.meta[name][row] for name in UNIT_SAMPLE_FIELDS})
            if self.outside:
                keep, niche_keep = genes >= 0, niche_genes >= 0
                genes, counts = genes[keep], counts[keep]
                niche_genes, niche_counts = niche_genes[niche_keep], niche_counts[niche_keep]
                # The totals are over the vocabulary (schema.META_FIELDS), so they follow the drop.
                meta["total_counts"], meta["n_genes"] = float(counts.sum()), int(genes.size)
            # Local ids are sorted like the vocabulary (both by Ensembl id within a species), so the
            # mapped indices stay sorted; check rather than trust.
            if genes.size > 1 and np.any(np.diff(genes) <= 0):
                order = np.argsort(genes, kind="stable")
                genes, counts = genes[order], counts[order]
            if niche_genes.size > 1 and np.any(np.diff(niche_genes) <= 0):
                order = np.argsort(niche_genes, kind="stable")
                niche_genes, niche_counts = niche_genes[order], niche_counts[order]
            out.append(
                ShardSample(
                    key=self.keys[row],
                    patch=self.images[schema.PATCH_COLUMN][row],
                    region=self.images[schema.REGION_COLUMN][row],
                    genes=genes,
                    counts=counts,
                    niche_genes=niche_genes,
                    niche_counts=niche_counts,
                    meta=meta,
                )
            )
        return out


@dataclass(frozen=True)
class _PackContext:
    """What every shard writer needs (sent once to each worker process)."""

    out: str
    work_root: str
    vocabulary_ids: npt.NDArray[np.str_]
    counts_dtype: str
    shard_settings: ShardSettings
    tar_dtypes: schema.TarDtypes
    generation: int = 0
    drop_outside_vocabulary: bool = False


class _SlideCache:
    """The slides one process reads: gene maps kept, open (memory-mapped) tables bounded.

    With the shuffled order every shard draws from nearly every slide of its split, so a pack of
    thousands of slides must not keep a file open per slide (the usual limit is 1,024).
    """

    def __init__(self, context: _PackContext, *, max_open: int = 256) -> None:
        from collections import OrderedDict

        from stcorpus.curate.genes import GeneIndex

        self.context = context
        self.work = WorkDir(Path(context.work_root))
        self.index = GeneIndex(context.vocabulary_ids)
        self.max_open = max_open
        self.maps: dict[str, npt.NDArray[np.int32]] = {}
        self.sources: OrderedDict[str, _SlideSource] = OrderedDict()

    def source(self, slide_id: str) -> _SlideSource:
        """The slide's samples and gene map, opening (or reusing) its table."""
        source = self.sources.pop(slide_id, None)
        if source is None:
            unit = self.work.result(slide_id)
            if unit is None:
                raise FileNotFoundError(f"no finished unit for slide {slide_id} in {self.work.root}")
            if slide_id not in self.maps:
                ids = np.asarray(unit.gene_ids, dtype=np.str_)
                # indices raises GeneVocabularyError naming the ids when a slide's gene is not in the vocabulary.
                drop = self.context.drop_outside_vocabulary
                self.maps[slide_id] = self.index.positions(ids) if drop else self.index.indices(ids)
            source = _SlideSource(
                unit,
                self.work.samples(slide_id),
                local_to_vocab=self.maps[slide_id],
                counts_dtype=self.context.counts_dtype,
            )
            if len(self.sources) >= self.max_open:
                self.sources.popitem(last=False)
        self.sources[slide_id] = source
        return source


@dataclass(frozen=True)
class _ShardJob:
    """One shard (in both formats): its split, number and samples as (slide, row) pairs."""

    split: str
    index: int
    slide_ids: tuple[str, ...]  # slide_pos refers to this tuple
    slide_pos: npt.NDArray[np.int32]
    rows: npt.NDArray[np.int64]


def _write_shard(cache: _SlideCache, job: _ShardJob) -> list[ShardInfo]:
    context = cache.context
    samples: list[ShardSample | None] = [None] * len(job.rows)
    for pos in np.unique(job.slide_pos):
        where = np.flatnonzero(job.slide_pos == pos)
        source = cache.source(job.slide_ids[pos])
        for i, sample in zip(where, source.samples(job.rows[where], split=job.split), strict=True):
            samples[i] = sample
    with ShardWriter(
        Path(context.out),
        split=job.split,
        counts_dtype=context.counts_dtype,
        settings=context.shard_settings,
        tar_dtypes=context.tar_dtypes,
        first_index=job.index,
        generation=context.generation,
    ) as writer:
        for maybe in samples:
            assert maybe is not None, "every position of a shard job is filled by its slides"
            writer.add(maybe)
    return writer.shards


_WORKER_CACHE: _SlideCache | None = None


def _init_worker(context: _PackContext) -> None:
    global _WORKER_CACHE  # noqa: PLW0603 - one cache per pool process, set once by the initializer
    _WORKER_CACHE = _SlideCache(context)


def _write_shard_in_worker(job: _ShardJob) -> list[ShardInfo]:
    assert _WORKER_CACHE is not None, "pack worker used without its initializer"
    return _write_shard(_WORKER_CACHE, job)


@dataclass
class PackResult:
    """What the pack wrote."""

    shards: list[ShardInfo]
    counts_dtype: str
    samples_per_shard: int
    n_samples: dict[str, int]
    #: dtypes of the ``expr.npz`` arrays (``corpus.json`` ``expression``).
    tar_dtypes: schema.TarDtypes = field(default_factory=schema.TarDtypes)


def pack(
    out: Path,
    *,
    work: WorkDir,
    units: Sequence[UnitResult],
    splits: Mapping[str, str],
    gene_index: GeneIndex,
    settings: PackSettings,
    workers: int = 1,
    progress: Any = None,
    generation: int = 0,
    first_index: Mapping[str, int] | None = None,
    tar_dtypes: schema.TarDtypes | None = None,
    counts_dtype: str | None = None,
    drop_outside_vocabulary: bool = False,
) -> PackResult:
    """Write the shards of every split from the built ``units`` (``splits`` maps slide id -> split).

    ``gene_index`` maps each slide's measured Ensembl ids onto the corpus vocabulary. Every
    shard's samples are fixed by the seeded order before anything is written, so ``workers``
    processes write shards side by side and the bytes are the same as with one.

    ``generation`` > 0 appends: the shards of each split are numbered from ``first_index[split]``
    (one past the split's last existing shard), every existing shard below that number is left
    untouched, and only files at or above it (left by a killed append) are removed first.
    ``tar_dtypes`` and ``counts_dtype`` then must be the corpus's recorded dtypes (one choice per
    corpus); appended slides whose counts do not fit them raise ``SettingsError``.
    ``drop_outside_vocabulary`` (an append keeps the corpus's ``gene_index``) drops the genes a
    slide measured outside it instead of raising; the caller counts and reports them.
    """
    if generation < 0:
        raise SettingsError(f"generation must be >= 0, not {generation}")
    starts = dict(first_index or {})
    if generation == 0:
        if starts:
            raise SettingsError("first_index is for appends (generation > 0); a first build numbers shards from 0")
        for stale in (out / schema.WDS_DIR, out / schema.PARQUET_DIR):
            shutil.rmtree(stale, ignore_errors=True)
    else:
        _remove_from(out, starts)
    measured_dtype = corpus_counts_dtype(units)
    if counts_dtype is None:
        counts_dtype = measured_dtype
    elif counts_dtype == "int32" and measured_dtype != "int32":
        raise SettingsError(
            f"the appended slides have non-integer counts but the corpus in {out} stores int32 counts: "
            "rebuild the whole corpus with `curate build --reshuffle` (or `--overwrite`)"
        )
    needed = corpus_tar_dtypes(work, units, gene_index=gene_index, counts_dtype=counts_dtype)
    if tar_dtypes is None:
        tar_dtypes = needed
    elif not _fits(needed, tar_dtypes):
        raise SettingsError(
            f"the appended slides need expr.npz dtypes {needed.record()} but the corpus in {out} stores "
            f"{tar_dtypes.record()}: rebuild the whole corpus with `curate build --reshuffle` (or `--overwrite`)"
        )
    per_shard = shard_size(units, settings)
    context = _PackContext(
        out=str(out),
        work_root=str(work.root),
        vocabulary_ids=gene_index.ids,
        counts_dtype=counts_dtype,
        shard_settings=ShardSettings(
            samples_per_shard=per_shard, row_group_size=min(settings.row_group_size, per_shard)
        ),
        tar_dtypes=tar_dtypes,
        generation=generation,
        drop_outside_vocabulary=drop_outside_vocabulary,
    )
    jobs: list[_ShardJob] = []
    n_samples: dict[str, int] = {}
    for split in schema.SPLITS:
        members = sorted(
            (u for u in units if splits.get(u.slide_id) == split and u.n_samples > 0), key=lambda u: u.slide_id
        )
        if not members:
            continue
        slide_ids = tuple(u.slide_id for u in members)
        slide_pos, rows = sample_order(
            [u.n_samples for u in members], order=settings.order, seed=settings.seed, split=split
        )
        n_samples[split] = len(rows)
        first = starts.get(split, 0)
        for index, chunk in enumerate(_chunks(len(rows), per_shard), start=first):
            jobs.append(_ShardJob(split, index, slide_ids, slide_pos[chunk], rows[chunk]))
    shards: list[ShardInfo] = []
    if workers <= 1 or len(jobs) <= 1:
        cache = _SlideCache(context)
        for job in jobs:
            shards.extend(_write_shard(cache, job))
            if progress is not None:
                progress.update(len(job.rows))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context_spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=context_spawn, initializer=_init_worker, initargs=(context,)
        ) as pool:
            # map keeps the jobs' order, so shards.parquet lists shards as a serial pack would.
            for job, written in zip(jobs, pool.map(_write_shard_in_worker, jobs), strict=True):
                shards.extend(written)
                if progress is not None:
                    progress.update(len(job.rows))
    return PackResult(
        shards=shards,
        counts_dtype=counts_dtype,
        samples_per_shard=per_shard,
        n_samples=n_samples,
        tar_dtypes=tar_dtypes,
    )


def _remove_from(out: Path, starts: Mapping[str, int]) -> None:
    """Delete shard files numbered at or above ``starts[split]`` (what a killed append left)."""
    for fmt in schema.FORMATS:
        for split in schema.SPLITS:
            folder = out / Path(schema.shard_path(fmt, split, 0)).parent
            if not folder.is_dir():
                continue
            if split not in starts:
                if any(folder.iterdir()):
                    raise SettingsError(
                        f"{folder} holds shards but first_index names no start for split {split!r}: "
                        "give one past its last shard, so the append cannot overwrite them"
                    )
                continue
            first = starts[split]
            for path in folder.iterdir():
                number = path.name.split(".", 1)[0].rsplit("-", 1)[-1]
                if number.isdigit() and int(number) >= first:
                    path.unlink()


def _fits(needed: schema.TarDtypes, stored: schema.TarDtypes) -> bool:
    """Whether every array ``needed`` describes can be stored losslessly in ``stored``'s dtypes."""
    recorded = stored.record()
    return all(
        np.can_cast(np.dtype(value), np.dtype(recorded[key]), casting="safe") for key, value in needed.record().items()
    )


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
