"""Shards as the shard reader gets them: held to ``shards.parquet``, and kept in a local cache when remote.

:class:`ShardSource` wraps the corpus's ``Source`` for the shard reader (the metadata files are
read from the source itself). For every shard ``shards.parquet`` lists it guarantees:

- a **missing** shard (no file, a 404, no object) is a ``ShardError`` naming it, so the
  ``on_bad_sample`` policy applies (``warn``/``skip`` skip its samples and count it);
- a Parquet shard **shorter or longer** than recorded is a ``ShardError`` before any of its
  samples is read (its footer is at its end); a tar shard yields the samples before a cut and
  is a ``ShardError`` where it is cut (every tar header is checksummed), locally as remotely;
- with ``verify_sha256``, a shard whose bytes do not hash to the recorded sha256 is a
  ``ShardError`` before any of its samples is read (local shards are hashed once per process;
  remote shards are downloaded whole first, into the cache or a temporary file).

With a :class:`ShardCache` (``LoaderSettings.cache``), a remote shard is served from the cache
folder when it is there, and otherwise streamed as usual while its bytes are written to a partial
file beside the cache; when the stream ends (or is closed early: the rest of the body is read
into the file, on the connection already open, so a worker whose run ends inside a shard still
leaves the whole shard) its size and sha256 are checked and it is renamed into place. Only then
is it a cache entry. The cache:

- keeps shards by sha256 (``<folder>/shards/ab/abcd...``): two corpora or revisions sharing a
  shard share its copy, and a hit is the recorded bytes by construction (its size is checked);
- stays within ``max_bytes``: before a shard is filled, least recently used shards are deleted
  until it fits (a read counts as a use; the partial files being filled count at their final
  size); a shard larger than the whole budget is never cached;
- is safe for the workers and ranks of one node: one process fills a shard at a time (a file
  lock per shard; another process reading the same shard meanwhile streams it uncached),
  entries appear by atomic rename, eviction holds a cache-wide lock, and a file deleted while
  another process reads it stays readable to that process (POSIX).

With a cache, a Parquet shard not yet cached is fetched in one GET from its first byte (the
footer a Parquet read starts with is at the end), so its first row group arrives later than
without a cache, but the shard costs one request instead of two.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import secrets
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import IO, Any, Final

from stcorpus.loaders.errors import MissingFileError, ShardError
from stcorpus.loaders.settings import CacheSettings
from stcorpus.loaders.source import Source, Stream
from stcorpus.locking import try_lock, unlock, wait_lock

log = logging.getLogger(__name__)

_CHUNK: Final = 1 << 20
_GB: Final = 1 << 30


@dataclass(frozen=True)
class ShardRecord:
    """What ``shards.parquet`` says about one shard file."""

    path: str
    size: int
    sha256: str | None
    format: str = "parquet"


def shard_records(rows: Iterable[Mapping[str, Any]]) -> dict[str, ShardRecord]:
    """Shard records by path, from the rows of ``shards.parquet``."""
    return {
        str(row["path"]): ShardRecord(
            str(row["path"]), int(row.get("bytes") or 0), row.get("sha256") or None, str(row.get("format") or "")
        )
        for row in rows
    }


def _sha256_of(handle: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The cache folder
# ---------------------------------------------------------------------------------------------


class ShardCache:
    """Shards of remote corpora on local disk, by sha256, within a byte budget (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike[str], *, max_bytes: int) -> None:
        self.folder = Path(folder).expanduser()
        self.max_bytes = int(max_bytes)
        self.shards = self.folder / "shards"
        self.partials = self.folder / "partial"
        self.locks = self.folder / "locks"

    @classmethod
    def from_settings(cls, settings: CacheSettings) -> ShardCache | None:
        """The cache the settings name, or None."""
        if settings.folder is None:
            return None
        return cls(settings.folder, max_bytes=int(settings.max_gb * _GB))

    def __repr__(self) -> str:
        return f"ShardCache({str(self.folder)!r}, max_bytes={self.max_bytes})"

    def path(self, sha256: str) -> Path:
        """Where the shard with ``sha256`` is kept."""
        return self.shards / sha256[:2] / sha256

    def lookup(self, record: ShardRecord) -> Path | None:
        """The cached copy of ``record`` (marked as used now), or None."""
        if record.sha256 is None:
            return None
        path = self.path(record.sha256)
        try:
            if path.stat().st_size != record.size:
                log.warning("%s: cached copy %s has the wrong size: dropped", record.path, path)
                path.unlink(missing_ok=True)
                return None
            os.utime(path)  # the use that least-recently-used eviction goes by
        except FileNotFoundError:
            return None
        return path

    def usage(self) -> int:
        """Bytes held: cached shards, plus the final size of shards being filled."""
        total = sum(p.stat().st_size for p in self._entries())
        for partial in self.partials.glob("*.partial"):
            parts = partial.name.split(".")
            total += int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0
        return total

    def _entries(self) -> list[Path]:
        return [p for p in self.shards.glob("*/*") if p.is_file()]

    def evict(self, *, room: int = 0) -> int:
        """Delete least recently used shards until ``room`` more bytes fit in the budget; return bytes freed."""
        fd = wait_lock(self.locks / "evict.lock", what="shard cache eviction")
        try:
            budget = self.max_bytes - room
            used = self.usage()
            freed = 0
            if used <= budget:
                return 0
            entries = []
            for path in self._entries():
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                entries.append((stat.st_mtime_ns, stat.st_size, path))
            for _, size, path in sorted(entries):
                if used - freed <= budget:
                    break
                path.unlink(missing_ok=True)
                freed += size
                log.info("shard cache %s: evicted %s (%d bytes, least recently used)", self.folder, path.name, size)
            return freed
        finally:
            unlock(fd)

    def reserve(self, record: ShardRecord, *, wait: bool) -> Fill | None:
        """A fill of ``record`` (holding its lock), or None: not cacheable, or (``wait=False``) busy elsewhere."""
        if record.sha256 is None or record.size > self.max_bytes or record.size <= 0:
            return None
        lock_path = self.locks / f"{record.sha256}.lock"
        fd = wait_lock(lock_path, what=record.path) if wait else try_lock(lock_path)
        if fd is None:
            return None
        try:
            for stale in self.partials.glob(f"{record.sha256}.*.partial"):
                stale.unlink(missing_ok=True)  # left by a process that died while filling (we hold the lock)
            self.evict(room=record.size)
            self.partials.mkdir(parents=True, exist_ok=True)
            partial = self.partials / f"{record.sha256}.{record.size}.{os.getpid()}-{secrets.token_hex(4)}.partial"
            return Fill(self, record, fd, partial)
        except BaseException:
            unlock(fd)
            raise


