"""A corpus's metadata: ``corpus.json``, ``shards.parquet``, ``slides.parquet``, ``genes.parquet``.

Shard lists and sample counts come from ``shards.parquet``, never from listing folders (a Hub
repository or an HTTP server cannot be listed cheaply, and a listing says nothing about counts).

Filters are applied here, before any shard is opened:

1. the built slides of the chosen splits that pass the filters are looked up in ``slides.parquet``;
2. a shard none of whose ``slide_ids`` is selected is dropped without being opened;
3. a shard all of whose slides are selected is read whole; its count is ``n_samples``;
4. a shard with both (a mixed shard, the rule under the default shuffled packing) has its rows
   selected from the ``slide_id`` column of its Parquet twin (same samples, same order in both
   formats): one column of a few bytes per row, read once when the dataset is made (locally a
   column read; remotely a footer request and one ranged request per row group). The epoch
   length is then the exact number of selected rows, and it is cross-checked against the
   ``n_spots_written`` of the selected slides.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from stcorpus import schema
from stcorpus.loaders.errors import (
    CorpusError,
    EmptySelectionError,
    LoaderSettingsError,
    SchemaVersionError,
    ShardError,
)
from stcorpus.loaders.plan import ShardEntry
from stcorpus.loaders.settings import Filters, HttpSettings
from stcorpus.loaders.source import Source, open_source

if TYPE_CHECKING:
    import os

    import pyarrow as pa

log = logging.getLogger(__name__)

_FILTER_COLUMNS = {
    "organ": "organ",
    "species": "species",
    "technology": "technology",
    "assay": "assay",
    "licence": "licence",
    "count_kind": "count_kind",
}


#: Columns of ``shards.parquet`` the loader reads (``bytes`` may be null), and which must be integers.
def _inside_corpus(path: object) -> bool:
    """Whether a shards.parquet ``path`` is a relative POSIX path that stays inside the corpus folder."""
    if not isinstance(path, str) or not path or "\\" in path or "://" in path or path.startswith("/"):
        return False
    parts = path.split("/")
    return all(part not in ("", ".", "..") for part in parts) and ":" not in parts[0]


_SHARD_COLUMNS: Final = ("path", "format", "split", "index", "n_samples", "bytes")
_SHARD_INTEGER_COLUMNS: Final = ("index", "n_samples", "bytes")
#: Columns of ``slides.parquet`` every selection reads.
_SLIDE_COLUMNS: Final = ("slide_id", "status", "split")
#: ``genes.parquet``: some built slide measured the gene (True throughout where the file predates it).
_MEASURED: Final = "measured"


@dataclass(frozen=True)
class Selection:
    """The shards (with row selections) and slides a loader reads."""

    shards: tuple[ShardEntry, ...]
    slide_ids: frozenset[str]
    n_samples: int
    shards_skipped: int  # shards with no selected slide, never opened
    shards_mixed: int  # shards whose rows were selected from their slide_id column


class Corpus:
    """The metadata of one corpus, read once from its source (a folder, HTTP, the Hub, an fsspec store)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        raw = self._json()
        if raw.get("schema") not in schema.READABLE_SCHEMAS:
            raise SchemaVersionError(
                f"{source.location}: corpus.json says schema {raw.get('schema')!r}; this loader reads "
                f"{', '.join(schema.READABLE_SCHEMAS)}: install the stcorpus version that wrote it, "
                "or rebuild the corpus"
            )
        self.info = raw
        self.counts_dtype: str = raw.get("counts_dtype", "int32")
        where = f"{source.location}/{schema.CORPUS_FILE}"
        n_genes, splits = raw["n_genes"], raw.get("splits", {})
        if isinstance(n_genes, bool) or not isinstance(n_genes, int) or n_genes < 1:
            raise CorpusError(f"{where}: n_genes is {n_genes!r}, not a positive integer; rebuild the corpus")
        if not isinstance(splits, dict) or not all(isinstance(v, int) for v in splits.values()):
            raise CorpusError(f"{where}: splits is {splits!r}, not split -> number of samples; rebuild the corpus")
        self.n_genes = n_genes
        self.splits: dict[str, int] = {str(k): int(v) for k, v in splits.items()}
        try:
            #: The shard formats the corpus holds (``corpus.json`` ``formats``; both when it predates the key).
            self.formats: tuple[str, ...] = schema.corpus_formats(raw)
        except ValueError as exc:
            raise CorpusError(f"{where}: {exc}; rebuild the corpus") from None

    def __repr__(self) -> str:
        return f"Corpus({self.source.location!r}, splits={self.splits})"

    def _json(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.source.read_bytes(schema.CORPUS_FILE))
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{self.source.location}/{schema.CORPUS_FILE} is not JSON: {exc}") from exc
        for key in ("schema", "n_genes"):
            if key not in data:
                raise CorpusError(f"{self.source.location}/{schema.CORPUS_FILE} has no {key!r}: not a built corpus")
        return data

    def _table(self, name: str) -> pa.Table:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(pa.BufferReader(self.source.read_bytes(name)))
        except pa.ArrowException as exc:
            raise CorpusError(f"{self.source.location}/{name} is not a readable Parquet table: {exc}") from exc

    @cached_property
    def shards(self) -> list[dict[str, Any]]:
        """Rows of ``shards.parquet``."""
        import pyarrow as pa

        table = self._table(schema.SHARDS_FILE)
        where = f"{self.source.location}/{schema.SHARDS_FILE}"
        self._require(table, schema.SHARDS_FILE, _SHARD_COLUMNS)
        wrong = [
            f"{name} is {table.schema.field(name).type}"
            for name in _SHARD_INTEGER_COLUMNS
            if name in table.column_names and not pa.types.is_integer(table.schema.field(name).type)
        ]
        if wrong:
            raise CorpusError(
                f"{where}: {', '.join(wrong)}, expected integers; rebuild it, or copy shards.parquet again"
            )
        rows: list[dict[str, Any]] = table.to_pylist()
        for number, row in enumerate(rows):
            if not _inside_corpus(row["path"]):
                raise CorpusError(
                    f"{where}: row {number} names shard {row['path']!r}, which is not a path inside the corpus "
                    "(shards are relative paths such as wds/train/train-000000.tar, never absolute, with no '..'); "
                    "rebuild the corpus, or copy shards.parquet again"
                )
        return rows

    @cached_property
    def slides(self) -> list[dict[str, Any]]:
        """Rows of ``slides.parquet``."""
        table = self._table(schema.SLIDES_FILE)
        self._require(table, schema.SLIDES_FILE, _SLIDE_COLUMNS)
        rows: list[dict[str, Any]] = table.to_pylist()
        return rows

    def _require(self, table: pa.Table, name: str, columns: Sequence[str]) -> None:
        """A metadata table lacking columns the loader reads is this corpus's fault, said as such."""
        missing = [column for column in columns if column not in table.column_names]
        if missing:
            raise CorpusError(
                f"{self.source.location}/{name} lacks column(s) {', '.join(missing)} (has "
                f"{', '.join(table.column_names) or 'none'}): not the {name} of a built corpus; rebuild it, or copy "
                f"{name} again"
            )

    @cached_property
    def genes(self) -> pa.Table:
        """``genes.parquet`` as an Arrow table, with a ``measured`` column even where the file has none.

        A corpus written before the vocabulary was the references' has no ``measured`` column: its
        vocabulary was the union of its slides' genes, so every gene is measured
        (``schema.GENE_OPTIONAL_COLUMNS``).
        """
        import pyarrow as pa

        table = self._table(schema.GENES_FILE)
        self._require(table, schema.GENES_FILE, ("index",))
        index = table.column("index").to_numpy()
        if len(index) != self.n_genes or not np.array_equal(index, np.arange(len(index))):
            raise CorpusError(
                f"{self.source.location}/{schema.GENES_FILE}: index must be 0..{self.n_genes - 1} in order "
                f"(corpus.json n_genes={self.n_genes}, the table has {len(index)} rows)"
            )
        for name, value in schema.GENE_OPTIONAL_COLUMNS.items():
            if name not in table.column_names:
                kind = schema.arrow_type(schema.GENE_TYPES[name])
                table = table.append_column(pa.field(name, kind), pa.array([value] * table.num_rows, type=kind))
        if not pa.types.is_boolean(table.schema.field(_MEASURED).type) or table.column(_MEASURED).null_count:
            raise CorpusError(
                f"{self.source.location}/{schema.GENES_FILE}: column {_MEASURED} is "
                f"{table.schema.field(_MEASURED).type} with {table.column(_MEASURED).null_count} null(s), "
                "expected bool without nulls; rebuild the corpus, or copy genes.parquet again"
            )
        return table

    @cached_property
    def measured(self) -> npt.NDArray[np.bool_]:
        """Per vocabulary gene, whether some built slide of the corpus measured it (``genes.parquet`` ``measured``)."""
        return np.asarray(self.genes.column(_MEASURED).to_numpy(zero_copy_only=False), dtype=np.bool_)

    def measured_indices(self) -> npt.NDArray[np.int64]:
        """Vocabulary indices of the genes the corpus measured, sorted."""
        return np.flatnonzero(self.measured).astype(np.int64)

    def measured_genes(self) -> dict[str, npt.NDArray[np.int64]]:
        """Vocabulary indices each built slide measured (``slides.parquet`` ``measured_genes``)."""
        return {
            row["slide_id"]: np.asarray(row["measured_genes"] or [], dtype=np.int64)
            for row in self.slides
            if row.get("status") == "built"
        }

    def select_slides(self, *, splits: Sequence[str], filters: Filters) -> dict[str, dict[str, Any]]:
        """Built slides of ``splits`` that pass ``filters``, by slide id."""
        chosen = {}
        for row in self.slides:
            if row.get("status") != "built" or row.get("split") not in splits:
                continue
            if filters.slide_ids and row["slide_id"] not in filters.slide_ids:
                continue
            if row["slide_id"] in filters.exclude_slide_ids:
                continue
            if any(
                getattr(filters, name) and row.get(column) not in getattr(filters, name)
                for name, column in _FILTER_COLUMNS.items()
            ):
                continue
            chosen[row["slide_id"]] = row
        return chosen

    def select(self, *, splits: Sequence[str], fmt: str, filters: Filters) -> Selection:
        """The shards of ``splits`` in format ``fmt`` and their selected rows (see the module docstring)."""
        if fmt not in self.formats:
            raise LoaderSettingsError(
                f"{self.source.location} holds only {' and '.join(self.formats)} shards ({schema.CORPUS_FILE} "
                f"formats: it was built with `curate build --formats {','.join(self.formats)}`), not {fmt}: read it "
                f"with LoaderSettings(format={self.formats[0]!r}) (`format: {self.formats[0]}` in the loader settings)"
            )
        rows = [r for r in self.shards if r["format"] == fmt and r["split"] in splits]
        if not rows:
            raise EmptySelectionError(
                f"{self.source.location}: shards.parquet lists no {fmt} shard of split(s) {list(splits)}; "
                f"the corpus has splits {self.splits}"
            )
        rows.sort(key=lambda r: (list(splits).index(r["split"]), r["index"]))
        twins = {(r["split"], r["index"]): r for r in self.shards if r["format"] == "parquet"}
        slides = self.select_slides(splits=splits, filters=filters) if filters.active() else None
        entries: list[ShardEntry] = []
        skipped = mixed = 0
        for row in rows:
            rows_selected: npt.NDArray[np.int64] | None = None
            if slides is not None:
                in_shard = set(row["slide_ids"] or [])
                keep = in_shard & slides.keys()
                if not keep:
                    skipped += 1
                    continue
                if keep != in_shard:
                    twin = twins.get((row["split"], row["index"]))
                    if twin is None:
                        raise CorpusError(
                            f"{row['path']}: no Parquet twin in shards.parquet to select rows from"
                            + (
                                f" (this corpus holds {' and '.join(self.formats)} shards only): filters that keep "
                                "some of a shard's slides need the Parquet shards; rebuild it with `curate build "
                                "--formats parquet,wds`, or filter the samples after loading"
                                if "parquet" not in self.formats
                                else ""
                            )
                        )
                    rows_selected = self._rows_of_slides(twin, keep)
                    mixed += 1
            entries.append(
                ShardEntry(
                    path=row["path"],
                    split=row["split"],
                    index=int(row["index"]),
                    n_rows=int(row["n_samples"]),
                    nbytes=int(row["bytes"] or 0),
                    rows=rows_selected,
                    first_key=row.get("first_key") or "",
                    last_key=row.get("last_key") or "",
                )
            )
        total = sum(e.n for e in entries)
        if slides is not None:
            self._check_counts(slides, total, splits)
        if total == 0:
            raise EmptySelectionError(
                f"no sample of split(s) {list(splits)} passes the filters {filters}: "
                f"loosen them (slides.parquet lists the organs, species, licences...)"
            )
        return Selection(
            shards=tuple(entries),
            slide_ids=frozenset(slides) if slides is not None else frozenset(),
            n_samples=total,
            shards_skipped=skipped,
            shards_mixed=mixed,
        )

    def _rows_of_slides(self, twin: dict[str, Any], keep: set[str]) -> npt.NDArray[np.int64]:
        column = self.read_column(twin["path"], "slide_id", size=int(twin["bytes"] or 0))
        if len(column) != int(twin["n_samples"]):
            raise ShardError(f"{twin['path']}: {len(column)} rows, shards.parquet says {twin['n_samples']}")
        return np.flatnonzero(np.isin(np.asarray(column, dtype=object), list(keep))).astype(np.int64)

    def read_column(self, path: str, name: str, *, size: int) -> list[Any]:
        """One column of a Parquet shard (locally a column read; remotely footer + one range per row group)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from stcorpus.loaders.read import SparseFile, parquet_metadata_from_tail, row_group_spans

        local = self.source.local_path(path)
        try:
            if local is not None:
                return list(pq.read_table(local, columns=[name]).column(name).to_pylist())
            tail_start = max(0, size - 64 * 1024)
            stream = self.source.open_range(path, tail_start, size, size=size)
            try:
                tail = stream.read()
            finally:
                stream.close()
            metadata = parquet_metadata_from_tail(tail, size, path)
            # A Parquet leaf column, not an Arrow field: the image structs expand into two leaves each.
            leaves = [metadata.schema.column(k).path for k in range(metadata.num_columns)]
            if name not in leaves:
                raise ShardError(f"{path}: no column {name!r}")
            index = leaves.index(name)
            sparse = SparseFile(size, path)
            values: list[Any] = []
            spans = row_group_spans(metadata)
            for g in range(metadata.num_row_groups):
                chunk = metadata.row_group(g).column(index)
                start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
                stream = self.source.open_range(path, start, start + chunk.total_compressed_size, size=size)
                try:
                    sparse.hold(start, stream.read())
                finally:
                    stream.close()
                assert spans[g][0] <= start
                parquet = pq.ParquetFile(pa.PythonFile(sparse, mode="r"), metadata=metadata)
                values += parquet.read_row_group(g, columns=[name]).column(name).to_pylist()
                sparse.drop(start)
            return values
        except (pa.ArrowException, OSError) as exc:
            raise ShardError(f"{path}: cannot read column {name!r}: {exc}") from exc

    def _check_counts(self, slides: dict[str, dict[str, Any]], total: int, splits: Sequence[str]) -> None:
        written = [row.get("n_spots_written") for row in slides.values()]
        if any(w is None for w in written):
            return
        expected = sum(int(w) for w in written if w is not None)
        if expected != total:
            log.warning(
                "the selected slides of %s have %d samples in slides.parquet (n_spots_written) but the shards "
                "hold %d of them; reading what the shards hold",
                list(splits),
                expected,
                total,
            )


def open_corpus(
    location: str | os.PathLike[str],
    *,
    http: HttpSettings | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Corpus:
    """The metadata of the corpus at ``location`` (a folder, ``http(s)://``, ``hf://datasets/...``, an fsspec URL)."""
    return Corpus(open_source(location, http=http, storage_options=storage_options))
