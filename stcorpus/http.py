"""The one HTTP(S) client of stcorpus, below both wings: ``curate fetch`` downloads and the loader's reads.

What every request through :class:`HttpClient` gets:

- **retries** with exponential backoff and jitter for connection errors, timeouts and the
  statuses of :func:`retryable_status` (408, 425, 429 and every 5xx but 501 and 505); a
  ``Retry-After`` (seconds or an HTTP date) is honoured, up to ``RetryPolicy.retry_after_max``;
- **redirects followed by hand**, so ``Authorization`` (and cookies) never reach another origin,
  e.g. the CDN the Hugging Face Hub redirects large files to;
- **per-host limits**: a :class:`HostLimit` hands out slots per origin (scheme, host, port);
  :class:`PerHostLimit` bounds the threads of one process, and another implementation of the
  same protocol (one shared by processes) plugs in unchanged;
- **range reads**: :meth:`HttpClient.open_range` streams bytes ``[start, stop)`` from one GET and
  resumes a dropped connection with ``Range: bytes=<pos>-`` and ``If-Range`` (a file replaced on
  the server meanwhile is an error, never spliced); :meth:`HttpClient.read_range` returns them;
- identity encoding (byte offsets are file offsets) and a ``User-Agent`` naming stcorpus;
- one ``requests.Session`` per thread and process (sessions are not thread-safe, and a forked
  DataLoader worker must not reuse its parent's pooled sockets).

Errors are :class:`stcorpus.errors.RemoteError` and its subclasses, with messages that start with
the caller's ``what``; each wing turns them into its own errors. Nothing here logs request
headers; URLs in logs and errors go through :func:`redact_url`. ``hf://`` URLs are resolved to
plain URLs and headers by :mod:`stcorpus.hub`.

>>> client = HttpClient(RetryPolicy(retries=3), limit=PerHostLimit(4))  # doctest: +SKIP
>>> head = client.read_range("https://example.org/slide.tif", 0, 16, what="slide.tif")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timezone
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests
import urllib3

from stcorpus.errors import (
    RemoteAuthError,
    RemoteChangedError,
    RemoteError,
    RemoteNotFoundError,
    RemoteTruncatedError,
)

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_REDIRECTS: Final = 10
#: Statuses worth another attempt besides the 5xx ones (see :func:`retryable_status`).
RETRY_STATUSES: Final = frozenset({408, 425, 429})
#: 5xx statuses that another attempt cannot fix.
NEVER_RETRY_5XX: Final = frozenset({501, 505})
#: Headers that carry credentials: dropped when a redirect leaves the origin.
CREDENTIAL_HEADERS: Final = ("Authorization", "Proxy-Authorization", "Cookie")

_SECRET_QUERY_KEY: Final = re.compile(
    r"(token|sig|signature|secret|password|passwd|key|credential|policy|auth|session)", re.IGNORECASE
)
_CONTENT_RANGE: Final = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """``url`` fit for logs and messages: no password, no credential-like query values.

    >>> redact_url("https://user:pw@cdn.example.org/f?X-Amz-Signature=abc&part=1")
    'https://user:***@cdn.example.org/f?X-Amz-Signature=***&part=1'
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else f"***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if _SECRET_QUERY_KEY.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, with the scheme's default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def retryable_status(status: int) -> bool:
    """True for statuses another attempt may fix: 408, 425, 429 and 5xx but 501/505.

    >>> [s for s in (200, 404, 408, 429, 500, 501, 503, 522) if retryable_status(s)]
    [408, 429, 500, 503, 522]
    """
    return status in RETRY_STATUSES or (500 <= status < 600 and status not in NEVER_RETRY_5XX)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date; ``None`` if unusable.

    >>> parse_retry_after("7")
    7.0
    >>> parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0)
    10.0
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def backoff_delay(failures: int, *, base: float, maximum: float, rng: random.Random) -> float:
    """``min(maximum, base * 2**(failures-1))`` scaled by a jitter in [0.5, 1] (``failures`` >= 1)."""
    delay: float = min(maximum, base * 2.0 ** max(0, failures - 1))
    return delay * (0.5 + 0.5 * rng.random())


