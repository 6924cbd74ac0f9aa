"""HTTP(S) downloads into the cache: streaming, Range resume, retries, per-host limits, redirects.

What a download guarantees:

- bytes are streamed to a partial file (never to the final name) and hashed on the way;
- an interrupted body is resumed with ``Range: bytes=<have>-`` (plus ``If-Range`` with the
  validator the server gave, so a file that changed on the server restarts instead of being
  spliced); the answer must be ``206`` with a ``Content-Range`` starting where the partial ends,
  a ``200`` means the server ignored the range and the download starts over;
- connection errors, timeouts, truncated bodies, ``408``, ``429`` and ``5xx`` are retried with
  exponential backoff and jitter; ``Retry-After`` (seconds or an HTTP date) is honoured;
- redirects are followed by hand so that ``Authorization`` (and cookies) never reach another
  origin, e.g. the CDN the Hugging Face Hub redirects large files to;
- a body shorter than its ``Content-Length`` is an error (after retries), never a short file.

Nothing here logs request headers; URLs in logs and errors go through :func:`redact_url`.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests
import urllib3

from stcorpus.curate.errors import (
    AccessDeniedError,
    FetchError,
    HttpStatusError,
    RemoteNotFoundError,
    SizeMismatchError,
)

if TYPE_CHECKING:
    from stcorpus.curate.fetch.settings import FetchSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_REDIRECTS: Final = 10
#: Statuses worth another attempt (besides every 5xx).
RETRY_STATUSES: Final = frozenset({408, 425, 429})
#: Statuses whose ``Retry-After`` is honoured.
RETRY_AFTER_STATUSES: Final = frozenset({429, 503})
#: Headers that carry credentials: dropped when a redirect leaves the origin.
CREDENTIAL_HEADERS: Final = ("Authorization", "Proxy-Authorization", "Cookie")

_CONTENT_RANGE: Final = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE: Final = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)
_SECRET_QUERY_KEY: Final = re.compile(
    r"(token|sig|signature|secret|password|passwd|key|credential|policy|auth|session)", re.IGNORECASE
)

ProgressFn = Callable[[int], None]


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


def _validator(headers: Mapping[str, str]) -> str | None:
    """A validator for ``If-Range``: a strong ETag, else Last-Modified."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


# ---------------------------------------------------------------------------------------------
# Results and the internal retry signal
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadResult:
    """A HEAD answer: status, headers and the URL that gave it (after same-origin redirects)."""

    status: int
    headers: Mapping[str, str]
    url: str


@dataclass(frozen=True)
class Downloaded:
    """A complete download in the partial file: its size, sha256, and how much was resumed."""

    size: int
    sha256: str
    resumed_from: int


class _Retryable(Exception):
    """One attempt failed in a way another attempt may fix."""

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
        self.progressed = progressed
        self.truncated = truncated


@dataclass
class _HashState:
    """Kept between the attempts of one download: the hash of the partial file's first
    ``length`` bytes, and the most bytes the partial file ever held (progress is passing it)."""

    length: int = -1
    digest: Any = None
    high_water: int = 0

    def progressed(self, written: int) -> bool:
        """True if ``written`` passes every earlier attempt (then it becomes the new mark)."""
        if written > self.high_water:
            self.high_water = written
            return True
        return False


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


