"""Shard readers: the selected rows of WebDataset tars and Parquet files, as raw samples.

Both formats yield the same :class:`RawSample`: the JPEG bytes of the views (not decoded), the
expression as numpy arrays (views into the read buffers: Arrow's, or the shard's memory map for a
tar on disk) and ``pos`` / ``n_neighbors``. Images are decoded by the next stage (on the CPU, or
on the GPU from the bytes), never here. For a tar
that means taking its ``expr.npz`` and ``json`` members apart (``parse_npz``: headers only, no
copy); a member that cannot be taken apart marks the sample with a ``fault`` for the loader's
``on_bad_sample`` policy instead of stopping the shard. Skipping a sample costs a header parse
(tar; a seek on local files) or nothing (Parquet rows of another row group are never read), so a
resume never decodes what it skips.

Tar members are parsed here rather than with ``tarfile``: ``tarfile`` reads about 11-12k
members/s per core, which at four members per sample would cost a third of the time it takes to
decode the two JPEGs. This reader handles what our writer and common tar writers produce:
ustar (with prefix), pax extended headers (``x``; ``g`` ignored) and GNU long names (``L``);
every header's checksum is verified. Shards on disk are read through a memory map (tar) or
pyarrow's (Parquet): shards are written under a temporary name and renamed into place, never
rewritten, so a map stays valid while views of it are in use.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Final

import numpy as np
import numpy.typing as npt

from stcorpus import schema
from stcorpus.loaders import parquet_fast
from stcorpus.loaders.buffers import ArrayPool
from stcorpus.loaders.errors import ShardError
from stcorpus.loaders.plan import Segment, ShardEntry
from stcorpus.loaders.settings import HttpSettings
from stcorpus.loaders.source import Readahead, Source, Stream

if TYPE_CHECKING:
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

log = logging.getLogger(__name__)

BLOCK: Final = 512
_ZERO_BLOCK: Final = bytes(BLOCK)
_IMAGE_SUFFIXES: Final = ("jpg", "jpeg", "png")

#: The members of one tar sample by suffix (images as views into the read buffer).
Members = dict[str, bytes | memoryview]
_PARQUET_TAIL: Final = 64 * 1024


class RawSample:
    """One sample as read from a shard, in the same shape for both formats; images not decoded."""

    __slots__ = (
        "counts",
        "fault",
        "genes",
        "key",
        "n_neighbors",
        "niche_counts",
        "niche_genes",
        "patch",
        "pos",
        "region",
    )

    def __init__(self, key: str) -> None:
        self.key = key
        self.patch: bytes | memoryview | None = None  # JPEG (a view into the read buffer)
        self.region: bytes | memoryview | None = None
        self.genes: npt.NDArray[Any] | None = None
        self.counts: npt.NDArray[Any] | None = None
        self.niche_genes: npt.NDArray[Any] | None = None
        self.niche_counts: npt.NDArray[Any] | None = None
        self.pos: int = 0
        self.n_neighbors: int = 0
        #: Why the sample cannot be used (a member that could not be parsed), else None.
        self.fault: str | None = None

    @property
    def slide_id(self) -> str:
        """The slide id part of the key."""
        return self.key.partition(schema.KEY_SEPARATOR)[0]


@dataclass(frozen=True)
class Columns:
    """What the decode stage needs from a sample (Parquet reads only these columns)."""

    patch: bool = True
    region: bool = True
    expression: bool = True
    niche: bool = False

    def parquet(self) -> list[str]:
        """Parquet column names to read."""
        names = [schema.KEY_COLUMN, schema.POS]
        # Only the JPEG leaf of an image struct (``datasets``' Image: bytes and path): the path
        # strings would be decompressed and dropped.
        if self.patch:
            names.append(f"{schema.PATCH_COLUMN}.bytes")
        if self.region:
            names.append(f"{schema.REGION_COLUMN}.bytes")
        if self.expression:
            names += [schema.Expr.GENES.value, schema.Expr.COUNTS.value]
        if self.niche:
            names += list(schema.NICHE_FIELDS)
        return names


# ---------------------------------------------------------------------------------------------
# Tar
# ---------------------------------------------------------------------------------------------


def _octal(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ShardError(f"bad tar header: {what} field {field!r} is not octal") from None


def _byte_sum(data: bytes) -> int:
    """The sum of the bytes of a 512-byte block, exactly (5x faster than ``sum(data)``).

    Adler-32's low half is 1 + the byte sum modulo 65521; a 256-byte half sums to at most
    65,280, below the modulus, so the two halves give the exact sum.
    """
    return (zlib.adler32(data[:256]) & 0xFFFF) + (zlib.adler32(data[256:]) & 0xFFFF) - 2


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156], "checksum")
    unsigned = _byte_sum(header) - sum(header[148:156]) + 8 * 32  # the checksum field counts as spaces
    if stored == unsigned:
        return True
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 8 * 32
    return stored == signed


def _pax(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def split_member_name(name: str) -> tuple[str, str]:
    """``(key, suffix)`` of a member the WebDataset way: the key ends at the basename's first dot."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


