"""Shard writers: the same samples, in the same order, as WebDataset tars and Parquet files.

``ShardWriter`` takes samples (``ShardSample``) for one split and writes them into equal-count
shards in every format of ``ShardSettings.formats`` at once (both by default; ``curate build
--formats`` writes one): shard ``i`` of ``wds/<split>/`` and of ``parquet/<split>/`` hold exactly
the same samples in the same order, and every shard but the last holds exactly
``samples_per_shard`` samples. Files are written under a hidden temporary name, fsynced and
renamed, so a shard is never visible under its final name before it is complete.

Output is byte-reproducible: tar members have fixed mtime/uid/gid/mode and a fixed order,
``expr.npz`` is written with a fixed zip timestamp, JSON with sorted keys, and Parquet with
fixed writer options (for one pyarrow version).

Expression is written compactly (schema ``stcorpus/2``; ``bench/format.py`` measures the
choices at real depth):

- Parquet: every leaf column gets its encoding and compression by its Parquet leaf path
  (``genes.list.element``; pyarrow silently ignores options keyed by a top-level name of a
  nested column, which left schema 1's expression uncompressed). Sorted gene indices are
  ``DELTA_BINARY_PACKED``, counts ``BYTE_STREAM_SPLIT``, both then zstd except the spot gene
  indices (packed enough by their delta encoding: zstd there costs more read time than the bytes
  it saves are worth); JPEG bytes are stored as they are. ``parquet_leaf_options`` lists what
  each leaf gets.
- Tar: ``expr.npz`` stays stored (a deflated member costs more to open than both JPEGs take to
  decode) with every array in the smallest dtype that holds the corpus's values
  (``schema.TarDtypes``, one choice per corpus).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from stcorpus import schema
from stcorpus.curate.atomic import fsync_dir
from stcorpus.curate.errors import SettingsError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

#: Zip's earliest representable time: a fixed stamp keeps ``expr.npz`` bytes reproducible.
_ZIP_EPOCH: Final = (1980, 1, 1, 0, 0, 0)
_TAR_MODE: Final = 0o444


#: Parquet encodings the writer accepts for the expression leaves (``RLE_DICTIONARY``: a
#: dictionary page, then bit-packed ids).
PARQUET_ENCODINGS: Final = ("PLAIN", "DELTA_BINARY_PACKED", "BYTE_STREAM_SPLIT", "RLE_DICTIONARY")
PARQUET_CODECS: Final = ("none", "zstd", "lz4", "snappy", "gzip", "brotli")


def shard_formats(formats: Iterable[str]) -> tuple[str, ...]:
    """``formats`` checked, without repeats, in ``schema.FORMATS`` order (``curate build --formats``).

    >>> shard_formats(["wds", "parquet"])
    ('parquet', 'wds')
    """
    given = [str(fmt).strip() for fmt in formats]
    if not given or any(fmt not in schema.FORMATS for fmt in given):
        raise SettingsError(
            f"--formats must name one or more of {', '.join(schema.FORMATS)}, comma-separated (e.g. --formats "
            f"parquet, or --formats {','.join(schema.FORMATS)}, the default), not {','.join(given)!r}"
        )
    return tuple(fmt for fmt in schema.FORMATS if fmt in given)


@dataclass(frozen=True)
class ShardSettings:
    """How samples are cut into shards and encoded (the defaults are what ``bench/format.py`` chose)."""

    samples_per_shard: int = 10_000
    row_group_size: int = 1_000
    #: Parquet compression of every non-image leaf (images are JPEG already and stored as is).
    parquet_compression: str = "zstd"
    #: Encoding of the sorted gene index lists (``genes``, ``niche_genes``).
    genes_encoding: str = "DELTA_BINARY_PACKED"
    #: Compression of the spot gene index leaf (``genes``) in place of ``parquet_compression``
    #: (``None``: the same). Delta encoding already packs it: zstd takes 13% off its bytes and
    #: adds 0.8 of the 5 ns a value costs to read; the niche gene leaf keeps zstd, which takes 25%
    #: off its denser deltas (``bench/parquet_decode.py``, 3,000 genes per spot).
    genes_compression: str | None = "none"
    #: Encoding of the count lists (``counts``, ``niche_counts``).
    counts_encoding: str = "BYTE_STREAM_SPLIT"
    #: Deflate ``expr.npz`` (smaller, but slower to open than both JPEGs are to decode).
    tar_deflate: bool = False
    #: The formats written (``schema.FORMATS``): both by default, the same samples in each.
    formats: tuple[str, ...] = schema.FORMATS

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", shard_formats(self.formats))
        if self.samples_per_shard < 1:
            raise SettingsError(f"samples_per_shard must be >= 1, not {self.samples_per_shard}")
        if self.row_group_size < 1:
            raise SettingsError(f"row_group_size must be >= 1, not {self.row_group_size}")
        if self.parquet_compression not in PARQUET_CODECS:
            raise SettingsError(
                f"parquet_compression must be one of {PARQUET_CODECS}, not {self.parquet_compression!r}"
            )
        if self.genes_compression is not None and self.genes_compression not in PARQUET_CODECS:
            raise SettingsError(
                f"genes_compression must be None or one of {PARQUET_CODECS}, not {self.genes_compression!r}"
            )
        for name in ("genes_encoding", "counts_encoding"):
            if getattr(self, name) not in PARQUET_ENCODINGS:
                raise SettingsError(f"{name} must be one of {PARQUET_ENCODINGS}, not {getattr(self, name)!r}")


@dataclass(frozen=True)
class ShardSample:
    """One sample ready to be written: images as JPEG bytes, expression as vocabulary indices."""

    key: str
    patch: bytes
    region: bytes
    genes: npt.NDArray[np.int32]
    counts: npt.NDArray[Any]
    niche_genes: npt.NDArray[np.int32]
    niche_counts: npt.NDArray[Any]
    meta: Mapping[str, Any]  # exactly schema.META_FIELD_NAMES


@dataclass(frozen=True)
class ShardInfo:
    """One written shard file: a row of ``shards.parquet``."""

    path: str
    format: str
    split: str
    index: int
    n_samples: int
    bytes: int
    sha256: str
    first_key: str
    last_key: str
    slide_ids: tuple[str, ...]
    #: The build generation that wrote the shard (0 until a build appends to a corpus).
    generation: int = 0

    def row(self) -> dict[str, Any]:
        """This shard as a ``shards.parquet`` row."""
        return {name: (list(v) if isinstance(v, tuple) else v) for name, v in vars(self).items()}


# ---------------------------------------------------------------------------------------------
# Members
# ---------------------------------------------------------------------------------------------


def encode_expr(
    genes: npt.NDArray[Any],
    counts: npt.NDArray[Any],
    niche_genes: npt.NDArray[Any],
    niche_counts: npt.NDArray[Any],
    *,
    dtypes: schema.TarDtypes | None = None,
    deflate: bool = False,
) -> bytes:
    """The ``expr.npz`` member: four arrays in a zip with a fixed timestamp.

    Each array is stored in its ``dtypes`` dtype (None: as given); a value that does not fit is a
    ValueError, never a silent wrap.
    """
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    buffer = io.BytesIO()
    wanted = (dtypes.genes, dtypes.counts, dtypes.genes, dtypes.niche_counts) if dtypes is not None else (None,) * 4
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, array, dtype in zip(
            (
                schema.Expr.GENES.value,
                schema.Expr.COUNTS.value,
                schema.Expr.NICHE_GENES.value,
                schema.Expr.NICHE_COUNTS.value,
            ),
            (genes, counts, niche_genes, niche_counts),
            wanted,
            strict=True,
        ):
            member = io.BytesIO()
            stored = np.ascontiguousarray(array)
            if dtype is not None:
                stored = lossless_cast(stored, np.dtype(dtype))
            np.lib.format.write_array(member, stored, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = method
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def encode_meta(meta: Mapping[str, Any]) -> bytes:
    """The ``json`` member: the metadata fields in schema order, compact, UTF-8."""
    missing = [name for name in schema.META_FIELD_NAMES if name not in meta]
    extra = sorted(set(meta) - set(schema.META_FIELD_NAMES))
    if missing or extra:
        raise ValueError(f"sample metadata: missing {missing}, unexpected {extra}")
    ordered = {name: _plain(meta[name]) for name in schema.META_FIELD_NAMES}
    return json.dumps(ordered, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


class _AtomicFile:
    """A file written under a hidden temporary name and renamed into place when complete."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle: IO[bytes] = self.tmp.open("wb")
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def finish(self) -> None:
        """Flush and fsync the temporary file; it is complete but not yet visible."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()

    def publish(self) -> None:
        """Rename the finished file into place."""
        self.tmp.replace(self.path)
        fsync_dir(self.path.parent)

    def commit(self) -> None:
        self.finish()
        self.publish()

    def abort(self) -> None:
        if not self.handle.closed:
            self.handle.close()
        self.tmp.unlink(missing_ok=True)


class _HashingSink(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to a file."""

    def __init__(self, target: _AtomicFile) -> None:
        self.target = target

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self.target.write(bytes(data))


