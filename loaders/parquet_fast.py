"""A compiled decoder for the expression list leaves of our Parquet shards (optional: numba).

pyarrow spends about half of the 4-5 ns a value it takes to read a ``list<int32>`` leaf building
the list offsets from the repetition and definition levels, one level at a time (bench/README.md,
issue 16). The shards this project writes store those levels as long runs, and their values as
DELTA_BINARY_PACKED (gene indices) or BYTE_STREAM_SPLIT (counts), zstd-compressed or not; this
module reads such a column chunk straight from the file's bytes: the page headers (Thrift compact
protocol, parsed here), zstd through pyarrow's codec, and the levels and values in numba kernels
(:mod:`stcorpus.loaders._parquet_kernels`, imported and compiled on first use, cached on disk).

It returns exactly what the loader builds from pyarrow's ``ListArray``: per-row offsets (int64,
``rows + 1``) and the flat values. Only the layout our writer produces is decoded: data pages v1
or v2, no dictionary page, PLAIN / DELTA_BINARY_PACKED / BYTE_STREAM_SPLIT values of an INT32 (or
FLOAT: PLAIN / BYTE_STREAM_SPLIT) leaf, zstd or no compression, one leaf with
``max_repetition_level == max_definition_level == 1`` (a not-null list of not-null values).
Anything else, and any page that does not add up (a count, a length, an unknown encoding), is
refused for that column chunk: :func:`read_lists` leaves it out of its result and the caller
reads it with pyarrow. Never a wrong answer in place of a refusal: every count the file states is
checked against what was decoded.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import pyarrow.parquet as pq

    from stcorpus.loaders.buffers import ArrayPool

log = logging.getLogger(__name__)

# Parquet's enums (parquet.thrift).
_DATA_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 2, 3
_PLAIN, _RLE, _DELTA_BINARY_PACKED, _BYTE_STREAM_SPLIT = 0, 3, 5, 9
_CODECS: Final = ("ZSTD", "UNCOMPRESSED")
_ENCODINGS: Final = {"PLAIN", "RLE", "DELTA_BINARY_PACKED", "BYTE_STREAM_SPLIT"}
_VALUE_ENCODINGS: Final = {
    "INT32": (_PLAIN, _DELTA_BINARY_PACKED, _BYTE_STREAM_SPLIT),
    "FLOAT": (_PLAIN, _BYTE_STREAM_SPLIT),
}
_DTYPES: Final = {"INT32": np.dtype("<i4"), "FLOAT": np.dtype("<f4")}

#: Flat values and per-row offsets of one list column chunk: row ``r`` is ``values[offsets[r]:offsets[r + 1]]``.
ListChunk = tuple[npt.NDArray[np.int64], npt.NDArray[Any]]


class Refused(Exception):
    """The fast path does not decode this column chunk (the reason is the message); pyarrow reads it."""


def numba_available() -> bool:
    """True when numba can be found (without importing it: that takes a few hundred ms)."""
    return importlib.util.find_spec("numba") is not None


def resolve(decoder: str) -> str:
    """``pyarrow`` or ``numba``: what ``LoaderSettings.parquet_decoder`` means on this machine."""
    if decoder == "auto":
        return "numba" if numba_available() else "pyarrow"
    return decoder


@functools.cache
def kernels() -> ModuleType:
    """The numba kernels (imports numba; each kernel compiles on its first call, or loads from numba's cache)."""
    from stcorpus.loaders import _parquet_kernels

    return _parquet_kernels


def read_lists(
    buffer: npt.NDArray[np.uint8],
    base: int,
    metadata: pq.FileMetaData,
    group: int,
    names: Sequence[str],
    pool: ArrayPool | None = None,
) -> tuple[dict[str, ListChunk], dict[str, str]]:
    """Decode the list columns ``names`` of row group ``group`` from the file's bytes.

    ``buffer`` holds the file's bytes from offset ``base`` on (the whole file memory-mapped with
    ``base`` 0, or one row group's span). Returns ``(decoded, refused)``: the columns decoded, and
    for each column not decoded why; the caller reads those with pyarrow. With ``pool``
    (``loaders/buffers.py``) the values are decoded into its reused memory, not fresh arrays.
    """
    rg = metadata.row_group(group)
    leaves: dict[str, list[int]] = {}
    for c in range(rg.num_columns):
        leaves.setdefault(rg.column(c).path_in_schema.split(".", 1)[0], []).append(c)
    decoded: dict[str, ListChunk] = {}
    refused: dict[str, str] = {}
    for name in names:
        try:
            if len(leaves.get(name, ())) != 1:
                raise Refused(f"{name} is not one leaf")
            decoded[name] = decode_chunk(buffer, base, metadata, group, leaves[name][0], pool)
        except Refused as exc:
            refused[name] = str(exc)
    return decoded, refused


def decode_chunk(
    buffer: npt.NDArray[np.uint8],
    base: int,
    metadata: pq.FileMetaData,
    group: int,
    column: int,
    pool: ArrayPool | None = None,
) -> ListChunk:
    """Offsets and values of one list column chunk, or :class:`Refused`."""
    rg = metadata.row_group(group)
    chunk = rg.column(column)
    leaf = metadata.schema.column(column)
    if leaf.max_repetition_level != 1 or leaf.max_definition_level != 1:
        raise Refused(f"levels rep {leaf.max_repetition_level} def {leaf.max_definition_level}, not 1 / 1")
    physical = leaf.physical_type
    if physical not in _VALUE_ENCODINGS:
        raise Refused(f"physical type {physical}")
    if chunk.has_dictionary_page:
        raise Refused("dictionary page")
    if chunk.compression not in _CODECS:
        raise Refused(f"compression {chunk.compression}")
    if not set(chunk.encodings) <= _ENCODINGS:
        raise Refused(f"encodings {chunk.encodings}")
    rows, levels = rg.num_rows, chunk.num_values
    if rows <= 0 or levels < rows:
        raise Refused(f"{rows} rows, {levels} levels")
    start, end = _chunk_span(buffer, base, chunk)
    k = kernels()
    codec = _codec() if chunk.compression == "ZSTD" else None
    allowed = _VALUE_ENCODINGS[physical]
    offsets = np.empty(rows + 1, np.int64)
    # at most one value per level
    values = np.empty(levels, np.int32) if pool is None else pool.get(levels, np.int32)
    scratch: npt.NDArray[np.uint8] | None = None
    row = nvals = seen = 0
    pos = start
    while pos < end:
        header, body = _page_header(buffer, pos, end)
        kind, size, csize = header.get(1), header.get(2), header.get(3)
        if not isinstance(size, int) or not isinstance(csize, int) or size < 0 or csize < 0 or body + csize > end:
            raise Refused("page sizes")
        pos = body + csize
        if kind == _DATA_PAGE:
            page_header = _struct(header.get(5))
            n, encoding = page_header.get(1), page_header.get(2)
            if page_header.get(3) != _RLE or page_header.get(4) != _RLE:
                raise Refused("levels not RLE")
            page = _decompress(codec, buffer[body : body + csize], size)
            rep_pos, rep_end = _prefixed(page, 0)
            def_pos, def_end = _prefixed(page, rep_end)
            levels_buf, values_buf, values_pos = page, page, def_end
            nulls = None
        elif kind == _DATA_PAGE_V2:
            page_header = _struct(header.get(8))
            n, nulls, encoding = page_header.get(1), page_header.get(2), page_header.get(4)
            def_len, rep_len = page_header.get(5), page_header.get(6)
            if not isinstance(def_len, int) or not isinstance(rep_len, int) or def_len < 0 or rep_len < 0:
                raise Refused("v2 level lengths")
            if rep_len + def_len > min(csize, size):
                raise Refused("v2 level lengths")
            levels_buf = buffer[body : body + rep_len + def_len]
            rep_pos, rep_end, def_pos, def_end = 0, rep_len, rep_len, rep_len + def_len
            raw = buffer[body + rep_len + def_len : body + csize]
            compressed = page_header.get(7, True)
            values_buf = _decompress(codec if compressed else None, raw, size - rep_len - def_len)
            values_pos = 0
        elif kind == _DICTIONARY_PAGE:
            raise Refused("dictionary page")
        else:
            raise Refused(f"page type {kind}")
        if not isinstance(n, int) or n < 0 or seen + n > levels:
            raise Refused("page level count")
        if encoding not in allowed:
            raise Refused(f"value encoding {encoding}")
        if n == 0:
            continue
        if k.all_equal(levels_buf, def_pos, def_end, n, 1, 1):
            count = n
            row = k.rep_starts(levels_buf, rep_pos, rep_end, n, offsets, row, nvals)
            if row < 0:
                raise Refused("repetition levels")
        else:
            if scratch is None or len(scratch) < 2 * n:
                scratch = np.empty(2 * n, np.uint8)
            rep, dfn = scratch[:n], scratch[n : 2 * n]
            if k.expand(levels_buf, rep_pos, rep_end, n, rep) < 0 or k.expand(levels_buf, def_pos, def_end, n, dfn) < 0:
                raise Refused("levels")
            row, after = k.assemble(rep, dfn, n, offsets, row, nvals)
            if row < 0:
                raise Refused("levels")
            count = after - nvals
        if nulls is not None and nulls != n - count:
            raise Refused("v2 null count")
        _values(k, encoding, values_buf, values_pos, count, values, nvals)
        nvals += count
        seen += n
    if seen != levels or row != rows or offsets[0] != 0:
        raise Refused(f"{seen} levels and {row} rows decoded, the footer says {levels} and {rows}")
    offsets[rows] = nvals
    return offsets, values[:nvals].view(_DTYPES[physical])


#: Where each row's bytes lie in the buffer given: row ``r`` is ``buffer[starts[r]:ends[r]]``.
BinaryChunk = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]