def strong_validator(headers: Mapping[str, str]) -> str | None:
    """A validator for ``If-Range``: a strong ETag, else Last-Modified."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


# ---------------------------------------------------------------------------------------------
# Policy, limits, the retry signal
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a client tries: retries after the first attempt, backoff, timeouts."""

    #: Retries after the first attempt (and resumes of one range read).
    retries: int = 5
    #: Backoff ``min(backoff_max, backoff_base * 2**n)`` seconds, times a jitter in [0.5, 1].
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    #: Longest ``Retry-After`` honoured (seconds); a longer one is waited for this long.
    retry_after_max: float = 300.0
    connect_timeout: float = 10.0
    #: Seconds without a byte from the server before the attempt is retried.
    read_timeout: float = 60.0


class HostLimit(Protocol):
    """Slots per origin: at most so many requests to one host at once."""

    def slot(self, url: str) -> AbstractContextManager[None]:
        """Hold one slot of ``url``'s origin for the ``with`` block."""
        ...


class PerHostLimit:
    """At most ``per_host`` concurrent requests per origin among the threads of one process.

    A redirect target counts against the host that redirected (the slot is taken for the URL as
    asked). Pickles as a fresh limit (semaphores stay in their process).
    """

    def __init__(self, per_host: int) -> None:
        if per_host < 1:
            raise ValueError(f"per_host must be >= 1, not {per_host}")
        self.per_host = per_host
        self._slots: dict[tuple[str, str, int | None], threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"per_host": self.per_host}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(int(state["per_host"]))  # type: ignore[misc]

    @contextlib.contextmanager
    def slot(self, url: str) -> Iterator[None]:
        """Hold one slot of ``url``'s origin."""
        key = origin(url)
        with self._lock:
            semaphore = self._slots.get(key)
            if semaphore is None:
                semaphore = self._slots[key] = threading.BoundedSemaphore(self.per_host)
        with semaphore:
            yield


