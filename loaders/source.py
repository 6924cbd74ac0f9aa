"""Where a corpus lives: a local folder, an ``http(s)://`` base URL, or ``hf://datasets/<org>/<name>``.

A ``Source`` answers two kinds of reads, both by path relative to the corpus root:

- ``read_bytes(path)``: a whole small file (``corpus.json``, ``shards.parquet``, ...).
- ``open_range(path, start, stop, size=...)``: a sequential stream of bytes ``[start, stop)``.
  Over HTTP this is one GET (``Range`` when not the whole file); a dropped connection is
  resumed with ``Range: bytes=<pos>-`` (the retry counts against ``http.retries``); 429/503
  are waited out with their ``Retry-After``; a body shorter than the size ``shards.parquet``
  recorded is an error (``ShardError``), never a silently short shard.

``hf://datasets/<org>/<name>[@<revision>]`` resolves every file with ``huggingface_hub.hf_hub_url``
against ``HF_ENDPOINT`` read at call time (so a test or a mirror can set it late), with the
headers of ``huggingface_hub.utils.build_hf_headers()`` (token from ``HF_TOKEN`` or the login
cache). Tokens are never logged or put into error messages; the Hub's redirect to its CDN is
followed by ``requests``, which drops the Authorization header on the way to another host.

Every remote GET is counted per path (``request_counts``), for the request budget (see
``stcorpus.loaders.dataset``): the Hub allows about 5,000 resolver requests per 5 minutes per account.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from stcorpus.loaders.errors import CorpusError, RemoteAuthError, RemoteError, ShardError
from stcorpus.loaders.settings import HttpSettings

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)

HF_PREFIX: Final = "hf://datasets/"
DEFAULT_ENDPOINT: Final = "https://huggingface.co"
RETRY_STATUS: Final = frozenset({408, 425, 429, 500, 502, 503, 504})


class Stream(Protocol):
    """A sequential binary stream (what shard readers consume)."""

    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class Source(Protocol):
    """Read access to the files of one corpus."""

    location: str
    remote: bool

    def read_bytes(self, path: str) -> bytes:
        """The whole file ``path``."""
        ...

    def open_range(self, path: str, start: int = 0, stop: int | None = None, *, size: int | None = None) -> Stream:
        """A stream of bytes ``[start, stop)`` of ``path`` (``stop=None``: to the end)."""
        ...

    def local_path(self, path: str) -> Path | None:
        """The file on local disk, or None for a remote source."""
        ...


def open_source(location: str | os.PathLike[str], *, http: HttpSettings | None = None) -> Source:
    """The ``Source`` for a local folder, an ``http(s)://`` URL or ``hf://datasets/<org>/<name>[@rev]``."""
    http = http or HttpSettings()
    text = os.fspath(location)
    if text.startswith(("http://", "https://")):
        return HttpSource(text, http=http)
    if text.startswith("hf://"):
        return HubSource(text, http=http)
    if "://" in text:
        raise CorpusError(
            f"unsupported corpus location {text!r}: use a folder, http(s)://... or hf://datasets/<org>/<name>"
        )
    root = Path(text)
    if not root.is_dir():
        raise CorpusError(f"corpus folder {root} does not exist (or is not a folder)")
    return LocalSource(root)


class LocalSource:
    """A corpus in a local folder."""

    remote = False

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def __repr__(self) -> str:
        return f"LocalSource({self.location!r})"

    def local_path(self, path: str) -> Path:
        """The file on disk."""
        return self.root / path

    def read_bytes(self, path: str) -> bytes:
        """The whole file ``path``."""
        try:
            return (self.root / path).read_bytes()
        except FileNotFoundError as exc:
            raise CorpusError(f"{self.root / path} is missing: is {self.root} a built corpus?") from exc

    def open_range(self, path: str, start: int = 0, stop: int | None = None, *, size: int | None = None) -> Stream:
        """The file opened for reading at ``start`` (``stop`` and ``size`` are checked by the readers)."""
        handle = (self.root / path).open("rb", buffering=1 << 20)
        if start:
            handle.seek(start)
        return handle