#: The constant fields of a member's ustar header after the size: mtime 0, the checksum as spaces,
#: a regular file, no link, the POSIX magic and version, no owner names or device numbers.
_USTAR_AFTER_SIZE: Final = (
    b"00000000000\0"
    + b" " * 8
    + tarfile.REGTYPE
    + b"\0" * 100
    + tarfile.POSIX_MAGIC
    + b"\0" * (32 + 32 + 8 + 8 + 155 + 12)
)  # ... and the 12 unused bytes that fill the 512-byte block
_USTAR_MODE_IDS: Final = b"%07o\0" % _TAR_MODE + b"0000000\0" * 2  # mode, uid 0, gid 0
#: The end of a tar: two zero blocks, then zeros up to a whole record (``tarfile``'s layout).
_TAR_BLOCK, _TAR_RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE


def tar_member_header(name: str, size: int) -> bytes:
    """The header of a shard member: what ``tarfile`` writes for it, built without ``tarfile``'s overhead.

    The fields are fixed (mode 0o444, uid/gid 0, mtime 0, no owner names) so the bytes are
    reproducible; a name longer than ustar's 100 bytes or not ASCII gets ``tarfile``'s PAX header.

    >>> header = tar_member_header("S1__AAAC-1.json", 7)
    >>> len(header), tarfile.TarInfo.frombuf(header, "utf-8", "strict").size
    (512, 7)
    """
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or not name.isascii() or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, _TAR_MODE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    block = encoded.ljust(100, b"\0") + _USTAR_MODE_IDS + b"%011o\0" % size + _USTAR_AFTER_SIZE
    checksum = sum(block)  # the checksum field counts as eight spaces
    return block[:148] + b"%06o\0 " % checksum + block[156:]