class MappedShard:
    """A local shard file as a read-only memory map; ``read`` returns views into it, no copies.

    A tar sample is four members: read through a buffered file, each is a ``read`` call, an
    allocation and a copy of its bytes (both JPEGs and ``expr.npz``: about 85 kB a sample at
    3,000 genes); from the map it is a slice. The map lives as long as a view of it does (a JPEG of
    a batch being decoded), so ``close`` only drops this object's reference.
    """

    def __init__(self, handle: BinaryIO) -> None:
        try:
            size = os.fstat(handle.fileno()).st_size
            self._view = memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)) if size else memoryview(b"")
        finally:
            handle.close()  # the map keeps its own reference to the file
        self.pos = 0

    def view(self) -> memoryview:
        """The whole shard (a view of the map)."""
        return self._view

    def read(self, n: int = -1, /) -> memoryview:
        """The next ``n`` bytes (fewer at the end) as a view."""
        start = self.pos
        self.pos = len(self._view) if n < 0 else min(len(self._view), start + n)
        return self._view[start : self.pos]

    def seek(self, offset: int, whence: int = 0, /) -> int:
        """Move like ``io.IOBase.seek``."""
        base = (0, self.pos, len(self._view))[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def close(self) -> None:
        """Drop this reader's view (views handed out keep the map alive)."""
        self._view = memoryview(b"")


#: ``tar_headers`` statuses (0, a header left to the Python parser, needs no name here).
_SCAN_END, _SCAN_FULL = 1, 2


class _TarScan:
    """The compiled scan of a mapped tar's headers (``_parquet_kernels.tar_headers``), in chunks."""

    def __init__(self, shard: MappedShard) -> None:
        self.kernel = parquet_fast.kernels().tar_headers
        self.view = shard.view()
        self.buffer = np.frombuffer(self.view, np.uint8)
        n = TarCursor.SCAN_MEMBERS
        self.data, self.sizes = np.empty(n, np.int64), np.empty(n, np.int64)
        self.names, self.prefixes = np.empty(n, np.int64), np.empty(n, np.int64)
        self.found = self.done = 0
        self.status = _SCAN_FULL  # nothing scanned yet: scan on first use
        self.next = 0
        self._lists: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])

    def run(self, pos: int) -> None:
        """Scan from the header at ``pos``."""
        self.found, self.next, self.status = self.kernel(
            self.buffer, pos, self.data, self.sizes, self.names, self.prefixes
        )
        self.done = 0
        n = self.found
        self._lists = (
            self.data[:n].tolist(),
            self.sizes[:n].tolist(),
            self.names[:n].tolist(),
            self.prefixes[:n].tolist(),
        )

    def take(self) -> tuple[str, int, int]:
        """The next scanned member: ``(name, data position, size)``."""
        k = self.done
        self.done += 1
        data, sizes, names, prefixes = self._lists
        view = self.view
        at = data[k] - BLOCK  # the member's header
        name = view[at : at + names[k]].tobytes().decode("utf-8", "surrogateescape")
        if prefixes[k]:
            prefix = view[at + 345 : at + 345 + prefixes[k]].tobytes().decode("utf-8", "surrogateescape")
            name = f"{prefix}/{name}"
        return name, data[k], sizes[k]


def mapped(stream: Stream) -> Stream | MappedShard:
    """``stream`` as a :class:`MappedShard` when it is a file on disk, else as it is."""
    fileno = getattr(stream, "fileno", None)
    if fileno is None:
        return stream
    try:
        fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return stream
    return MappedShard(stream)  # type: ignore[arg-type]


