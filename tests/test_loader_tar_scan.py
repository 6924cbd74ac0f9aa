"""The compiled scan of a mapped tar shard's headers: the cursor reads exactly what it reads without
it, in every tar dialect tarfile writes, and fails on damage with the same errors."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest

from stcorpus.loaders import parquet_fast
from stcorpus.loaders.errors import ShardError
from stcorpus.loaders.read import BLOCK, MappedShard, TarCursor, mapped

pytestmark = pytest.mark.skipif(not parquet_fast.numba_available(), reason="numba is not installed")

KEYS = ("a", "b" * 120, "deep/" * 25 + "c", "ünï", "d", "e" * 99, "f")


def archive(fmt: int, *, extras: bool = False, sizes: tuple[int, ...] = (700, 3, 512, 0)) -> bytes:
    """Samples of four members each (sizes chosen around the 512-byte blocks), optionally with
    a directory, a symlink and a global PAX header among them."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for i, key in enumerate(KEYS):
            if extras and i == 2:
                folder = tarfile.TarInfo("some/folder")
                folder.type = tarfile.DIRTYPE
                tar.addfile(folder)
                link = tarfile.TarInfo("some/link")
                link.type = tarfile.SYMTYPE
                link.linkname = "a.json"
                tar.addfile(link)
            for suffix, size in zip(("patch.jpg", "json", "region.jpg", "expr.npz"), sizes, strict=True):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = size + i
                tar.addfile(info, io.BytesIO(bytes([i + 1]) * info.size))
    return out.getvalue()


def read(path: Path, rows: list[int], *, scan: bool, stream: Any = None) -> list[tuple[int, str, dict[str, bytes]]]:
    cursor = TarCursor(stream or mapped(path.open("rb")), path=path.name, seekable=True, scan=scan)
    try:
        return [(r, k, {s: bytes(v) for s, v in m.items()}) for r, k, m in cursor.rows(rows)]
    finally:
        cursor.close()


def assert_fails_alike(path: Path, match: str) -> None:
    """Reading every sample fails with the same ShardError with and without the scan."""
    errors = []
    for scan in (False, True):
        with pytest.raises(ShardError, match=match) as info:
            read(path, list(range(len(KEYS))), scan=scan)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize(
    ("fmt", "extras"),
    [
        pytest.param(tarfile.PAX_FORMAT, False, id="pax"),
        pytest.param(tarfile.PAX_FORMAT, True, id="pax + directory, symlink"),
        pytest.param(tarfile.GNU_FORMAT, False, id="gnu long names"),
    ],
)
@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4, 5, 6], [1, 3, 6], [6]])
def test_scanned_reads_equal_the_parsers(tmp_path: Path, fmt: int, extras: bool, rows: list[int]) -> None:
    path = tmp_path / "s.tar"
    path.write_bytes(archive(fmt, extras=extras))
    expected = read(path, rows, scan=False, stream=path.open("rb"))
    assert [k for _, k, _ in expected] == [KEYS[r] for r in rows]
    assert read(path, rows, scan=True) == expected


def test_ustar_prefixes_are_joined_to_the_name(tmp_path: Path) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key in ("x/" * 60 + "k1", "k2"):  # 122 characters: the ustar prefix holds the folders
            info = tarfile.TarInfo(f"{key}.json")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    path = tmp_path / "s.tar"
    path.write_bytes(out.getvalue())
    assert out.getvalue()[345:346] != b"\0"  # the first header has a prefix
    got = read(path, [0, 1], scan=True)
    assert got == read(path, [0, 1], scan=False) and got[0][1] == "x/" * 60 + "k1"


def test_the_scan_does_the_reading_of_a_writer_style_shard(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    path.write_bytes(archive(tarfile.PAX_FORMAT))
    cursor = TarCursor(mapped(path.open("rb")), path="s.tar", seekable=True, scan=True)
    assert isinstance(cursor.stream, MappedShard) and cursor._scan is not None
    list(cursor.rows([0]))
    assert cursor._scan.found >= 4  # the first sample's members came from the scan
    assert TarCursor(io.BytesIO(b""), path="x", seekable=False, scan=True)._scan is None  # a stream: no scan


def test_a_checksum_that_does_not_match_fails_as_without_the_scan(tmp_path: Path) -> None:
    data = bytearray(archive(tarfile.PAX_FORMAT))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        data[tar.getmembers()[9].offset + 10] ^= 0xFF  # a name byte of a later member's header
    path = tmp_path / "s.tar"
    path.write_bytes(bytes(data))
    assert_fails_alike(path, "checksum mismatch")


def test_a_signed_checksum_is_accepted_as_without_the_scan(tmp_path: Path) -> None:
    """Old writers summed the header as signed bytes: the scan leaves such a header to the parser."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:  # UTF-8 in the name field
        for key in ("a", "ünï", "z"):
            info = tarfile.TarInfo(f"{key}.json")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    data = bytearray(out.getvalue())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith("ünï"))
    header = data[member.offset : member.offset + BLOCK]
    assert any(b > 127 for b in header)
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 8 * 32
    data[member.offset + 148 : member.offset + 156] = b"%06o\0 " % signed
    path = tmp_path / "s.tar"
    path.write_bytes(bytes(data))
    expected = read(path, [0, 1, 2], scan=False)
    assert [k for _, k, _ in expected] == ["a", "ünï", "z"]
    assert read(path, [0, 1, 2], scan=True) == expected


@pytest.mark.parametrize("cut", [BLOCK * 3 + 100, BLOCK * 9, 4000])
def test_a_cut_archive_fails_as_without_the_scan(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "s.tar"
    path.write_bytes(archive(tarfile.PAX_FORMAT)[:cut])
    assert_fails_alike(path, "truncated")


def test_many_members_take_several_scans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TarCursor, "SCAN_MEMBERS", 3)
    path = tmp_path / "s.tar"
    path.write_bytes(archive(tarfile.PAX_FORMAT, extras=True))
    assert read(path, [0, 2, 5, 6], scan=True) == read(path, [0, 2, 5, 6], scan=False)