class _Sink:
    """Bytes of one shard written to a file and hashed on the way."""

    def __init__(self, record: ShardRecord, handle: IO[bytes]) -> None:
        self.record = record
        self._handle: IO[bytes] | None = handle
        self._digest = hashlib.sha256()
        self.written = 0

    def write(self, data: bytes) -> None:
        """Append the shard's next bytes."""
        assert self._handle is not None
        self._handle.write(data)
        self._digest.update(data)
        self.written += len(data)

    def problem(self) -> str | None:
        """Why the bytes written are not the recorded shard, or None when they are."""
        if self.written != self.record.size:
            return f"{self.written} bytes, shards.parquet says {self.record.size}"
        digest = self._digest.hexdigest()
        if digest != self.record.sha256:
            return f"sha256 {digest}, shards.parquet says {self.record.sha256}"
        return None


class Fill(_Sink):
    """One shard being written into the cache; holds the shard's lock until ``commit`` or ``abort``."""

    def __init__(self, cache: ShardCache, record: ShardRecord, fd: int, partial: Path) -> None:
        super().__init__(record, partial.open("wb"))
        self.cache, self.partial = cache, partial
        self._fd: int | None = fd

    def commit(self) -> IO[bytes]:
        """Move the (verified) bytes into the cache; the entry, opened for reading.

        Opened before the lock is released, so an eviction by another process cannot take the
        entry away before it is read. The budget was made room for when the fill was reserved.
        """
        assert self._handle is not None and self.record.sha256 is not None
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._handle = None
        final = self.cache.path(self.record.sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        self.partial.chmod(0o644)
        self.partial.replace(final)
        try:
            return final.open("rb", buffering=_CHUNK)
        finally:
            self._release()

    def abort(self) -> None:
        """Drop what was written."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self.partial.unlink(missing_ok=True)
        self._release()

    def _release(self) -> None:
        if self._fd is not None:
            unlock(self._fd)
            self._fd = None


# ---------------------------------------------------------------------------------------------
# The source the shard reader reads
# ---------------------------------------------------------------------------------------------


class ShardSource:
    """The corpus's source as the shard reader sees it: shards checked, and cached when remote."""

    def __init__(
        self,
        source: Source,
        records: Mapping[str, ShardRecord],
        *,
        verify: bool = False,
        cache: ShardCache | None = None,
    ) -> None:
        self.source = source
        self.records = dict(records)
        self.verify = verify
        self.cache = cache if source.remote else None
        self.location = source.location
        self.remote = source.remote
        self._verified: set[tuple[str, int, int, int]] = set()
        self._warned_unhashed = False

    def __repr__(self) -> str:
        return f"ShardSource({self.source!r}, verify={self.verify}, cache={self.cache!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_verified"] = set()  # each process hashes what it opens
        return state

    def read_bytes(self, path: str) -> bytes:
        """The whole file ``path`` (from the source)."""
        return self.source.read_bytes(path)

    def _missing(self, path: str, where: str) -> ShardError:
        return ShardError(
            f"{path} is listed in shards.parquet but missing from {where}: the copy of the corpus is incomplete; "
            "copy, download or publish it again (on_bad_sample: warn skips the shard and counts it)"
        )

    # -- local -------------------------------------------------------------------------------

    def local_path(self, path: str) -> Path | None:
        """The checked local file of ``path`` (None for a remote source)."""
        local = self.source.local_path(path)
        if local is None:
            return None
        record = self.records.get(path)
        try:
            stat = local.stat()
        except FileNotFoundError:
            raise self._missing(path, self.location) from None
        if not S_ISREG(stat.st_mode):
            raise ShardError(f"{local}: listed in shards.parquet but not a file (a folder?); copy the shard again")
        # A tar of the wrong size is still read: the samples before a cut are whole (every tar header is
        # checksummed), so the reader yields them (warning once) and raises ShardError where it is cut.
        if record is not None and record.size and stat.st_size != record.size and record.format != "wds":
            raise ShardError(
                f"{local}: {stat.st_size} bytes on disk, shards.parquet says {record.size}: truncated or replaced; "
                "copy or download the shard again"
            )
        if self.verify and record is not None:
            self._verify_local(local, record, stat)
        return local

    def _verify_local(self, local: Path, record: ShardRecord, stat: os.stat_result) -> None:
        key = (str(local), stat.st_size, stat.st_mtime_ns, stat.st_ino)
        if key in self._verified:
            return
        if record.sha256 is None:
            self._warn_unhashed(record)
            return
        with local.open("rb") as handle:
            digest = _sha256_of(handle)
        if digest != record.sha256:
            raise ShardError(
                f"{local}: sha256 {digest}, shards.parquet says {record.sha256}: the shard is corrupt or was "
                "replaced; copy or download it again"
            )
        self._verified.add(key)

    def _warn_unhashed(self, record: ShardRecord) -> None:
        if not self._warned_unhashed:
            log.warning("%s: shards.parquet records no sha256: not verified (and never cached)", record.path)
            self._warned_unhashed = True

    # -- ranges ------------------------------------------------------------------------------

    def open_range(self, path: str, start: int = 0, stop: int | None = None, *, size: int | None = None) -> Stream:
        """Bytes ``[start, stop)`` of shard ``path``: checked, from the cache when it holds the shard."""
        record = self.records.get(path)
        if not self.remote:
            self.local_path(path)  # missing / wrong size / sha256 before the first byte
            return self.source.open_range(path, start, stop, size=size)
        if record is None or record.size <= 0:
            return _Checked(self.source.open_range(path, start, stop, size=size), self, path)
        stop = record.size if stop is None else stop
        cache = self.cache
        if cache is not None:
            hit = cache.lookup(record)
            if hit is not None:
                stream = _window(hit, start, stop)
                if stream is not None:
                    return stream
        if self.verify:
            return self._verified_copy(record, start, stop)
        fill = cache.reserve(record, wait=False) if cache is not None else None
        if fill is None:
            return _Checked(self.source.open_range(path, start, stop, size=record.size), self, path)
        remote = _Checked(self.source.open_range(path, 0, record.size, size=record.size), self, path)
        return _Tee(remote, fill, start, stop)

    def _verified_copy(self, record: ShardRecord, start: int, stop: int) -> Stream:
        """The whole shard downloaded, hashed and checked before any byte is served."""
        if record.sha256 is None:
            self._warn_unhashed(record)
            return _Checked(self.source.open_range(record.path, start, stop, size=record.size), self, record.path)
        cache = self.cache
        fill = cache.reserve(record, wait=True) if cache is not None else None
        if cache is not None and fill is not None:
            hit = cache.lookup(record)  # filled by another process while we waited for its lock
            if hit is not None:
                fill.abort()
                stream = _window(hit, start, stop)
                if stream is not None:
                    return stream
                fill = None
        sink: Fill | _TempSink = fill if fill is not None else _TempSink(record)
        remote = _Checked(self.source.open_range(record.path, 0, record.size, size=record.size), self, record.path)
        try:
            while chunk := remote.read(_CHUNK):
                sink.write(chunk)
            problem = sink.problem()
            if problem is not None:
                raise ShardError(f"{record.path}: {problem}: the shard is corrupt or was replaced on {self.location}")
        except BaseException:
            sink.abort()
            raise
        finally:
            remote.close()
        return _Window(sink.commit(), start, stop)