class TarCursor:
    """Walks one tar shard sample by sample (consecutive members sharing a key form a sample).

    With ``scan`` (a memory-mapped shard and the compiled kernels of ``stcorpus[fast]``), the
    headers of plain file members are read by a compiled scan ahead of the cursor, checksums
    included (the cursor 22 -> 14 us a sample of four members); any header it does not take (PAX or GNU
    long names, other member types, a checksum that does not match, a cut) is read here as
    before, with the same errors.
    """

    #: Members per compiled scan.
    SCAN_MEMBERS: Final = 1024

    def __init__(self, stream: Stream | MappedShard, *, path: str, seekable: bool, scan: bool = False) -> None:
        self.stream = stream
        self.path = path
        self.seekable = seekable
        self.offset = 0
        self.row = -1  # row of the sample whose members are being collected
        self.key: str | None = None
        self.members: Members = {}
        self._lookahead: tuple[str, str, int] | None = None  # header read, data not yet: key, suffix, size
        self._ended = False
        self._emitted = -1  # last row handed out
        self._scan: _TarScan | None = _TarScan(stream) if scan and isinstance(stream, MappedShard) else None

    def _read(self, n: int) -> bytes | memoryview:
        data = self.stream.read(n)
        if len(data) < n:
            parts = [bytes(data)]
            got = len(data)
            while got < n:
                more = self.stream.read(n - got)
                if not more:
                    raise ShardError(f"{self.path}: truncated at byte {self.offset + got} (a member is cut short)")
                parts.append(bytes(more))
                got += len(more)
            data = b"".join(parts)
        self.offset += n
        return data

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        if self.seekable:
            self.stream.seek(n, 1)  # type: ignore[union-attr]
            self.offset += n
            return
        while n > 0:
            chunk = self.stream.read(min(n, 1 << 20))
            if not chunk:
                raise ShardError(f"{self.path}: truncated at byte {self.offset}")
            n -= len(chunk)
            self.offset += len(chunk)

    def _next_header(self) -> tuple[str, str, int] | None:
        """The next file member's ``(key, suffix, size)``, from the compiled scan where it has it."""
        scan = self._scan
        if scan is None:
            return self._header()
        assert isinstance(self.stream, MappedShard)
        if scan.done == scan.found and scan.status == _SCAN_FULL:
            scan.run(self.offset)
        if scan.done < scan.found:
            name, data, size = scan.take()
            self.stream.pos = self.offset = data
            key, suffix = split_member_name(name)
            return key, suffix, size
        if scan.status == _SCAN_END:  # the end-of-archive block at scan.next
            self.stream.pos = self.offset = scan.next + BLOCK
            return None
        # A header the scan leaves to the parser below, at scan.next; the scan resumes after it.
        self.stream.pos = self.offset = scan.next
        header = self._header()
        scan.status = _SCAN_FULL
        return header

    def _header(self) -> tuple[str, str, int] | None:
        """The next file member's ``(key, suffix, size)``; None at the end of the archive."""
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            header = bytes(self.stream.read(BLOCK))  # a copy when mapped: fields are parsed as bytes
            if len(header) < BLOCK:
                raise ShardError(f"{self.path}: truncated at byte {self.offset} (no end-of-archive marker)")
            self.offset += BLOCK
            if header == _ZERO_BLOCK:
                return None
            if not _checksum_ok(header):
                raise ShardError(f"{self.path}: corrupt tar header at byte {self.offset - BLOCK} (checksum mismatch)")
            size = _octal(header[124:136], "size")
            kind = header[156:157]
            padded = size + (-size % BLOCK)
            if kind in (b"x", b"L", b"g"):
                data = bytes(self._read(padded)[:size])
                if kind == b"x":
                    pax = _pax(data)
                elif kind == b"L":
                    long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if prefix:
                    name = f"{prefix}/{name}"
            name = pax.get("path", long_name or name)
            if "size" in pax:
                size = int(pax["size"])
                padded = size + (-size % BLOCK)
            if kind not in (b"0", b"\0", b"7"):
                self._skip(padded)  # directories, links, devices: not samples
                long_name, pax = None, {}
                continue
            key, suffix = split_member_name(name)
            return key, suffix, size

    def _member_data(self, size: int, *, keep: bool, view: bool = False) -> bytes | memoryview | None:
        """The member's bytes (``view``: a view that skips copying off the block padding)."""
        padded = size + (-size % BLOCK)
        if keep:
            data = self._read(padded)
            if padded == size:
                return data
            return memoryview(data)[:size] if view else data[:size]
        self._skip(padded)
        return None

    def rows(self, wanted: Sequence[int] | npt.NDArray[np.int64]) -> Iterator[tuple[int, str, Members]]:
        """``(row, key, members)`` of each wanted row (ascending, not before the cursor)."""
        for target in wanted:
            target = int(target)
            if target <= self._emitted or target < self.row:
                raise ShardError(f"{self.path}: row {target} is behind the cursor (row {self.row})")
            while True:
                if self._lookahead is None and not self._ended:
                    self._lookahead = self._next_header()
                    if self._lookahead is None:
                        self._ended = True
                if self._ended:
                    if self.row == target and self.key is not None:
                        yield self._emit()
                        break
                    raise ShardError(f"{self.path}: archive ends at sample {self.row + 1}; sample {target} is missing")
                key, suffix, size = self._lookahead  # type: ignore[misc]
                if key != self.key:
                    if self.row == target and self.key is not None:
                        yield self._emit()
                        break
                    self.row += 1
                    self.key = key
                    self.members = {}
                self._lookahead = None
                # Images as views (no copy of 17 kB per JPEG); expr.npz and json stay bytes.
                data = self._member_data(size, keep=self.row == target, view=suffix.endswith(_IMAGE_SUFFIXES))
                if data is not None:
                    self.members[suffix] = data

    def _emit(self) -> tuple[int, str, Members]:
        assert self.key is not None
        out = (self.row, self.key, self.members)
        self._emitted = self.row
        self.members = {}
        self.key = f"\0consumed:{self.row}"  # the next member starts a new row whatever its key
        return out

    def close(self) -> None:
        """Close the underlying stream."""
        self.stream.close()


_PATCH_MEMBER: Final = schema.Member.PATCH.value
_REGION_MEMBER: Final = schema.Member.REGION.value
_EXPR_MEMBER: Final = schema.Member.EXPR.value
_META_MEMBER: Final = schema.Member.META.value


def raw_from_members(key: str, members: Mapping[str, bytes | memoryview], columns: Columns) -> RawSample:
    """A raw sample from the tar members of one key: ``json`` and ``expr.npz`` taken apart."""
    import json

    sample = RawSample(key)
    sample.patch = members.get(_PATCH_MEMBER)
    sample.region = members.get(_REGION_MEMBER)
    meta = members.get(_META_MEMBER)
    if meta is None:
        sample.fault = "no json member (metadata)"
        return sample
    try:
        fields = json.loads(bytes(meta))
        sample.pos = int(fields[schema.POS])
        sample.n_neighbors = int(fields.get(schema.N_NEIGHBORS) or 0)
    except (ValueError, KeyError, TypeError) as exc:
        sample.fault = f"malformed json member: {exc}"
        return sample
    if columns.expression or columns.niche:
        blob = members.get(_EXPR_MEMBER)
        if blob is None:
            sample.fault = f"no {_EXPR_MEMBER} member"
            return sample
        try:
            arrays = parse_npz(blob)
            sample.genes, sample.counts = arrays[schema.Expr.GENES.value], arrays[schema.Expr.COUNTS.value]
            sample.niche_genes = arrays[schema.Expr.NICHE_GENES.value]
            sample.niche_counts = arrays[schema.Expr.NICHE_COUNTS.value]
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as exc:  # np.load's CRC check: BadZipFile
            sample.fault = f"malformed {_EXPR_MEMBER} member: {exc}"
    return sample


# ---------------------------------------------------------------------------------------------
# expr.npz
# ---------------------------------------------------------------------------------------------

_NPY_HEADER = re.compile(rb"\{'descr': '([<>|][a-z]\d+)', 'fortran_order': False, 'shape': \((\d*),?\), \}")


#: A zip local file header: signature, version, flags, method, time, date, crc, sizes, name/extra lengths.
_ZIP_LOCAL = struct.Struct("<4sHHHHHIIIHH")
#: Parsed ``.npy`` headers (dtype, count) by their bytes: samples repeat the same few headers.
_NPY_HEADERS: dict[bytes, tuple[np.dtype[Any], int]] = {}