class Retry(Exception):
    """One attempt failed in a way another attempt may fix (raised inside :meth:`HttpClient.retrying`)."""

    def __init__(
        self,
        reason: str,
        *,
        delay: float | None = None,
        status: int | None = None,
        progressed: bool = False,
        truncated: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay
        self.status = status
        #: The attempt got further than every earlier one: it does not use up a retry.
        self.progressed = progressed
        #: The attempt failed on a body cut short (given up as :class:`RemoteTruncatedError`).
        self.truncated = truncated


@dataclass(frozen=True)
class HeadResult:
    """A HEAD answer: status, headers and the URL that gave it (after same-origin redirects)."""

    status: int
    headers: Mapping[str, str]
    url: str


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


class HttpClient:
    """Requests with retries, hand-followed redirects and per-host limits; safe to share between threads.

    ``sent`` counts the requests sent per URL as asked (every attempt, not redirect hops): the
    request budget of a Hub or a CDN is counted in those. A client pickles without its sessions
    (a DataLoader worker opens its own) and with a fresh count.
    """

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        limit: HostLimit | None = None,
        pool_size: int = 10,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy or RetryPolicy()
        self.limit = limit
        self.pool_size = pool_size
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.sent: Counter[str] = Counter()
        self._local = threading.local()
        self._sessions: list[tuple[requests.Session, int]] = []  # (session, pid of its process)
        self._sessions_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_local", "_sessions", "_sessions_lock"):
            state.pop(name)
        state["sent"] = Counter()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._sessions = []
        self._sessions_lock = threading.Lock()

    def close(self) -> None:
        """Close every session this client opened in this process."""
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        pid = os.getpid()
        for session, owner in sessions:
            if owner == pid:
                session.close()

    # --- plumbing ------------------------------------------------------------------------------

    def session(self) -> requests.Session:
        """This thread's session (a new one after a fork)."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None or getattr(self._local, "pid", None) != os.getpid():
            from stcorpus import __version__

            session = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_maxsize=max(1, self.pool_size), max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = f"stcorpus/{__version__} requests/{requests.__version__}"
            session.headers["Accept-Encoding"] = "identity"
            self._local.session, self._local.pid = session, os.getpid()
            with self._sessions_lock:
                self._sessions.append((session, os.getpid()))
        return session

    def slot(self, url: str) -> AbstractContextManager[None]:
        """A slot of the per-host limit for ``url`` (none to wait for without a limit)."""
        return self.limit.slot(url) if self.limit is not None else contextlib.nullcontext()

    def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        *,
        follow: Literal["all", "same-origin"] = "all",
        timeout: tuple[float, float] | None = None,
    ) -> tuple[requests.Response, str]:
        """One attempt: send a request and follow redirects by hand; credentials never cross origins.

        With ``follow="same-origin"`` a redirect to another origin is returned as it is (closed),
        so a HEAD to the Hub can read ``X-Linked-Etag`` from the redirect itself. The response
        body is not read (``stream=True``). Transport errors propagate as ``requests`` raises them.
        """
        session = self.session()
        current = dict(headers)
        timeout = timeout or (self.policy.connect_timeout, self.policy.read_timeout)
        start = origin(url)
        self.sent[url] += 1
        for _ in range(MAX_REDIRECTS + 1):
            response = session.request(
                method, url, headers=current, stream=True, allow_redirects=False, timeout=timeout
            )
            if not response.is_redirect:
                return response, url
            target = urljoin(url, response.headers["Location"])
            if urlsplit(target).scheme.lower() not in ("http", "https"):
                response.close()
                raise RemoteError(f"{redact_url(url)} redirects to {redact_url(target)}, which is not http(s)")
            if origin(target) != start:
                if follow == "same-origin":
                    response.close()
                    return response, url
                # Like browsers and requests: credentials stay with the origin they were meant for.
                for name in CREDENTIAL_HEADERS:
                    current.pop(name, None)
                    current.pop(name.lower(), None)
            log.debug("redirect %s -> %s", redact_url(url), redact_url(target))
            if response.status_code == 303 and method != "HEAD":
                method = "GET"
            response.close()
            url, start = target, origin(target)
        raise RemoteError(f"more than {MAX_REDIRECTS} redirects starting from {redact_url(url)}")

    # --- errors and retries --------------------------------------------------------------------

    def retry_for(self, response: requests.Response) -> Retry | None:
        """A :class:`Retry` when ``response``'s status is worth another attempt (with its Retry-After)."""
        status = response.status_code
        if not retryable_status(status):
            return None
        delay = parse_retry_after(response.headers.get("Retry-After"))
        if delay is not None:
            delay = min(delay, self.policy.retry_after_max)
        return Retry(f"HTTP {status} {response.reason or ''}".rstrip(), delay=delay, status=status)

    @staticmethod
    def status_error(response: requests.Response, *, what: str, hint: str = "") -> RemoteError:
        """The error of a final error status; ``hint`` says what to do about a 401/403."""
        status = response.status_code
        server_says = response.headers.get("X-Error-Message", "")
        detail = f" ({server_says})" if server_says else ""
        base = f"{what}: HTTP {status} {response.reason or ''}".rstrip() + detail
        if status in (401, 403):
            return RemoteAuthError(f"{base}; {hint or 'check that you have access to this URL'}", status=status)
        if status in (404, 410):
            return RemoteNotFoundError(f"{base}; check the URL (and the revision/path for hf://)", status=status)
        return RemoteError(base, status=status)

    @staticmethod
    def network_error(exc: Exception, *, url: str) -> Retry | RemoteError:
        """A transport error: retryable (connection, timeout) or final (bad URL, TLS)."""
        text = redact_url(url)
        if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema)):
            return RemoteError(f"invalid URL {text}: {type(exc).__name__}")
        if isinstance(exc, requests.exceptions.SSLError):
            return RemoteError(f"TLS error talking to {text}: {exc}; check the certificate setup (REQUESTS_CA_BUNDLE)")
        kind = "timed out" if isinstance(exc, requests.exceptions.Timeout) else "connection failed"
        return Retry(f"{kind} ({type(exc).__name__}) for {text}")

    def retrying(self, attempt: Callable[[], T], *, what: str) -> T:
        """Run ``attempt`` until it returns, retrying :class:`Retry` failures with backoff.

        Gives up after ``policy.retries`` failed retries with :class:`RemoteTruncatedError` (a body
        cut short) or :class:`RemoteError` (with the last status). An attempt that got further
        than every earlier one (``Retry.progressed``) does not use up a retry.
        """
        failures = attempts = 0
        while True:
            attempts += 1
            try:
                return attempt()
            except Retry as exc:
                failures = 1 if exc.progressed else failures + 1
                if failures > self.policy.retries:
                    raise _give_up(exc, what=what, attempts=attempts) from None
                delay = exc.delay
                if delay is None:
                    delay = backoff_delay(
                        failures, base=self.policy.backoff_base, maximum=self.policy.backoff_max, rng=self.rng
                    )
                log.warning(
                    "%s: %s; retrying in %.1f s (%d of %d)", what, exc.reason, delay, failures, self.policy.retries
                )
                self.sleep(delay)

    # --- HEAD and GET --------------------------------------------------------------------------

    def head(self, url: str, *, headers: Mapping[str, str] | None = None, what: str, hint: str = "") -> HeadResult:
        """HEAD ``url`` with retries; same-origin redirects are followed, others returned as they are."""

        def once() -> HeadResult:
            with self.slot(url):
                try:
                    response, final = self.send("HEAD", url, headers or {}, follow="same-origin")
                except requests.RequestException as exc:
                    raise self.network_error(exc, url=url) from None
                response.close()
            retry = self.retry_for(response)
            if retry is not None:
                raise retry
            if response.status_code >= 400:
                raise self.status_error(response, what=what, hint=hint)
            return HeadResult(status=response.status_code, headers=response.headers, url=final)

        return self.retrying(once, what=what)

    def get(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        start: int = 0,
        stop: int | None = None,
        if_range: str | None = None,
        what: str,
        hint: str = "",
    ) -> requests.Response:
        """A streaming GET of bytes ``[start, stop)`` (the whole file by default), with retries.

        Returns the open response (200 or 206; the caller reads ``raw`` and closes it). A range
        the file cannot satisfy (416) is :class:`RemoteTruncatedError`. No per-host slot is held:
        :meth:`open_range` holds one for the life of its stream.
        """
        request = dict(headers or {})
        if if_range is not None:
            request["If-Range"] = if_range
        if start or stop is not None:
            request["Range"] = f"bytes={start}-{'' if stop is None else stop - 1}"

        def once() -> requests.Response:
            try:
                response, _ = self.send("GET", url, request, follow="all")
            except requests.RequestException as exc:
                raise self.network_error(exc, url=url) from None
            status = response.status_code
            if status in (200, 206):
                return response
            response.close()
            if status == 416:
                raise RemoteTruncatedError(
                    f"{what}: {redact_url(url)} answered 416 for bytes {start}-{'' if stop is None else stop}: "
                    "the file is shorter than recorded",
                    status=status,
                )
            retry = self.retry_for(response)
            if retry is not None:
                raise retry
            raise self.status_error(response, what=what, hint=hint)

        return self.retrying(once, what=what)

    def open_range(
        self,
        url: str,
        start: int = 0,
        stop: int | None = None,
        *,
        size: int | None = None,
        headers: Mapping[str, str] | Callable[[], Mapping[str, str]] | None = None,
        what: str | None = None,
        hint: str = "",
    ) -> RangeStream:
        """A stream of bytes ``[start, stop)`` of ``url`` (``stop=None``: to ``size``, else to the end).

        One GET; a dropped connection or a body that ends before ``stop`` is resumed with Range
        (see :class:`RangeStream`). ``headers`` may be a function, called before each request
        (Hub tokens are read at call time).
        """
        return RangeStream(self, url, start=start, stop=stop, size=size, headers=headers, what=what, hint=hint)

    def read_range(
        self,
        url: str,
        start: int = 0,
        stop: int | None = None,
        *,
        headers: Mapping[str, str] | Callable[[], Mapping[str, str]] | None = None,
        what: str | None = None,
        hint: str = "",
    ) -> bytes:
        """Bytes ``[start, stop)`` of ``url`` (one GET, resumed when it drops)."""
        stream = self.open_range(url, start, stop, headers=headers, what=what, hint=hint)
        try:
            return stream.read()
        finally:
            stream.close()


