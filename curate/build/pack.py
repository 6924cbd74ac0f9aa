"""Pack: built slides -> equal-count shards of every split, in each format asked for, as the units finish.

``StreamPack`` takes each built slide's samples (memory-mapped Arrow in the unit work format of
``workdir``) in a fixed order, maps the slide's local gene indices onto the corpus vocabulary
(the shipped references', known before any slide is built), and writes them with
``stcorpus.curate.shards.ShardWriter`` while other slides are still being built.

Order (``PackSettings.order``):

- ``shuffled`` (default): a seeded windowed shuffle within each split. The split keeps up to
  ``window`` slides open and draws every next sample from one of them, picked at random, in that
  slide's own seeded row order, so consecutive samples come from many slides (what CLIP-style
  training needs) and a reader's shard shuffle mixes further.
- ``slide``: slide after slide (``consumption_order``), each slide's spots in lattice order (as
  the unit wrote them), for neighbourhood and same-slide training.

Shard size: every shard of a split holds exactly ``n`` samples but the last, where ``n`` is
``samples_per_shard`` or fewer so that a shard stays under ``max_shard_bytes`` on average (from the
slides taken before the first sample is drawn). The same slides and settings give the same bytes,
whatever order the units finish in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from stcorpus import schema
from stcorpus.curate.atomic import write_atomic
from stcorpus.curate.build.workdir import (
    CHECKPOINT_FILE,
    UNIT_IMAGES,
    UNIT_KEY,
    UNIT_LISTS,
    UNIT_SAMPLE_FIELDS,
    UnitResult,
    WorkDir,
)
from stcorpus.curate.errors import SettingsError
from stcorpus.curate.shards import ShardInfo, ShardSample, ShardSettings, ShardWriter, lossless_cast, shard_formats

if TYPE_CHECKING:
    import pyarrow as pa

    from stcorpus.curate.genes import GeneIndex

log = logging.getLogger(__name__)

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
    #: Slides a split draws from at once (``shuffled``): the more, the better mixed and the more
    #: unit work files on disk until packed. ``slide`` order draws from one.
    window: int = 64
    #: The shard formats written (``--formats``), in ``schema.FORMATS`` order: both by default; one
    #: of them halves the corpus's disk (``corpus.json`` ``formats`` records which).
    formats: tuple[str, ...] = schema.FORMATS

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", shard_formats(self.formats))
        if self.order not in ("shuffled", "slide"):
            raise SettingsError(f"order must be 'shuffled' or 'slide', not {self.order!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise SettingsError(
                f"the shuffle window must be at least one slide (curate build --shuffle-window), not {self.window!r}"
            )
        if self.samples_per_shard < 1 or self.max_shard_bytes < 1 or self.row_group_size < 1:
            raise SettingsError(
                f"shards need at least one sample and one byte (curate build --samples-per-shard, --max-shard-mb): "
                f"samples_per_shard={self.samples_per_shard!r}, max_shard_bytes={self.max_shard_bytes!r}, "
                f"row_group_size={self.row_group_size!r}"
            )


def corpus_counts_dtype(units: Sequence[UnitResult]) -> str:
    """int32 when every slide has integer counts, else float32 for the whole corpus."""
    return "int32" if all(u.counts_dtype == "int32" for u in units) else "float32"


def shard_size(units: Sequence[UnitResult], settings: PackSettings) -> int:
    """Samples per shard: the setting, reduced so an average shard stays under the byte limit."""
    samples = sum(u.n_samples for u in units)
    if samples == 0:
        return settings.samples_per_shard
    mean_bytes = sum(u.sample_bytes for u in units) / samples
    by_bytes = max(1, int(settings.max_shard_bytes // max(mean_bytes, 1.0)))
    return min(settings.samples_per_shard, by_bytes)


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


class _SlideCache:
    """The slides the pack reads: gene maps kept, open (memory-mapped) tables bounded.

    A shuffled split draws from every slide in its window, so the cache holds at least the windows'
    slides; a pack of thousands of slides must not keep a file open per slide (the usual limit is 1,024).
    """

    def __init__(
        self, work: WorkDir, *, gene_index: GeneIndex, counts_dtype: str, drop_outside: bool, max_open: int = 256
    ) -> None:
        from collections import OrderedDict

        self.work = work
        self.index = gene_index
        self.counts_dtype = counts_dtype
        self.drop_outside = drop_outside
        self.max_open = max_open
        self.sources: OrderedDict[str, _SlideSource] = OrderedDict()

    def source(self, unit: UnitResult) -> _SlideSource:
        """The slide's samples and gene map, opening (or reusing) its table."""
        source = self.sources.pop(unit.slide_id, None)
        if source is None:
            ids = np.asarray(unit.gene_ids, dtype=np.str_)
            # indices raises GeneVocabularyError naming the ids when a slide's gene is not in the vocabulary.
            local_to_vocab = self.index.positions(ids) if self.drop_outside else self.index.indices(ids)
            source = _SlideSource(
                unit, self.work.samples(unit.slide_id), local_to_vocab=local_to_vocab, counts_dtype=self.counts_dtype
            )
            if len(self.sources) >= self.max_open:
                self.sources.popitem(last=False)
        self.sources[unit.slide_id] = source
        return source

    def forget(self, slide_id: str) -> None:
        """Close a slide's table (before its work files are deleted)."""
        self.sources.pop(slide_id, None)