def parse_npz(data: bytes | memoryview) -> dict[str, npt.NDArray[Any]]:
    """The arrays of an uncompressed ``.npz`` (what our writer makes), without ``zipfile``.

    The arrays are views into ``data`` (a tar member mapped from disk stays uncopied). Anything
    unusual (compression, data descriptors, non-1-D arrays) goes through ``np.load``.
    """
    view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    out: dict[str, npt.NDArray[Any]] = {}
    pos = 0
    while pos + 30 <= len(view) and view[pos : pos + 4].tobytes() == b"PK\x03\x04":
        _, _, flags, method, _, _, _, size, _, name_len, extra_len = _ZIP_LOCAL.unpack_from(view, pos)
        if method != 0 or flags & 0x08 or size == 0xFFFFFFFF:
            return _np_load(data)
        name = bytes(view[pos + 30 : pos + 30 + name_len]).decode("utf-8")
        start = pos + 30 + name_len + extra_len
        if view[start : start + 7].tobytes() != b"\x93NUMPY\x01":
            return _np_load(data)
        header_len = int.from_bytes(view[start + 8 : start + 10], "little")
        header = bytes(view[start + 10 : start + 10 + header_len])
        parsed = _NPY_HEADERS.get(header)
        if parsed is None:
            match = _NPY_HEADER.match(header)
            if match is None:
                return _np_load(data)
            parsed = (np.dtype(match.group(1).decode()), int(match.group(2)) if match.group(2) else 1)
            if len(_NPY_HEADERS) < 4096:
                _NPY_HEADERS[header] = parsed
        dtype, count = parsed
        out[name.removesuffix(".npy")] = np.frombuffer(view, dtype=dtype, count=count, offset=start + 10 + header_len)
        pos = start + size
    return out if out else _np_load(data)


def _np_load(data: bytes | memoryview) -> dict[str, npt.NDArray[Any]]:
    import io

    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


# ---------------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------------


def row_group_spans(metadata: pq.FileMetaData) -> list[tuple[int, int]]:
    """Byte span ``[start, stop)`` of each row group (its column chunks are contiguous)."""
    spans = []
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        start, stop = None, 0
        for c in range(group.num_columns):
            column = group.column(c)
            offset = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
            start = offset if start is None else min(start, offset)
            stop = max(stop, offset + column.total_compressed_size)
        spans.append((start or 0, stop))
    return spans


def row_group_starts(metadata: pq.FileMetaData) -> npt.NDArray[np.int64]:
    """First row of each row group, plus the row count at the end."""
    counts = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


class SparseFile:
    """A read-only file of ``size`` bytes of which only some ranges are held (for pyarrow).

    pyarrow, given the file's metadata, reads only inside the row group it is asked for; a read
    outside the held ranges is a bug, reported as an error rather than served wrongly.
    """

    def __init__(self, size: int, path: str) -> None:
        self.size, self.path = size, path
        self.ranges: dict[int, bytes] = {}
        self.pos = 0
        self.closed = False

    def hold(self, start: int, data: bytes) -> None:
        """Make ``data`` readable at ``start``."""
        self.ranges[start] = data

    def drop(self, start: int) -> None:
        """Forget the range held at ``start``."""
        self.ranges.pop(start, None)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else (self.pos + offset if whence == 1 else self.size + offset)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.size - self.pos
        for start, data in self.ranges.items():
            if start <= self.pos and self.pos + n <= start + len(data):
                out = data[self.pos - start : self.pos - start + n]
                self.pos += n
                return out
        raise ShardError(f"{self.path}: read of bytes {self.pos}-{self.pos + n} outside the fetched ranges")

    def close(self) -> None:
        self.closed = True