def read_binary(
    buffer: npt.NDArray[np.uint8], base: int, metadata: pq.FileMetaData, group: int, leaves: Sequence[str]
) -> tuple[dict[str, BinaryChunk], dict[str, str]]:
    """Locate the values of the binary leaves ``leaves`` (paths, e.g. ``patch.bytes``) of row group ``group``.

    For the JPEG leaves, which the writer stores PLAIN and uncompressed: each row's bytes are
    found where they lie in ``buffer`` (nothing is copied or decoded). Returns ``(located,
    refused)`` as :func:`read_lists` does; a leaf with a null, compressed pages or a dictionary
    is refused and pyarrow reads it.
    """
    paths = [metadata.schema.column(c).path for c in range(metadata.num_columns)]
    located: dict[str, BinaryChunk] = {}
    refused: dict[str, str] = {}
    for leaf in leaves:
        try:
            if paths.count(leaf) != 1:
                raise Refused(f"{leaf} is not one leaf of the file")
            located[leaf] = locate_binary_chunk(buffer, base, metadata, group, paths.index(leaf))
        except Refused as exc:
            refused[leaf] = str(exc)
    return located, refused


def locate_binary_chunk(
    buffer: npt.NDArray[np.uint8], base: int, metadata: pq.FileMetaData, group: int, column: int
) -> BinaryChunk:
    """Starts and ends (into ``buffer``) of the one value of every row of a binary column chunk, or :class:`Refused`."""
    rg = metadata.row_group(group)
    chunk = rg.column(column)
    leaf = metadata.schema.column(column)
    max_def = leaf.max_definition_level
    if leaf.max_repetition_level != 0 or not 0 <= max_def <= 8:
        raise Refused(f"levels rep {leaf.max_repetition_level} def {max_def}, not 0 / 0-8")
    if leaf.physical_type != "BYTE_ARRAY":
        raise Refused(f"physical type {leaf.physical_type}")
    if chunk.has_dictionary_page:
        raise Refused("dictionary page")
    if chunk.compression != "UNCOMPRESSED":
        raise Refused(f"compression {chunk.compression}")
    if not set(chunk.encodings) <= {"PLAIN", "RLE"}:
        raise Refused(f"encodings {chunk.encodings}")
    rows = rg.num_rows
    if rows <= 0 or chunk.num_values != rows:
        raise Refused(f"{rows} rows, {chunk.num_values} values")
    start, end = _chunk_span(buffer, base, chunk)
    k = kernels()
    width = max_def.bit_length()
    starts = np.empty(rows, np.int64)
    ends = np.empty(rows, np.int64)
    seen = 0
    pos = start
    while pos < end:
        header, body = _page_header(buffer, pos, end)
        kind, size, csize = header.get(1), header.get(2), header.get(3)
        if not isinstance(size, int) or not isinstance(csize, int) or size != csize or body + csize > end:
            raise Refused("page sizes")
        pos = body + csize
        if kind == _DATA_PAGE:
            page_header = _struct(header.get(5))
            n, encoding = page_header.get(1), page_header.get(2)
            def_pos = def_end = body
            if max_def:
                if page_header.get(3) != _RLE:
                    raise Refused("levels not RLE")
                def_pos, def_end = _prefixed(buffer[: body + csize], body)
        elif kind == _DATA_PAGE_V2:
            page_header = _struct(header.get(8))
            n, nulls, encoding = page_header.get(1), page_header.get(2), page_header.get(4)
            def_len, rep_len = page_header.get(5), page_header.get(6)
            if rep_len != 0 or not isinstance(def_len, int) or not 0 <= def_len <= csize or nulls != 0:
                raise Refused("v2 levels")
            # (is_compressed means nothing without a codec: the chunk is UNCOMPRESSED)
            def_pos, def_end = body, body + def_len
        elif kind == _DICTIONARY_PAGE:
            raise Refused("dictionary page")
        else:
            raise Refused(f"page type {kind}")
        if not isinstance(n, int) or n < 0 or seen + n > rows:
            raise Refused("page value count")
        if encoding != _PLAIN:
            raise Refused(f"value encoding {encoding}")
        if n == 0:
            continue
        if max_def and not k.all_equal(buffer, def_pos, def_end, n, width, max_def):
            raise Refused("a null value (or levels that do not add up)")
        if k.plain_byte_array(buffer, def_end, pos, n, starts, ends, seen) < 0:
            raise Refused("PLAIN BYTE_ARRAY run")
        seen += n
    if seen != rows:
        raise Refused(f"{seen} values decoded, the footer says {rows}")
    return starts, ends


