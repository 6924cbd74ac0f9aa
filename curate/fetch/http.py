"""HTTP(S) downloads into the cache: streaming, Range resume, verification, on :class:`stcorpus.http.HttpClient`.

The shared client (``stcorpus.http``, also the loader's) gives every request its retries and
their status set, ``Retry-After``, hand-followed redirects that keep ``Authorization`` (and
cookies) on their origin, and the per-host limit. What a download adds:

- bytes are streamed to a partial file (never to the final name) and hashed on the way;
- an interrupted body is resumed with ``Range: bytes=<have>-`` (plus ``If-Range`` with the
  validator the server gave, so a file that changed on the server restarts instead of being
  spliced); the answer must be ``206`` with a ``Content-Range`` starting where the partial ends,
  a ``200`` means the server ignored the range and the download starts over;
- an attempt that made the partial file grow does not use up a retry;
- a body shorter than its ``Content-Length`` is an error (after retries), never a short file;
- an HTML page where a data file or archive is expected (a folder URL answered with a directory
  listing, a login page) is refused: folders are given as archives or file by file.

Nothing here logs request headers; URLs in logs and errors go through :func:`redact_url`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import requests
import urllib3

from stcorpus.curate.errors import (
    AccessDeniedError,
    FetchError,
    HttpStatusError,
    NotADataFileError,
    RemoteNotFoundError,
    SizeMismatchError,
)
from stcorpus.errors import RemoteAuthError, RemoteError, RemoteTruncatedError
from stcorpus.errors import RemoteNotFoundError as BaseNotFound
from stcorpus.http import HeadResult, HttpClient, PerHostLimit, Retry, RetryPolicy, redact_url, strong_validator

if TYPE_CHECKING:
    from stcorpus.curate.fetch.settings import FetchSettings

logger = logging.getLogger(__name__)

__all__ = ["Downloaded", "Downloader", "HeadResult", "ProgressFn", "looks_like_html", "redact_url"]

_CONTENT_RANGE: Final = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE: Final = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)
_HTML_TYPES: Final = ("text/html", "application/xhtml+xml")
_HTML_STARTS: Final = (b"<!doctype html", b"<html", b"<head", b"<body", b"<title")

ProgressFn = Callable[[int], None]


def looks_like_html(content_type: str | None, first_bytes: bytes) -> bool:
    """True when a body is an HTML page: it starts like one, or is served as HTML and starts with ``<``.

    >>> looks_like_html("application/octet-stream", b"<!DOCTYPE HTML><html><title>Directory listing")
    True
    >>> looks_like_html("text/html", b"barcode\tin_tissue")  # a TSV on a misconfigured server
    False
    """
    text = first_bytes[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(_HTML_STARTS) or (text.startswith(b"<?xml") and b"<html" in text):
        return True
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media in _HTML_TYPES and text.startswith(b"<")


@dataclass(frozen=True)
class Downloaded:
    """A complete download in the partial file: its size, sha256, and how much was resumed."""

    size: int
    sha256: str
    resumed_from: int


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


def fetch_error(exc: RemoteError) -> FetchError:
    """The fetch layer's error for an error of the shared client (same message)."""
    if isinstance(exc, RemoteAuthError):
        return AccessDeniedError(str(exc), status=exc.status)
    if isinstance(exc, BaseNotFound):
        return RemoteNotFoundError(str(exc), status=exc.status)
    if isinstance(exc, RemoteTruncatedError):
        return SizeMismatchError(f"{exc}. The partial download is kept in the cache and resumes on the next run")
    if exc.status is not None:
        return HttpStatusError(str(exc), status=exc.status)
    return FetchError(str(exc))


def client_for(settings: FetchSettings, **options: Any) -> HttpClient:
    """The shared client with the fetch settings' retries, timeouts and per-host limit."""
    policy = RetryPolicy(
        retries=settings.retries,
        backoff_base=settings.backoff_base,
        backoff_max=settings.backoff_max,
        retry_after_max=settings.retry_after_max,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
    )
    limit: Any = PerHostLimit(settings.per_host)
    if settings.host_cap is not None:
        from stcorpus.curate.fetch.hostcap import SharedHostLimit

        limit = SharedHostLimit(limit, root=settings.cache_dir, cap=settings.host_cap)
    return HttpClient(policy, limit=limit, pool_size=settings.per_host, **options)


class Downloader:
    """Downloads and HEAD requests for one ``Fetcher``, shared by its threads (on one :class:`HttpClient`)."""

    def __init__(
        self, settings: FetchSettings, *, on_bytes: ProgressFn | None = None, client: HttpClient | None = None
    ) -> None:
        self._settings = settings
        self._on_bytes = on_bytes
        self.client = client if client is not None else client_for(settings)

    def close(self) -> None:
        """Close every session the client opened."""
        self.client.close()

    # --- HEAD ----------------------------------------------------------------------------------

    def head(self, url: str, *, headers: Mapping[str, str], what: str, hint: str = "") -> HeadResult:
        """HEAD ``url`` with retries; same-origin redirects are followed, others returned as they are.

        Error statuses (other than retryable ones) raise ``HttpStatusError`` subclasses; ``hint``
        is appended to the message of a 401/403.
        """
        try:
            return self.client.head(url, headers=headers, what=what, hint=hint)
        except RemoteError as exc:
            raise fetch_error(exc) from None

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
        try:
            return self.client.retrying(attempt, what=what)
        except RemoteError as exc:
            raise fetch_error(exc) from None

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
        with self.client.slot(url):
            try:
                response, final = self.client.send("GET", url, request, follow="all")
            except requests.RequestException as exc:
                raise _fetch_network_error(self.client.network_error(exc, url=url)) from None
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
                    raise Retry(
                        f"cannot resume at byte {offset}: the server now says the file has {total} bytes "
                        f"(it announced {announced}); starting over",
                        truncated=True,
                    )
                retry = self.client.retry_for(response)
                if retry is not None:
                    raise retry
                if status >= 400:
                    raise fetch_error(self.client.status_error(response, what=what, hint=hint))
                if status == 206 and offset:
                    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
                    if match is None or int(match.group(1)) != offset:
                        self.discard(partial, meta)
                        raise Retry(
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
                        "validator": strong_validator(response.headers),
                        "total": total,
                        "expected_sha256": expected_sha256,
                    },
                )
                return self._stream(
                    response,
                    url=final,
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
        url: str,
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
                    if written == 0 and looks_like_html(response.headers.get("Content-Type"), chunk):
                        self.discard(partial, meta)
                        raise NotADataFileError(
                            f"{what}: {redact_url(url)} answered with an HTML page "
                            f"({response.headers.get('Content-Type') or 'no Content-Type'}), not a data file or "
                            "archive: a folder URL answered with its directory listing, or a login or error page. "
                            "Give a folder as an archive (.tar.gz, .zip) or file by file, one source per file"
                        )
                    handle.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    if self._on_bytes is not None:
                        self._on_bytes(len(chunk))
            except (urllib3.exceptions.HTTPError, requests.RequestException) as exc:
                handle.flush()
                state.length, state.digest = written, digest
                of_total = f" of {total}" if total is not None else ""
                raise Retry(
                    f"the connection broke after {written}{of_total} bytes ({type(exc).__name__})",
                    progressed=state.progressed(written),
                    truncated=True,
                ) from None
            handle.flush()
            os.fsync(handle.fileno())
        state.length, state.digest = written, digest
        if total is not None and written != total:
            raise Retry(
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


def _fetch_network_error(error: Retry | RemoteError) -> Retry | FetchError:
    return error if isinstance(error, Retry) else fetch_error(error)


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


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
