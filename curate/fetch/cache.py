"""The content-addressed cache: layout, atomic writes and hashing.

Layout under the cache root::

    blobs/sha256/ab/<sha256>            downloaded bytes, read-only, named by their sha256
    named/ab/<sha256>/<file name>       hard link to the blob under the URL's file name
                                        (readers and libraries that look at suffixes get one)
    urls/ab/<key>.json                  URL as written -> sha256, size, Hub commit (key = sha256 of the URL)
    partial/<key>                       an unfinished download of that URL, resumed by Range
    partial/<key>.json                  what the partial belongs to (validator, expected digest)
    unpacked/sha256/ab/<sha256>/        an archive unpacked once, keyed by the archive's sha256
    local/ab/<key>.json                 sha256 of a local file, remembered by path + size + mtime
    pins/<key>/<slide key>              the slides that still need an input (``evict.py``)
    budget/<holder key>.json            room reserved under ``--cache-budget`` (``budget.py``)
    locks/                              lock files (see ``locking.py``)
    tmp/                                temporary files and folders, renamed into place when complete

Everything that appears under a final name appears there complete: it is written under
``tmp/`` (or ``partial/``), flushed to disk and renamed, and ``rename`` is atomic on one file
system. Readers of the cache therefore need no lock; writers lock per URL or per digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from stcorpus.curate.atomic import fsync_dir, write_atomic

_HEX64: Final = re.compile(r"^[0-9a-f]{64}$")
_UNSAFE_NAME: Final = re.compile(r"[^A-Za-z0-9._+\-]")
HASH_CHUNK: Final = 1 << 20


def url_key(url: str) -> str:
    """The cache key of a URL as written: the sha256 of its UTF-8 bytes."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def is_sha256(value: str | None) -> bool:
    """True for 64 lower-case hexadecimal digits."""
    return value is not None and bool(_HEX64.match(value))