def _chunk_span(buffer: npt.NDArray[np.uint8], base: int, chunk: Any) -> tuple[int, int]:
    """``[start, end)`` of a column chunk's pages in ``buffer`` (which holds the file from ``base`` on)."""
    start = chunk.data_page_offset - base
    end = start + chunk.total_compressed_size
    if start < 0 or end > len(buffer):
        raise Refused("column chunk outside the buffer")
    return start, end


def _values(
    k: ModuleType,
    encoding: int,
    buf: npt.NDArray[np.uint8],
    pos: int,
    count: int,
    out: npt.NDArray[np.int32],
    o: int,
) -> None:
    if encoding == _DELTA_BINARY_PACKED:
        if k.delta_binary_packed(buf, pos, len(buf), count, out, o) < 0:
            raise Refused("DELTA_BINARY_PACKED run")
    elif encoding == _BYTE_STREAM_SPLIT:
        if len(buf) - pos != 4 * count or k.byte_stream_split4(buf, pos, len(buf), count, out, o) < 0:
            raise Refused("BYTE_STREAM_SPLIT run")
    else:  # PLAIN
        if len(buf) - pos != 4 * count:
            raise Refused("PLAIN run")
        out[o : o + count] = buf[pos : pos + 4 * count].view("<i4")


def _prefixed(page: npt.NDArray[np.uint8], pos: int) -> tuple[int, int]:
    """A v1 level run: its 4-byte little-endian length at ``pos``; ``(start, end)`` of its bytes."""
    if pos + 4 > len(page):
        raise Refused("level run length")
    length = int(page[pos : pos + 4].view("<u4")[0])
    if pos + 4 + length > len(page):
        raise Refused("level run length")
    return pos + 4, pos + 4 + length