class _TarShard:
    def __init__(self, path: Path, *, dtypes: schema.TarDtypes, deflate: bool) -> None:
        self.dtypes, self.deflate = dtypes, deflate
        self.file = _AtomicFile(path)

    def add(self, sample: ShardSample) -> None:
        members = (
            (schema.Member.PATCH.value, sample.patch),
            (schema.Member.REGION.value, sample.region),
            (
                schema.Member.EXPR.value,
                encode_expr(
                    sample.genes,
                    sample.counts,
                    sample.niche_genes,
                    sample.niche_counts,
                    dtypes=self.dtypes,
                    deflate=self.deflate,
                ),
            ),
            (schema.Member.META.value, encode_meta(sample.meta)),
        )
        for suffix, data in members:
            self.write(f"{sample.key}.{suffix}", data)

    def write(self, name: str, data: bytes) -> None:
        """One member (header, data, zeros to a whole block), with the fixed header fields of ``tar_member_header``."""
        self.file.write(tar_member_header(name, len(data)) + data + b"\0" * (-len(data) % _TAR_BLOCK))

    def copy_retyped(self, source: Path) -> None:
        """Append every member of the tar ``source``, its ``expr.npz`` re-encoded in this shard's dtypes."""
        expr = "." + schema.Member.EXPR.value
        with tarfile.open(source, mode="r:") as old:
            for member in old:
                handle = old.extractfile(member)
                assert handle is not None, f"{source}: member {member.name} is not a file"
                data = handle.read()
                if member.name.endswith(expr):
                    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                        data = encode_expr(
                            *(arrays[e.value] for e in schema.Expr), dtypes=self.dtypes, deflate=self.deflate
                        )
                self.write(member.name, data)

    def finish(self) -> None:
        end = self.file.size + 2 * _TAR_BLOCK
        self.file.write(b"\0" * (2 * _TAR_BLOCK + (-end % _TAR_RECORD)))
        self.file.finish()

    def abort(self) -> None:
        self.file.abort()