def parquet_metadata_from_tail(tail: bytes, size: int, path: str) -> pq.FileMetaData:
    """The footer metadata of a Parquet file from its last bytes (``tail`` ends at ``size``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if len(tail) < 12 or tail[-4:] != b"PAR1":
        raise ShardError(f"{path}: not a Parquet file (no PAR1 footer magic): truncated or corrupt")
    footer_len = int.from_bytes(tail[-8:-4], "little")
    if footer_len + 8 > len(tail):
        raise ShardError(f"{path}: Parquet footer of {footer_len} bytes is longer than the tail read")
    sparse = SparseFile(size, path)
    sparse.hold(size - len(tail), tail)
    try:
        return pq.ParquetFile(pa.PythonFile(sparse, mode="r")).metadata
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"{path}: corrupt Parquet footer: {exc}") from exc


def raw_from_table(
    table: pa.Table,
    rows: npt.NDArray[np.int64],
    columns: Columns,
    *,
    lists: Mapping[str, tuple[list[int], npt.NDArray[Any]]] | None = None,
    binary: Mapping[str, BinaryRows] | None = None,
) -> list[RawSample]:
    """Raw samples of ``rows`` (indices into ``table``) of one Parquet row group.

    ``lists``: list columns decoded elsewhere (``parquet_fast``), as offsets for the rows of
    ``table`` (absolute into their values) and values; ``binary``: image columns located
    elsewhere (by leaf: ``patch.bytes``), as each row's start and end in a buffer; the others are
    taken from ``table``.
    """
    lists = lists or {}
    binary = binary or {}

    def list_column(name: str) -> tuple[list[int], npt.NDArray[Any]]:
        return lists[name] if name in lists else _list_column(table, name)

    def image_column(name: str) -> BinaryRows:
        if f"{name}.bytes" in binary:
            return binary[f"{name}.bytes"]
        offsets, data = _binary_views(_array(table, name).flatten()[0])
        bounds = offsets.tolist()
        return bounds[:-1], bounds[1:], data

    keys = table.column(schema.KEY_COLUMN).to_pylist()
    pos = table.column(schema.POS).to_numpy(zero_copy_only=False).tolist()
    # Offsets as Python lists: indexing a list is several times cheaper than a numpy array.
    patch = image_column(schema.PATCH_COLUMN) if columns.patch else None
    region = image_column(schema.REGION_COLUMN) if columns.region else None
    expression = niche = None
    if columns.expression:
        expression = (list_column(schema.Expr.GENES.value), list_column(schema.Expr.COUNTS.value))
    if columns.niche:
        niche = (list_column(schema.Expr.NICHE_GENES.value), list_column(schema.Expr.NICHE_COUNTS.value))
        neighbours = table.column(schema.N_NEIGHBORS).to_numpy(zero_copy_only=False).tolist()
    out = []
    for r in rows.tolist():
        sample = RawSample(keys[r])
        sample.pos = int(pos[r]) if pos[r] is not None else 0
        if pos[r] is None:
            sample.fault = "null pos"
        if patch is not None:
            begins, ends, data = patch
            sample.patch = data[begins[r] : ends[r]]
        if region is not None:
            begins, ends, data = region
            sample.region = data[begins[r] : ends[r]]
        if expression is not None:
            (go, gv), (co, cv) = expression
            sample.genes, sample.counts = gv[go[r] : go[r + 1]], cv[co[r] : co[r + 1]]
        if niche is not None:
            (go, gv), (co, cv) = niche
            sample.niche_genes, sample.niche_counts = gv[go[r] : go[r + 1]], cv[co[r] : co[r + 1]]
            sample.n_neighbors = int(neighbours[r] or 0)
        out.append(sample)
    return out


def _array(table: pa.Table, name: str) -> pa.Array:
    """Column ``name`` as one array, without a copy when it is one chunk (a row group read is).

    ``ChunkedArray.combine_chunks`` copies even a single chunk: for the niche lists of a row group
    of 256 samples at 3,000 genes that is 9 MB, as long as pyarrow took to decode them.
    """
    column = table.column(name)
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _list_column(table: pa.Table, name: str) -> tuple[list[int], npt.NDArray[Any]]:
    """Offsets (a list) and flat values of a list column: row ``r`` is ``values[offsets[r]:offsets[r + 1]]``."""
    array = _array(table, name)
    # A sliced list array (offset > 0) keeps its parent's offsets and values: both are absolute.
    return array.offsets.to_numpy().tolist(), array.values.to_numpy(zero_copy_only=False)


#: Rows of a binary column: row ``r`` is ``data[starts[r]:ends[r]]`` (Python lists: cheap to index).
BinaryRows = tuple[list[int], list[int], memoryview]


def _binary_views(array: pa.Array) -> tuple[npt.NDArray[Any], memoryview]:
    """Offsets and data of a binary array: row ``r`` is ``data[offsets[r]:offsets[r + 1]]``, no copy."""
    import pyarrow as pa

    width = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    _, offsets, data = array.buffers()
    offsets_array = np.frombuffer(offsets, dtype=width)[array.offset : array.offset + len(array) + 1]
    return offsets_array.astype(np.int64), memoryview(data).cast("B") if data is not None else memoryview(b"")


# ---------------------------------------------------------------------------------------------
# The reader of one worker
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Visit:
    """Consecutive rows of one shard read in one pass (one GET when remote)."""

    shard: int
    rows: npt.NDArray[np.int64]


def visits(segments: Sequence[Segment]) -> list[Visit]:
    """Merge consecutive segments of one shard whose rows keep increasing into one visit."""
    out: list[Visit] = []
    for seg in segments:
        if not len(seg.rows):
            continue
        if out and out[-1].shard == seg.shard and seg.rows[0] > out[-1].rows[-1]:
            out[-1] = Visit(seg.shard, np.concatenate([out[-1].rows, seg.rows]))
        else:
            out.append(Visit(seg.shard, seg.rows))
    return out


#: Called with (error, shard path, number of samples lost); raises to stop, returns to skip.
ShardErrorHandler = Callable[[ShardError, str, int], None]


class ShardReader:
    """Reads the rows of a list of segments, in order, from a corpus's shards of one format."""

    def __init__(
        self,
        source: Source,
        shards: Sequence[ShardEntry],
        *,
        fmt: str,
        columns: Columns,
        http: HttpSettings,
        on_shard_error: ShardErrorHandler,
        parquet_decoder: str = "pyarrow",
        pool: ArrayPool | None = None,
    ) -> None:
        self.source = source
        self.shards = shards
        self.fmt = fmt
        self.columns = columns
        self.http = http
        self.on_shard_error = on_shard_error
        self.shards_opened = 0
        self.parquet_decoder = parquet_decoder
        #: Memory the fast decoder decodes into, reused once a row group's samples are dropped.
        self.pool = pool
        #: Column chunks the fast decoder refused (pyarrow read them), by column name.
        self.refused: dict[str, int] = {}
        self._kernels: bool | None = None  # the compiled kernels in use (decided on first use)

    def iter_samples(self, segments: Sequence[Segment]) -> Iterator[RawSample | None]:
        """One item per row of ``segments``: the raw sample, or None where it could not be read."""
        plan = visits(segments)
        readahead = self._readahead(plan) if self.source.remote else None
        try:
            for i, visit in enumerate(plan):
                yield from self._visit(i, visit, readahead)
        finally:
            if readahead is not None:
                readahead.close()

    def _visit(self, i: int, visit: Visit, readahead: Readahead | None) -> Iterator[RawSample | None]:
        entry = self.shards[visit.shard]
        done = 0
        try:
            self.shards_opened += 1
            reader = self._tar_rows if self.fmt == "wds" else self._parquet_rows
            for sample in reader(i, entry, visit.rows, readahead):
                done += 1
                yield sample
        except ShardError as exc:
            lost = len(visit.rows) - done
            self.on_shard_error(exc, entry.path, lost)
            for _ in range(lost):
                yield None

    # -- tar ---------------------------------------------------------------------------------

    def _tar_rows(
        self, i: int, entry: ShardEntry, rows: npt.NDArray[np.int64], readahead: Readahead | None
    ) -> Iterator[RawSample]:
        stream: Stream | MappedShard
        if readahead is not None:
            _, stream = readahead.take(i)
            seekable = False
        else:
            path = self.source.local_path(entry.path)
            assert path is not None
            size = path.stat().st_size
            if entry.nbytes and size != entry.nbytes:
                # Not fatal yet: the samples before a cut are fine; the cursor fails where it is cut.
                _warn_size_once(entry.path, size, entry.nbytes)
            stream = mapped(self.source.open_range(entry.path))
            seekable = True
        cursor = TarCursor(stream, path=entry.path, seekable=seekable, scan=self._compiled())
        try:
            for row, key, members in cursor.rows(rows):
                _check_key(entry, row, key)
                yield raw_from_members(key, members, self.columns)
        finally:
            cursor.close()

    # -- parquet -----------------------------------------------------------------------------

    def _parquet_rows(
        self, i: int, entry: ShardEntry, rows: npt.NDArray[np.int64], readahead: Readahead | None
    ) -> Iterator[RawSample]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = self.columns.parquet()
        fast = self._fast_columns()
        if readahead is None:
            path = self.source.local_path(entry.path)
            assert path is not None
            _check_size(path.stat().st_size, entry)
            try:
                # No pre-buffering: it reads through pyarrow's I/O threads, which costs more CPU
                # than reading one row group in this thread (6.4 against 6.0 us per sample).
                # Memory-mapped: the column chunks are decoded from the page cache with no read
                # into a buffer first (the JPEG columns, stored plain, not even copied): 4 us
                # less per sample at 3,000 genes. Shards are never rewritten in place.
                parquet = pq.ParquetFile(path, pre_buffer=False, memory_map=True)
            except (pa.ArrowException, OSError) as exc:
                raise ShardError(f"{entry.path}: not a readable Parquet file: {exc}") from exc
            # The fast decoder reads the column chunks from a map of its own: the expression is
            # decoded out of it, the samples' JPEG bytes are views of it (the map lives as long as
            # they do; a shard is renamed into place when written and never rewritten).
            whole = _file_bytes(path, entry.path) if fast else None
            starts = row_group_starts(parquet.metadata)
            for g, group_rows in _by_row_group(rows, starts, entry):
                local = group_rows - starts[g]
                lists, binary = self._fast_row_group(whole, 0, parquet.metadata, g, fast, entry.path, local)
                wanted = [n for n in names if n not in lists and n not in binary]
                batches = _read_row_group(parquet, g, wanted, entry.path)
                yield from self._parquet_samples(entry, batches, group_rows, local, lists, binary)
            return
        (metadata, first_group, span_start), stream = readahead.take(i)
        sparse = SparseFile(entry.nbytes, entry.path)
        parquet = pq.ParquetFile(pa.PythonFile(sparse, mode="r"), metadata=metadata)
        starts = row_group_starts(metadata)
        spans = row_group_spans(metadata)
        offset = span_start
        try:
            for g, group_rows in _by_row_group(rows, starts, entry):
                if g < first_group:
                    raise ShardError(f"{entry.path}: row group {g} is before the fetched span")
                start, stop = spans[g]
                _skip_stream(stream, start - offset, entry.path)
                data = _read_exact(stream, stop - start, entry.path)
                offset = stop
                sparse.hold(start, data)
                local = group_rows - starts[g]
                buffer = np.frombuffer(data, np.uint8) if fast else None
                lists, binary = self._fast_row_group(buffer, start, metadata, g, fast, entry.path, local)
                wanted = [n for n in names if n not in lists and n not in binary]
                batches = _read_row_group(parquet, g, wanted, entry.path)
                sparse.drop(start)
                yield from self._parquet_samples(entry, batches, group_rows, local, lists, binary)
        finally:
            stream.close()

    def _parquet_samples(
        self,
        entry: ShardEntry,
        batches: list[pa.RecordBatch],
        rows: npt.NDArray[np.int64],
        local: npt.NDArray[np.int64],
        lists: Mapping[str, tuple[list[int], npt.NDArray[Any]]] | None = None,
        binary: Mapping[str, BinaryRows] | None = None,
    ) -> Iterator[RawSample]:
        """Raw samples of ``rows`` (``local``: the same rows in their row group) from its record batches.

        ``lists``: list columns of the whole row group decoded by ``parquet_fast`` (offsets as a
        list); ``binary``: its image columns located by ``parquet_fast``.
        """
        import pyarrow as pa

        base = 0
        for batch in batches:
            n = batch.num_rows
            lo, hi = np.searchsorted(local, [base, base + n])
            if hi > lo:
                table = pa.Table.from_batches([batch])
                # The batch's rows of the row group's offsets (absolute into the values, as a sliced ListArray's).
                batch_lists = {name: (o[base : base + n + 1], v) for name, (o, v) in (lists or {}).items()}
                batch_binary = {
                    name: (b[base : base + n], e[base : base + n], d) for name, (b, e, d) in (binary or {}).items()
                }
                samples = raw_from_table(
                    table, local[lo:hi] - base, self.columns, lists=batch_lists, binary=batch_binary
                )
                yield from _checked(entry, rows[lo:hi], samples)
            base += n

    def _compiled(self) -> bool:
        """Whether the compiled kernels are used: ``numba`` or ``auto`` where numba imports."""
        if self._kernels is None:
            self._kernels = False
            if parquet_fast.resolve(self.parquet_decoder) == "numba":
                try:
                    parquet_fast.kernels()
                except ImportError as exc:
                    if self.parquet_decoder == "numba":
                        raise
                    log.warning("parquet_decoder 'auto': numba does not import (%s); decoding with pyarrow", exc)
                else:
                    self._kernels = True
        return self._kernels

    def _fast_columns(self) -> list[str]:
        """The Parquet columns ``parquet_fast`` reads: none with ``pyarrow``, or under ``auto`` without numba.

        The expression lists (decoded) and the image columns (located in the shard's bytes).
        """
        if not self._compiled():
            return []
        return [n for n in self.columns.parquet() if n in _FAST_COLUMNS]

    def _refused(self, path: str, g: int, name: str, why: str) -> None:
        """Count a column chunk the fast decoder refused; pyarrow reads it (slower, same values)."""
        first = name not in self.refused
        self.refused[name] = self.refused.get(name, 0) + 1
        # Said once per column and reader, the rest at debug.
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "%s: row group %d column %s is not in the layout the compiled decoder reads (%s); pyarrow "
            "reads it (slower, same values)%s",
            path,
            g,
            name,
            why,
            "; further refusals of this column are logged at debug" if first else "",
        )

    def _fast_row_group(
        self,
        buffer: npt.NDArray[np.uint8] | None,
        base: int,
        metadata: pq.FileMetaData,
        g: int,
        names: list[str],
        path: str,
        local: npt.NDArray[np.int64],
    ) -> tuple[dict[str, tuple[list[int], npt.NDArray[Any]]], dict[str, BinaryRows]]:
        """What ``parquet_fast`` reads of row group ``g`` (``local``: the rows wanted): ``(lists, binary)``.

        The list columns among ``names`` decoded, and the image leaves located in ``buffer``
        (views); both empty without a ``buffer``. When only a few rows are wanted, their values
        are compacted and their JPEG bytes copied out, so that they do not keep the whole row
        group's bytes alive (fetched over HTTP, it is held in memory).
        """
        if buffer is None:
            return {}, {}
        decoded, refused = parquet_fast.read_lists(
            buffer, base, metadata, g, [n for n in names if n in _LIST_COLUMNS], self.pool
        )
        leaves = [n for n in names if n in _IMAGE_LEAVES]
        located, refused_leaves = parquet_fast.read_binary(buffer, base, metadata, g, leaves) if leaves else ({}, {})
        for name, why in (refused | refused_leaves).items():
            self._refused(path, g, name, why)
        few = 4 * len(local) < metadata.row_group(g).num_rows
        lists = {}
        for name, (offsets, values) in decoded.items():
            if few:
                offsets, values = _compact(offsets, values, local)
            lists[name] = (offsets.tolist(), values)
        binary: dict[str, BinaryRows] = {}
        data = buffer.data
        for leaf, (begins, ends) in located.items():
            binary[leaf] = _compact_binary(begins, ends, data, local) if few else (begins.tolist(), ends.tolist(), data)
        return lists, binary

    # -- read-ahead --------------------------------------------------------------------------

    def _readahead(self, plan: list[Visit]) -> Readahead:
        jobs = [(self.shards[v.shard].path, self._job(v)) for v in plan]
        return Readahead(jobs, max_bytes=self.http.readahead_mb << 20, chunk_bytes=self.http.chunk_kb << 10)

    def _job(self, visit: Visit) -> Callable[[], tuple[Any, Stream]]:
        entry = self.shards[visit.shard]
        if self.fmt == "wds":
            return _TarJob(self.source, entry)
        return _ParquetJob(self.source, entry, int(visit.rows[0]), int(visit.rows[-1]))


