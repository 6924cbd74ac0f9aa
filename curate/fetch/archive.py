"""Unpacking ``.tar.gz``/``.tgz``/``.tar``/``.zip`` archives without trusting them.

Every member is checked before anything is written: no absolute path, no ``..`` component,
no device, FIFO or other special file, symlinks and hard links only to places inside the
target, at most ``archive_max_members`` members and ``archive_max_bytes`` declared bytes. While
writing, the bytes actually written are counted against the same limit (and against
``archive_max_ratio`` times the archive's size): a zip bomb that lies about its sizes stops
there. Files are created with ``O_NOFOLLOW`` under a parent whose real path is checked to lie
inside the target, so a link planted by an earlier member cannot redirect a later one.
Permissions are normalised (0644, 0755 for executables and folders); owners are ignored.

Callers unpack into an empty temporary folder and rename it into place, so a refused
archive leaves nothing behind.
"""

from __future__ import annotations

import gzip
import lzma
import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Final, Literal

from stcorpus.curate.errors import UnsafeArchiveError

ArchiveFormat = Literal["tar", "zip"]

#: Suffixes unpacked by default (a Source's ``unpack`` overrides the rule).
ARCHIVE_SUFFIXES: Final = (".tar.gz", ".tgz", ".tar", ".zip")
_RATIO_FLOOR: Final = 1 << 20  # ratios of tiny archives mean nothing
_COPY_CHUNK: Final = 1 << 20
_O_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_O_BINARY: Final = getattr(os, "O_BINARY", 0)

#: What a user can do about an archive over the limits that is genuine (there is no flag for the limits).
_GENUINE: Final = (
    "if it is genuine, unpack it yourself and name the unpacked folder as the source (a local path, with "
    "`allow_local: true` in the manifest)"
)


def is_archive_name(name: str) -> bool:
    """True if a file name ends with one of ``ARCHIVE_SUFFIXES`` (case-insensitive)."""
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def detect_format(path: Path) -> ArchiveFormat | None:
    """``"zip"`` or ``"tar"`` (plain or compressed) from the file's bytes; ``None`` otherwise."""
    with path.open("rb") as handle:
        head = handle.read(6)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (EOFError, zlib.error, lzma.LZMAError, OSError):
        # A compressed stream that breaks off (a truncated .tar.gz): a tar, so that unpacking it says
        # "corrupt or truncated" rather than "not an archive".
        return "tar" if head.startswith(_COMPRESSED_MAGIC) else None
    return None


#: The first bytes of gzip, bzip2 and xz streams (tarfile reads tars compressed with each).
_COMPRESSED_MAGIC: Final = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


@dataclass(frozen=True)
class Limits:
    """What an archive may hold."""

    max_bytes: int
    max_members: int
    max_ratio: float


@dataclass
class _Budget:
    """Bytes and members written so far, against the limits."""

    archive: Path
    limits: Limits
    archive_size: int
    written: int = 0

    def allowed_bytes(self) -> int:
        cap = self.limits.max_bytes
        if self.limits.max_ratio > 0:
            cap = min(cap, max(_RATIO_FLOOR, int(self.archive_size * self.limits.max_ratio)))
        return cap

    def spend(self, amount: int, *, member: str) -> None:
        self.written += amount
        if self.written > self.allowed_bytes():
            raise UnsafeArchiveError(
                f"{self.archive}: member {member!r}: unpacking would write more than {self.allowed_bytes()} bytes "
                f"(archive of {self.archive_size} bytes; limits: archive_max_bytes={self.limits.max_bytes}, "
                f"archive_max_ratio={self.limits.max_ratio}); " + _GENUINE
            )


def unpack_archive(archive: Path, target: Path, *, limits: Limits, display: str | None = None) -> int:
    """Unpack ``archive`` into the empty folder ``target``; return the number of bytes written.

    Raises ``UnsafeArchiveError`` naming the archive (``display``, e.g. its URL, if given) and
    the offending member; the caller removes ``target`` then.
    """
    name = display or str(archive)
    kind = detect_format(archive)
    if kind is None:
        raise UnsafeArchiveError(
            f"{name}: not a tar or zip archive (set `unpack: false` on the source if it is a plain file)"
        )
    target.mkdir(parents=True, exist_ok=True)
    budget = _Budget(archive=Path(name), limits=limits, archive_size=archive.stat().st_size)
    if kind == "zip":
        written = _unpack_zip(archive, target, budget=budget, name=name)
    else:
        written = _unpack_tar(archive, target, budget=budget, name=name)
    _check_links(target, archive=name)
    return written


def _check_links(target: Path, *, archive: str) -> None:
    """Every symlink left in ``target`` resolves inside it (links through links can climb out)."""
    real_root = Path(os.path.realpath(target))
    for folder, dirs, files in os.walk(target):
        for entry in (*dirs, *files):
            path = Path(folder) / entry
            if path.is_symlink():
                real = Path(os.path.realpath(path))
                if real != real_root and real_root not in real.parents:
                    member = path.relative_to(target).as_posix()
                    raise UnsafeArchiveError(
                        f"{archive}: member {member!r} is a link that resolves outside the archive; refusing"
                    )