class _ParquetShard:
    def __init__(self, path: Path, *, counts_dtype: str, settings: ShardSettings) -> None:
        import pyarrow.parquet as pq

        self.schema = schema.sample_arrow_schema(counts_dtype)
        self.counts_dtype = np.dtype(counts_dtype)
        self.settings = settings
        self.file = _AtomicFile(path)
        options = parquet_leaf_options(self.schema, settings)
        self.writer: pq.ParquetWriter = pq.ParquetWriter(
            _HashingSink(self.file),
            self.schema,
            compression=options["compression"],
            use_dictionary=options["use_dictionary"],
            column_encoding=options["column_encoding"],
            write_statistics=[schema.KEY_COLUMN, "slide_id"],
        )
        self.rows: list[ShardSample] = []
        # Row groups are encoded and compressed on a thread of their own (pyarrow releases the GIL
        # there) while the caller goes on with the next samples and the tar; one at a time, in order.
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-shard")
        self._pending: Future[None] | None = None

    def add(self, sample: ShardSample) -> None:
        self.rows.append(sample)
        if len(self.rows) >= self.settings.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            table = self._table(self.rows)
            self.rows = []
            self._wait()  # at most one row group in flight: memory stays bounded, errors surface here
            self._pending = self._encoder.submit(self.writer.write_table, table, row_group_size=table.num_rows)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _table(self, rows: Sequence[ShardSample]) -> pa.Table:
        import pyarrow as pa

        columns: dict[str, Any] = {
            schema.KEY_COLUMN: [r.key for r in rows],
            schema.PATCH_COLUMN: [{"bytes": r.patch, "path": f"{r.key}.{schema.Member.PATCH.value}"} for r in rows],
            schema.REGION_COLUMN: [{"bytes": r.region, "path": f"{r.key}.{schema.Member.REGION.value}"} for r in rows],
            schema.Expr.GENES.value: _list_array([r.genes for r in rows], self._type(schema.Expr.GENES)),
            schema.Expr.COUNTS.value: _list_array([r.counts for r in rows], self._type(schema.Expr.COUNTS)),
            schema.Expr.NICHE_GENES.value: _list_array(
                [r.niche_genes for r in rows], self._type(schema.Expr.NICHE_GENES)
            ),
            schema.Expr.NICHE_COUNTS.value: _list_array(
                [r.niche_counts for r in rows], self._type(schema.Expr.NICHE_COUNTS)
            ),
        }
        for f in schema.META_FIELDS:
            columns[f.name] = [_plain(r.meta[f.name]) for r in rows]
        arrays = [
            columns[name]
            if isinstance(columns[name], pa.Array)
            else pa.array(columns[name], type=self.schema.field(name).type)
            for name in self.schema.names
        ]
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def _type(self, column: schema.Expr) -> pa.ListType:
        list_type: pa.ListType = self.schema.field(column.value).type
        return list_type

    def finish(self) -> None:
        self._flush()
        try:
            self._wait()
        finally:
            self._encoder.shutdown(wait=True)
        self.writer.close()
        self.file.finish()

    def abort(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
            wait([pending])  # never close the writer under a row group being written
        self._encoder.shutdown(wait=True)
        if self.writer.is_open:
            self.writer.close()
        self.file.abort()


def _list_array(arrays: Sequence[npt.NDArray[Any]], list_type: pa.ListType) -> pa.Array:
    """A list array of ``list_type`` built from numpy arrays without going through Python lists."""
    import pyarrow as pa

    dtype = np.dtype(list_type.value_type.to_pandas_dtype())
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = lossless_cast(np.concatenate(arrays), dtype) if arrays else np.zeros(0, dtype=dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), type=list_type)


