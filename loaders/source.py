"""Where a corpus lives: a folder, ``file://``, ``http(s)://``, ``hf://datasets/<org>/<name>``, or any fsspec store.

A ``Source`` answers two kinds of reads, both by path relative to the corpus root:

- ``read_bytes(path)``: a whole small file (``corpus.json``, ``shards.parquet``, ...).
- ``open_range(path, start, stop, size=...)``: a sequential stream of bytes ``[start, stop)``.

Which source a location gets:

- a folder or ``file://...``: :class:`LocalSource` (files opened in place, seekable);
- ``http(s)://<base>``: :class:`HttpSource`, on the one HTTP client of :mod:`stcorpus.http`.
  A range is one GET (``Range`` when not the whole file); a dropped connection is resumed with
  ``Range: bytes=<pos>-`` (counted against ``http.retries``); 408/429/5xx are retried and their
  ``Retry-After`` waited out; a body shorter than ``shards.parquet`` recorded is a ``ShardError``;
- ``hf://datasets/<org>/<name>[@<revision>][/<folder>]``: :class:`HubSource`, the same client on
  the resolve URLs of :mod:`stcorpus.hub` (``HF_ENDPOINT`` read at call time, the token of
  ``HF_TOKEN`` or ``hf auth login``, sent to the Hub's origin only, never to its CDN);
- any other fsspec URL (``s3://``, ``gs://``, ``az://``/``abfs://``, ``memory://``, ...):
  :class:`FsspecSource`. Credentials come from the store's own usual configuration (for S3:
  ``AWS_*`` variables, ``~/.aws``, instance roles; ``AWS_ENDPOINT_URL`` for an S3-compatible
  server; for GCS: application-default credentials; for Azure: ``AZURE_STORAGE_*``), or from
  ``storage_options`` given in Python; they are never stored in settings, logs or states. A
  range of an S3 object is one streamed GET (resumed on a drop); other stores read a range in
  blocks of ``http.block_mb`` MiB, one request per block.

Tokens and credentials are never logged or put into error messages; URLs in messages go
through :func:`stcorpus.http.redact_url`. A missing file is :class:`MissingFileError` (a
``CorpusError`` and a ``FileNotFoundError``); the shard reader sees missing, short and corrupt
shards as ``ShardError`` (``stcorpus.loaders.shard_cache.ShardSource``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import unquote, urlsplit

from stcorpus.errors import HubUrlError
from stcorpus.errors import RemoteAuthError as BaseAuthError
from stcorpus.errors import RemoteChangedError as BaseChangedError
from stcorpus.errors import RemoteError as BaseRemoteError
from stcorpus.errors import RemoteNotFoundError as BaseNotFoundError
from stcorpus.errors import RemoteTruncatedError as BaseTruncatedError
from stcorpus.loaders.errors import CorpusError, MissingFileError, RemoteAuthError, RemoteError, ShardError
from stcorpus.loaders.settings import HttpSettings

if TYPE_CHECKING:
    from stcorpus.http import HttpClient, RangeStream

log = logging.getLogger(__name__)

#: Schemes read through the HTTP client rather than fsspec.
HTTP_SCHEMES: Final = ("http", "https")


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


def open_source(
    location: str | os.PathLike[str],
    *,
    http: HttpSettings | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Source:
    """The ``Source`` for ``location``: a folder, ``file://``, ``http(s)://``, ``hf://datasets/...`` or an fsspec URL.

    ``storage_options`` go to the fsspec filesystem of an fsspec URL (credentials, an endpoint);
    leave them out to use the store's own configuration.
    """
    http = http or HttpSettings()
    text = os.fspath(location)
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    if scheme in HTTP_SCHEMES:
        return HttpSource(text, http=http)
    if scheme == "hf":
        return HubSource(text, http=http)
    if scheme == "file":
        return LocalSource(_local_folder(Path(unquote(urlsplit(text).path)), text))
    if scheme:
        return FsspecSource(text, http=http, storage_options=storage_options)
    return LocalSource(_local_folder(Path(text), text))


def _local_folder(root: Path, location: str) -> Path:
    if not root.is_dir():
        raise CorpusError(f"corpus folder {location} does not exist (or is not a folder)")
    return root


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
            raise MissingFileError(f"{self.root / path} is missing: is {self.root} a built corpus?") from exc

    def open_range(self, path: str, start: int = 0, stop: int | None = None, *, size: int | None = None) -> Stream:
        """The file opened for reading at ``start`` (``stop`` and ``size`` are checked by the readers)."""
        try:
            handle = (self.root / path).open("rb", buffering=1 << 20)
        except FileNotFoundError as exc:
            raise MissingFileError(f"{self.root / path} is missing: is {self.root} a built corpus?") from exc
        if start:
            handle.seek(start)
        return handle


# ---------------------------------------------------------------------------------------------
# HTTP(S) and the Hub, on the one client
# ---------------------------------------------------------------------------------------------


def client_for(http: HttpSettings) -> HttpClient:
    """The shared HTTP client with the loader's retries and timeouts."""
    from stcorpus.http import HttpClient, RetryPolicy

    policy = RetryPolicy(
        retries=http.retries,
        backoff_base=http.backoff_s,
        backoff_max=http.max_backoff_s,
        retry_after_max=http.max_backoff_s,
        connect_timeout=http.timeout_s,
        read_timeout=http.timeout_s,
    )
    return HttpClient(policy)