class _TarJob:
    def __init__(self, source: Source, entry: ShardEntry) -> None:
        self.source, self.entry = source, entry

    def __call__(self) -> tuple[Any, Stream]:
        return None, self.source.open_range(self.entry.path, 0, None, size=self.entry.nbytes)


class _ParquetJob:
    """Footer (one ranged GET of the file's tail), then one GET over the row groups needed."""

    def __init__(self, source: Source, entry: ShardEntry, first_row: int, last_row: int) -> None:
        self.source, self.entry = source, entry
        self.first_row, self.last_row = first_row, last_row

    def __call__(self) -> tuple[Any, Stream]:
        size = self.entry.nbytes
        tail_start = max(0, size - _PARQUET_TAIL)
        tail_stream = self.source.open_range(self.entry.path, tail_start, size, size=size)
        try:
            tail = _read_exact(tail_stream, size - tail_start, self.entry.path)
        finally:
            tail_stream.close()
        footer_len = int.from_bytes(tail[-8:-4], "little") if len(tail) >= 8 else 0
        if footer_len + 8 > len(tail) and footer_len + 8 <= size:
            more = self.source.open_range(self.entry.path, size - footer_len - 8, tail_start, size=size)
            try:
                tail = _read_exact(more, tail_start - (size - footer_len - 8), self.entry.path) + tail
            finally:
                more.close()
        metadata = parquet_metadata_from_tail(tail, size, self.entry.path)
        starts = row_group_starts(metadata)
        if int(starts[-1]) != self.entry.n_rows:
            raise ShardError(f"{self.entry.path}: {starts[-1]} rows, shards.parquet says {self.entry.n_rows}")
        first = int(np.searchsorted(starts, self.first_row, side="right")) - 1
        last = int(np.searchsorted(starts, self.last_row, side="right")) - 1
        spans = row_group_spans(metadata)
        start, stop = spans[first][0], spans[last][1]
        return (metadata, first, start), self.source.open_range(self.entry.path, start, stop, size=size)