def unit_tar_dtypes(unit: UnitResult, table: pa.Table, *, gene_index: GeneIndex, counts_dtype: str) -> schema.TarDtypes:
    """The smallest ``expr.npz`` dtypes that hold every gene index and count of one built slide.

    The gene index dtype follows the largest index the slide's genes take, not the vocabulary's
    size: the vocabulary is the references' ~128k genes, but human genes mostly sit below 65,536
    and keep two bytes each. One pass over the unit's (memory-mapped) ``table``: milliseconds per slide.
    """
    import pyarrow.compute as pc

    positions = gene_index.positions(np.asarray(unit.gene_ids, dtype=np.str_))
    top_index = int(positions.max()) if positions.size else -1
    highest = {}
    for name in (schema.Expr.COUNTS.value, schema.Expr.NICHE_COUNTS.value):
        values = table.column(name).combine_chunks().flatten()
        highest[name] = float(pc.max(values).as_py()) if len(values) else 0.0
    return schema.TarDtypes.smallest(
        n_genes=top_index + 1,
        max_count=highest[schema.Expr.COUNTS.value],
        max_niche_count=highest[schema.Expr.NICHE_COUNTS.value],
        counts_dtype=counts_dtype,
    )


def _widest(a: schema.TarDtypes, b: schema.TarDtypes) -> schema.TarDtypes:
    def wider(x: str, y: str) -> str:
        return str(np.promote_types(np.dtype(x), np.dtype(y)))

    return schema.TarDtypes(
        genes=wider(a.genes, b.genes),
        counts=wider(a.counts, b.counts),
        niche_counts=wider(a.niche_counts, b.niche_counts),
    )


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"stcorpus-order:{seed}:{name}".encode()).digest()[:8], "big")


def slide_rows(n: int, *, order: Order, seed: int, split: str, slide_id: str) -> npt.NDArray[np.int64]:
    """The order a slide's rows leave it: a seeded permutation (``shuffled``) or as the unit wrote them."""
    if order == "slide":
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng(_seed_for(seed, f"{split}:{slide_id}")).permutation(n).astype(np.int64)


CHECKPOINT_FORMAT = "stcorpus-pack/1"


@dataclass
class _Open:
    """A slide in a split's window: its row order and how many rows have left it."""

    unit: UnitResult
    rows: npt.NDArray[np.int64]
    cursor: int = 0


@dataclass
class _Split:
    """One split's stream: its window of slides, its seeded draw and its shard writer."""

    name: str
    rng: np.random.Generator
    first_index: int
    window: list[_Open] = field(default_factory=list)
    position: int = 0  # slides of this split taken into the window
    writer: ShardWriter | None = None
    drawn: int = 0
    exhausted: list[str] = field(default_factory=list)  # slides out of the window since the last commit
    #: The state at each commit (what a resumed pack restarts from), oldest first.
    history: list[dict[str, Any]] = field(default_factory=list)
    #: Slides of this split taken before this consumption index are in the state already (a resumed pack).
    taken_before: int = 0
    #: Restored at a commit made inside a run of draws: that run goes on before the split takes a slide.
    interrupted: bool = False

    def snapshot(self, at: int) -> dict[str, Any]:
        return {
            "at": at,
            "position": self.position,
            "drawn": self.drawn,
            "rng": self.rng.bit_generator.state,
            "window": [[o.unit.slide_id, o.cursor] for o in self.window],
            "n_shards": len(self.writer.shards) if self.writer is not None else 0,
        }

    def record(self) -> dict[str, Any]:
        shards = self.writer.shards if self.writer is not None else []
        return {"history": self.history, "shards": [s.row() for s in shards]}