class HttpClient:
    """Downloads and HEAD requests with retries; one per ``Fetcher``, shared by its threads.

    Each thread gets its own ``requests.Session`` (sessions are not thread-safe); the
    per-host limit is a semaphore per origin of the URL as requested (redirect targets count
    against the host that redirected).
    """

    def __init__(
        self,
        settings: FetchSettings,
        *,
        on_bytes: ProgressFn | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._on_bytes = on_bytes
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._local = threading.local()
        self._slots: dict[tuple[str, str, int | None], threading.BoundedSemaphore] = {}
        self._slots_lock = threading.Lock()
        self._sessions: list[requests.Session] = []

    def close(self) -> None:
        """Close every session this client opened."""
        with self._slots_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    # --- plumbing ------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            from stcorpus.curate import __version__

            session = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_maxsize=max(1, self._settings.per_host), max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = f"stcorpus/{__version__} requests/{requests.__version__}"
            self._local.session = session
            with self._slots_lock:
                self._sessions.append(session)
        return session

    @contextlib.contextmanager
    def _slot(self, url: str) -> Iterator[None]:
        key = origin(url)
        with self._slots_lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = threading.BoundedSemaphore(self._settings.per_host)
        with slot:
            yield

    def _send(
        self, method: str, url: str, headers: Mapping[str, str], *, follow: Literal["all", "same-origin"]
    ) -> tuple[requests.Response, str]:
        """Send a request, following redirects by hand; credentials never cross to another origin.

        With ``follow="same-origin"`` a redirect to another origin is returned as it is (closed),
        so a HEAD to the Hub can read ``X-Linked-Etag`` from the redirect itself.
        """
        session = self._session()
        current = dict(headers)
        timeout = (self._settings.connect_timeout, self._settings.read_timeout)
        start = origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            response = session.request(
                method, url, headers=current, stream=True, allow_redirects=False, timeout=timeout
            )
            if not response.is_redirect:
                return response, url
            target = urljoin(url, response.headers["Location"])
            if urlsplit(target).scheme.lower() not in ("http", "https"):
                response.close()
                raise FetchError(f"{redact_url(url)} redirects to {redact_url(target)}, which is not http(s)")
            if origin(target) != start:
                if follow == "same-origin":
                    response.close()
                    return response, url
                # Like browsers and requests: credentials stay with the origin they were meant for.
                for name in CREDENTIAL_HEADERS:
                    current.pop(name, None)
                    current.pop(name.lower(), None)
            logger.debug("redirect %s -> %s", redact_url(url), redact_url(target))
            if response.status_code == 303 and method != "HEAD":
                method = "GET"
            response.close()
            url, start = target, origin(target)
        raise FetchError(f"more than {MAX_REDIRECTS} redirects starting from {redact_url(url)}")

    def _status_error(self, response: requests.Response, *, what: str, hint: str) -> HttpStatusError:
        status = response.status_code
        server_says = response.headers.get("X-Error-Message", "")
        detail = f" ({server_says})" if server_says else ""
        base = f"{what}: HTTP {status} {response.reason or ''}".rstrip() + detail
        if status in (401, 403):
            return AccessDeniedError(f"{base}; {hint or 'check that you have access to this URL'}", status=status)
        if status in (404, 410):
            return RemoteNotFoundError(f"{base}; check the URL (and the revision/path for hf://)", status=status)
        return HttpStatusError(base, status=status)

    def _retryable_status(self, response: requests.Response) -> _Retryable | None:
        status = response.status_code
        if status not in RETRY_STATUSES and status < 500:
            return None
        delay = None
        if status in RETRY_AFTER_STATUSES:
            delay = parse_retry_after(response.headers.get("Retry-After"))
            if delay is not None:
                delay = min(delay, self._settings.retry_after_max)
        return _Retryable(f"HTTP {status} {response.reason or ''}".rstrip(), delay=delay, status=status)

    def _retrying(self, attempt: Callable[[], T], *, what: str) -> T:
        """Run ``attempt`` until it returns, retrying ``_Retryable`` failures with backoff."""
        failures = 0
        attempts = 0
        while True:
            attempts += 1
            try:
                return attempt()
            except _Retryable as exc:
                # An attempt that made the partial file grow is progress, not a failure: a big
                # file over a flaky link finishes as long as each attempt gets somewhere.
                failures = 1 if exc.progressed else failures + 1
                if failures > self._settings.retries:
                    raise self._give_up(exc, what=what, attempts=attempts) from None
                delay = exc.delay
                if delay is None:
                    delay = backoff_delay(
                        failures, base=self._settings.backoff_base, maximum=self._settings.backoff_max, rng=self._rng
                    )
                logger.warning(
                    "%s: %s; retrying in %.1f s (%d of %d)", what, exc.reason, delay, failures, self._settings.retries
                )
                self._sleep(delay)

    @staticmethod
    def _give_up(exc: _Retryable, *, what: str, attempts: int) -> FetchError:
        tried = f"gave up after {attempts} attempt{'s' if attempts > 1 else ''}"
        if exc.truncated:
            return SizeMismatchError(
                f"{what}: {exc.reason}; {tried}. The partial download is kept in the cache and resumes on the next run"
            )
        if exc.status is not None:
            return HttpStatusError(f"{what}: {exc.reason}; {tried}; try again later", status=exc.status)
        return FetchError(f"{what}: {exc.reason}; {tried}; check the network and try again")

    @staticmethod
    def _network_error(exc: Exception, *, url: str) -> _Retryable | FetchError:
        text = redact_url(url)
        if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema)):
            return FetchError(f"invalid URL {text}: {type(exc).__name__}")
        if isinstance(exc, requests.exceptions.SSLError):
            return FetchError(f"TLS error talking to {text}: {exc}; check the certificate setup (REQUESTS_CA_BUNDLE)")
        kind = "timed out" if isinstance(exc, requests.exceptions.Timeout) else "connection failed"
        return _Retryable(f"{kind} ({type(exc).__name__}) for {text}")

    # --- HEAD ----------------------------------------------------------------------------------

    def head(self, url: str, *, headers: Mapping[str, str], what: str, hint: str = "") -> HeadResult:
        """HEAD ``url`` with retries; same-origin redirects are followed, others returned as they are.

        Error statuses (other than retryable ones) raise ``HttpStatusError`` subclasses; ``hint``
        is appended to the message of a 401/403.
        """
        return self._retrying(functools.partial(self._head_once, url, headers, what, hint), what=what)

    def _head_once(self, url: str, headers: Mapping[str, str], what: str, hint: str) -> HeadResult:
        with self._slot(url):
            try:
                response, final = self._send(
                    "HEAD", url, {**headers, "Accept-Encoding": "identity"}, follow="same-origin"
                )
            except requests.RequestException as exc:
                raise self._network_error(exc, url=url) from None
            response.close()
        retry = self._retryable_status(response)
        if retry is not None:
            raise retry
        if response.status_code >= 400:
            raise self._status_error(response, what=what, hint=hint)
        return HeadResult(status=response.status_code, headers=response.headers, url=final)

    # --- GET into a partial file ---------------------------------------------------------------

    def download(
        self,
        url: str,
        *,
        partial: Path,
        meta: Path,
        key: str,
        headers: Mapping[str, str],
        expected_sha256: str | None,
        expected_size: int | None,
        what: str,
        hint: str = "",
    ) -> Downloaded:
        """Download ``url`` into ``partial``, resuming what is there; return its size and sha256.

        ``meta`` records what the partial belongs to (``key``, the server's validator, the
        expected digest) so a later run resumes only the same file. The caller holds the lock
        of ``key``, verifies the digest and moves the file into place.
        """
        self._check_partial(partial, meta, key=key, expected_sha256=expected_sha256)
        state = _HashState(high_water=partial.stat().st_size if partial.exists() else 0)
        attempt = functools.partial(
            self._download_once,
            url,
            partial=partial,
            meta=meta,
            key=key,
            headers=headers,
            expected_sha256=expected_sha256,
            expected_size=expected_size,
            what=what,
            hint=hint,
            state=state,
        )
        return self._retrying(attempt, what=what)

    @staticmethod
    def discard(partial: Path, meta: Path) -> None:
        """Delete a partial download and its record (after a digest or size mismatch)."""
        partial.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)

    def _check_partial(self, partial: Path, meta: Path, *, key: str, expected_sha256: str | None) -> None:
        if not partial.exists():
            return
        record = _read_meta(meta)
        stale = record is None or record.get("key") != key
        if record is not None and expected_sha256 and record.get("expected_sha256") not in (None, expected_sha256):
            stale = True  # the partial belongs to another version of the file
        if stale:
            logger.info("discarding a partial download that does not match its record: %s", partial.name)
            self.discard(partial, meta)

    def _download_once(
        self,
        url: str,
        *,
        partial: Path,
        meta: Path,
        key: str,
        headers: Mapping[str, str],
        expected_sha256: str | None,
        expected_size: int | None,
        what: str,
        hint: str,
        state: _HashState,
    ) -> Downloaded:
        offset = partial.stat().st_size if partial.exists() else 0
        request = {**headers, "Accept-Encoding": "identity"}
        if offset:
            request["Range"] = f"bytes={offset}-"
            validator = (_read_meta(meta) or {}).get("validator")
            if validator:
                request["If-Range"] = validator
        with self._slot(url):
            try:
                response, final = self._send("GET", url, request, follow="all")
            except requests.RequestException as exc:
                raise self._network_error(exc, url=url) from None
            with contextlib.closing(response):
                status = response.status_code
                if status == 416 and offset:
                    total = _unsatisfied_total(response.headers)
                    announced = (_read_meta(meta) or {}).get("total")
                    if total == offset and announced in (None, total):
                        # The partial is complete: a run stopped between the last byte and the rename.
                        with partial.open("rb") as handle:
                            digest = _prefix_digest(handle, offset, state)
                        return Downloaded(size=offset, sha256=digest.hexdigest(), resumed_from=offset)
                    self.discard(partial, meta)
                    raise _Retryable(
                        f"cannot resume at byte {offset}: the server now says the file has {total} bytes "
                        f"(it announced {announced}); starting over",
                        truncated=True,
                    )
                retry = self._retryable_status(response)
                if retry is not None:
                    raise retry
                if status >= 400:
                    raise self._status_error(response, what=what, hint=hint)
                if status == 206 and offset:
                    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
                    if match is None or int(match.group(1)) != offset:
                        self.discard(partial, meta)
                        raise _Retryable(
                            f"asked for bytes {offset}- and got Content-Range "
                            f"{response.headers.get('Content-Range')!r}; starting over"
                        )
                    total = None if match.group(3) == "*" else int(match.group(3))
                elif status == 200:
                    if offset:
                        logger.info("%s: the server ignored the Range request; downloading from the start", what)
                    offset = 0
                    total = _int_header(response.headers, "Content-Length")
                else:
                    raise FetchError(f"{what}: unexpected HTTP {status} from {redact_url(final)}")
                if expected_size is not None and total is not None and total != expected_size:
                    self.discard(partial, meta)
                    raise SizeMismatchError(
                        f"{what}: the server announces {total} bytes but the manifest says size {expected_size}; "
                        "check the URL, or correct `size` in the manifest"
                    )
                _write_meta(
                    meta,
                    {
                        "key": key,
                        "validator": _validator(response.headers),
                        "total": total,
                        "expected_sha256": expected_sha256,
                    },
                )
                return self._stream(
                    response,
                    partial=partial,
                    offset=offset,
                    total=total,
                    state=state,
                    what=what,
                    expected_size=expected_size,
                    meta=meta,
                )

    def _stream(
        self,
        response: requests.Response,
        *,
        partial: Path,
        offset: int,
        total: int | None,
        state: _HashState,
        what: str,
        expected_size: int | None,
        meta: Path,
    ) -> Downloaded:
        partial.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("r+b" if offset else "wb") as handle:
            digest = _prefix_digest(handle, offset, state) if offset else hashlib.sha256()
            handle.seek(offset)
            handle.truncate()
            written = offset
            try:
                # decode_content=False: the bytes as served (a .tar.gz sent with Content-Encoding:
                # gzip must not be unzipped on the way), which is also what Content-Length counts.
                for chunk in response.raw.stream(self._settings.chunk_size, decode_content=False):
                    handle.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    if self._on_bytes is not None:
                        self._on_bytes(len(chunk))
            except (urllib3.exceptions.HTTPError, requests.RequestException) as exc:
                handle.flush()
                state.length, state.digest = written, digest
                of_total = f" of {total}" if total is not None else ""
                raise _Retryable(
                    f"the connection broke after {written}{of_total} bytes ({type(exc).__name__})",
                    progressed=state.progressed(written),
                    truncated=True,
                ) from None
            handle.flush()
            os.fsync(handle.fileno())
        state.length, state.digest = written, digest
        if total is not None and written != total:
            raise _Retryable(
                f"the body ended after {written} of {total} bytes", progressed=state.progressed(written), truncated=True
            )
        if total is None and expected_size is not None and written != expected_size:
            self.discard(partial, meta)
            raise SizeMismatchError(f"{what}: received {written} bytes but the manifest says size {expected_size}")
        return Downloaded(size=written, sha256=digest.hexdigest(), resumed_from=offset)


def _prefix_digest(handle: Any, length: int, state: _HashState) -> Any:
    """sha256 of the first ``length`` bytes of ``handle``: reused from the last attempt when possible."""
    if state.length == length and state.digest is not None:
        return state.digest.copy()
    digest = hashlib.sha256()
    handle.seek(0)
    left = length
    while left > 0:
        chunk = handle.read(min(1 << 20, left))
        if not chunk:
            break
        digest.update(chunk)
        left -= len(chunk)
    return digest


def _unsatisfied_total(headers: Mapping[str, str]) -> int | None:
    match = _UNSATISFIED_RANGE.match(headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_meta(path: Path, payload: dict[str, Any]) -> None:
    from stcorpus.curate.atomic import write_atomic

    write_atomic(path, (json.dumps(payload, sort_keys=True) + "\n").encode())