class HttpSource:
    """A corpus served over HTTP(S) under a base URL (``<base>/<path>``)."""

    remote = True

    def __init__(self, base_url: str, *, http: HttpSettings, client: HttpClient | None = None) -> None:
        self.location = base_url
        self.base = base_url.rstrip("/") + "/"
        self.http = http
        self.client = client if client is not None else client_for(http)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"

    def local_path(self, path: str) -> None:
        """None: the files are remote."""
        return None

    def url(self, path: str) -> str:
        """URL of ``path``."""
        return self.base + path

    def headers(self) -> dict[str, str]:
        """Request headers beyond the client's own (none for plain HTTP)."""
        return {}

    def access_hint(self) -> str:
        """What to do about a 401/403."""
        return "check that you may read this URL (credentials in the URL or a proxy are not sent for you)"

    def public(self, path: str) -> str:
        """The URL of ``path`` fit for messages (no query string, no credentials)."""
        from stcorpus.http import redact_url

        return redact_url(self.url(path)).split("?", 1)[0]

    def translate(self, exc: BaseRemoteError, path: str) -> Exception:
        """The loader's error for an error of the HTTP client about ``path``."""
        where = self.public(path)
        if isinstance(exc, BaseAuthError):
            return RemoteAuthError(
                f"{where} answered {exc.status}: the dataset is gated or private; {self.access_hint()}",
                status=exc.status,
            )
        if isinstance(exc, BaseNotFoundError):
            return MissingFileError(f"{where} answered {exc.status}: is {self.location} a built corpus?")
        if isinstance(exc, (BaseTruncatedError, BaseChangedError)):
            return ShardError(str(exc))
        return RemoteError(f"{where}: {exc}", status=exc.status)

    def read_bytes(self, path: str) -> bytes:
        """The whole file ``path`` (streamed, resumed on a dropped connection)."""
        stream = self.open_range(path)
        try:
            return stream.read()
        finally:
            stream.close()

    def open_range(self, path: str, start: int = 0, stop: int | None = None, *, size: int | None = None) -> Stream:
        """Bytes ``[start, stop)`` of ``path`` as one streaming GET, resumed with Range on failure."""
        inner = self.client.open_range(self.url(path), start, stop, size=size, headers=self.headers, what=path)
        return _Translating(inner, self, path)


class HubSource(HttpSource):
    """A corpus in a Hugging Face dataset repository: ``hf://datasets/<org>/<name>[@<revision>][/<folder>]``."""

    def __init__(self, location: str, *, http: HttpSettings, client: HttpClient | None = None) -> None:
        from stcorpus.hub import parse_hf

        try:
            self.root = parse_hf(location, file=False)
        except HubUrlError as exc:
            raise CorpusError(str(exc)) from None
        self.repo_id = self.root.repo_id
        self.revision = self.root.revision
        super().__init__(location, http=http, client=client)

    def url(self, path: str) -> str:
        """The resolve URL of ``path``, against ``HF_ENDPOINT`` as it is now."""
        from stcorpus.hub import resolve_url

        return resolve_url(self.root.child(path))

    def headers(self) -> dict[str, str]:
        """Hub headers (token, user agent), built at call time."""
        from stcorpus.hub import auth_headers

        return auth_headers()

    def access_hint(self) -> str:
        """Log in, or accept the dataset's terms."""
        from stcorpus.hub import access_hint, auth_headers, token_of

        return access_hint(self.root, logged_in=token_of(auth_headers()) is not None)