def sha256_file(path: Path, *, chunk_size: int = HASH_CHUNK) -> str:
    """The sha256 (hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def safe_file_name(name: str) -> str:
    """A file name that is safe on every platform, keeping the suffixes (``spatial.tar.gz``)."""
    name = _UNSAFE_NAME.sub("_", name).strip("._") or "file"
    return name[-200:]


@dataclass(frozen=True)
class UrlRecord:
    """What the URL index remembers about one URL."""

    url: str
    sha256: str
    size: int
    commit: str | None = None


class Cache:
    """Paths and atomic operations of one cache root; safe to share between threads and processes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # --- paths ---------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        """Where the bytes with this digest live."""
        return self.root / "blobs" / "sha256" / sha256[:2] / sha256

    def named_path(self, sha256: str, name: str) -> Path:
        """The blob under a file name (a hard link, or a copy where links are not possible)."""
        return self.root / "named" / sha256[:2] / sha256 / safe_file_name(name)

    def unpacked_path(self, sha256: str) -> Path:
        """The folder the archive with this digest is unpacked into."""
        return self.root / "unpacked" / "sha256" / sha256[:2] / sha256

    def partial_path(self, url: str) -> Path:
        """The unfinished download of ``url`` (resumed with a Range request)."""
        return self.root / "partial" / url_key(url)

    def partial_meta_path(self, url: str) -> Path:
        """What the partial download of ``url`` belongs to."""
        return self.root / "partial" / f"{url_key(url)}.json"

    def lock_path(self, kind: str, key: str) -> Path:
        """The lock file serialising work of ``kind`` on ``key``."""
        return self.root / "locks" / f"{kind}-{key}.lock"

    def url_index_path(self, url: str) -> Path:
        """Where the URL index remembers ``url``."""
        return self.url_key_index_path(url_key(url))

    def url_key_index_path(self, key: str) -> Path:
        """Where the URL index remembers the URL whose ``url_key`` is ``key``."""
        return self.root / "urls" / key[:2] / f"{key}.json"

    def _local_memo_path(self, path: Path) -> Path:
        key = url_key(str(path))
        return self.root / "local" / key[:2] / f"{key}.json"

    def tmp_dir(self) -> Path:
        """A folder on the cache's file system for temporary files (created if missing)."""
        path = self.root / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path

    # --- atomic writes -------------------------------------------------------------------------

    def write_json(self, path: Path, payload: dict[str, Any]) -> None:
        """Write JSON atomically (temp file in ``tmp/``, fsync, rename)."""
        write_atomic(path, (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode(), tmp_dir=self.tmp_dir())

    def commit_blob(self, partial: Path, sha256: str) -> Path:
        """Move a complete, verified file into ``blobs/`` under its digest and return the blob path."""
        target = self.blob_path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and target.stat().st_size == partial.stat().st_size:
            # Same digest, same size: another process got there first with the same bytes.
            partial.unlink()
        else:
            partial.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            partial.replace(target)
            fsync_dir(target.parent)
        return target

    def link_named(self, sha256: str, name: str) -> Path:
        """The blob under ``name`` (see ``named_path``), created atomically if missing."""
        blob = self.blob_path(sha256)
        named = self.named_path(sha256, name)
        if named.exists() and named.stat().st_size == blob.stat().st_size:
            return named
        named.parent.mkdir(parents=True, exist_ok=True)
        tmp = named.parent / f".{named.name}.{uuid.uuid4().hex}.tmp"
        try:
            os.link(blob, tmp)
        except OSError:
            # No hard links here (another file system, FAT, some network mounts): copy instead.
            shutil.copyfile(blob, tmp)
        tmp.replace(named)
        return named

    # --- URL index -----------------------------------------------------------------------------

    def lookup_url(self, url: str, *, require_blob: bool = True) -> UrlRecord | None:
        """The record of ``url`` if its blob is still in the cache with the recorded size.

        ``require_blob=False``: the record even when the blob was released (what the URL held).
        """
        path = self.url_index_path(url)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # an unreadable index entry is a cache miss; the download rewrites it
        record = UrlRecord(url=data["url"], sha256=data["sha256"], size=data["size"], commit=data.get("commit"))
        if record.url != url or not is_sha256(record.sha256):
            return None
        if require_blob and not self.has_blob(record.sha256, size=record.size):
            return None
        return record

    def record_url(self, record: UrlRecord) -> None:
        """Remember that ``record.url`` holds the blob ``record.sha256``."""
        self.write_json(
            self.url_index_path(record.url),
            {"url": record.url, "sha256": record.sha256, "size": record.size, "commit": record.commit},
        )

    def has_blob(self, sha256: str, *, size: int | None = None) -> bool:
        """True if the blob exists (with ``size`` bytes, when given)."""
        try:
            actual = self.blob_path(sha256).stat().st_size
        except FileNotFoundError:
            return False
        return size is None or actual == size

    # --- local files ---------------------------------------------------------------------------

    def local_sha256(self, path: Path) -> str:
        """sha256 of a local file, remembered by (path, size, mtime, inode) so big files hash once."""
        info = path.stat()
        signature = {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "ino": info.st_ino}
        memo = self._local_memo_path(path)
        with contextlib.suppress(FileNotFoundError, ValueError, OSError):
            data = json.loads(memo.read_text(encoding="utf-8"))
            same = data.get("path") == str(path) and all(data.get(k) == v for k, v in signature.items())
            if same and is_sha256(data.get("sha256")):
                return str(data["sha256"])
        digest = sha256_file(path)
        self.write_json(memo, {"path": str(path), "sha256": digest, **signature})
        return digest

    # --- temporary folders ---------------------------------------------------------------------

    @contextlib.contextmanager
    def temp_dir(self, prefix: str) -> Iterator[Path]:
        """A fresh folder under ``tmp/``, removed at the end unless it was renamed away."""
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp_dir()))
        try:
            yield path
        finally:
            if path.exists():
                shutil.rmtree(path)
