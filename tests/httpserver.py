"""A real HTTP server on 127.0.0.1 for tests, with Range support, request logs and faults.

It serves a folder, answers ``Range`` requests with ``206`` + ``Content-Range`` (and honours
``If-Range``), records every request (method, path, headers, host, arrival time) and can misbehave on
purpose, per path, for the first K requests:

- ``Fault(drop_after=N)``: send the headers and N bytes of the body, then drop the connection;
- ``Fault(status=429, retry_after="1")``: answer 429/503/500 (with ``Retry-After``);
- ``Fault(body=b"...")``: serve other bytes than the file's (corruption in transit);
- ``Fault(content_length=N)``: announce N bytes, send fewer, close (a short body);
- ``Fault(ignore_range=True)``: answer a Range request with 200 and the whole file;
- ``Fault(delay=0.2)``: wait before answering (with ``max_in_flight`` to check concurrency limits).

``LocalServer.rate`` (bytes per second per connection, ``None``: no limit) throttles file bodies
like a remote store's link; ``bytes_sent`` counts the body bytes sent (benchmarks of caches).

A Hub stand-in answers ``/datasets/<org>/<name>/resolve/<revision>/<path>`` (and model repos,
``/<org>/<name>/resolve/...``) like
huggingface.co: HEAD/GET with ``ETag``, ``X-Linked-Etag`` (sha256), ``X-Linked-Size`` and
``X-Repo-Commit``, optionally ``401``/``403`` for a gated repository, optionally a ``302`` to a
"CDN" route ``/cdn/<sha256>`` addressed through ``localhost`` (another origin than
``127.0.0.1``, so clients must drop ``Authorization`` on the way).

Use the ``http_server`` fixture (register it with ``pytest_plugins = ["tests.httpserver"]`` in
a conftest, or import it), or ``with serve(folder) as server:``.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pytest

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
# Dataset repos (/datasets/<org>/<name>/...) and model repos (/<org>/<name>/...: model weights).
_RESOLVE = re.compile(r"^/(?:datasets/)?(?P<org>[^/]+)/(?P<name>[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")


@dataclass
class Fault:
    """A way to misbehave, for the first ``times`` matching requests (``None``: all of them)."""

    status: int | None = None
    retry_after: str | None = None
    drop_after: int | None = None
    body: bytes | None = None
    content_length: int | None = None
    ignore_range: bool = False
    delay: float = 0.0
    times: int | None = 1
    methods: tuple[str, ...] = ("GET",)


@dataclass
class HubRepo:
    """A dataset repository of the Hub stand-in, its files in ``folder``."""

    folder: Path
    commit: str = "1234567890abcdef1234567890abcdef12345678"
    #: Gated: requests need ``Authorization: Bearer <token>`` (401 without a token, 403 with another).
    token: str | None = None
    #: LFS/Xet-like files: X-Linked-Etag (sha256) and X-Linked-Size; else an ETag like a git blob id.
    lfs: bool = True
    #: Redirect GET/HEAD of LFS files to the CDN route (through ``localhost``).
    cdn: bool = True
    #: Revisions other than ``main`` and the commit itself (name -> commit).
    revisions: dict[str, str] = field(default_factory=dict)
    #: Lie about a file's sha256 in X-Linked-Etag (path in repo -> digest).
    linked_etag: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """One request as the server saw it."""

    method: str
    path: str  # without the query string
    query: str
    headers: dict[str, str]  # lower-case names
    host: str
    at: float = 0.0  # time.time() when it arrived


class LocalServer:
    """State of a running server; see the module docstring."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[Request] = []
        self.faults: dict[str, list[Fault]] = {}
        self.hub: dict[str, HubRepo] = {}
        self._lock = threading.Lock()
        self._cdn: dict[str, Path] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self.port = 0
        self.in_flight = 0
        #: The most requests the server was answering at once.
        self.max_in_flight = 0
        #: Body bytes per second per connection (None: as fast as the loopback goes).
        self.rate: float | None = None
        #: Body bytes sent so far.
        self.bytes_sent = 0

    # --- addresses -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, through 127.0.0.1."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn_url(self) -> str:
        """Base URL of the CDN route, through ``localhost`` (another origin for clients)."""
        return f"http://localhost:{self.port}"

    def file_url(self, relative: str) -> str:
        """URL of a file under the served folder."""
        return f"{self.url}/{quote(relative)}"

    # --- programming -------------------------------------------------------------------------

    def add_fault(self, path: str, fault: Fault) -> None:
        """Misbehave on requests for ``path`` (the URL path, e.g. ``/data/x.bin``)."""
        with self._lock:
            self.faults.setdefault(path, []).append(fault)

    def add_repo(self, repo_id: str, repo: HubRepo) -> HubRepo:
        """Serve ``repo`` as the dataset ``repo_id`` (``org/name``)."""
        self.hub[repo_id] = repo
        return repo

    # --- inspection --------------------------------------------------------------------------

    def requests_for(self, path: str, *, method: str | None = None) -> list[Request]:
        """Requests for ``path`` (optionally of one method), in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.path == path and (method is None or r.method == method)]

    def count(self, path: str, *, method: str | None = None) -> int:
        """How many requests ``path`` got."""
        return len(self.requests_for(path, method=method))

    # --- internals ---------------------------------------------------------------------------

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _sent(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n

    def _take_fault(self, path: str, method: str) -> Fault | None:
        with self._lock:
            for fault in self.faults.get(path, []):
                if method not in fault.methods or (fault.times is not None and fault.times <= 0):
                    continue
                if fault.times is not None:
                    fault.times -= 1
                return fault
        return None

    def _register_cdn(self, sha256: str, path: Path) -> None:
        with self._lock:
            self._cdn[sha256] = path

    def _cdn_file(self, sha256: str) -> Path | None:
        with self._lock:
            return self._cdn.get(sha256)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\x00" % len(data) + data, usedforsecurity=False).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stcorpus-test/1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    state: LocalServer  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    # --- dispatch ------------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        self.state._enter()
        try:
            self._answer(method)
        finally:
            self.state._leave()

    def _answer(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.state._record(
            Request(
                method=method,
                path=path,
                query=parts.query,
                headers=headers,
                host=headers.get("host", ""),
                at=time.time(),
            )
        )
        fault = self.state._take_fault(path, method)
        if fault is not None and fault.delay:
            time.sleep(fault.delay)
        if fault is not None and fault.status is not None:
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            self._empty(fault.status, extra)
            return
        match = _RESOLVE.match(path)
        if match:
            self._hub(method, match, fault)
        elif path.startswith("/cdn/"):
            file = self.state._cdn_file(path.removeprefix("/cdn/"))
            if file is None:
                self._empty(404)
            else:
                self._file(method, file, fault, etag=f'"{_sha256(file)}"')
        else:
            file = (self.state.root / path.lstrip("/")).resolve()
            root = self.state.root.resolve()
            if root not in file.parents or not file.is_file():
                self._empty(404)
            else:
                self._file(method, file, fault, etag=f'"{_sha256(file)}"')

    def _hub(self, method: str, match: re.Match[str], fault: Fault | None) -> None:
        repo_id = f"{match.group('org')}/{match.group('name')}"
        repo = self.state.hub.get(repo_id)
        if repo is None:
            self._empty(404, {"X-Error-Code": "RepoNotFound"})
            return
        if repo.token is not None:
            auth = self.headers.get("Authorization")
            if auth is None:
                message = f"Access to dataset {repo_id} is restricted. You must have access to it and be authenticated."
                self._empty(401, {"X-Error-Code": "GatedRepo", "X-Error-Message": message})
                return
            if auth != f"Bearer {repo.token}":
                message = f"Access to dataset {repo_id} is restricted and you are not in the authorized list."
                self._empty(403, {"X-Error-Code": "GatedRepo", "X-Error-Message": message})
                return
        revision = unquote(match.group("revision"))
        commit: str | None = repo.revisions.get(revision)
        if revision in ("main", repo.commit) or revision in repo.revisions.values():
            commit = repo.commit if revision == "main" else revision
        if commit is None:
            self._empty(404, {"X-Error-Code": "RevisionNotFound"})
            return
        repo_path = match.group("path")
        file = repo.folder / repo_path
        if not file.is_file():
            self._empty(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
            return
        sha = _sha256(file)
        headers = {"X-Repo-Commit": commit}
        if repo.lfs:
            linked = repo.linked_etag.get(repo_path, sha)
            headers |= {
                "ETag": f'"{linked}"',
                "X-Linked-Etag": f'"{linked}"',
                "X-Linked-Size": str(file.stat().st_size),
            }
            if repo.cdn:
                self.state._register_cdn(sha, file)
                location = f"{self.state.cdn_url}/cdn/{sha}?X-Amz-Signature=cafe&Expires=1"
                self._empty(302, {**headers, "Location": location})
                return
            self._file(method, file, fault, etag=f'"{linked}"', extra=headers)
        else:
            blob = _git_blob_id(file)
            self._file(method, file, fault, etag=f'"{blob}"', extra={**headers, "ETag": f'"{blob}"'})

    # --- responses -----------------------------------------------------------------------------

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _file(
        self, method: str, file: Path, fault: Fault | None, *, etag: str, extra: dict[str, str] | None = None
    ) -> None:
        data = file.read_bytes() if fault is None or fault.body is None else fault.body
        size = len(data)
        start, end, status = 0, size - 1, 200
        requested = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        use_range = requested is not None and not (fault and fault.ignore_range) and if_range in (None, etag)
        if use_range and requested is not None:
            range_match = _RANGE.match(requested.strip())
            if range_match is None:
                self._empty(400)
                return
            start = int(range_match.group(1))
            end = min(int(range_match.group(2)), size - 1) if range_match.group(2) else size - 1
            if start >= size:
                self._empty(416, {"Content-Range": f"bytes */{size}"})
                return
            status = 206
        body = data[start : end + 1]
        announced = fault.content_length if fault and fault.content_length is not None else len(body)
        self.send_response(status)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if "ETag" not in (extra or {}):
            self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        if method == "HEAD":
            return
        if fault and fault.drop_after is not None:
            self.wfile.write(body[: fault.drop_after])
            self.state._sent(min(len(body), fault.drop_after))
            self._drop()
            return
        self._write_body(body)
        if announced != len(body):
            self._drop()

    def _write_body(self, body: bytes) -> None:
        rate = self.state.rate
        if rate is None:
            self.wfile.write(body)
            self.state._sent(len(body))
            return
        start = time.monotonic()
        chunk = 64 * 1024
        for offset in range(0, len(body), chunk):
            part = body[offset : offset + chunk]
            try:
                self.wfile.write(part)
            except OSError:  # the client closed the connection (it read what it needed)
                return
            self.state._sent(len(part))
            if offset + len(part) >= len(body):
                break  # the client has it all: no pause after the last chunk (it would count as in flight)
            ahead = (offset + len(part)) / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)

    def _drop(self) -> None:
        """End the connection now, mid-body as far as the client can tell."""
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


@contextmanager
def serve_in_thread(handler: type[BaseHTTPRequestHandler]) -> Iterator[ThreadingHTTPServer]:
    """Run ``handler`` on 127.0.0.1 (a free port, ``server_address[1]``) for the ``with`` block."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@contextmanager
def serve(root: Path) -> Iterator[LocalServer]:
    """Run a server for ``root`` on 127.0.0.1 (a free port) for the ``with`` block."""
    root.mkdir(parents=True, exist_ok=True)
    state = LocalServer(root)
    handler = type("Handler", (_Handler,), {"state": state})
    with serve_in_thread(handler) as httpd:
        state._httpd = httpd
        state.port = httpd.server_address[1]
        yield state


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[LocalServer]:
    """A running ``LocalServer`` serving ``tmp_path / "www"``."""
    with serve(tmp_path / "www") as server:
        yield server