class _Checked:
    """A remote shard stream whose "missing" errors are ``ShardError`` (the reader's policy applies)."""

    def __init__(self, inner: Stream, owner: ShardSource, path: str) -> None:
        self.inner, self.owner, self.path = inner, owner, path

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes."""
        try:
            return self.inner.read(n)
        except MissingFileError:
            raise self.owner._missing(self.path, self.owner.location) from None

    def close(self) -> None:
        """Close the inner stream."""
        self.inner.close()


class _Window:
    """Bytes ``[start, stop)`` of an open local file."""

    def __init__(self, handle: IO[bytes], start: int, stop: int) -> None:
        self.handle = handle
        handle.seek(start)
        self.left = stop - start

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes of the window."""
        if n < 0 or n > self.left:
            n = self.left
        data = self.handle.read(n) if n > 0 else b""
        self.left -= len(data)
        return data

    def close(self) -> None:
        """Close the file."""
        self.handle.close()


def _window(path: Path, start: int, stop: int) -> _Window | None:
    """A window on a cached file, or None if it was evicted meanwhile."""
    try:
        handle = path.open("rb", buffering=_CHUNK)
    except FileNotFoundError:
        return None
    return _Window(handle, start, stop)


class _TempSink(_Sink):
    """A shard downloaded into an anonymous temporary file (verification without a cache)."""

    def __init__(self, record: ShardRecord) -> None:
        # Outlives this call: the window serving the shard closes (and so deletes) it.
        super().__init__(record, tempfile.TemporaryFile(prefix="stcorpus-shard-"))  # noqa: SIM115

    def abort(self) -> None:
        """Drop the file."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def commit(self) -> IO[bytes]:
        """The file, for reading (it goes when it is closed)."""
        assert self._handle is not None
        self._handle.flush()
        return self._handle


class _Tee:
    """Bytes ``[start, stop)`` of a shard streamed from ``[0, size)``, every byte also written to a fill.

    Bytes before ``start`` are read into the fill first; on ``close`` the rest of the shard is read
    into it (same connection), and it is committed when its size and sha256 match the record.
    Closing never raises: a fill that fails is dropped with a log line, the reader's bytes stand.
    """

    def __init__(self, remote: Stream, fill: Fill, start: int, stop: int) -> None:
        self.remote, self.fill = remote, fill
        self.start, self.stop = start, stop
        self.pos = 0
        self._failed = False
        self._closed = False

    def _pull(self, n: int) -> bytes:
        data = self.remote.read(n)
        if data:
            self.fill.write(data)
            self.pos += len(data)
        return data

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes of the window (all of it for ``n < 0``)."""
        if n < 0:
            out = io.BytesIO()
            while chunk := self.read(_CHUNK):
                out.write(chunk)
            return out.getvalue()
        try:
            while self.pos < self.start:
                if not self._pull(min(_CHUNK, self.start - self.pos)):
                    return b""
            n = min(n, self.stop - self.pos)
            return self._pull(n) if n > 0 else b""
        except BaseException:
            self._failed = True
            raise

    def close(self) -> None:
        """Read the rest of the shard into the fill, commit it if it is the recorded shard, close."""
        if self._closed:
            return
        self._closed = True
        fill, record = self.fill, self.fill.record
        try:
            if not self._failed:
                while self.pos < record.size and self._pull(min(_CHUNK, record.size - self.pos)):
                    pass
        except (OSError, ShardError) as exc:
            self._failed = True
            log.info("%s: not cached, the rest of it could not be read (%s)", record.path, exc)
        finally:
            self.remote.close()
        problem = None if self._failed else fill.problem()
        if self._failed or problem is not None:
            if problem is not None:
                log.warning("%s: not cached: %s", record.path, problem)
            fill.abort()
            return
        try:
            fill.commit().close()
        except OSError as exc:
            log.warning("%s: could not be kept in the shard cache %s: %s", record.path, fill.cache.folder, exc)
            fill.abort()
