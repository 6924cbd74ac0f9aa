"""numba kernels of :mod:`stcorpus.loaders.parquet_fast` (imported on its first use only).

Every kernel checks its reads against the end it is given and its writes against the length of
its output, and returns a negative status instead of reading or writing out of bounds (numba
does not check indices): a page that does not add up is refused, and pyarrow reads the column
chunk instead. Levels here are bit width 1 (``max_rep`` = ``max_def`` = 1), the RLE /
bit-packed hybrid of the Parquet spec.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba as nb
import numpy as np

_F = TypeVar("_F", bound=Callable[..., Any])


def _jit(function: _F) -> _F:
    """Compiled on the first call (numba infers the types from the arguments), cached on disk."""
    return cast(_F, nb.njit(cache=True, nogil=True)(function))


@_jit
def _uleb(buf: Any, pos: int, end: int) -> tuple[int, int]:
    """An unsigned LEB128 varint at ``pos``: (value, next position), or (-1, -1) past ``end`` or over 63 bits."""
    value = 0
    shift = 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 56:
            return -1, -1
    return -1, -1


@_jit
def all_equal(buf: Any, pos: int, end: int, n: int, width: int, value: int) -> bool:
    """True when the ``n`` levels of bit width ``width`` (1 to 8) at ``buf[pos:end]`` all equal ``value``.

    The list leaves' definition levels (width 1, all 1: no empty list in the page) and the image
    leaves' (all the maximum: no null).
    """
    if width < 1 or width > 8:
        return False
    p = 0
    mask = (1 << width) - 1
    while p < n:
        header, pos = _uleb(buf, pos, end)
        if header < 0:
            return False
        if header & 1:
            # Bit-packed: groups of 8 levels in ``width`` bytes, least significant bit first.
            groups = header >> 1
            if pos + groups * width > end:
                return False
            for _ in range(groups):
                acc = 0
                for k in range(width):
                    acc |= int(buf[pos + k]) << (8 * k)
                pos += width
                for k in range(min(8, n - p)):
                    if (acc >> (k * width)) & mask != value:
                        return False
                p += 8
                if p >= n:
                    break
        else:
            length = header >> 1
            if length == 0 or pos >= end or buf[pos] != value:
                return False
            pos += 1  # a level of width <= 8 is one byte
            p += length
    return True


@_jit
def rep_starts(buf: Any, pos: int, end: int, n: int, offsets: Any, row: int, base: int) -> int:
    """Record the rows the ``n`` repetition levels at ``buf[pos:end]`` start, as ``offsets[row] = base + level``.

    For pages whose definition levels are all 1 (every level is a value). Returns the next row,
    or -1 when the levels do not add up (too few, a value other than 0 / 1, more rows than
    ``offsets`` holds).
    """
    rows = len(offsets) - 1
    p = 0
    while p < n:
        header, pos = _uleb(buf, pos, end)
        if header < 0:
            return -1
        if header & 1:
            groups = header >> 1
            if pos + groups > end:
                return -1
            for _ in range(groups):
                if p >= n:
                    break
                byte = buf[pos]
                pos += 1
                if byte != 0xFF:
                    for k in range(min(8, n - p)):
                        if not (byte >> k) & 1:
                            if row >= rows:
                                return -1
                            offsets[row] = base + p + k
                            row += 1
                p += 8
        else:
            length = header >> 1
            if length == 0 or pos >= end:
                return -1
            value = buf[pos]
            pos += 1
            if value == 0:
                length = min(length, n - p)
                if row + length > rows:
                    return -1
                for k in range(length):
                    offsets[row + k] = base + p + k
                row += length
            elif value != 1:
                return -1
            p += length
    return row


@_jit
def expand(buf: Any, pos: int, end: int, n: int, out: Any) -> int:
    """The ``n`` width-1 levels at ``buf[pos:end]`` into ``out[:n]``; 0, or -1 when they do not add up."""
    if n > len(out):
        return -1
    p = 0
    while p < n:
        header, pos = _uleb(buf, pos, end)
        if header < 0:
            return -1
        if header & 1:
            groups = header >> 1
            if pos + groups > end:
                return -1
            for _ in range(groups):
                if p >= n:
                    break
                byte = buf[pos]
                pos += 1
                for k in range(min(8, n - p)):
                    out[p + k] = (byte >> k) & 1
                p += 8
        else:
            length = header >> 1
            if length == 0 or pos >= end:
                return -1
            value = buf[pos]
            pos += 1
            if value > 1:
                return -1
            for k in range(min(length, n - p)):
                out[p + k] = value
            p += length
    return 0


@_jit
def assemble(rep: Any, dfn: Any, n: int, offsets: Any, row: int, nvals: int) -> tuple[int, int]:
    """Rows and values of ``n`` expanded levels: ``(next row, values so far)``, or (-1, -1).

    A row starts at repetition level 0; definition level 1 is a value, 0 an empty list (only
    at the start of a row).
    """
    rows = len(offsets) - 1
    for i in range(n):
        if rep[i] == 0:
            if row >= rows:
                return -1, -1
            offsets[row] = nvals
            row += 1
        elif row == 0:
            return -1, -1
        if dfn[i] == 1:
            nvals += 1
        elif rep[i] != 0:
            return -1, -1
    return row, nvals


@_jit
def delta_binary_packed(buf: Any, pos: int, end: int, count: int, out: Any, o: int) -> int:
    """``count`` int32 values of a DELTA_BINARY_PACKED run at ``buf[pos:end]`` into ``out[o:]``.

    Returns the position after the run, or -1 when the run does not add up (its value count is
    not ``count``, a bit width over 32, a miniblock past ``end``, ``out`` too short).
    """
    block, pos = _uleb(buf, pos, end)
    if pos < 0:
        return -1
    minis, pos = _uleb(buf, pos, end)
    if pos < 0:
        return -1
    total, pos = _uleb(buf, pos, end)
    if pos < 0:
        return -1
    first, pos = _uleb(buf, pos, end)
    if pos < 0:
        return -1
    if total != count or o + count > len(out) or minis <= 0 or block <= 0 or block % (32 * minis):
        return -1
    per = block // minis
    if per > 1 << 16:  # no writer's miniblock; bounds the sums below
        return -1
    if count == 0:
        return pos
    last = (first >> 1) ^ -(first & 1)
    if last < -(1 << 31) or last >= 1 << 31:
        return -1
    out[o] = last
    o += 1
    left = count - 1
    deltas = np.empty(per, np.int64)
    while left > 0:
        zz, pos = _uleb(buf, pos, end)
        if pos < 0:
            return -1
        min_delta = (zz >> 1) ^ -(zz & 1)
        # Deltas of int32 values wrap at 32 bits: a min delta outside int32 is no writer's.
        if min_delta < -(1 << 32) or min_delta >= 1 << 32:
            return -1
        widths = pos
        pos += minis
        if pos > end:
            return -1
        for m in range(minis):
            if left <= 0:
                break
            width = int(buf[widths + m])
            if width > 32:
                return -1
            size = per * width // 8
            if pos + size > end:
                return -1
            take = per if left > per else left
            mask = (1 << width) - 1
            # First the miniblock's deltas (independent of each other), then their running sum:
            # one add a value on the sum's dependency chain (1.7-1.9 -> 1.2-1.3 ns a value).
            if pos + size + 8 <= end:
                # Each value from the bytes that hold it (a slice: no negative-index checks): a
                # value starts at bit 0-7 of its first byte, so widths up to 9 / 17 / 32 span
                # at most 2 / 3 / 5 bytes (fewer loads: 15% off the narrow gene deltas).
                b = buf[pos : pos + size + 8]
                if width <= 9:
                    for j in range(take):
                        bit = j * width
                        i = bit >> 3
                        word = np.uint64(b[i]) | (np.uint64(b[i + 1]) << np.uint64(8))
                        deltas[j] = (np.int64(word >> np.uint64(bit & 7)) & mask) + min_delta
                elif width <= 17:
                    for j in range(take):
                        bit = j * width
                        i = bit >> 3
                        word = (
                            np.uint64(b[i])
                            | (np.uint64(b[i + 1]) << np.uint64(8))
                            | (np.uint64(b[i + 2]) << np.uint64(16))
                        )
                        deltas[j] = (np.int64(word >> np.uint64(bit & 7)) & mask) + min_delta
                else:
                    for j in range(take):
                        bit = j * width
                        i = bit >> 3
                        word = (
                            np.uint64(b[i])
                            | (np.uint64(b[i + 1]) << np.uint64(8))
                            | (np.uint64(b[i + 2]) << np.uint64(16))
                            | (np.uint64(b[i + 3]) << np.uint64(24))
                            | (np.uint64(b[i + 4]) << np.uint64(32))
                        )
                        deltas[j] = (np.int64(word >> np.uint64(bit & 7)) & mask) + min_delta
            else:  # the last bytes of the page: byte by byte, reading nothing past ``end``
                acc = np.uint64(0)
                bits = 0
                q = pos
                for j in range(take):
                    while bits < width:
                        acc |= np.uint64(buf[q]) << np.uint64(bits)
                        q += 1
                        bits += 8
                    deltas[j] = np.int64(acc & np.uint64(mask)) + min_delta
                    acc >>= np.uint64(width)
                    bits -= width
            dst = out[o : o + take]
            for j in range(len(dst)):
                last += deltas[j]
                dst[j] = last  # the store to int32 keeps the low 32 bits: the writer's wrap
            # Back into int32's range once a miniblock (it moves at most 2^49 within one).
            last = ((last + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)
            o += take
            pos += size
            left -= take
    return pos


@_jit
def byte_stream_split4(buf: Any, pos: int, end: int, count: int, out: Any, o: int) -> int:
    """``count`` 4-byte values split into 4 byte streams at ``buf[pos:end]`` into ``out[o:]``; 0 or -1."""
    if pos + 4 * count > end or o + count > len(out):
        return -1
    # Slices, and a loop bounded by their own length: numba then drops its negative-index checks
    # and the loop vectorises (10x faster than indexing ``buf[pos + k]``).
    b0 = buf[pos : pos + count]
    b1 = buf[pos + count : pos + 2 * count]
    b2 = buf[pos + 2 * count : pos + 3 * count]
    b3 = buf[pos + 3 * count : pos + 4 * count]
    dst = out[o : o + count]
    for k in range(len(dst)):
        dst[k] = np.int32(
            np.uint32(b0[k])
            | (np.uint32(b1[k]) << np.uint32(8))
            | (np.uint32(b2[k]) << np.uint32(16))
            | (np.uint32(b3[k]) << np.uint32(24))
        )
    return 0


@_jit
def plain_byte_array(buf: Any, pos: int, end: int, count: int, starts: Any, ends: Any, o: int) -> int:
    """Where the ``count`` PLAIN BYTE_ARRAY values at ``buf[pos:end]`` lie: ``starts[o:]`` / ``ends[o:]``.

    Each value is a 4-byte little-endian length and its bytes. Returns 0, or -1 when the values
    do not fill ``buf[pos:end]`` exactly or ``starts`` is too short.
    """
    if o + count > len(starts) or o + count > len(ends):
        return -1
    for k in range(count):
        if pos + 4 > end:
            return -1
        length = int(buf[pos]) | (int(buf[pos + 1]) << 8) | (int(buf[pos + 2]) << 16) | (int(buf[pos + 3]) << 24)
        pos += 4
        if pos + length > end:
            return -1
        starts[o + k] = pos
        ends[o + k] = pos + length
        pos += length
    return 0 if pos == end else -1


# ---------------------------------------------------------------------------------------------
# Tar headers (the tar reader's scan of a local shard; not Parquet, but the same compiled path)
# ---------------------------------------------------------------------------------------------


@_jit
def _tar_octal(buf: Any, pos: int, width: int) -> int:
    """An octal field of a tar header (spaces, digits, then NUL or space); -1 when it is not one."""
    end = pos + width
    while pos < end and buf[pos] == 32:
        pos += 1
    value = 0
    digits = 0
    while pos < end and 48 <= buf[pos] <= 55:
        value = value * 8 + (buf[pos] - 48)
        pos += 1
        digits += 1
        if digits > 21:
            return -1
    while pos < end and buf[pos] == 32:
        pos += 1
    if pos < end and buf[pos] != 0:  # after the digits and spaces: the end of the field or a NUL
        return -1
    return value


@_jit
def tar_headers(buf: Any, pos: int, data: Any, sizes: Any, names: Any, prefixes: Any) -> tuple[int, int, int]:
    """Scan the plain file members of a tar from the header at ``pos``: ``(members, next position, status)``.

    Member ``k``'s data starts at ``data[k]`` and is ``sizes[k]`` bytes; its header (512 bytes
    before the data) has a name of ``names[k]`` bytes at its start and a ustar prefix of
    ``prefixes[k]`` bytes at 345 (0: none). Status 1: the end-of-archive block was reached (at the next position);
    0: the scan stopped at a header it leaves to the caller (a PAX or GNU long-name header, a
    member that is not a regular file, a base-256 size, a checksum that does not match, a
    truncated archive), at the next position; 2: the output arrays are full.
    """
    n = 0
    size_all = len(buf)
    while True:
        if n >= len(data):
            return n, pos, 2
        if pos + 512 > size_all:
            return n, pos, 0
        header = buf[pos : pos + 512]  # a slice: the sum loop vectorises
        total = np.int64(0)
        for k in range(len(header)):
            total += np.int64(header[k])
        if total == 0:  # all zero bytes: the end-of-archive block
            return n, pos, 1
        for k in range(148, 156):
            total += 32 - np.int64(header[k])
        stored = _tar_octal(buf, pos + 148, 8)
        if stored != total:
            return n, pos, 0  # (the signed-sum variant and its error are the caller's)
        kind = buf[pos + 156]
        if kind != 48 and kind != 0 and kind != 55:  # '0', NUL, '7': a regular file
            return n, pos, 0
        if buf[pos + 124] & 0x80:
            return n, pos, 0
        size = _tar_octal(buf, pos + 124, 12)
        if size < 0:
            return n, pos, 0
        padded = size + (-size % 512)
        if pos + 512 + padded > size_all:
            return n, pos, 0
        data[n] = pos + 512
        sizes[n] = size
        length = 0
        while length < 100 and header[length] != 0:
            length += 1
        names[n] = length
        ustar = buf[pos + 257] == 117 and buf[pos + 258] == 115 and buf[pos + 259] == 116
        ustar = ustar and buf[pos + 260] == 97 and buf[pos + 261] == 114
        length = 0
        while ustar and length < 155 and header[345 + length] != 0:
            length += 1
        prefixes[n] = length
        n += 1
        pos += 512 + padded