@dataclass
class PackResult:
    """What the pack wrote."""

    shards: list[ShardInfo]
    counts_dtype: str
    samples_per_shard: int
    n_samples: dict[str, int]
    #: dtypes of the ``expr.npz`` arrays (``corpus.json`` ``expression``).
    tar_dtypes: schema.TarDtypes = field(default_factory=schema.TarDtypes)
    #: Slides not packed because their counts equal an earlier one's (slide id -> the kept slide's id).
    duplicates: dict[str, str] = field(default_factory=dict)
    #: The slides packed, in the order the stream took them.
    packed: list[str] = field(default_factory=list)


def consumption_order(slides: Iterable[tuple[str, str | None]]) -> list[str]:
    """The ids of ``(slide id, source)`` pairs in the order the pack takes them: by source preference, then id.

    Taking slides in this order makes the first copy of a duplicated slide the one kept (10x over
    GEO over HEST over STimage, ``SOURCE_PREFERENCE``), as a pack that sees every slide at once would choose.
    """
    return [slide_id for _, slide_id in sorted((source_rank(str(source)), slide_id) for slide_id, source in slides)]


#: Sources in order of preference when the same slide arrives through several (the first is kept).
SOURCE_PREFERENCE = ("10x", "geo", "hest", "stimage")


def source_rank(source: str) -> int:
    """A source's place in ``SOURCE_PREFERENCE`` (unknown sources last)."""
    return SOURCE_PREFERENCE.index(source) if source in SOURCE_PREFERENCE else len(SOURCE_PREFERENCE)