@functools.cache
def _codec() -> Any:
    import pyarrow as pa

    return pa.Codec("zstd")


def _decompress(codec: Any, raw: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.uint8]:
    if codec is None:
        if len(raw) != size:
            raise Refused("uncompressed page size")
        return raw
    import pyarrow as pa

    try:
        out = codec.decompress(raw, decompressed_size=size)
    except (pa.ArrowException, ValueError) as exc:
        raise Refused(f"zstd: {exc}") from exc
    page = np.frombuffer(out, np.uint8)
    if len(page) != size:
        raise Refused("decompressed page size")
    return page


# ---------------------------------------------------------------------------------------------
# Thrift compact protocol (the page headers)
# ---------------------------------------------------------------------------------------------


def _page_header(buffer: npt.NDArray[np.uint8], pos: int, end: int) -> tuple[dict[int, Any], int]:
    """The PageHeader struct at ``pos`` (fields by id) and the position of the page body after it."""
    for span in (256, 4096, end - pos):
        data = buffer[pos : min(end, pos + span)].tobytes()
        try:
            header, used = _read_struct(data, 0)
        except IndexError:
            if pos + span >= end:
                break
            continue
        return header, pos + used
    raise Refused("page header runs past the column chunk")


def _struct(value: Any) -> dict[int, Any]:
    if not isinstance(value, dict):
        raise Refused("page header without its page type's struct")
    return value


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 70:
            raise Refused("varint too long")


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _read_struct(data: bytes, i: int, depth: int = 0) -> tuple[dict[int, Any], int]:
    if depth > 16:
        raise Refused("Thrift nesting")
    out: dict[int, Any] = {}
    field = 0
    while True:
        head = data[i]
        i += 1
        if head == 0:
            return out, i
        kind, delta = head & 0x0F, head >> 4
        if delta:
            field += delta
        else:
            raw, i = _varint(data, i)
            field = _zigzag(raw)
        if kind in (1, 2):  # a boolean field carries its value in its type
            out[field] = kind == 1
            continue
        out[field], i = _read_value(data, i, kind, depth)


