"""``Fetcher``: a manifest ``Source`` in, a verified local path out.

>>> from stcorpus.curate.fetch import Fetcher, FetchSettings
>>> from stcorpus.curate.manifest import load_manifest
>>> manifest = load_manifest("manifests/demo.yaml")  # doctest: +SKIP
>>> with Fetcher(FetchSettings()) as fetcher:  # doctest: +SKIP
...     files = fetcher.fetch_sample(manifest.samples[0])  # {"matrix": Path(...), "spatial": Path(...)}

Remote files go through the content-addressed cache (``cache.py``); local paths are used in
place and hashed; archives are unpacked once per digest. A ``Fetcher`` is safe to share between
threads, and several processes may share one cache folder.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

from stcorpus.curate.errors import (
    AccessDeniedError,
    ChecksumMismatchError,
    FetchError,
    LocalSourceNotAllowedError,
    NotADataFileError,
    SizeMismatchError,
    UnsafeArchiveError,
    UnsupportedSchemeError,
)
from stcorpus.curate.errors import RemoteNotFoundError as StoreNotFoundError
from stcorpus.curate.fetch.archive import Limits, is_archive_name, unpack_archive
from stcorpus.curate.fetch.cache import Cache, UrlRecord, url_key
from stcorpus.curate.fetch.hub import parse_hf_url
from stcorpus.curate.fetch.local import local_path, tree_digest
from stcorpus.curate.fetch.lockfile import lock_sources
from stcorpus.curate.fetch.settings import FetchSettings
from stcorpus.hub import access_hint, auth_headers, metadata_from_head, resolve_url, token_of
from stcorpus.locking import file_lock

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    from stcorpus.curate.fetch.http import Downloader, ProgressFn
    from stcorpus.curate.manifest import Sample, Source

logger = logging.getLogger(__name__)

_SCHEME: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
#: Object stores read through fsspec (with the store's own credentials).
STORE_SCHEMES: Final = ("s3", "gs", "gcs", "az", "abfs", "abfss")
_NAME_PARAMS: Final = ("file", "filename", "name")


@dataclass(frozen=True)
class Fetched:
    """One fetched source.

    ``path`` is the file (a hard link into the cache named like the URL's last segment), the
    local file, or the local folder; ``unpacked`` is the folder an archive was unpacked into.
    ``sha256`` and ``size`` are those of the bytes fetched (the archive, not its members); for a
    local folder they are its tree digest and total bytes (see ``local.py``).
    """

    url: str  # as written in the manifest
    path: Path
    sha256: str
    size: int
    cache_hit: bool  # True when nothing was downloaded
    local: bool = False
    is_folder: bool = False
    unpacked: Path | None = None
    commit: str | None = None  # the Hub commit an hf:// revision pointed at, when known

    @property
    def target(self) -> Path:
        """What readers get: the unpacked folder of an archive, else ``path``."""
        return self.unpacked if self.unpacked is not None else self.path


@dataclass(frozen=True)
class _Plan:
    """How to download one remote source, once resolved."""

    url: str  # what to GET
    headers: dict[str, str]
    sha256: str | None
    size: int | None
    commit: str | None = None
    hint: str = ""


def url_scheme(url: str) -> str | None:
    """The lower-case scheme of a URL, or ``None`` for a plain path."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else None


def file_name(url: str) -> str:
    """A file name for a URL: its last path segment (or a ``file=``/``filename=`` query value)."""
    parts = urlsplit(url)
    if url_scheme(url) == "hf":
        return unquote(url.rstrip("/").rsplit("/", 1)[-1])
    for key, value in parse_qsl(parts.query):
        if key.lower() in _NAME_PARAMS and value:
            return value.rsplit("/", 1)[-1]
    segment = unquote(parts.path.rstrip("/").rsplit("/", 1)[-1])
    return segment or "download"


def wants_unpack(source: Source, *, is_folder: bool) -> bool:
    """Whether a fetched source is to be unpacked: ``Source.unpack`` if set, else by its extension."""
    if source.unpack is not None:
        return source.unpack and not is_folder
    return not is_folder and is_archive_name(file_name(source.url))


class Fetcher:
    """Resolve a sample's sources into local paths through the cache.

    ``on_bytes`` is called (from worker threads) with the size of every chunk downloaded,
    for progress bars.
    """

    def __init__(self, settings: FetchSettings | None = None, *, on_bytes: ProgressFn | None = None) -> None:
        from stcorpus.curate.fetch.http import Downloader

        self.settings = settings if settings is not None else FetchSettings()
        self.cache = Cache(self.settings.cache_dir)
        self._on_bytes = on_bytes
        self._http: Downloader = Downloader(self.settings, on_bytes=on_bytes)

    def close(self) -> None:
        """Close the HTTP sessions."""
        self._http.close()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- public API ----------------------------------------------------------------------------

    def fetch_sample(self, sample: Sample) -> dict[str, Path]:
        """Fetch every source of ``sample``; map each source name to what a reader opens.

        That is a file, the folder an archive was unpacked into, or a local folder.
        """
        return {name: self.fetch(source, sample=sample, name=name).target for name, source in sample.sources.items()}

    def fetch(self, source: Source, *, sample: Sample, name: str | None = None) -> Fetched:
        """Fetch one source of ``sample`` (``name`` defaults to the key ``source`` has in ``sample.sources``).

        Raises a ``FetchError`` subclass naming the sample, the source and the URL.
        """
        name = name if name is not None else _name_in(sample, source)
        what = f"{sample.describe()}: source {name!r} ({_display(source.url)})"
        scheme = url_scheme(source.url)
        if scheme is None or scheme == "file":
            fetched = self._fetch_local(source, sample=sample, what=what)
        elif (mirrored := self._from_mirror(source, sample=sample, what=what)) is not None:
            fetched = mirrored
        elif scheme in ("http", "https"):
            plain = _Plan(url=source.url, headers={}, sha256=source.sha256, size=source.size)
            fetched = self._fetch_remote(source, what=what, plan=lambda: plain)
        elif scheme == "hf":
            fetched = self._fetch_hub(source, sample=sample, what=what)
        elif scheme in STORE_SCHEMES:
            fetched = self._fetch_store(source, what=what)
        else:
            raise UnsupportedSchemeError(
                f"{what}: URL scheme {scheme}:// is not supported; use https://, http://, "
                "hf://datasets/<org>/<name>/<path>, s3://, gs://, az://, file:// or a local path"
            )
        if source.unpack and fetched.is_folder:
            raise FetchError(f"{what}: `unpack: true` but the source is a folder, not an archive; drop `unpack`")
        if wants_unpack(source, is_folder=fetched.is_folder):
            fetched = replace(fetched, unpacked=self._unpack(fetched, what=what))
        return fetched

    def expected(self, source: Source, *, sample: Sample) -> tuple[str | None, int | None]:
        """(sha256, size) of a source known without downloading it: manifest, then lock file, then cache.

        ``None`` where none of them knows; ``size_of`` asks the server for a size.
        """
        locked = lock_sources(sample.manifest_path).get(source.url)
        sha256 = source.sha256 or (locked[0] if locked else None)
        size = source.size if source.size is not None else (locked[1] if locked else None)
        if sha256 is None or size is None:
            record = self.cache.lookup_url(source.url, require_blob=False)
            if record is not None and (sha256 is None or record.sha256 == sha256):
                sha256, size = record.sha256, record.size if size is None else size
        return sha256, size

    def size_of(self, source: Source, *, sample: Sample) -> int | None:
        """The bytes a remote source will download: manifest, lock file, cache, else a HEAD's Content-Length."""
        size = self.expected(source, sample=sample)[1]
        if size is not None:
            return size
        what = f"{sample.describe()}: source {_name_in(sample, source)!r} ({_display(source.url)})"
        scheme = url_scheme(source.url)
        if scheme == "hf":
            return self._plan_hub(source, what=what).size
        if scheme in ("http", "https"):
            length = self._http.head(source.url, headers={}, what=what).headers.get("Content-Length", "")
            return int(length) if length.strip().isdigit() else None
        return None

    def identify(self, source: Source, *, sample: Sample) -> str | None:
        """The sha256 an ``hf://`` source's bytes have, from one HEAD, remembered in the URL index; else None.

        A build asks before it pins slides' inputs, so slides that share bytes under different
        URLs share one pin (``evict.py``). Only the Hub announces a digest before the download
        (for LFS/Xet files); a failed HEAD is left for the fetch to report.
        """
        known = self.expected(source, sample=sample)[0]
        if known is not None or url_scheme(source.url) != "hf":
            return known
        what = f"{sample.describe()}: source {_name_in(sample, source)!r} ({_display(source.url)})"
        try:
            plan = self._plan_hub(source, what=what)
        except FetchError as exc:
            logger.debug("%s: no digest before the download (%s)", what, exc)
            return None
        if plan.sha256 is None or plan.size is None:
            return None
        self.cache.record_url(UrlRecord(url=source.url, sha256=plan.sha256, size=plan.size, commit=plan.commit))
        return plan.sha256

    # --- mirrors and huggingface_hub's cache ---------------------------------------------------

    def is_mirrored(self, source: Source, *, sample: Sample) -> bool:
        """Whether the source's file is in a local mirror (read in place, outside the cache)."""
        found = self._mirror_path(source, sample=sample, what=source.url)
        if found is not None and found[1].is_file():
            return True
        if url_scheme(source.url) == "hf" and self.settings.use_hf_cache:
            file = parse_hf_url(source.url)
            return _hf_cached(file.repo_id, file.path, revision=file.revision) is not None
        return False

    def needs_download(self, source: Source, *, sample: Sample) -> bool:
        """Whether fetching ``source`` would download it (not local, cached, mirrored or in huggingface_hub's cache).

        Without network; an unpinned ``hf://`` file in huggingface_hub's cache counts as a download
        (which bytes the revision names is known only after a HEAD).
        """
        scheme = url_scheme(source.url)
        if scheme in (None, "file") or self._cached(source) is not None:
            return False
        mirrored = self._mirror_path(source, sample=sample, what=source.url)
        if mirrored is not None and mirrored[1].is_file():
            return False
        if scheme == "hf" and self.expected(source, sample=sample)[0] is not None:
            return not self.is_mirrored(source, sample=sample)
        return True

    def _mirror_path(self, source: Source, *, sample: Sample, what: str) -> tuple[str, Path] | None:
        """(prefix, path) of the source in the longest mirror prefix it starts with, or None."""
        mirrors = {**sample.mirrors, **dict(self.settings.mirrors)}
        prefixes = sorted((p for p in mirrors if source.url.startswith(p)), key=len, reverse=True)
        if not prefixes:
            return None
        prefix = prefixes[0]
        folder = mirrors[prefix]
        path = (folder / unquote(source.url[len(prefix) :])).absolute()
        if not path.resolve().is_relative_to(folder.resolve()):
            raise FetchError(f"{what}: the URL leaves the mirror folder {folder} of {prefix!r}; fix the URL")
        return prefix, path

    def _from_mirror(self, source: Source, *, sample: Sample, what: str) -> Fetched | None:
        """The source's file in a local mirror (``--mirror``, the manifest's ``mirrors``), verified; None if absent."""
        found = self._mirror_path(source, sample=sample, what=what)
        if found is None:
            return None
        prefix, path = found
        if not path.is_file():
            logger.info("%s: not in the mirror for %r (%s); fetching it", what, prefix, path)
            return None
        where = f"the mirror file {path} (from --mirror or the manifest's `mirrors` for {prefix!r})"
        return self._verified_copy(source, sample=sample, path=path, where=where, what=what, strict=True)

    def _verified_copy(
        self, source: Source, *, sample: Sample, path: Path, where: str, what: str, strict: bool
    ) -> Fetched | None:
        """A local copy of a remote source, checked against the digest the manifest or lock file has.

        A copy that differs is an error when ``strict`` (a mirror the user named), else None (fetch it).
        """
        sha256, size = self.expected(source, sample=sample)
        actual_size = path.stat().st_size
        actual = self.cache.local_sha256(path) if sha256 is not None or size is None or actual_size == size else None
        if (size is not None and actual_size != size) or (sha256 is not None and actual != sha256):
            if not strict:
                logger.info("%s: %s differs from the expected file; fetching it", what, where)
                return None
            raise ChecksumMismatchError(
                f"{what}: {where} has {actual_size} bytes, sha256 {actual or '(not hashed)'}, but the manifest or its "
                f"lock file expects {size if size is not None else '?'} bytes, sha256 {sha256 or '?'}; replace the "
                "mirror's copy, or remove the mapping (--mirror / `mirrors`) to download the file"
            )
        digest = actual if actual is not None else self.cache.local_sha256(path)
        return Fetched(url=source.url, path=path, sha256=digest, size=actual_size, cache_hit=True, local=True)

    def _fetch_hub(self, source: Source, *, sample: Sample, what: str) -> Fetched:
        """An ``hf://`` source: this cache, else huggingface_hub's cache, else a download into this cache."""
        hit = self._cached(source)
        if hit is not None:
            return hit
        plan: _Plan | None = None
        if self.settings.use_hf_cache:
            file = parse_hf_url(source.url)
            known = self.expected(source, sample=sample)[0]
            if known is None:
                # Which bytes the revision names now (one HEAD), so a cached older commit is not taken for them.
                plan = self._plan_hub(source, what=what)
            revision = plan.commit if plan is not None and plan.commit else file.revision
            found = _hf_cached(file.repo_id, file.path, revision=revision)
            if found is not None:
                where = f"huggingface_hub's cached file {found}"
                copy = self._verified_copy(source, sample=sample, path=found, where=where, what=what, strict=False)
                if copy is not None and (plan is None or plan.sha256 in (None, copy.sha256)):
                    logger.info("%s: using %s", what, where)
                    return replace(copy, commit=plan.commit if plan is not None else None)
        planned = plan
        return self._fetch_remote(
            source, what=what, plan=lambda: planned if planned is not None else self._plan_hub(source, what=what)
        )

    def open_ranged(self, source: Source, *, sample: Sample, name: str | None = None) -> Fetched | None:
        """A partial copy of a remote TIFF, downloaded by byte range as the image is read (``ranges.py``).

        None where the whole file is fetched instead: not ``http(s)://``/``hf://``, not a TIFF, an
        archive, no known sha256 (neither the manifest's nor the Hub's: the digest a unit records
        cannot come from a part of the file), or a server that does not serve byte ranges. Also None for a
        file already whole in the cache, a mirror or huggingface_hub's cache (``fetch`` takes it).
        """
        from stcorpus.curate.fetch import ranges
        from stcorpus.curate.fetch.cache import url_key
        from stcorpus.curate.imaging import TIFF_SUFFIXES
        from stcorpus.http import strong_validator

        scheme = url_scheme(source.url)
        if scheme not in ("http", "https", "hf") or not file_name(source.url).lower().endswith(TIFF_SUFFIXES):
            return None
        if wants_unpack(source, is_folder=False):
            return None
        if not self.needs_download(source, sample=sample):
            return None  # cached whole, mirrored or in huggingface_hub's cache: fetch() takes it from there
        name = name if name is not None else _name_in(sample, source)
        what = f"{sample.describe()}: source {name!r} ({_display(source.url)})"
        with file_lock(self.cache.lock_path("url", url_key(source.url)), what=what):
            if scheme == "hf":
                plan = self._plan_hub(source, what=what)
                validator = None  # the URL is resolved at the commit the HEAD saw: its bytes cannot change
            else:
                head = self._http.head(source.url, headers={}, what=what)
                if head.headers.get("Accept-Ranges", "").strip().lower() != "bytes":
                    return None
                length = head.headers.get("Content-Length", "")
                size = int(length) if length.strip().isdigit() else None
                if source.size is not None and size is not None and size != source.size:
                    raise SizeMismatchError(
                        f"{what}: the server announces {size} bytes but the manifest says size {source.size}; "
                        "check the URL, or correct `size` in the manifest"
                    )
                plan = _Plan(url=source.url, headers={}, sha256=source.sha256, size=size)
                validator = strong_validator(head.headers)
            if plan.sha256 is None or plan.size is None:
                return None
            settings = self.settings
            record = ranges.RangeRecord(
                url=source.url,
                get_url=plan.url,
                size=plan.size,
                validator=validator,
                sha256=plan.sha256,
                hub=scheme == "hf",
                policy={
                    "retries": settings.retries,
                    "backoff_base": settings.backoff_base,
                    "backoff_max": settings.backoff_max,
                    "retry_after_max": settings.retry_after_max,
                    "connect_timeout": settings.connect_timeout,
                    "read_timeout": settings.read_timeout,
                },
                per_host=settings.per_host,
                host_cap=settings.host_cap,
                cap_root=str(settings.cache_dir) if settings.host_cap is not None else None,
            )
            path = ranges.copy_path(self.cache, source.url, file_name(source.url))
            ranges.start_copy(path, record)
        return Fetched(
            url=source.url, path=path, sha256=plan.sha256, size=plan.size, cache_hit=False, commit=plan.commit
        )

    # --- local ---------------------------------------------------------------------------------

    def _fetch_local(self, source: Source, *, sample: Sample, what: str) -> Fetched:
        if not (sample.allow_local or self.settings.allow_local):
            raise LocalSourceNotAllowedError(
                f"{what}: local paths and file:// URLs are not allowed for this sample; set `allow_local: true` at "
                "the top of its manifest, or allow them for this run (`--allow-local` on curate fetch, plan and "
                "build)"
            )
        path = local_path(source.url, base_dir=sample.base_dir)
        if not path.exists():
            raise FetchError(f"{what}: {path} does not exist (relative paths start at the manifest's folder)")
        if path.is_dir():
            digest, size = tree_digest(path, cache=self.cache)
        elif not path.is_file():  # /dev/zero, a FIFO, a socket: hashing it would never end
            raise FetchError(
                f"{what}: {path} is a device or special file, not a data file or folder; name the file itself"
            )
        else:
            digest, size = self.cache.local_sha256(path), path.stat().st_size
        if source.size is not None and size != source.size:
            raise SizeMismatchError(f"{what}: {path} has {size} bytes but the manifest says size {source.size}")
        if source.sha256 is not None and digest != source.sha256:
            raise ChecksumMismatchError(
                f"{what}: sha256 mismatch for {path}: the manifest expects {source.sha256}, the "
                f"{'folder (tree digest)' if path.is_dir() else 'file'} has {digest}"
            )
        return Fetched(
            url=source.url, path=path, sha256=digest, size=size, cache_hit=False, local=True, is_folder=path.is_dir()
        )

    # --- remote --------------------------------------------------------------------------------

    def _cached(self, source: Source) -> Fetched | None:
        """A cache hit needing no network: the manifest's digest, or the URL index."""
        cache = self.cache
        if source.sha256 is not None and cache.has_blob(source.sha256, size=source.size):
            record = cache.lookup_url(source.url)
            commit = record.commit if record is not None and record.sha256 == source.sha256 else None
            size = cache.blob_path(source.sha256).stat().st_size
            if record is None or record.sha256 != source.sha256:
                cache.record_url(UrlRecord(url=source.url, sha256=source.sha256, size=size))
            return self._result(source, sha256=source.sha256, size=size, cache_hit=True, commit=commit)
        record = cache.lookup_url(source.url)
        if record is None or (source.sha256 is not None and record.sha256 != source.sha256):
            return None
        if source.size is not None and record.size != source.size:
            return None
        return self._result(source, sha256=record.sha256, size=record.size, cache_hit=True, commit=record.commit)

    def _result(self, source: Source, *, sha256: str, size: int, cache_hit: bool, commit: str | None) -> Fetched:
        path = self.cache.link_named(sha256, file_name(source.url))
        return Fetched(url=source.url, path=path, sha256=sha256, size=size, cache_hit=cache_hit, commit=commit)

    def _fetch_remote(self, source: Source, *, what: str, plan: Callable[[], _Plan]) -> Fetched:
        hit = self._cached(source)
        if hit is not None:
            return hit
        cache = self.cache
        with file_lock(cache.lock_path("url", url_key(source.url)), what=what):
            hit = self._cached(source)  # another thread or process may have finished it meanwhile
            if hit is not None:
                return hit
            resolved = plan()
            if resolved.sha256 is not None and cache.has_blob(resolved.sha256, size=resolved.size):
                size = cache.blob_path(resolved.sha256).stat().st_size
                cache.record_url(UrlRecord(url=source.url, sha256=resolved.sha256, size=size, commit=resolved.commit))
                return self._result(source, sha256=resolved.sha256, size=size, cache_hit=True, commit=resolved.commit)
            partial, meta = cache.partial_path(source.url), cache.partial_meta_path(source.url)
            logger.info("downloading %s", what)
            try:
                downloaded = self._http.download(
                    resolved.url,
                    partial=partial,
                    meta=meta,
                    key=source.url,
                    headers=resolved.headers,
                    expected_sha256=resolved.sha256,
                    expected_size=resolved.size,
                    what=what,
                    hint=resolved.hint,
                )
            except FetchError as exc:
                raise _scrubbed(exc, token_of(resolved.headers)) from None
            if resolved.sha256 is not None and downloaded.sha256 != resolved.sha256:
                # Drop the bytes: resuming them later would only rebuild the same wrong file.
                self._http.discard(partial, meta)
                raise ChecksumMismatchError(
                    f"{what}: sha256 mismatch: expected {resolved.sha256}, downloaded {downloaded.sha256} "
                    f"({downloaded.size} bytes); nothing was kept in the cache. If the file changed at its source "
                    "on purpose, update `sha256` in the manifest"
                )
            # Recorded before the blob lands, so a URL-pinned blob is never without its record (evict.reclaim).
            cache.record_url(
                UrlRecord(url=source.url, sha256=downloaded.sha256, size=downloaded.size, commit=resolved.commit)
            )
            cache.commit_blob(partial, downloaded.sha256)
            meta.unlink(missing_ok=True)
            if downloaded.resumed_from:
                logger.info("%s: resumed at byte %d of %d", what, downloaded.resumed_from, downloaded.size)
            return self._result(
                source, sha256=downloaded.sha256, size=downloaded.size, cache_hit=False, commit=resolved.commit
            )

    def _fetch_store(self, source: Source, *, what: str) -> Fetched:
        """An object of an fsspec store (``s3://``, ``gs://``, ``az://``): streamed into the cache, hashed, verified.

        Credentials are the store's own configuration (``AWS_*`` / ``~/.aws``, application-default
        credentials, ``AZURE_STORAGE_*``); stores retry on their own, and an interrupted copy starts over.
        """
        from stcorpus.curate.fetch.http import looks_like_html

        hit = self._cached(source)
        if hit is not None:
            return hit
        cache = self.cache
        with file_lock(cache.lock_path("url", url_key(source.url)), what=what):
            hit = self._cached(source)
            if hit is not None:
                return hit
            fs, path = _store(source.url, what=what)
            partial = cache.partial_path(source.url)
            partial.parent.mkdir(parents=True, exist_ok=True)
            digest, size = hashlib.sha256(), 0
            logger.info("downloading %s", what)
            try:
                announced = int(fs.size(path))
                if source.size is not None and announced != source.size:
                    raise SizeMismatchError(
                        f"{what}: the store holds {announced} bytes, the manifest says size {source.size}; "
                        "check the URL, or correct `size` in the manifest"
                    )
                with fs.open(path, "rb", block_size=self.settings.chunk_size) as remote, partial.open("wb") as out:
                    while chunk := remote.read(self.settings.chunk_size):
                        if size == 0 and looks_like_html(None, chunk):
                            raise NotADataFileError(
                                f"{what}: the object is an HTML page, not a data file or archive; give a folder as "
                                "an archive (.tar.gz, .zip) or file by file, one source per file"
                            )
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                        if self._on_bytes is not None:
                            self._on_bytes(len(chunk))
            except FileNotFoundError:
                partial.unlink(missing_ok=True)
                raise StoreNotFoundError(f"{what}: no such object; check the URL") from None
            except PermissionError as exc:
                partial.unlink(missing_ok=True)
                raise AccessDeniedError(
                    f"{what}: the store refused access ({exc}); check its credentials (AWS_PROFILE or "
                    "AWS_ACCESS_KEY_ID for s3://, application-default credentials for gs://, AZURE_STORAGE_* for az://)"
                ) from None
            except OSError as exc:
                partial.unlink(missing_ok=True)
                raise FetchError(f"{what}: reading from the store failed: {type(exc).__name__}: {exc}") from None
            except FetchError:
                partial.unlink(missing_ok=True)
                raise
            if size != announced:
                partial.unlink(missing_ok=True)
                raise SizeMismatchError(f"{what}: read {size} bytes, the store announced {announced}")
            sha256 = digest.hexdigest()
            if source.sha256 is not None and sha256 != source.sha256:
                partial.unlink(missing_ok=True)
                raise ChecksumMismatchError(
                    f"{what}: sha256 mismatch: expected {source.sha256}, downloaded {sha256} ({size} bytes); "
                    "nothing was kept in the cache. If the file changed at its source on purpose, update `sha256`"
                )
            cache.record_url(UrlRecord(url=source.url, sha256=sha256, size=size))  # first: see _fetch_remote
            cache.commit_blob(partial, sha256)
            return self._result(source, sha256=sha256, size=size, cache_hit=False, commit=None)

    def _plan_hub(self, source: Source, *, what: str) -> _Plan:
        file = parse_hf_url(source.url)
        headers = auth_headers()
        token = token_of(headers)
        hint = access_hint(file, logged_in=token is not None)
        try:
            head = self._http.head(resolve_url(file), headers=headers, what=what, hint=hint)
        except FetchError as exc:
            raise _scrubbed(exc, token) from None
        meta = metadata_from_head(head)
        if source.sha256 is not None and meta.sha256 is not None and meta.sha256 != source.sha256:
            raise ChecksumMismatchError(
                f"{what}: sha256 mismatch: the manifest expects {source.sha256} but the Hub announces "
                f"{meta.sha256} for revision {file.revision!r}; pin the revision the manifest was written "
                "against (hf://datasets/<org>/<name>@<commit>/<path>) or update `sha256`"
            )
        if source.size is not None and meta.size is not None and meta.size != source.size:
            raise SizeMismatchError(
                f"{what}: the Hub announces {meta.size} bytes for revision {file.revision!r}, the manifest says "
                f"size {source.size}"
            )
        # Download the commit the HEAD saw, so a branch that moves meanwhile cannot mix versions.
        url = resolve_url(file, revision=meta.commit) if meta.commit else head.url
        return _Plan(
            url=url,
            headers=headers,
            sha256=source.sha256 or meta.sha256,
            size=source.size if source.size is not None else meta.size,
            commit=meta.commit,
            hint=hint,
        )

    # --- archives ------------------------------------------------------------------------------

    def _unpack(self, fetched: Fetched, *, what: str) -> Path:
        cache = self.cache
        target = cache.unpacked_path(fetched.sha256)
        if target.is_dir():
            return target
        with file_lock(cache.lock_path("unpack", fetched.sha256), what=f"unpacking {what}"):
            if target.is_dir():
                return target
            limits = Limits(
                max_bytes=self.settings.archive_max_bytes,
                max_members=self.settings.archive_max_members,
                max_ratio=self.settings.archive_max_ratio,
            )
            with cache.temp_dir(f"unpack-{fetched.sha256[:16]}-") as tmp:
                try:
                    written = unpack_archive(fetched.path, tmp, limits=limits, display=what)
                except UnsafeArchiveError:
                    logger.warning("refused to unpack %s", what)
                    raise
                tmp.chmod(0o755)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp.rename(target)
            logger.info("unpacked %s: %d bytes", what, written)
        return target


def _store(url: str, *, what: str) -> tuple[Any, str]:
    """The fsspec filesystem of a store URL and the object's path in it."""
    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(url)
    except ImportError as exc:
        raise UnsupportedSchemeError(
            f"{what}: no fsspec filesystem for {url_scheme(url)}:// is installed ({exc}); install its backend "
            "(s3fs for s3://, gcsfs for gs://, adlfs for az://)"
        ) from None
    return fs, str(path)


def hf_cache_dir() -> Path:
    """huggingface_hub's cache folder, read at call time: ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, else its default."""
    import os

    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _hf_cached(repo_id: str, path: str, *, revision: str) -> Path | None:
    """The file huggingface_hub's cache holds for a dataset file at a revision (no network), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, path, cache_dir=hf_cache_dir(), revision=revision, repo_type="dataset")
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _name_in(sample: Sample, source: Source) -> str:
    for name, candidate in sample.sources.items():
        if candidate is source:
            return name
    for name, candidate in sample.sources.items():
        if candidate == source:
            return name
    return "?"


def _display(url: str) -> str:
    from stcorpus.http import redact_url

    return url if url_scheme(url) in (None, "file", "hf") else redact_url(url)


def _scrubbed(exc: FetchError, token: str | None) -> FetchError:
    """``exc`` with the token removed from its message (defence in depth: messages never include headers)."""
    if not token or token not in str(exc):
        return exc
    message = str(exc).replace(token, "***")
    if isinstance(exc, AccessDeniedError):
        return AccessDeniedError(message, status=exc.status)
    return FetchError(message)