def parquet_leaf_paths(column: pa.Field) -> list[str]:
    """The Parquet leaf paths of an Arrow field, as pyarrow's writer options key them.

    >>> import pyarrow as pa
    >>> parquet_leaf_paths(pa.field("genes", pa.list_(pa.int32())))
    ['genes.list.element']
    """
    import pyarrow as pa

    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        child = pa.field("element", column.type.value_type)
        return [f"{column.name}.list.{leaf}" for leaf in parquet_leaf_paths(child)]
    if pa.types.is_struct(column.type):
        return [f"{column.name}.{leaf}" for child in column.type for leaf in parquet_leaf_paths(child)]
    return [column.name]


#: Columns of few distinct values, dictionary-encoded.
_DICTIONARY_COLUMNS: Final = ("split", "species", "organ", "technology", "assay", "study_id", "slide_id")


def parquet_leaf_options(arrow_schema: pa.Schema, settings: ShardSettings) -> dict[str, Any]:
    """``compression``, ``use_dictionary`` and ``column_encoding`` of every leaf of a sample shard.

    Keyed by leaf path: the JPEG bytes are stored as they are; the spot gene indices get
    ``settings.genes_compression``; everything else is compressed with
    ``settings.parquet_compression``; gene index and count lists get their encodings.
    """
    images = {f"{name}.bytes" for name in (schema.PATCH_COLUMN, schema.REGION_COLUMN)}
    compression: dict[str, str] = {}
    encoding: dict[str, str] = {}
    dictionary: list[str] = []
    for column in arrow_schema:
        for leaf in parquet_leaf_paths(column):
            compression[leaf] = "none" if leaf in images else settings.parquet_compression
            if column.name == schema.Expr.GENES.value and settings.genes_compression is not None:
                compression[leaf] = settings.genes_compression
            if column.name in _DICTIONARY_COLUMNS:
                dictionary.append(leaf)
            elif column.name in (schema.Expr.GENES.value, schema.Expr.NICHE_GENES.value):
                _encode(leaf, settings.genes_encoding, encoding, dictionary)
            elif column.name in (schema.Expr.COUNTS.value, schema.Expr.NICHE_COUNTS.value):
                _encode(leaf, settings.counts_encoding, encoding, dictionary)
    return {"compression": compression, "use_dictionary": dictionary, "column_encoding": encoding}


def _encode(leaf: str, name: str, encoding: dict[str, str], dictionary: list[str]) -> None:
    if name == "RLE_DICTIONARY":
        dictionary.append(leaf)
    else:
        encoding[leaf] = name


