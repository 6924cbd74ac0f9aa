"""Range reads of remote (pyramidal) TIFFs: only the bytes a build reads are downloaded (issue 17 item 3).

A build decodes a fraction of a whole-slide image: the levels that serve each view's um/px,
under the spots, and a coarse level for the thumbnail. For a TIFF source over ``http(s)://`` or
``hf://`` the build (``curate build``; ``--no-range-reads`` or ``FetchSettings.range_reads=False``
turns it off) therefore does not download the file. :meth:`Fetcher.open_ranged` makes a *partial
copy* instead:

- ``<cache>/ranges/<url key>/<file name>``: a sparse file of the remote file's size; only the
  byte ranges read so far hold data (the file system stores nothing for the rest);
- ``<file name>.ranges.json`` beside it (:class:`RangeRecord`): the URL to GET, the size and
  strong validator (ETag) the server gave, the retry policy, and the byte ranges held.

The image reader (``imaging.TiffImage``) opens a TIFF through :func:`open_partial`, which gives a
:class:`PartialFile` where the record exists: a seekable binary file whose reads download any
missing range first (header and IFDs come this way, in ``READAHEAD`` pieces), and whose
:meth:`PartialFile.prefetch` downloads many tile ranges at once, merging ranges less than
``COALESCE_GAP`` apart into one request. The tiler prefetches the tiles under every spot's views
before it cuts any, so a slide costs a few dozen requests, not one per tile.

The bytes are the server's own: the tiles decoded, hence the corpus, are byte-identical to a build
from the whole file. Every range GET goes through the shared client (retries, ``Retry-After``,
resumes; ``stcorpus.http``) and must carry the validator the copy was started with: a file that
changed on the server fails the slide (``RemoteChangedError``) instead of splicing versions. The
whole file's sha256 cannot be checked from a part of it; the unit records the manifest's or the
Hub's digest where there is one (an ``hf://`` URL is pinned to a commit).
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from stcorpus.curate.errors import FetchError
from stcorpus.errors import RemoteChangedError, RemoteError
from stcorpus.http import HttpClient, PerHostLimit, RetryPolicy, redact_url
from stcorpus.locking import file_lock

if TYPE_CHECKING:
    from stcorpus.curate.fetch.cache import Cache

log = logging.getLogger(__name__)

#: Ranges closer than this are fetched in one request (the bytes between come along): one more
#: request costs a round trip, about what a MiB takes at 1 Gbit/s over 10 ms. A small file uses
#: a gap of 1/64 of its size, so what comes along stays a small part of it.
COALESCE_GAP: Final = 1 << 20
#: Least bytes a read that misses downloads (TIFF headers and IFDs are read in small pieces);
#: at most 1/256 of the file.
READAHEAD: Final = 1 << 16
#: The suffix of the record beside a partial copy.
RECORD_SUFFIX: Final = ".ranges.json"
#: The suffix of the lock file beside a partial copy that serialises downloads into it.
LOCK_SUFFIX: Final = ".ranges.lock"
#: Bytes written per piece while a range streams in.
_CHUNK: Final = 1 << 20

Span = tuple[int, int]  # [start, stop) in bytes


def coalesce(spans: Iterable[Span], *, gap: int = COALESCE_GAP) -> list[Span]:
    """Sorted, merged ``[start, stop)`` spans: overlapping ones, and ones less than ``gap`` apart.

    >>> coalesce([(100, 200), (0, 10), (205, 300), (5000, 6000)], gap=10)
    [(0, 10), (100, 300), (5000, 6000)]
    """
    merged: list[list[int]] = []
    for start, stop in sorted(s for s in spans if s[1] > s[0]):
        if merged and start - merged[-1][1] <= gap:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [(a, b) for a, b in merged]


class Coverage:
    """The byte ranges a partial copy holds: sorted, disjoint, merged when they touch."""

    def __init__(self, spans: Iterable[Span] = ()) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []
        for start, stop in coalesce(spans, gap=0):
            self._starts.append(start)
            self._stops.append(stop)

    @property
    def spans(self) -> list[Span]:
        """The held ranges, in order."""
        return list(zip(self._starts, self._stops, strict=True))

    @property
    def total(self) -> int:
        """Bytes held."""
        return sum(b - a for a, b in zip(self._starts, self._stops, strict=True))

    def add(self, start: int, stop: int) -> None:
        """Record ``[start, stop)`` as held."""
        if stop <= start:
            return
        merged = coalesce([*self.spans, (start, stop)], gap=0)
        self._starts = [a for a, _ in merged]
        self._stops = [b for _, b in merged]

    def missing(self, start: int, stop: int) -> list[Span]:
        """The parts of ``[start, stop)`` not held, in order."""
        gaps: list[Span] = []
        position = start
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        while position < stop and i < len(self._starts):
            a, b = self._starts[i], self._stops[i]
            if b <= position:
                i += 1
                continue
            if a >= stop:
                break
            if a > position:
                gaps.append((position, a))
            position = max(position, b)
            i += 1
        if position < stop:
            gaps.append((position, stop))
        return gaps


@dataclass
class RangeRecord:
    """What a partial copy is of (``<file>.ranges.json``); never holds a token."""

    url: str  # as the manifest gives it
    get_url: str  # what to GET (an hf:// URL resolved at the commit the HEAD saw)
    size: int
    validator: str | None  # the strong ETag of the first answer; every range must match it
    sha256: str | None  # the whole file's digest where the manifest or the Hub gives one
    hub: bool  # send the Hub token (read at request time)
    policy: dict[str, float] = field(default_factory=dict)  # RetryPolicy fields
    per_host: int = 4
    #: ``FetchSettings.host_cap`` and the cache folder whose ``locks/`` hold its slots (``hostcap.py``):
    #: range reads share the cross-process per-host cap with every other download of the build.
    host_cap: int | None = None
    cap_root: str | None = None
    spans: list[list[int]] = field(default_factory=list)
    fetched_bytes: int = 0
    requests: int = 0

    def same_file(self, other: RangeRecord) -> bool:
        """True when both records describe the same remote bytes."""
        return (self.url, self.get_url, self.size, self.validator, self.sha256) == (
            other.url,
            other.get_url,
            other.size,
            other.validator,
            other.sha256,
        )


def record_path(path: Path) -> Path:
    """The record of the partial copy at ``path``."""
    return path.with_name(path.name + RECORD_SUFFIX)


def read_record(path: Path) -> RangeRecord | None:
    """The record of the partial copy at ``path``, or None (no record, or an unreadable one)."""
    try:
        data = json.loads(record_path(path).read_text(encoding="utf-8"))
        return RangeRecord(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.warning("%s: unreadable range record (%s); the copy starts over", record_path(path), exc)
        return None


def write_record(path: Path, record: RangeRecord) -> None:
    """Write the record of ``path`` atomically."""
    from stcorpus.curate.atomic import write_atomic

    write_atomic(record_path(path), (json.dumps(asdict(record), sort_keys=True) + "\n").encode())


def start_copy(path: Path, record: RangeRecord) -> None:
    """Make (or keep) the partial copy at ``path`` for ``record``.

    A copy of the same remote bytes keeps what it holds (a build killed midway resumes); any
    other is started over as a sparse file of ``record.size`` bytes.
    """
    old = read_record(path)
    if old is not None and old.same_file(record) and path.is_file() and path.stat().st_size == record.size:
        limits = (record.policy, record.per_host, record.host_cap, record.cap_root)
        if (old.policy, old.per_host, old.host_cap, old.cap_root) != limits:
            # This run's retries and connection caps, over what the copy already holds.
            old.policy, old.per_host, old.host_cap, old.cap_root = limits
            write_record(path, old)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    record_path(path).unlink(missing_ok=True)
    with path.open("wb") as handle:
        handle.truncate(record.size)  # sparse: no blocks are written
    record.spans, record.fetched_bytes, record.requests = [], 0, 0
    write_record(path, record)


def copy_path(cache: Cache, url: str, name: str) -> Path:
    """Where the partial copy of ``url`` lives in ``cache``, under the file name ``name``."""
    from stcorpus.curate.fetch.cache import safe_file_name, url_key

    return cache.root / "ranges" / url_key(url) / safe_file_name(name)


def evict_copy(cache: Cache, url: str) -> int:
    """Delete the partial copy of ``url`` (the caller holds the URL's lock); returns the bytes it held."""
    import shutil

    from stcorpus.curate.fetch.cache import url_key

    folder = cache.root / "ranges" / url_key(url)
    if not folder.is_dir():
        return 0
    held = sum(path.stat().st_blocks * 512 for path in folder.iterdir() if path.is_file())  # what the disk holds
    shutil.rmtree(folder, ignore_errors=True)
    return held


class PartialFile(io.RawIOBase):
    """A read-only, seekable view of a remote file through its partial copy (see the module docstring).

    Reads of bytes the copy lacks download them first; :meth:`prefetch` downloads many ranges in
    few requests. Thread-safe. ``fetched_bytes`` and ``requests`` count this object's downloads.
    """

    def __init__(
        self,
        path: Path,
        record: RangeRecord,
        *,
        client: HttpClient | None = None,
        headers: Mapping[str, str] | Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        super().__init__()
        self.path = path
        self.name = str(path)  # tifffile names the file by it
        self.record = record
        self.coverage = Coverage((a, b) for a, b in record.spans)
        self.size = record.size
        self.gap = min(COALESCE_GAP, max(4096, record.size // 64))
        self.readahead = min(READAHEAD, max(4096, record.size // 256))
        self.fetched_bytes = 0
        self.requests = 0
        self._client = client if client is not None else _client(record)
        self._owns_client = client is None
        if headers is None and record.hub:
            from stcorpus.hub import auth_headers

            headers = auth_headers
        self._headers = headers
        self._fd = os.open(path, os.O_RDWR)
        self._pos = 0
        self._lock = threading.RLock()

    # --- io.RawIOBase --------------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._pos = offset
        elif whence == io.SEEK_CUR:
            self._pos += offset
        elif whence == io.SEEK_END:
            self._pos = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if self._pos < 0:
            raise ValueError(f"negative seek position {self._pos}")
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        start = self._pos
        stop = min(self.size, start + len(view))
        if stop <= start:
            return 0
        with self._lock:
            wanted = self.coverage.missing(start, stop)
            if wanted:
                # A miss reads ahead: the next IFD or tag value usually follows.
                ahead = min(self.size, max(stop, start + self.readahead))
                self._download(coalesce(self.coverage.missing(start, ahead), gap=self.gap))
            data = os.pread(self._fd, stop - start, start)
        if len(data) != stop - start:
            raise FetchError(f"{self.path}: the partial copy is shorter than {self.size} bytes; delete it to restart")
        view[: len(data)] = data
        self._pos = stop
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
            if self._owns_client:
                self._client.close()
        super().close()

    # --- downloads -----------------------------------------------------------------------------

    def prefetch(self, spans: Iterable[Span], *, gap: int | None = None) -> int:
        """Download the parts of ``spans`` the copy lacks, merged into few requests; returns the bytes fetched.

        Parts less than ``gap`` bytes apart (default: ``self.gap``) are fetched in one request.
        """
        gap = self.gap if gap is None else gap
        with self._lock:
            missing: list[Span] = []
            for start, stop in coalesce(((max(0, a), min(self.size, b)) for a, b in spans), gap=0):
                missing.extend(self.coverage.missing(start, stop))
            before = self.fetched_bytes
            self._download(coalesce(missing, gap=gap), gap=gap)
            return self.fetched_bytes - before

    def _download(self, spans: list[Span], *, gap: int | None = None) -> None:
        if not spans:
            return
        # One download into the copy at a time across processes (a prefetch in the build process and
        # the slide's unit in a worker): the second finds in the record what the first fetched.
        with file_lock(self.path.with_name(self.path.name + LOCK_SUFFIX), what=f"range reads of {self.path.name}"):
            held_before = self.coverage.total
            self._refresh()
            if self.coverage.total != held_before:  # another process fetched some: only what is still missing
                missing = (part for a, b in spans for part in self.coverage.missing(a, b))
                spans = coalesce(missing, gap=self.gap if gap is None else gap)
            if not spans:
                return
            what = f"{redact_url(self.record.get_url)} (range read of {self.record.url})"
            try:
                for start, stop in spans:
                    self._download_one(start, stop, what=what)
            except RemoteError as exc:
                raise _fetch_error(exc) from None
            finally:
                os.fsync(self._fd)  # bytes on disk before the record says they are held
                self.record.spans = [[a, b] for a, b in self.coverage.spans]
                write_record(self.path, self.record)

    def _refresh(self) -> None:
        """Add what another process's downloads put in the copy since this one read its record."""
        disk = read_record(self.path)
        if disk is not None and disk.same_file(self.record):
            for start, stop in disk.spans:
                self.coverage.add(start, stop)

    def _download_one(self, start: int, stop: int, *, what: str) -> None:
        stream = self._client.open_range(
            self.record.get_url, start, stop, size=self.size, headers=self._headers, what=what
        )
        position = start
        try:
            while position < stop:
                chunk = stream.read(min(_CHUNK, stop - position))
                if not chunk:
                    raise RemoteError(f"{what}: the body ended at byte {position} of the range {start}-{stop}")
                if position == start:
                    self._check_validator(stream.etag, what=what)
                os.pwrite(self._fd, chunk, position)
                position += len(chunk)
        finally:
            stream.close()
            self.requests += 1
            self.record.requests += 1
            self.fetched_bytes += position - start
            self.record.fetched_bytes += position - start
            self.coverage.add(start, position)

    def _check_validator(self, etag: str | None, *, what: str) -> None:
        expected = self.record.validator
        if expected is not None and etag is not None and etag != expected:
            raise RemoteChangedError(
                f"{what}: the file changed on the server (ETag {etag}, the copy began at {expected}); "
                "build again to start the copy over"
            )


def open_partial(path: Path) -> PartialFile | None:
    """The :class:`PartialFile` of ``path`` when it is a partial copy (it has a record), else None."""
    record = read_record(path)
    if record is None:
        return None
    return PartialFile(path, record)


def _client(record: RangeRecord) -> HttpClient:
    known = {name: record.policy[name] for name in RetryPolicy.__dataclass_fields__ if name in record.policy}
    policy = RetryPolicy(**known)  # type: ignore[arg-type]  # JSON numbers of the same fields
    limit: Any = PerHostLimit(record.per_host)
    if record.host_cap is not None and record.cap_root is not None:
        from stcorpus.curate.fetch.hostcap import SharedHostLimit

        limit = SharedHostLimit(limit, root=Path(record.cap_root), cap=record.host_cap)
    return HttpClient(policy, limit=limit, pool_size=record.per_host)


def _fetch_error(exc: RemoteError) -> FetchError:
    from stcorpus.curate.fetch.http import fetch_error

    return fetch_error(exc)


__all__ = [
    "COALESCE_GAP",
    "READAHEAD",
    "Coverage",
    "PartialFile",
    "RangeRecord",
    "coalesce",
    "copy_path",
    "evict_copy",
    "open_partial",
    "read_record",
    "start_copy",
    "write_record",
]