# ---------------------------------------------------------------------------------------------
# Member names and link targets
# ---------------------------------------------------------------------------------------------


def _member_path(raw: str, *, archive: str) -> PurePosixPath | None:
    """The member's relative path, or None for the archive root itself ("./")."""
    name = raw.replace("\\", "/")  # zips written on Windows; a backslash is never a safe character here
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {raw!r} has an absolute path; refusing to unpack")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeArchiveError(f"{archive}: member {raw!r} has a '..' component; refusing to unpack")
    if "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member {raw!r} has a NUL byte in its name; refusing to unpack")
    return PurePosixPath(*parts) if parts else None


def _link_target(member: PurePosixPath, link: str, *, archive: str, raw: str) -> PurePosixPath:
    """Where a symlink at ``member`` pointing to ``link`` lands, relative to the root; refuse outside."""
    if link.startswith("/") or (len(link) > 1 and link[1] == ":") or "\x00" in link:
        raise UnsafeArchiveError(f"{archive}: member {raw!r} is a link to the absolute path {link!r}; refusing")
    joined = posixpath.normpath(posixpath.join(str(member.parent), link.replace("\\", "/")))
    if joined == ".." or joined.startswith(("../", "/")):
        raise UnsafeArchiveError(f"{archive}: member {raw!r} is a link to {link!r}, outside the archive; refusing")
    return PurePosixPath(joined)


# ---------------------------------------------------------------------------------------------
# Writing inside the target only
# ---------------------------------------------------------------------------------------------


class _Writer:
    """Creates folders, files and links under ``root`` and nowhere else."""

    def __init__(self, root: Path, *, archive: str) -> None:
        self.root = root
        self.real_root = Path(os.path.realpath(root))
        self.archive = archive

    def _inside(self, path: Path, *, raw: str) -> None:
        real = Path(os.path.realpath(path))
        if real != self.real_root and self.real_root not in real.parents:
            raise UnsafeArchiveError(
                f"{self.archive}: member {raw!r} would be written through a link to {real}, outside the target"
            )

    def folder(self, rel: PurePosixPath, *, raw: str) -> Path:
        path = self.root.joinpath(*rel.parts)
        current = self.root
        for part in rel.parts:
            current = current / part
            if current.is_symlink():
                self._inside(current, raw=raw)
            if not current.exists():
                current.mkdir(mode=0o755)
            elif not current.is_dir():
                raise UnsafeArchiveError(f"{self.archive}: member {raw!r} needs {current.name!r} to be a folder")
        self._inside(path, raw=raw)
        return path

    def _prepare(self, rel: PurePosixPath, *, raw: str) -> Path:
        parent = self.folder(rel.parent, raw=raw) if rel.parent.parts else self.root
        path = parent / rel.name
        if path.is_symlink() or path.is_file():
            path.unlink()  # tar semantics: a later member of the same name replaces an earlier one
        elif path.exists():
            raise UnsafeArchiveError(f"{self.archive}: member {raw!r} would replace a folder")
        return path

    def file(self, rel: PurePosixPath, source: IO[bytes], *, raw: str, executable: bool, budget: _Budget) -> int:
        path = self._prepare(rel, raw=raw)
        mode = 0o755 if executable else 0o644
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_BINARY, mode)
        written = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(_COPY_CHUNK):
                budget.spend(len(chunk), member=raw)
                out.write(chunk)
                written += len(chunk)
        return written

    def symlink(self, rel: PurePosixPath, link: str, *, raw: str) -> None:
        path = self._prepare(rel, raw=raw)
        path.symlink_to(link)

    def copy(self, rel: PurePosixPath, existing: PurePosixPath, *, raw: str, budget: _Budget) -> int:
        source = self.root.joinpath(*existing.parts)
        if source.is_symlink() or not source.is_file():
            raise UnsafeArchiveError(
                f"{self.archive}: member {raw!r} is a hard link to {str(existing)!r}, which is not a file unpacked "
                "before it; refusing"
            )
        self._inside(source, raw=raw)
        with source.open("rb") as handle:
            return self.file(rel, handle, raw=raw, executable=os.access(source, os.X_OK), budget=budget)


# ---------------------------------------------------------------------------------------------
# tar
# ---------------------------------------------------------------------------------------------