def lossless_cast(values: npt.NDArray[Any], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """``values`` as ``dtype`` if no value changes on the way, else a ValueError (never a silent cast)."""
    if values.dtype == dtype or np.can_cast(values.dtype, dtype, casting="safe"):
        return values.astype(dtype, copy=False)
    if values.dtype.kind == "f" and dtype.kind in "iu" and not np.all(np.isfinite(values)):
        raise ValueError(f"cannot store {values.dtype} values as {dtype} without changing them (NaN or inf)")
    with np.errstate(invalid="ignore", over="ignore"):
        cast = values.astype(dtype)
    numeric = values.dtype.kind in "iuf" and dtype.kind in "iuf"
    if not numeric or not np.array_equal(cast.astype(values.dtype), values):
        raise ValueError(f"cannot store {values.dtype} values as {dtype} without changing them")
    return cast


# ---------------------------------------------------------------------------------------------
# The writer of one split
# ---------------------------------------------------------------------------------------------


@dataclass
class ShardWriter:
    """Writes the samples of one split into equal-count shards of each of ``settings.formats``.

    >>> with ShardWriter(root, split="train", counts_dtype="int32") as writer:  # doctest: +SKIP
    ...     for sample in samples:
    ...         writer.add(sample)
    >>> writer.shards  # doctest: +SKIP
    """

    root: Path
    split: str
    counts_dtype: str = "int32"
    settings: ShardSettings = field(default_factory=ShardSettings)
    #: dtypes of the ``expr.npz`` arrays: give the corpus's ``TarDtypes.smallest``; None stores
    #: int32 indices and ``counts_dtype`` counts (schema 1's layout).
    tar_dtypes: schema.TarDtypes | None = None
    #: The build generation the shards belong to (``shards.parquet`` ``generation``).
    generation: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    #: Number of the first shard written (several writers can each write a range of shards).
    first_index: int = 0

    def __post_init__(self) -> None:
        if self.split not in schema.SPLITS:
            raise SettingsError(f"unknown split {self.split!r}; splits are {schema.SPLITS}")
        if self.counts_dtype not in schema.COUNT_DTYPES:
            raise SettingsError(f"counts dtype must be one of {schema.COUNT_DTYPES}, not {self.counts_dtype!r}")
        if self.first_index < 0:
            raise SettingsError(f"first_index must be >= 0, not {self.first_index}")
        if self.generation < 0:
            raise SettingsError(f"generation must be >= 0, not {self.generation}")
        if self.tar_dtypes is None:
            self.tar_dtypes = schema.TarDtypes(counts=self.counts_dtype, niche_counts=self.counts_dtype)
        self._index = self.first_index
        self._tar: _TarShard | None = None
        self._parquet: _ParquetShard | None = None
        self._n = 0
        self._first_key = ""
        self._last_key = ""
        self._slides: set[str] = set()

    def add(self, sample: ShardSample) -> None:
        """Append one sample; a shard is committed each time it reaches ``samples_per_shard``."""
        if self._n == 0:
            self._open()
        for _, shard in self._writing():
            shard.add(sample)
        if self._n == 0:
            self._first_key = sample.key
        self._last_key = sample.key
        self._slides.add(str(sample.meta["slide_id"]))
        self._n += 1
        if self._n == self.settings.samples_per_shard:
            self._commit()

    def add_all(self, samples: Iterable[ShardSample]) -> None:
        """Append every sample of ``samples``."""
        for sample in samples:
            self.add(sample)

    def _open(self) -> None:
        if "wds" in self.settings.formats:
            self._tar = _TarShard(
                self.root / schema.shard_path("wds", self.split, self._index),
                dtypes=self.tar_dtypes or schema.TarDtypes(),
                deflate=self.settings.tar_deflate,
            )
        if "parquet" in self.settings.formats:
            self._parquet = _ParquetShard(
                self.root / schema.shard_path("parquet", self.split, self._index),
                counts_dtype=self.counts_dtype,
                settings=self.settings,
            )

    def _writing(self) -> list[tuple[str, _TarShard | _ParquetShard]]:
        """The open shard of each format written, tar first (the order ``shards`` lists them in)."""
        return [(fmt, shard) for fmt, shard in (("wds", self._tar), ("parquet", self._parquet)) if shard is not None]

    def _commit(self) -> None:
        writing = self._writing()
        # Every file is completed before any is renamed: a failure in one leaves none visible.
        try:
            for _, shard in writing:
                shard.finish()
        except BaseException:
            self.abort()
            raise
        for fmt, shard in writing:
            shard.file.publish()
            self.shards.append(
                ShardInfo(
                    path=schema.shard_path(fmt, self.split, self._index),
                    format=fmt,
                    split=self.split,
                    index=self._index,
                    n_samples=self._n,
                    bytes=shard.file.size,
                    sha256=shard.file.digest.hexdigest(),
                    first_key=self._first_key,
                    last_key=self._last_key,
                    slide_ids=tuple(sorted(self._slides)),
                    generation=self.generation,
                )
            )
        self._tar = self._parquet = None
        self._index += 1
        self._n = 0
        self._slides = set()

    def retype(self, dtypes: schema.TarDtypes) -> None:
        """Store every ``expr.npz`` written so far, and from now on, in ``dtypes`` (wider than before).

        The streaming pack fixes a corpus's dtypes from its first slides; a later slide with larger
        counts or gene indices widens them. Each committed tar shard is rewritten in place (atomically)
        and the one being written is carried over into a fresh file; the bytes are those the shards
        would have had if written in ``dtypes`` from the start. Parquet shards do not change (without
        ``wds`` in ``settings.formats`` nothing is rewritten; later shards are never tars either).
        """
        if dtypes == self.tar_dtypes:
            return
        self.tar_dtypes = dtypes
        for position, info in enumerate(self.shards):
            if info.format != "wds":
                continue
            path = self.root / info.path
            shard = _TarShard(path, dtypes=dtypes, deflate=self.settings.tar_deflate)
            try:
                shard.copy_retyped(path)
                shard.finish()
            except BaseException:
                shard.abort()
                raise
            shard.file.publish()
            self.shards[position] = replace(info, bytes=shard.file.size, sha256=shard.file.digest.hexdigest())
        if self._tar is not None:
            old = self._tar
            old.finish()
            carried = old.file.tmp.with_name(old.file.tmp.name + ".old")
            old.file.tmp.replace(carried)
            self._tar = _TarShard(old.file.path, dtypes=dtypes, deflate=self.settings.tar_deflate)
            try:
                self._tar.copy_retyped(carried)
            finally:
                carried.unlink(missing_ok=True)

    def close(self) -> list[ShardInfo]:
        """Commit the last (possibly short) shard and return every shard written."""
        if self._n > 0:
            self._commit()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temporary files); committed shards stay."""
        for shard in (self._tar, self._parquet):
            if shard is not None:
                shard.abort()
        self._tar = self._parquet = None
        self._n = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard_index(root: Path, shards: Sequence[ShardInfo]) -> Path:
    """Write ``shards.parquet``: one row per shard file, sorted by format, split and index."""
    import pyarrow as pa

    ordered = sorted(shards, key=lambda s: (s.format, schema.SPLITS.index(s.split), s.generation, s.index))
    index_schema = schema.shards_arrow_schema()
    table = pa.Table.from_pylist([s.row() for s in ordered], schema=index_schema)
    return write_parquet_atomic(root / schema.SHARDS_FILE, table)


def write_parquet_atomic(path: Path, table: pa.Table, **options: Any) -> Path:
    """Write an Arrow table as Parquet through a temporary file + rename."""
    import pyarrow.parquet as pq

    out = _AtomicFile(path)
    try:
        pq.write_table(table, _HashingSink(out), **options)
    except BaseException:
        out.abort()
        raise
    out.commit()
    return path