#: The list columns that ``parquet_fast`` may decode (the expression), and the image columns it
#: locates in a shard's bytes; keys, pos and the rest stay pyarrow's.
_LIST_COLUMNS: Final = frozenset(e.value for e in schema.Expr)
_IMAGE_LEAVES: Final = frozenset(f"{name}.bytes" for name in (schema.PATCH_COLUMN, schema.REGION_COLUMN))
_FAST_COLUMNS: Final = _LIST_COLUMNS | _IMAGE_LEAVES


def _file_bytes(path: Path, shown: str) -> npt.NDArray[np.uint8]:
    """A local file's bytes, memory-mapped read-only."""
    try:
        with path.open("rb") as handle:
            return np.frombuffer(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)
    except (OSError, ValueError) as exc:  # ValueError: an empty file
        raise ShardError(f"{shown}: cannot be memory-mapped: {exc}") from exc


def _compact_binary(
    begins: npt.NDArray[np.int64], ends: npt.NDArray[np.int64], data: memoryview, local: npt.NDArray[np.int64]
) -> BinaryRows:
    """Only the values of rows ``local`` (the others empty), copied out of ``data`` (see ``_compact``)."""
    rows = local.tolist()
    kept = b"".join(data[int(begins[r]) : int(ends[r])] for r in rows)
    lengths = np.zeros(len(begins), np.int64)
    lengths[local] = ends[local] - begins[local]
    new_ends = np.cumsum(lengths)
    return (new_ends - lengths).tolist(), new_ends.tolist(), memoryview(kept)


