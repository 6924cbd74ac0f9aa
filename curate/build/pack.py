"""Pack: finished units -> equal-count shards of every split, in both formats.

The pack reads each built slide's samples (memory-mapped Arrow, see ``workdir``), maps the slide's
local gene indices onto the corpus vocabulary, orders the samples of each split, and writes
them with ``curate.shards.ShardWriter``.

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from curate.build.workdir import UnitResult, WorkDir
from curate.errors import SettingsError
from curate.shards import ShardInfo, ShardSample, ShardSettings, ShardWriter, lossless_cast
from stcorpus import schema

if TYPE_CHECKING:
    import pyarrow as pa

    from curate.genes import GeneIndex

Order = Literal["shuffled", "slide"]

#: Metadata fields a unit stores per sample; the others come from the slide (and the split).
UNIT_SAMPLE_FIELDS = (
    "barcode",
    "x_um",
    "y_um",
    "array_row",
    "array_col",
    "pos",
    "neighbors",
    "n_neighbors",
    "total_counts",
    "n_genes",
    "outside_fraction",
)
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
            raise SettingsError("samples_per_shard, max_shard_bytes and row_group_size must be >= 1")


def unit_sample_schema(counts_dtype: str) -> pa.Schema:
    """Arrow schema of a unit's ``samples.arrow`` (gene indices are local to the slide)."""
    import pyarrow as pa

    counts = pa.list_(pa.int32() if counts_dtype == "int32" else pa.float32())
    meta_types = {f.name: schema._arrow_type(f.arrow) for f in schema.META_FIELDS}
    return pa.schema(
        [
            ("key", pa.string()),
            ("patch", pa.binary()),
            ("region", pa.binary()),
            ("genes", pa.list_(pa.int32())),
            ("counts", counts),
            ("niche_genes", pa.list_(pa.int32())),
            ("niche_counts", counts),
            *((name, meta_types[name]) for name in UNIT_SAMPLE_FIELDS),
        ]
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


class _SlideSource:
    """One built slide as the pack reads it: its samples table and its gene index map."""

    def __init__(
        self, unit: UnitResult, table: pa.Table, *, gene_index: GeneIndex, split: str, counts_dtype: str
    ) -> None:
        self.unit = unit
        self.table = table
        # Raises GeneVocabularyError naming the ids when a slide's gene is not in the vocabulary.
        self.local_to_vocab = gene_index.indices(np.asarray(unit.gene_ids, dtype=np.str_))
        self.counts_dtype = np.dtype(counts_dtype)
        slide = unit.slide
        self.fixed = {name: slide.get(name) for name in SLIDE_SAMPLE_FIELDS} | {"split": split}

    def samples(self, rows: npt.NDArray[np.int64]) -> list[ShardSample]:
        """The samples at ``rows`` (in that order), ready to write."""
        import pyarrow as pa

        part = self.table.take(pa.array(rows))
        keys = part.column("key").to_pylist()
        patches = part.column("patch").to_pylist()
        regions = part.column("region").to_pylist()
        lists = {name: _list_column(part.column(name)) for name in ("genes", "counts", "niche_genes", "niche_counts")}
        meta_columns = {name: part.column(name).to_pylist() for name in UNIT_SAMPLE_FIELDS}
        out = []
        for i, key in enumerate(keys):
            genes = self.local_to_vocab[lists["genes"][i]]
            niche_genes = self.local_to_vocab[lists["niche_genes"][i]]
            counts = lossless_cast(lists["counts"][i], self.counts_dtype)
            niche_counts = lossless_cast(lists["niche_counts"][i], self.counts_dtype)
            # Local ids are sorted like the vocabulary (both by Ensembl id within a species), so the
            # mapped indices stay sorted; check rather than trust.
            if genes.size > 1 and np.any(np.diff(genes) <= 0):
                order = np.argsort(genes, kind="stable")
                genes, counts = genes[order], counts[order]
            if niche_genes.size > 1 and np.any(np.diff(niche_genes) <= 0):
                order = np.argsort(niche_genes, kind="stable")
                niche_genes, niche_counts = niche_genes[order], niche_counts[order]
            meta = dict(self.fixed)
            meta.update({name: meta_columns[name][i] for name in UNIT_SAMPLE_FIELDS})
            out.append(
                ShardSample(
                    key=key,
                    patch=patches[i],
                    region=regions[i],
                    genes=genes,
                    counts=counts,
                    niche_genes=niche_genes,
                    niche_counts=niche_counts,
                    meta=meta,
                )
            )
        return out


def _list_column(column: pa.ChunkedArray) -> list[npt.NDArray[Any]]:
    """A list<number> column as one numpy array per row (views into one flat array)."""
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(array))]


@dataclass
class PackResult:
    """What the pack wrote."""

    shards: list[ShardInfo]
    counts_dtype: str
    samples_per_shard: int
    n_samples: dict[str, int]


def pack(
    out: Path,
    *,
    work: WorkDir,
    units: Sequence[UnitResult],
    splits: Mapping[str, str],
    gene_index: GeneIndex,
    settings: PackSettings,
    progress: Any = None,
) -> PackResult:
    """Write the shards of every split from the built ``units`` (``splits`` maps slide id -> split).

    ``gene_index`` maps each slide's measured Ensembl ids onto the corpus vocabulary.
    """
    for stale in (out / schema.WDS_DIR, out / schema.PARQUET_DIR):
        shutil.rmtree(stale, ignore_errors=True)
    counts_dtype = corpus_counts_dtype(units)
    per_shard = shard_size(units, settings)
    shard_settings = ShardSettings(samples_per_shard=per_shard, row_group_size=min(settings.row_group_size, per_shard))
    shards: list[ShardInfo] = []
    n_samples: dict[str, int] = {}
    for split in schema.SPLITS:
        members = sorted(
            (u for u in units if splits.get(u.slide_id) == split and u.n_samples > 0), key=lambda u: u.slide_id
        )
        if not members:
            continue
        sources = [
            _SlideSource(u, work.samples(u.slide_id), gene_index=gene_index, split=split, counts_dtype=counts_dtype)
            for u in members
        ]
        slide_pos, rows = sample_order(
            [u.n_samples for u in members], order=settings.order, seed=settings.seed, split=split
        )
        n_samples[split] = len(rows)
        with ShardWriter(out, split=split, counts_dtype=counts_dtype, settings=shard_settings) as writer:
            for chunk in _chunks(len(rows), per_shard):
                for sample in _gather(sources, slide_pos[chunk], rows[chunk]):
                    writer.add(sample)
                if progress is not None:
                    progress.update(chunk.stop - chunk.start)
        shards.extend(writer.shards)
    return PackResult(shards=shards, counts_dtype=counts_dtype, samples_per_shard=per_shard, n_samples=n_samples)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _gather(
    sources: Sequence[_SlideSource], slide_pos: npt.NDArray[np.int32], rows: npt.NDArray[np.int64]
) -> list[ShardSample]:
    """The samples at (slide_pos[i], rows[i]) in order, reading each slide once per chunk."""
    result: list[ShardSample | None] = [None] * len(rows)
    for pos in np.unique(slide_pos):
        where = np.flatnonzero(slide_pos == pos)
        for i, sample in zip(where, sources[pos].samples(rows[where]), strict=True):
            result[i] = sample
    return [s for s in result if s is not None]