class StreamPack:
    """Packs slides into shards as their units finish: the pack of ``curate build``.

    Slides are taken in a fixed ``order`` (``consumption_order``), whatever order their units
    finish in: a unit that finishes early waits until the slides before it are taken. A duplicate
    (its counts fingerprint equals a slide's taken before, or one in ``corpus_digests``) is not
    packed. Each split keeps a window of ``settings.window`` slides; while the window is full, the
    next sample is drawn from one of its slides picked by a seeded generator, in that slide's
    seeded row order, and written into the split's open shard; a slide whose last row is drawn
    leaves the window, and its work files are deleted (``release``) once the shard holding that row
    is committed. Peak disk is the slides waiting for their turn, the windows and the open shards.
    Same slides, settings and seed: the same bytes, whatever the timing.

    The shard size and the ``expr.npz`` dtypes are fixed when the first sample is drawn, from the
    slides taken by then; a later slide with larger counts or gene indices widens the dtypes and
    every tar shard written so far is rewritten (``ShardWriter.retype``; the Parquet shards do not
    depend on them). An append passes the corpus's ``tar_dtypes``, which cannot change.

    After every commit the state of each split at its last commit is written to ``pack.json`` in
    the work folder. A killed build resumes from it (``resume``): slides already packed are not
    needed again, and the shards written are kept, so the rerun writes the same bytes.
    """

    def __init__(
        self,
        out: Path,
        *,
        work: WorkDir,
        order: Sequence[str],
        splits: Mapping[str, str],
        gene_index: GeneIndex,
        settings: PackSettings,
        counts_dtype: str,
        generation: int = 0,
        first_index: Mapping[str, int] | None = None,
        tar_dtypes: schema.TarDtypes | None = None,
        drop_outside_vocabulary: bool = False,
        corpus_digests: Mapping[str, str] | None = None,
        release: bool = False,
    ) -> None:
        if generation < 0:
            raise SettingsError(f"generation must be >= 0, not {generation}")
        self.starts = dict(first_index or {})
        if generation == 0 and self.starts:
            raise SettingsError("first_index is for appends (generation > 0); a first build numbers shards from 0")
        self.out, self.work, self.order = out, work, list(order)
        self.splits, self.gene_index, self.settings = dict(splits), gene_index, settings
        self.counts_dtype, self.generation = counts_dtype, generation
        self.fixed_dtypes = tar_dtypes
        self.drop_outside = drop_outside_vocabulary
        self.corpus_digests = dict(corpus_digests or {})
        self.release = release
        self.cache = _SlideCache(
            work, gene_index=gene_index, counts_dtype=counts_dtype, drop_outside=drop_outside_vocabulary
        )
        self.identity = self._identity()
        self._fresh()

    # -- state ------------------------------------------------------------------------------

    def _fresh(self) -> None:
        self.streams = {
            split: _Split(split, np.random.default_rng(_seed_for(self.settings.seed, split)), self.starts.get(split, 0))
            for split in schema.SPLITS
        }
        self.next = 0  # position in self.order
        self.arrived: dict[str, UnitResult] = {}
        #: [slide_id, unit_key, content_digest, split, outcome, expr.npz dtypes needed (kept slides)]
        self.consumed: list[list[Any]] = []
        self.taken: set[str] = set()
        self.seen: dict[str, str] = {}  # content digest -> kept slide
        self.duplicates: dict[str, str] = {}
        self.kept: list[UnitResult] = []
        self.needs: dict[str, schema.TarDtypes] = {}
        self.per_shard = 0  # fixed at the first draw
        self.tar_dtypes: schema.TarDtypes | None = self.fixed_dtypes
        self.releasable: list[str] = []  # duplicates and skipped slides: no stream needs them
        self.hold = False  # a slide failed: release nothing more, so the rerun that retries it rebuilds nothing
        self.waiting: set[str] = set()  # window slides of a resumed pack whose samples must be built again
        self.known_needs: dict[str, dict[str, str]] = {}  # expr.npz dtypes of the slides a resumed pack takes again
        self.complete = False
        self.n_packed = 0

    def _identity(self) -> str:
        text = json.dumps(
            {
                "settings": asdict(self.settings),
                "vocabulary": hashlib.sha256("\n".join(self.gene_index.ids.tolist()).encode()).hexdigest(),
                "counts_dtype": self.counts_dtype,
                "generation": self.generation,
                "first_index": self.starts,
                "tar_dtypes": self.fixed_dtypes.record() if self.fixed_dtypes else None,
                "drop_outside": self.drop_outside,
                "corpus_digests": sorted(self.corpus_digests.items()),
            },
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def checkpoint_path(self) -> Path:
        return self.work.root / CHECKPOINT_FILE

    def _checkpoint(self) -> None:
        record = {
            "format": CHECKPOINT_FORMAT,
            "identity": self.identity,
            "consumed": self.consumed,
            "per_shard": self.per_shard,
            "tar_dtypes": self.tar_dtypes.record() if self.tar_dtypes else None,
            "complete": self.complete,
            "splits": {name: s.record() for name, s in self.streams.items()},
        }
        write_atomic(self.checkpoint_path, (json.dumps(record, sort_keys=True) + "\n").encode())

    def resume(self, reusable: Mapping[str, UnitResult | None]) -> set[str]:
        """Pick up an earlier pack of these settings from ``pack.json``; returns the slides it does not need again.

        ``reusable`` maps slide id -> its finished unit, if it can be reused (None: it must run
        again). The earlier pack is valid up to the first slide that differs: another slide in
        ``order``, a changed unit, a slide to run again (failed before). Each split restarts from
        its last commit before that point; the shards it wrote up to there are kept, later ones
        removed, and the slides packed into them are not needed again (their units are reused even
        where the pack released their samples). A pack killed at any moment resumes where it was; an
        edited manifest repacks from its first changed slide on. Window slides whose samples were
        released must be built again: the pack waits for them before taking the next slide.
        """
        record = self._read_checkpoint()
        if record is None:
            self._start_over()
            return set()
        consumed = record["consumed"]
        valid = 0
        for i, (slide_id, key, digest, split, outcome, _) in enumerate(consumed):
            unit = reusable.get(slide_id)
            if (
                i >= len(self.order)
                or self.order[i] != slide_id
                or self.splits.get(slide_id) != split
                or unit is None
                or unit.unit_key != key
                or unit.content_digest != digest
                or (outcome == "skipped") != (unit.status != "built" or unit.n_samples == 0)
            ):
                break
            valid = i + 1
        splits = record["splits"]
        whole = bool(record["complete"]) and valid == len(consumed) == len(self.order)
        points: dict[str, dict[str, Any] | None] = {}  # split -> its restart point (None: as the pack ended)
        if whole:
            points = dict.fromkeys(splits)
        else:
            for name, data in splits.items():
                earlier = [h for h in data["history"] if h["at"] <= valid]
                if earlier:
                    points[name] = earlier[-1]
        if not points or not self._shards_there(splits, points):
            self._start_over()
            return set()
        self.per_shard = int(record["per_shard"])
        self.known_needs = {e[0]: e[5] for e in consumed[:valid] if e[5] is not None}
        written = _tar_dtypes(record["tar_dtypes"]) if record["tar_dtypes"] else None
        if self.fixed_dtypes is None:
            self.tar_dtypes = None
            for entry in consumed[:valid]:
                if entry[5] is not None:
                    need = _tar_dtypes(entry[5])
                    self.tar_dtypes = need if self.tar_dtypes is None else _widest(self.tar_dtypes, need)
        starts: dict[str, int] = {}
        for name, stream in self.streams.items():
            if name not in points:  # nothing committed before the restart point: from its first slide
                starts[name] = next((i for i, e in enumerate(consumed[:valid]) if e[3] == name), valid)
                _remove_from(self.out, {name: stream.first_index}, only=name)
                continue
            point = points[name]
            starts[name] = len(consumed) if point is None else int(point["at"])
            self._restore(stream, splits[name], point, reusable, written)
        resume_at = min(starts.values()) if starts else valid
        if whole:
            resume_at = len(consumed)
            self.complete = True
        in_windows = {o.unit.slide_id for s in self.streams.values() for o in s.window}
        not_needed = set()
        for slide_id, _, _, _, outcome, need in consumed[:resume_at]:
            unit = reusable[slide_id]
            assert unit is not None, f"slide {slide_id} is in the valid part of the checkpoint"
            self._record(unit, outcome=outcome, need=need)
            if slide_id not in in_windows:
                not_needed.add(slide_id)
        for i in range(resume_at, valid):
            slide_id, split = consumed[i][0], consumed[i][3]
            if i < starts.get(split, 0) and slide_id not in in_windows:
                not_needed.add(slide_id)  # packed into a kept shard: its samples are not read again
        for name, stream in self.streams.items():
            stream.taken_before = starts.get(name, 0)
        self.next = resume_at
        self.waiting = {s for s in in_windows if not self.work.has_samples(s)}
        log.info(
            "pack resumed from %s at slide %d of %d (the earlier pack was valid for %d); %d shard(s) kept",
            self.checkpoint_path,
            resume_at,
            len(self.order),
            valid,
            sum(len(s.writer.shards) for s in self.streams.values() if s.writer is not None),
        )
        return not_needed

    def _read_checkpoint(self) -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads(self.checkpoint_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None
        if record.get("format") != CHECKPOINT_FORMAT or record.get("identity") != self.identity:
            return None
        return record

    def _shards_there(self, splits: Mapping[str, Any], points: Mapping[str, Any]) -> bool:
        for name, point in points.items():
            rows = splits[name]["shards"]
            for row in rows[: len(rows) if point is None else int(point["n_shards"])]:
                path = self.out / row["path"]
                if not path.is_file() or path.stat().st_size != int(row["bytes"]):
                    return False
        return True

    def _start_over(self) -> None:
        self.checkpoint_path.unlink(missing_ok=True)
        if self.generation == 0:
            for stale in (self.out / schema.WDS_DIR, self.out / schema.PARQUET_DIR):
                shutil.rmtree(stale, ignore_errors=True)
        else:
            _remove_from(self.out, self.starts)

    def _restore(
        self,
        stream: _Split,
        data: Mapping[str, Any],
        point: Mapping[str, Any] | None,
        reusable: Mapping[str, UnitResult | None],
        written: schema.TarDtypes | None,
    ) -> None:
        rows = data["shards"] if point is None else data["shards"][: int(point["n_shards"])]
        shards = [ShardInfo(**{**row, "slide_ids": tuple(row["slide_ids"])}) for row in rows]
        first = stream.first_index + sum(s.format == self.settings.formats[0] for s in shards)
        if point is not None:
            stream.history = [h for h in data["history"] if h["at"] <= point["at"]]
            stream.position = int(point["position"])
            stream.drawn = int(point["drawn"])
            stream.rng.bit_generator.state = point["rng"]
            for slide_id, cursor in point["window"]:
                unit = reusable[slide_id]
                assert unit is not None, f"window slide {slide_id} is in the valid part of the checkpoint"
                stream.window.append(_Open(unit, self._rows(stream.name, unit), int(cursor)))
            stream.interrupted = True
        else:
            stream.history = list(data["history"])
        # Shard files past the restart point are an earlier run's: the stream writes them again.
        _remove_from(self.out, {stream.name: first}, only=stream.name)
        if shards:
            stream.writer = self._writer(stream, first=first, dtypes=written)
            stream.writer.shards = shards
            if self.tar_dtypes is not None and written is not None and self.tar_dtypes != written:
                # The kept shards were widened for slides past the restart point: back to what they hold.
                stream.writer.retype(self.tar_dtypes)

    # -- the stream -------------------------------------------------------------------------

    def add(self, unit: UnitResult) -> None:
        """A finished unit (any status); it is packed when every slide before it in ``order`` was."""
        if unit.slide_id in self.waiting:
            self.waiting.discard(unit.slide_id)  # built again: its samples are back
            for stream in self.streams.values():
                for slot in stream.window:
                    if slot.unit.slide_id == unit.slide_id:
                        slot.unit = unit
        if self.complete or unit.slide_id in self.taken or unit.slide_id in self.arrived:
            return
        self.arrived[unit.slide_id] = unit
        while not self.waiting and self.next < len(self.order) and self.order[self.next] in self.arrived:
            self._consume(self.arrived.pop(self.order[self.next]))
            self.next += 1

    def finish(self) -> PackResult:
        """Take the slides still waiting (those never finished are left out), drain the windows, commit."""
        if not self.complete:
            if self.waiting:
                raise SettingsError(
                    f"the pack resumed from {self.checkpoint_path} needs slide(s) {sorted(self.waiting)} built again, "
                    "and the build ended without them: run it again"
                )
            while self.next < len(self.order):
                slide_id = self.order[self.next]
                if slide_id in self.arrived:
                    self._consume(self.arrived.pop(slide_id))
                else:
                    self.consumed.append([slide_id, "", "", self.splits.get(slide_id), "absent", None])
                    self.taken.add(slide_id)
                self.next += 1
            for stream in self.streams.values():
                self._go_on(stream)
                while stream.window:
                    self._draw(stream)
                if stream.writer is not None:
                    stream.writer.close()
            self.complete = True
            self._checkpoint()
            self._release_all()
        shards = [s for stream in self.streams.values() if stream.writer is not None for s in stream.writer.shards]
        n_samples = {
            name: sum(s.n_samples for s in shards if s.split == name and s.format == self.settings.formats[0])
            for name in schema.SPLITS
            if any(s.split == name for s in shards)
        }
        return PackResult(
            shards=shards,
            counts_dtype=self.counts_dtype,
            samples_per_shard=self.per_shard or self.settings.samples_per_shard,
            n_samples=n_samples,
            tar_dtypes=self.tar_dtypes or schema.TarDtypes(),
            duplicates=dict(self.duplicates),
            packed=[u.slide_id for u in self.kept],
        )

    def _outcome(self, unit: UnitResult) -> str:
        digest = unit.content_digest
        if unit.status != "built" or unit.n_samples == 0 or self.splits.get(unit.slide_id) is None:
            return "skipped"
        if digest and digest in self.corpus_digests:
            return f"duplicate:{self.corpus_digests[digest]}"
        if digest and digest in self.seen:
            return f"duplicate:{self.seen[digest]}"
        return "kept"

    def _record(self, unit: UnitResult, *, outcome: str, need: Mapping[str, str] | None) -> None:
        """Book a slide taken in order (the stream's part is the caller's)."""
        self.consumed.append(
            [unit.slide_id, unit.unit_key, unit.content_digest, self.splits.get(unit.slide_id), outcome, need]
        )
        self.taken.add(unit.slide_id)
        if outcome.startswith("duplicate:"):
            self.duplicates[unit.slide_id] = outcome.split(":", 1)[1]
        elif outcome == "kept":
            if unit.content_digest:
                self.seen[unit.content_digest] = unit.slide_id
            self.kept.append(unit)
            if need is not None:
                self.needs[unit.slide_id] = _tar_dtypes(need)

    def _consume(self, unit: UnitResult) -> None:
        outcome = self._outcome(unit)
        index = len(self.consumed)
        if outcome != "kept":
            self._record(unit, outcome=outcome, need=None)
            if unit.status == "built":
                self.releasable.append(unit.slide_id)
            elif unit.status == "failed" and self.release and not self.hold:
                self.hold = True
                log.warning(
                    "slide %s failed: the slides packed after it keep their samples, so that the run that retries it "
                    "repacks without building them again",
                    unit.slide_id,
                )
            return
        if unit.counts_dtype != "int32" and self.counts_dtype == "int32":
            raise SettingsError(
                f"slide {unit.slide_id} has non-integer counts but the corpus in {self.out} stores int32 counts: "
                + (
                    "rebuild the whole corpus with `curate build --reshuffle` (or `--overwrite`)"
                    if self.generation
                    else "declare `counts: normalized` for it in its manifest"
                )
            )
        # A resumed pack knows the needs of the slides it takes again (their samples may be released).
        known = self.known_needs.get(unit.slide_id)
        self._record(unit, outcome=outcome, need=known if known is not None else self._need(unit).record())
        if self.per_shard:  # past the first draw: the dtypes must hold this slide
            self._fit(unit)
        stream = self.streams[self.splits[unit.slide_id]]
        if index >= stream.taken_before:  # else a resumed split holds it already
            self._take(stream, unit)

    def _take(self, stream: _Split, unit: UnitResult) -> None:
        self._go_on(stream)
        stream.window.append(_Open(unit, self._rows(stream.name, unit)))
        stream.position += 1
        self._drain_full(stream)

    def _go_on(self, stream: _Split) -> None:
        """The draws a resumed split's restart commit interrupted (its window slides are all there now)."""
        if stream.interrupted:
            stream.interrupted = False
            self._drain_full(stream)

    def _drain_full(self, stream: _Split) -> None:
        """Draw while the split's window is full."""
        # Slide order always drains the oldest slide first: one open slide gives the same bytes.
        while len(stream.window) >= (1 if self.settings.order == "slide" else self.settings.window):
            self._draw(stream)

    def _rows(self, split: str, unit: UnitResult) -> npt.NDArray[np.int64]:
        return slide_rows(
            unit.n_samples, order=self.settings.order, seed=self.settings.seed, split=split, slide_id=unit.slide_id
        )

    def _draw(self, stream: _Split) -> None:
        if not self.per_shard:
            self._fix_layout()
        pick = 0 if self.settings.order == "slide" else int(stream.rng.integers(len(stream.window)))
        slot = stream.window[pick]
        row = slot.rows[slot.cursor]
        slot.cursor += 1
        if slot.cursor == len(slot.rows):
            stream.window.pop(pick)
            stream.exhausted.append(slot.unit.slide_id)
        sample = self.cache.source(slot.unit).samples(np.asarray([row]), split=stream.name)[0]
        if stream.writer is None:
            stream.writer = self._writer(stream, first=stream.first_index)
        before = len(stream.writer.shards)
        stream.writer.add(sample)
        stream.drawn += 1
        self.n_packed += 1
        if len(stream.writer.shards) > before:
            self._committed(stream)

    def _committed(self, stream: _Split) -> None:
        done, stream.exhausted = stream.exhausted, []
        stream.history.append(stream.snapshot(len(self.consumed)))
        self._checkpoint()
        for slide_id in done:
            self._release(slide_id)
        for slide_id in self.releasable:
            self._release(slide_id)
        self.releasable = []

    def _writer(self, stream: _Split, *, first: int, dtypes: schema.TarDtypes | None = None) -> ShardWriter:
        return ShardWriter(
            self.out,
            split=stream.name,
            counts_dtype=self.counts_dtype,
            settings=ShardSettings(
                samples_per_shard=self.per_shard,
                row_group_size=min(self.settings.row_group_size, self.per_shard),
                formats=self.settings.formats,
            ),
            tar_dtypes=dtypes or self.tar_dtypes,
            first_index=first,
            generation=self.generation,
        )

    def _fix_layout(self) -> None:
        """Shard size and dtypes from the slides taken so far (at the first draw: the same point every run)."""
        self.per_shard = shard_size(self.kept, self.settings)
        if self.fixed_dtypes is None:
            if self.tar_dtypes is None:
                needed = [self.needs[u.slide_id] for u in self.kept]
                self.tar_dtypes = needed[0]
                for other in needed[1:]:
                    self.tar_dtypes = _widest(self.tar_dtypes, other)
        else:
            for unit in self.kept:
                self._fit(unit)

    def _need(self, unit: UnitResult) -> schema.TarDtypes:
        # The table the pack draws from next: the slide is mapped once.
        table = self.cache.source(unit).table
        return unit_tar_dtypes(unit, table, gene_index=self.gene_index, counts_dtype=self.counts_dtype)

    def _fit(self, unit: UnitResult) -> None:
        needed = self.needs[unit.slide_id]
        if self.tar_dtypes is None:
            self.tar_dtypes = needed
        if _fits(needed, self.tar_dtypes):
            return
        if self.fixed_dtypes is not None:
            raise SettingsError(
                f"appended slide {unit.slide_id} needs expr.npz dtypes {needed.record()} but the corpus in {self.out} "
                f"stores {self.tar_dtypes.record()}: rebuild the whole corpus with `curate build --reshuffle` "
                "(or `--overwrite`)"
            )
        self.tar_dtypes = _widest(self.tar_dtypes, needed)
        log.info("slide %s widens the tar dtypes to %s: rewriting the tar shards", unit.slide_id, self.tar_dtypes)
        for stream in self.streams.values():
            if stream.writer is not None:
                stream.writer.retype(self.tar_dtypes)
        self._checkpoint()

    def _release(self, slide_id: str) -> None:
        self.cache.forget(slide_id)
        if self.release and not self.hold:
            self.work.release_samples(slide_id)

    def _release_all(self) -> None:
        for stream in self.streams.values():
            for slide_id in stream.exhausted:
                self._release(slide_id)
            stream.exhausted = []
        for slide_id in self.releasable:
            self._release(slide_id)
        self.releasable = []


def _tar_dtypes(record: Mapping[str, str]) -> schema.TarDtypes:
    return schema.TarDtypes(
        genes=record[schema.Expr.GENES.value],
        counts=record[schema.Expr.COUNTS.value],
        niche_counts=record[schema.Expr.NICHE_COUNTS.value],
    )


def pack(
    out: Path,
    *,
    work: WorkDir,
    units: Sequence[UnitResult],
    splits: Mapping[str, str],
    gene_index: GeneIndex,
    settings: PackSettings,
    generation: int = 0,
    first_index: Mapping[str, int] | None = None,
    tar_dtypes: schema.TarDtypes | None = None,
    counts_dtype: str | None = None,
    drop_outside_vocabulary: bool = False,
) -> PackResult:
    """Pack every unit of ``units`` at once (``StreamPack`` fed in ``consumption_order``; units kept).

    ``generation`` > 0 appends: the shards of each split are numbered from ``first_index[split]``
    (one past the split's last existing shard), every existing shard below that number is left
    untouched, and only files at or above it (left by a killed append) are removed first.
    ``tar_dtypes`` and ``counts_dtype`` then must be the corpus's recorded dtypes (one choice per
    corpus); appended slides whose counts do not fit them raise ``SettingsError``.
    """
    measured_dtype = corpus_counts_dtype(units)
    if counts_dtype is None:
        counts_dtype = measured_dtype
    elif counts_dtype == "int32" and measured_dtype != "int32":
        raise SettingsError(
            f"the appended slides have non-integer counts but the corpus in {out} stores int32 counts: "
            "rebuild the whole corpus with `curate build --reshuffle` (or `--overwrite`)"
        )
    stream = StreamPack(
        out,
        work=work,
        order=consumption_order((u.slide_id, u.slide.get("source")) for u in units),
        splits=splits,
        gene_index=gene_index,
        settings=settings,
        counts_dtype=counts_dtype,
        generation=generation,
        first_index=first_index,
        tar_dtypes=tar_dtypes,
        drop_outside_vocabulary=drop_outside_vocabulary,
    )
    stream._start_over()
    by_id = {u.slide_id: u for u in units}
    for slide_id in stream.order:
        stream.add(by_id[slide_id])
    return stream.finish()


def _remove_from(out: Path, starts: Mapping[str, int], *, only: str | None = None) -> None:
    """Delete shard files numbered at or above ``starts[split]`` (what a killed append left); ``only``: one split."""
    for fmt in schema.FORMATS:
        for split in schema.SPLITS if only is None else (only,):
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