class HttpSource:
    """A corpus served over HTTP(S) under a base URL (``<base>/<path>``)."""

    remote = True

    def __init__(self, base_url: str, *, http: HttpSettings) -> None:
        self.location = base_url
        self.base = base_url.rstrip("/") + "/"
        self.http = http
        self.request_counts: Counter[str] = Counter()
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Sessions and counters stay in their process: a DataLoader worker opens its own.
        state = dict(self.__dict__)
        state.pop("_local")
        state["request_counts"] = Counter()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def local_path(self, path: str) -> None:
        """None: the files are remote."""
        return None

    def url(self, path: str) -> str:
        """URL of ``path``."""
        return self.base + path

    def headers(self) -> dict[str, str]:
        """Request headers (identity encoding: byte offsets must be file offsets for Range resumes)."""
        return {"Accept-Encoding": "identity"}

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        # A forked DataLoader worker must not reuse the parent's pooled sockets.
        if session is None or getattr(self._local, "pid", None) != os.getpid():
            import requests

            session = requests.Session()
            self._local.session = session
            self._local.pid = os.getpid()
        return session

    def _get(
        self, path: str, *, start: int, stop: int | None, stream: bool, if_range: str | None = None
    ) -> requests.Response:
        """One GET with retries for refused/failed connections and 408/429/5xx (Retry-After honoured)."""
        import requests

        headers = self.headers()
        if if_range is not None:
            headers["If-Range"] = if_range
        if start or stop is not None:
            headers["Range"] = f"bytes={start}-{'' if stop is None else stop - 1}"
        url = self.url(path)
        attempt = 0
        while True:
            self.request_counts[path] += 1
            try:
                response = self._session().get(url, headers=headers, stream=stream, timeout=self.http.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as exc:
                attempt = self._retry_or_raise(path, attempt, f"{type(exc).__name__}", None)
                continue
            status = response.status_code
            if status in (200, 206):
                return response
            response.close()
            if status in (401, 403):
                raise RemoteAuthError(
                    f"{self._public(url)} answered {status}: the dataset is gated or private; "
                    "log in (huggingface-cli login) or set HF_TOKEN, and accept its terms on the Hub"
                )
            if status == 404:
                raise CorpusError(f"{self._public(url)} answered 404: is {self.location} a built corpus?")
            if status == 416:
                raise ShardError(
                    f"{self._public(url)} answered 416 for bytes {start}-{stop}: the file is shorter than recorded"
                )
            if status not in RETRY_STATUS:
                raise RemoteError(f"{self._public(url)} answered {status}")
            attempt = self._retry_or_raise(path, attempt, f"HTTP {status}", response.headers.get("Retry-After"))

    def _retry_or_raise(self, path: str, attempt: int, what: str, retry_after: str | None) -> int:
        if attempt >= self.http.retries:
            raise RemoteError(f"{self._public(self.url(path))}: {what}, still failing after {attempt} retries")
        wait = min(self.http.backoff_s * 2**attempt, self.http.max_backoff_s)
        if retry_after is not None:
            try:
                wait = min(max(float(retry_after), 0.0), self.http.max_backoff_s)
            except ValueError:
                log.debug("ignoring a Retry-After that is not a number of seconds: %r", retry_after)
        log.warning("%s: %s; retry %d/%d in %.1f s", path, what, attempt + 1, self.http.retries, wait)
        time.sleep(wait)
        return attempt + 1

    @staticmethod
    def _public(url: str) -> str:
        return url.split("?", 1)[0]

    def read_bytes(self, path: str) -> bytes:
        """The whole file ``path`` (streamed, resumed on a dropped connection)."""
        stream = self.open_range(path)
        try:
            return stream.read()
        finally:
            stream.close()

    def open_range(self, path: str, start: int = 0, stop: int | None = None, *, size: int | None = None) -> Stream:
        """Bytes ``[start, stop)`` of ``path`` as one streaming GET, resumed with Range on failure."""
        return HttpStream(self, path, start=start, stop=stop, size=size)


class HubSource(HttpSource):
    """A corpus in a Hugging Face dataset repository: ``hf://datasets/<org>/<name>[@<revision>]``."""

    def __init__(self, location: str, *, http: HttpSettings) -> None:
        if not location.startswith(HF_PREFIX):
            raise CorpusError(f"{location!r}: Hub corpora are addressed as hf://datasets/<org>/<name>[@<revision>]")
        repo, _, revision = location[len(HF_PREFIX) :].strip("/").partition("@")
        if repo.count("/") != 1:
            raise CorpusError(f"{location!r}: expected hf://datasets/<org>/<name>, got repo {repo!r}")
        self.repo_id = repo
        self.revision = revision or "main"
        super().__init__(location, http=http)

    def url(self, path: str) -> str:
        """The resolve URL of ``path``, against ``HF_ENDPOINT`` as it is now."""
        from huggingface_hub import hf_hub_url

        endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
        return hf_hub_url(
            self.repo_id, path, repo_type="dataset", revision=self.revision, endpoint=endpoint.rstrip("/")
        )

    def headers(self) -> dict[str, str]:
        """Hub headers (token, user agent) built at call time, plus identity encoding."""
        from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

        headers = build_hf_headers(library_name="stcorpus")
        headers["Accept-Encoding"] = "identity"
        return headers


_RESUMABLE: tuple[type[BaseException], ...] | None = None


def _resumable_errors() -> tuple[type[BaseException], ...]:
    global _RESUMABLE  # noqa: PLW0603 - computed once, after requests is imported on first use
    if _RESUMABLE is None:
        import requests
        import urllib3.exceptions

        _RESUMABLE = (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.ProtocolError,
            urllib3.exceptions.ReadTimeoutError,
            ConnectionError,
            TimeoutError,
        )
    return _RESUMABLE


class HttpStream:
    """Bytes ``[start, stop)`` of one remote file, read from one GET, resumed with Range after a drop."""

    def __init__(self, source: HttpSource, path: str, *, start: int, stop: int | None, size: int | None) -> None:
        self.source, self.path = source, path
        self.pos, self.stop = start, stop
        if stop is None and size is not None:
            self.stop = size
        self.start = start
        self.resumes = 0
        self.etag: str | None = None
        self._response: requests.Response | None = None
        self._closed = False

    def _open(self) -> None:
        resuming = self.pos > self.start
        if_range = self.etag if resuming else None
        response = self.source._get(self.path, start=self.pos, stop=self.stop, stream=True, if_range=if_range)
        if not resuming:
            etag = response.headers.get("ETag")
            self.etag = etag if etag and not etag.startswith("W/") else None
        if response.status_code == 200 and self.pos:
            if if_range is not None:
                response.close()
                raise ShardError(
                    f"{self.path} changed on the server while it was being read (ETag {self.etag} no longer "
                    "matches): the corpus is being replaced; restart from a consistent revision"
                )
            # The server ignored Range: read past what we already have (costly, but correct).
            log.warning("%s: server ignored a Range request; skipping %d bytes", self.path, self.pos)
            _discard(response.raw, self.pos, self.path)
        self._response = response

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes (all that is left for ``n < 0``); ``b""`` at the end of the range."""
        if n < 0:
            parts = []
            while chunk := self.read(1 << 20):
                parts.append(chunk)
            return b"".join(parts)
        if self.stop is not None:
            n = min(n, self.stop - self.pos)
        if n <= 0 or self._closed:
            return b""
        while True:
            if self._response is None:
                self._open()
            assert self._response is not None
            try:
                data: bytes = self._response.raw.read(n, decode_content=False)
            except _resumable_errors() as exc:
                self._drop(f"connection dropped at byte {self.pos} ({type(exc).__name__})")
                continue
            if data:
                self.pos += len(data)
                return data
            if self.stop is None or self.pos >= self.stop:
                return b""
            # The body ended early without an error from the transport: the file is shorter than
            # recorded, or the connection was closed cleanly mid-body. One resume tells which.
            self._drop(f"body ended at byte {self.pos} of {self.stop}")

    def _drop(self, why: str) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None
        self.resumes += 1
        if self.resumes > self.source.http.retries:
            raise ShardError(f"{self.path}: {why}; gave up after {self.source.http.retries} resumes")
        log.warning("%s: %s; resuming with Range (%d/%d)", self.path, why, self.resumes, self.source.http.retries)
        time.sleep(min(self.source.http.backoff_s * 2 ** (self.resumes - 1), self.source.http.max_backoff_s) / 10)

    def close(self) -> None:
        """Close the connection (the rest of the body is not downloaded)."""
        self._closed = True
        if self._response is not None:
            self._response.close()
            self._response = None


def _discard(raw: Any, n: int, path: str) -> None:
    while n > 0:
        chunk = raw.read(min(n, 1 << 20))
        if not chunk:
            raise ShardError(f"{path}: body ended while skipping bytes the server should have left out (ignored Range)")
        n -= len(chunk)


# ---------------------------------------------------------------------------------------------
# Read-ahead
# ---------------------------------------------------------------------------------------------

_END: Final = object()


class Readahead:
    """Opens a known sequence of remote streams in a background thread, ahead of the consumer.

    ``jobs`` is the ordered list of ``(name, open_fn)``; ``open_fn()`` returns ``(info, stream)``.
    The thread opens job ``i``, puts ``info`` and then the stream's chunks into a bounded queue
    (at most ``max_bytes`` ahead), then opens job ``i + 1`` while the consumer is still parsing
    job ``i`` — so the next shard's request and first bytes are in flight before they are
    needed. ``take(i)`` returns job ``i``'s info and a stream over its chunks; closing it early
    tells the thread to abandon the rest of that job.
    """

    def __init__(
        self, jobs: list[tuple[str, Callable[[], tuple[Any, Stream]]]], *, max_bytes: int, chunk_bytes: int
    ) -> None:
        import queue

        self.jobs = jobs
        self.chunk_bytes = chunk_bytes
        self.queue: queue.Queue[tuple[int, Any]] = queue.Queue(maxsize=max(2, max_bytes // chunk_bytes))
        self._abandon = -1  # jobs up to this index are no longer wanted
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stcorpus-readahead", daemon=True)
        self._thread.start()

    def _put(self, item: tuple[int, Any]) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        for i, (_name, open_fn) in enumerate(self.jobs):
            if self._stop.is_set():
                return
            try:
                info, stream = open_fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who raises it
                self._put((i, exc))
                continue
            try:
                if not self._put((i, ("info", info))):
                    return
                while i > self._abandon and not self._stop.is_set():
                    chunk = stream.read(self.chunk_bytes)
                    if not chunk:
                        break
                    if not self._put((i, chunk)):
                        return
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who raises it
                self._put((i, exc))
                continue
            finally:
                stream.close()
            self._put((i, _END))

    def take(self, i: int) -> tuple[Any, QueueStream]:
        """Info and stream of job ``i``; earlier jobs are abandoned."""
        self._abandon = i - 1
        while True:
            j, item = self.queue.get()
            if j < i:
                continue  # leftovers of a job the consumer closed early
            if j > i:
                raise RuntimeError(f"read-ahead out of order: wanted job {i}, got {j}")
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, tuple) and item[0] == "info"
            return item[1], QueueStream(self, i)

    def close(self) -> None:
        """Stop the thread and drop what it fetched."""
        self._stop.set()
        self._thread.join(timeout=5)


class QueueStream:
    """The bytes of one read-ahead job, consumed from the queue."""

    def __init__(self, readahead: Readahead, index: int) -> None:
        self.readahead, self.index = readahead, index
        self._buffer = b""
        self._offset = 0
        self._done = False

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes (everything left for ``n < 0``)."""
        if n < 0:
            parts = [self._buffer[self._offset :]]
            self._buffer, self._offset = b"", 0
            while (chunk := self._next()) is not None:
                parts.append(chunk)
            return b"".join(parts)
        if self._offset >= len(self._buffer):
            chunk = self._next()
            if chunk is None:
                return b""
            self._buffer, self._offset = chunk, 0
        out = self._buffer[self._offset : self._offset + n]
        self._offset += len(out)
        return out

    def _next(self) -> bytes | None:
        if self._done:
            return None
        j, item = self.readahead.queue.get()
        assert j == self.index, f"read-ahead out of order: job {j} while reading {self.index}"
        if item is _END:
            self._done = True
            return None
        if isinstance(item, BaseException):
            self._done = True
            raise item
        assert isinstance(item, bytes)
        return item

    def close(self) -> None:
        """Abandon the rest of this job."""
        if not self._done:
            self.readahead._abandon = max(self.readahead._abandon, self.index)
            self._done = True