def _give_up(exc: Retry, *, what: str, attempts: int) -> RemoteError:
    tried = f"gave up after {attempts} attempt{'s' if attempts > 1 else ''}"
    if exc.truncated:
        return RemoteTruncatedError(f"{what}: {exc.reason}; {tried}")
    if exc.status is not None:
        return RemoteError(f"{what}: {exc.reason}; {tried}; try again later", status=exc.status)
    return RemoteError(f"{what}: {exc.reason}; {tried}; check the network and try again")


_RESUMABLE: tuple[type[BaseException], ...] = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.ReadTimeoutError,
    ConnectionError,
    TimeoutError,
)


class RangeStream:
    """Bytes ``[start, stop)`` of one remote file, read from one GET, resumed with Range after a drop.

    - A resume asks for ``bytes=<pos>-<stop - 1>`` with ``If-Range`` set to the strong validator
      of the first answer; a ``200`` to it means the file changed: :class:`RemoteChangedError`.
      A server that ignores Range (``200`` without ``If-Range``) is read past what we have.
    - A body that ends before ``stop`` without a transport error is resumed too: one resume
      tells a clean mid-body close from a file shorter than recorded (a 416).
    - ``policy.retries`` resumes at most, then :class:`RemoteTruncatedError`.
    - The per-host slot (when the client has a limit) is held from the first request to ``close``.
    """

    def __init__(
        self,
        client: HttpClient,
        url: str,
        *,
        start: int,
        stop: int | None,
        size: int | None,
        headers: Mapping[str, str] | Callable[[], Mapping[str, str]] | None,
        what: str | None,
        hint: str,
    ) -> None:
        self.client, self.url = client, url
        self.start = self.pos = start
        self.stop = size if stop is None else stop
        self.what = what or redact_url(url)
        self.hint = hint
        self._headers = headers
        self.resumes = 0
        self.etag: str | None = None
        self._response: requests.Response | None = None
        self._slot: contextlib.ExitStack | None = None
        self._closed = False

    def _request_headers(self) -> Mapping[str, str]:
        if self._headers is None:
            return {}
        return self._headers() if callable(self._headers) else self._headers

    def _open(self) -> None:
        if self._slot is None:
            self._slot = contextlib.ExitStack()
            self._slot.enter_context(self.client.slot(self.url))
        resuming = self.pos > self.start
        if_range = self.etag if resuming else None
        response = self.client.get(
            self.url,
            headers=self._request_headers(),
            start=self.pos,
            stop=self.stop,
            if_range=if_range,
            what=self.what,
            hint=self.hint,
        )
        if not resuming:
            self.etag = strong_validator(response.headers)
        if response.status_code == 206 and self.pos:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if match is not None and int(match.group(1)) != self.pos:
                response.close()
                raise RemoteError(
                    f"{self.what}: asked for bytes {self.pos}- and got Content-Range "
                    f"{response.headers.get('Content-Range')!r}"
                )
        if response.status_code == 200 and self.pos:
            if if_range is not None:
                response.close()
                raise RemoteChangedError(
                    f"{self.what} changed on the server while it was being read (ETag {self.etag} no longer "
                    "matches): the file is being replaced; restart from a consistent revision"
                )
            # The server ignored Range: read past what we already have (costly, but correct).
            log.warning("%s: the server ignored a Range request; skipping %d bytes", self.what, self.pos)
            _discard(response.raw, self.pos, self.what)
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
            except _RESUMABLE as exc:
                self._drop(f"connection dropped at byte {self.pos} ({type(exc).__name__})")
                continue
            if data:
                self.pos += len(data)
                return data
            if self.stop is None or self.pos >= self.stop:
                return b""
            self._drop(f"body ended at byte {self.pos} of {self.stop}")

    def _drop(self, why: str) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None
        self.resumes += 1
        retries = self.client.policy.retries
        if self.resumes > retries:
            raise RemoteTruncatedError(f"{self.what}: {why}; gave up after {retries} resumes")
        log.warning("%s: %s; resuming with Range (%d/%d)", self.what, why, self.resumes, retries)
        policy = self.client.policy
        self.client.sleep(min(policy.backoff_base * 2 ** (self.resumes - 1), policy.backoff_max) / 10)

    def close(self) -> None:
        """Close the connection (the rest of the body is not downloaded) and free the host slot."""
        self._closed = True
        if self._response is not None:
            self._response.close()
            self._response = None
        if self._slot is not None:
            self._slot.close()
            self._slot = None


def _discard(raw: Any, n: int, what: str) -> None:
    while n > 0:
        chunk = raw.read(min(n, 1 << 20))
        if not chunk:
            raise RemoteTruncatedError(
                f"{what}: body ended while skipping bytes the server should have left out (ignored Range)"
            )
        n -= len(chunk)