class _Translating:
    """A client stream whose errors are the loader's (the first read sends the request)."""

    def __init__(self, inner: RangeStream, source: HttpSource, path: str) -> None:
        self.inner, self.source, self.path = inner, source, path

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes of the range."""
        try:
            return self.inner.read(n)
        except BaseRemoteError as exc:
            raise self.source.translate(exc, self.path) from exc

    def close(self) -> None:
        """Close the connection."""
        self.inner.close()


# ---------------------------------------------------------------------------------------------
# fsspec stores
# ---------------------------------------------------------------------------------------------


class FsspecSource:
    """A corpus in any fsspec store (``s3://bucket/corpus``, ``gs://...``, ``az://...``, ``memory://...``).

    The filesystem is made with ``fsspec.core.url_to_fs(location, **storage_options)``, so the
    store's own configuration applies. A range of an S3 object (s3fs) is one streamed GET; other
    stores read it with ``cat_file`` in blocks of ``http.block_mb`` MiB. Each process (a DataLoader
    worker, forked or spawned) makes its own filesystem from the URL and ``storage_options``.
    """

    remote = True

    def __init__(self, location: str, *, http: HttpSettings, storage_options: Mapping[str, Any] | None = None) -> None:
        from stcorpus.http import redact_url

        self.location = redact_url(location)
        self.http = http
        self._url = location
        self._options = dict(storage_options or {})  # in memory only: may hold credentials
        self._fs: Any = None
        self._pid = -1
        fs = self.fs
        self.root = str(fs._strip_protocol(location)).rstrip("/")
        protocol = fs.protocol
        self.protocols = tuple(protocol) if isinstance(protocol, (tuple, list)) else (protocol,)

    @property
    def fs(self) -> Any:
        """The filesystem, made again in a new process (fsspec's async filesystems are not fork-safe)."""
        if self._fs is None or self._pid != os.getpid():
            from fsspec.core import url_to_fs

            try:
                self._fs, _ = url_to_fs(self._url, **self._options)
            except ImportError as exc:
                scheme = urlsplit(self._url).scheme
                raise CorpusError(
                    f"{self.location}: no fsspec filesystem for {scheme}:// is installed ({exc}); install its "
                    "backend (s3fs for s3://, gcsfs for gs://, adlfs for az:// and abfs://)"
                ) from exc
            except ValueError as exc:
                raise CorpusError(f"{self.location}: not a location fsspec can open ({exc})") from exc
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fs"], state["_pid"] = None, -1  # a DataLoader worker makes its own
        return state

    def __repr__(self) -> str:
        return f"FsspecSource({self.location!r})"

    def local_path(self, path: str) -> None:
        """None: read through the store."""
        return None

    def full(self, path: str) -> str:
        """The store path of ``path``."""
        return f"{self.root}/{path}"

    def translate(self, exc: OSError, path: str) -> Exception:
        """The loader's error for a store error about ``path``."""
        where = f"{self.location.rstrip('/')}/{path}"
        if isinstance(exc, FileNotFoundError):
            return MissingFileError(f"{where} is missing: is {self.location} a built corpus?")
        if isinstance(exc, PermissionError):
            return RemoteAuthError(
                f"{where}: access denied ({exc}); check the store's credentials (its usual configuration, e.g. "
                "AWS_PROFILE / AWS_ACCESS_KEY_ID for s3://, application-default credentials for gs://)"
            )
        return RemoteError(f"{where}: {type(exc).__name__}: {exc}")

    def read_bytes(self, path: str) -> bytes:
        """The whole file ``path``."""
        try:
            data: bytes = self.fs.cat_file(self.full(path))
        except OSError as exc:
            raise self.translate(exc, path) from exc
        return data

    def open_range(self, path: str, start: int = 0, stop: int | None = None, *, size: int | None = None) -> Stream:
        """Bytes ``[start, stop)`` of ``path``: one streamed GET on S3, blocks elsewhere."""
        end = size if stop is None else stop
        try:
            if end is None:
                end = int(self.fs.size(self.full(path)))
            if "s3" in self.protocols and hasattr(self.fs, "_call_s3"):
                return _S3Range(self, path, start, end)
        except OSError as exc:
            raise self.translate(exc, path) from exc
        return _BlockRange(self, path, start, end)


class _BlockRange:
    """``[start, stop)`` of a store file, fetched ``http.block_mb`` MiB per request."""

    def __init__(self, source: FsspecSource, path: str, start: int, stop: int) -> None:
        self.source, self.path = source, path
        self.pos, self.stop = start, stop
        self.block = max(1, source.http.block_mb) << 20
        self._buffer = memoryview(b"")

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes (all that is left for ``n < 0``)."""
        if n < 0:
            n = self.stop - self.pos + len(self._buffer)
        if not self._buffer and self.pos < self.stop:
            end = min(self.stop, self.pos + max(self.block, n))
            try:
                data = self.source.fs.cat_file(self.source.full(self.path), start=self.pos, end=end)
            except OSError as exc:
                raise self.source.translate(exc, self.path) from exc
            if len(data) != end - self.pos:
                raise ShardError(
                    f"{self.path}: asked the store for bytes {self.pos}-{end} and got {len(data)}: the file is "
                    "shorter than recorded"
                )
            self.pos = end
            self._buffer = memoryview(data)
        out = bytes(self._buffer[:n])
        self._buffer = self._buffer[len(out) :]
        return out

    def close(self) -> None:
        """Drop the buffer."""
        self._buffer = memoryview(b"")


def _s3_transport_errors() -> tuple[type[BaseException], ...]:
    """What a dropped or stalled S3 body raises: OS and timeout errors, aiohttp's and botocore's own."""
    import asyncio

    found: list[type[BaseException]] = [OSError, TimeoutError, asyncio.TimeoutError]
    try:
        import aiohttp

        found.append(aiohttp.ClientError)
    except ImportError:  # s3fs without aiohttp cannot exist, but keep the loader importable
        pass
    try:
        import botocore.exceptions

        found.append(botocore.exceptions.BotoCoreError)
    except ImportError:
        pass
    return tuple(found)


class _S3Range:
    """``[start, stop)`` of an S3 object as one streamed ``GetObject`` (with Range), resumed after a drop."""

    def __init__(self, source: FsspecSource, path: str, start: int, stop: int) -> None:
        self.source, self.path = source, path
        self.pos, self.stop = start, stop
        self.resumes = 0
        self._body: Any = None
        self._etag: str | None = None

    def _open(self) -> None:
        from fsspec.asyn import sync

        fs = self.source.fs
        bucket, key, version = fs.split_path(self.source.full(self.path))
        request: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={self.pos}-{self.stop - 1}"}
        if version:
            request["VersionId"] = version
        if self._etag is not None:
            request["IfMatch"] = self._etag  # a resume must read the same object
        answer = sync(fs.loop, fs._call_s3, "get_object", **request)
        self._etag = self._etag or answer.get("ETag")
        self._body = answer["Body"]

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes (all that is left for ``n < 0``)."""
        from fsspec.asyn import sync

        if n < 0:
            n = self.stop - self.pos
        n = min(n, self.stop - self.pos)
        if n <= 0:
            return b""
        while True:
            try:
                if self._body is None:
                    self._open()
                data: bytes = sync(self.source.fs.loop, self._body.read, n)
            except (FileNotFoundError, PermissionError) as exc:
                raise self.source.translate(exc, self.path) from exc
            except _s3_transport_errors() as exc:
                self._drop(f"{type(exc).__name__}: {exc}")
                continue
            if data:
                self.pos += len(data)
                return data
            self._drop(f"body ended at byte {self.pos} of {self.stop}")

    def _drop(self, why: str) -> None:
        self.close()
        self.resumes += 1
        if self.resumes > self.source.http.retries:
            raise ShardError(f"{self.path}: {why}; gave up after {self.source.http.retries} resumes")
        log.warning(
            "%s: %s; resuming at byte %d (%d/%d)", self.path, why, self.pos, self.resumes, self.source.http.retries
        )

    def close(self) -> None:
        """Close the body (the rest is not downloaded)."""
        if self._body is not None:
            self._body.close()
            self._body = None


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