def _unpack_tar(archive: Path, target: Path, *, budget: _Budget, name: str) -> int:
    writer = _Writer(target, archive=name)
    current = "(member headers)"
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in _tar_members(tar, budget=budget, name=name):
                current = member.name
                rel = _member_path(member.name, archive=name)
                if rel is None:
                    continue
                if member.isdir():
                    writer.folder(rel, raw=member.name)
                elif member.isfile():
                    source = tar.extractfile(member)
                    if source is None:  # pragma: no cover - isfile() members always have data
                        raise UnsafeArchiveError(f"{name}: member {member.name!r} has no data")
                    with source:
                        writer.file(rel, source, raw=member.name, executable=bool(member.mode & 0o100), budget=budget)
                elif member.issym():
                    _link_target(rel, member.linkname, archive=name, raw=member.name)
                    writer.symlink(rel, member.linkname, raw=member.name)
                elif member.islnk():
                    try:
                        existing = _member_path(member.linkname, archive=name)
                    except UnsafeArchiveError:
                        existing = None
                    if existing is None:
                        raise UnsafeArchiveError(
                            f"{name}: member {member.name!r} is a hard link to {member.linkname!r}, outside the "
                            "archive's files; refusing"
                        )
                    writer.copy(rel, existing, raw=member.name, budget=budget)
                else:
                    kind = "device" if (member.ischr() or member.isblk()) else "FIFO" if member.isfifo() else "special"
                    raise UnsafeArchiveError(f"{name}: member {member.name!r} is a {kind} file; refusing to unpack")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as exc:
        raise UnsafeArchiveError(
            f"{name}: member {current!r}: cannot read the tar archive ({type(exc).__name__}: {exc}); "
            "the file is corrupt or truncated"
        ) from exc
    return budget.written


def _tar_members(tar: tarfile.TarFile, *, budget: _Budget, name: str) -> Iterator[tarfile.TarInfo]:
    """Members in archive order, with the member-count and declared-size limits checked up front."""
    members = []
    declared = 0
    for member in tar:  # reads headers only; a .tar.gz is decompressed once more when files are read
        members.append(member)
        if len(members) > budget.limits.max_members:
            raise UnsafeArchiveError(
                f"{name}: member {member.name!r}: more than {budget.limits.max_members} members "
                "(archive_max_members); " + _GENUINE
            )
        if member.isfile():
            declared += member.size
            if declared > budget.allowed_bytes():
                raise UnsafeArchiveError(
                    f"{name}: member {member.name!r}: the archive declares more than {budget.allowed_bytes()} bytes "
                    "(archive_max_bytes / archive_max_ratio); " + _GENUINE
                )
    yield from members


# ---------------------------------------------------------------------------------------------
# zip
# ---------------------------------------------------------------------------------------------


def _unpack_zip(archive: Path, target: Path, *, budget: _Budget, name: str) -> int:
    writer = _Writer(target, archive=name)
    current = "(central directory)"
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            if len(infos) > budget.limits.max_members:
                raise UnsafeArchiveError(
                    f"{name}: member {infos[budget.limits.max_members].filename!r}: more than "
                    f"{budget.limits.max_members} members (archive_max_members); " + _GENUINE
                )
            declared = 0
            for info in infos:
                declared += info.file_size
                if declared > budget.allowed_bytes():
                    raise UnsafeArchiveError(
                        f"{name}: member {info.filename!r}: the archive declares more than {budget.allowed_bytes()} "
                        "bytes (archive_max_bytes / archive_max_ratio); " + _GENUINE
                    )
                if info.flag_bits & 0x1:
                    raise UnsafeArchiveError(f"{name}: member {info.filename!r} is encrypted; cannot unpack it")
            for info in infos:
                current = info.filename
                _unpack_zip_member(zf, info, writer=writer, budget=budget, name=name)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError) as exc:
        raise UnsafeArchiveError(
            f"{name}: member {current!r}: cannot read the zip archive ({type(exc).__name__}: {exc}); "
            "the file is corrupt, truncated or lies about its sizes"
        ) from exc
    return budget.written


def _unpack_zip_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, *, writer: _Writer, budget: _Budget, name: str
) -> None:
    rel = _member_path(info.filename, archive=name)
    if rel is None:
        return
    unix_mode = info.external_attr >> 16
    file_type = stat.S_IFMT(unix_mode) if unix_mode else 0
    if info.is_dir() or file_type == stat.S_IFDIR:
        writer.folder(rel, raw=info.filename)
        return
    if file_type == stat.S_IFLNK:
        if info.file_size > 4096:
            raise UnsafeArchiveError(
                f"{name}: member {info.filename!r} is a symlink with a {info.file_size}-byte target; refusing"
            )
        link = zf.read(info).decode("utf-8", errors="strict")
        _link_target(rel, link, archive=name, raw=info.filename)
        writer.symlink(rel, link, raw=info.filename)
        return
    if file_type not in (0, stat.S_IFREG):
        raise UnsafeArchiveError(f"{name}: member {info.filename!r} is a device or special file; refusing to unpack")
    with zf.open(info) as source:
        # ZipExtFile checks the CRC at the end: a member whose data disagrees with its header fails here.
        written = writer.file(rel, source, raw=info.filename, executable=bool(unix_mode & 0o100), budget=budget)
    if written != info.file_size:
        raise UnsafeArchiveError(
            f"{name}: member {info.filename!r} declares {info.file_size} bytes but holds {written}; refusing"
        )