def _read_value(data: bytes, i: int, kind: int, depth: int) -> tuple[Any, int]:
    if kind == 3:  # byte
        return data[i], i + 1
    if kind in (4, 5, 6):  # i16, i32, i64
        raw, i = _varint(data, i)
        return _zigzag(raw), i
    if kind == 7:  # double
        return None, i + 8
    if kind == 8:  # binary
        n, i = _varint(data, i)
        if i + n > len(data):
            raise IndexError("binary past the data")
        return None, i + n
    if kind in (9, 10):  # list, set
        head = data[i]
        i += 1
        n, element = head >> 4, head & 0x0F
        if n == 15:
            n, i = _varint(data, i)
        items = []
        for _ in range(n):
            if element in (1, 2):  # booleans in a list are one byte each
                items.append(data[i] == 1)
                i += 1
            else:
                item, i = _read_value(data, i, element, depth + 1)
                items.append(item)
        return items, i
    if kind == 11:  # map
        n, i = _varint(data, i)
        if n == 0:
            return {}, i
        types = data[i]
        i += 1
        for j in range(2 * n):
            _, i = _read_value(data, i, types >> 4 if j % 2 == 0 else types & 0x0F, depth + 1)
        return None, i
    if kind == 12:
        return _read_struct(data, i, depth + 1)
    raise Refused(f"Thrift type {kind}")