def _compact(
    offsets: npt.NDArray[np.int64], values: npt.NDArray[Any], local: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[Any]]:
    """Only the lists of rows ``local`` (the others empty), so that a few samples kept from a row
    group hold their own values, not the whole row group's (pyarrow's batches hold 32 rows)."""
    lengths = np.zeros(len(offsets) - 1, np.int64)
    lengths[local] = offsets[local + 1] - offsets[local]
    compact = np.zeros(len(offsets), np.int64)
    np.cumsum(lengths, out=compact[1:])
    kept = np.concatenate([values[offsets[r] : offsets[r + 1]] for r in local.tolist()]) if len(local) else values[:0]
    return compact, kept


#: Rows per record batch when a row group is read. pyarrow decodes long list columns faster in
#: batches of tens of rows than a row group of hundreds in one piece (bench/README.md, issue 16,
#: 3,000 genes: the loader's columns with niche 158 -> 140 us per sample, without 43 -> 40; 16,
#: 32 and 64 rows within noise of each other), and its working buffers stay small.
PARQUET_READ_BATCH: Final = 32


def _read_row_group(parquet: pq.ParquetFile, g: int, names: list[str], path: str) -> list[pa.RecordBatch]:
    """Row group ``g`` of ``parquet`` (columns ``names``) as record batches of ``PARQUET_READ_BATCH`` rows."""
    import pyarrow as pa

    try:
        return list(
            parquet.iter_batches(batch_size=PARQUET_READ_BATCH, row_groups=[g], columns=names, use_threads=False)
        )
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"{path}: row group {g} is corrupt: {exc}") from exc


def _by_row_group(
    rows: npt.NDArray[np.int64], starts: npt.NDArray[np.int64], entry: ShardEntry
) -> Iterator[tuple[int, npt.NDArray[np.int64]]]:
    if int(starts[-1]) != entry.n_rows:
        raise ShardError(f"{entry.path}: {starts[-1]} rows, shards.parquet says {entry.n_rows}")
    groups = np.searchsorted(starts, rows, side="right") - 1
    bounds = np.flatnonzero(np.diff(groups)) + 1
    for chunk in np.split(np.arange(len(rows)), bounds):
        if len(chunk):
            yield int(groups[chunk[0]]), rows[chunk]


@functools.cache
def _warn_size_once(path: str, size: int, expected: int) -> None:
    """Say once per process that a tar shard's size is not what shards.parquet says (its samples are still read)."""
    log.warning("%s: %d bytes on disk, shards.parquet says %d; reading the samples it holds", path, size, expected)


def _check_size(actual: int, entry: ShardEntry) -> None:
    if entry.nbytes and actual != entry.nbytes:
        raise ShardError(
            f"{entry.path}: {actual} bytes on disk, shards.parquet says {entry.nbytes}: truncated or replaced; "
            "re-download the shard"
        )


def _check_key(entry: ShardEntry, row: int, key: str) -> None:
    expected = entry.first_key if row == 0 else entry.last_key if row == entry.n_rows - 1 else None
    if expected and key != expected:
        raise ShardError(f"{entry.path}: sample {row} is {key!r}, shards.parquet says {expected!r}")


def _checked(entry: ShardEntry, rows: npt.NDArray[np.int64], samples: list[RawSample]) -> list[RawSample]:
    if (entry.first_key or entry.last_key) and len(rows):
        # Rows ascend: only the first and the last sample can be row 0 or the shard's last row.
        for at in (0, -1):
            row = int(rows[at])
            if row == 0 or row == entry.n_rows - 1:
                _check_key(entry, row, samples[at].key)
    return samples


def _read_exact(stream: Stream, n: int, path: str) -> bytes:
    parts = []
    left = n
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            raise ShardError(f"{path}: stream ended {left} bytes early")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _skip_stream(stream: Stream, n: int, path: str) -> None:
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise ShardError(f"{path}: stream ended while skipping")
        n -= len(chunk)
