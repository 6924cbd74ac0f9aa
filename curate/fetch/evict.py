"""Releasing a slide's fetched inputs once its unit is committed (issue 17 item 1).

A build pins every remote source of every slide it is about to run: an empty file
``pins/<key>/<slide key>`` under the cache root. The key is the content's when it is known
before the download (``sha256-<digest>``: the manifest's ``sha256``, the lock file's, or the one
the cache's URL index remembers), else the URL's (``url-<sha256 of the URL>``); once a slide has
fetched a URL-pinned source, its worker turns the pin into a content pin (``hold``). Two URLs
with the same bytes therefore share one pin folder, and the bytes stay while any slide needs them.

When a slide's unit is committed, the worker that ran it removes that slide's pins and deletes
every input nobody pins any more: the blob, its named link and its unpacked folder (the URL
index entries stay: they are small, and they let a later build see that a finished unit's inputs
are unchanged without fetching them again). Slides that share an archive keep it until the last
of them is done (a reference count kept on the file system, so it holds across threads,
processes and the workers of one shared cache), and a cache local to a node is emptied on the
node that filled it, because the worker evicts. Deleting happens under the content's lock, the
lock ``hold`` takes, so a pin that comes in between is never lost; a slide that finds its input
deleted between its download and its pin fetches it again.

A pin left behind by a killed build only keeps bytes (never loses them); the next build re-pins
what it still has to run and releases the pins of the slides it finds finished. Local sources
(paths, ``file://``, mirrors) are used in place and never deleted. With ``--keep-sources``
(``FetchSettings.keep_sources``) nothing is deleted at release; pins still guard the inputs of
running slides from ``reclaim``, which the cache budget calls to delete unpinned inputs, oldest
first, when it needs room.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from stcorpus.curate.fetch.cache import Cache, is_sha256, url_key
from stcorpus.curate.fetch.fetcher import url_scheme
from stcorpus.curate.fetch.lockfile import lock_sources
from stcorpus.curate.fetch.ranges import evict_copy
from stcorpus.curate.manifest import Sample, Source
from stcorpus.locking import file_lock

_CONTENT = "sha256-"
_URL = "url-"


def content_key(sha256: str) -> str:
    """The pin key of the bytes with this digest."""
    return f"{_CONTENT}{sha256}"


def _pin_dir(cache: Cache, key: str) -> Path:
    return cache.root / "pins" / key


def _pin_name(slide_id: str) -> str:
    # Slide ids are manifest ids (letters, digits, ``._-``); the key keeps any other id safe.
    return url_key(slide_id)


def remote_sources(sample: Sample) -> list[Source]:
    """The sources of the sample that go through the cache (not local paths), in name order."""
    names = sorted(sample.sources)
    return [sample.sources[n] for n in names if url_scheme(sample.sources[n].url) not in (None, "file")]


def known_sha256(cache: Cache, source: Source, *, sample: Sample) -> str | None:
    """The digest a source's bytes have, known without a download: manifest, lock file, then URL index."""
    if source.sha256 is not None:
        return source.sha256
    locked = lock_sources(sample.manifest_path).get(source.url)
    if locked is not None:
        return locked[0]
    record = cache.lookup_url(source.url, require_blob=False)
    return record.sha256 if record is not None else None


def pin_key(cache: Cache, source: Source, *, sample: Sample) -> str:
    """The pin key of a source: its content's when known, else its URL's."""
    sha256 = known_sha256(cache, source, sample=sample)
    return content_key(sha256) if sha256 is not None else f"{_URL}{url_key(source.url)}"


def pin(cache: Cache, samples: Iterable[Sample]) -> int:
    """Pin the remote sources of ``samples`` (before their units run); returns the pins written."""
    count = 0
    for sample in samples:
        for source in remote_sources(sample):
            folder = _pin_dir(cache, pin_key(cache, source, sample=sample))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / _pin_name(sample.id)).touch()
            count += 1
    return count


def hold(cache: Cache, slide_id: str, *, url: str, sha256: str, paths: Iterable[Path]) -> bool:
    """Pin fetched bytes by content for ``slide_id``; False when ``paths`` vanished meanwhile (fetch again).

    The URL pin of the source, if any, goes: from now on the content pin keeps the bytes.
    """
    with file_lock(cache.lock_path("content", sha256), what=f"pinning {url}"):
        folder = _pin_dir(cache, content_key(sha256))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / _pin_name(slide_id)).touch()
        _adopt(cache, url, sha256)
        return all(path.exists() for path in paths)


def _adopt(cache: Cache, url: str, sha256: str) -> None:
    """Turn the URL pins of ``url`` into pins of its content (the caller holds the content's lock).

    Slides pinned by URL before anyone knew what the URL holds keep these bytes from now on, as
    slides pinned by content do.
    """
    url_pin = _pin_dir(cache, f"{_URL}{url_key(url)}")
    if not url_pin.is_dir():
        return
    folder = _pin_dir(cache, content_key(sha256))
    folder.mkdir(parents=True, exist_ok=True)
    for entry in sorted(url_pin.iterdir()):
        (folder / entry.name).touch()
        entry.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        url_pin.rmdir()


def release(cache: Cache, sample: Sample, *, digests: Iterable[str] = (), delete: bool = True) -> int:
    """Remove the sample's pins and (``delete``) the inputs nobody pins any more; returns the bytes freed.

    ``digests`` are the sha256 of the inputs the slide fetched (its unit's ``inputs``); the pins of
    digests known otherwise (manifest, URL index) are removed as well.
    """
    name = _pin_name(sample.id)
    contents: dict[str, set[str]] = {d: set() for d in digests if is_sha256(d)}
    for source in remote_sources(sample):
        url_pin = _pin_dir(cache, f"{_URL}{url_key(source.url)}")
        (url_pin / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            url_pin.rmdir()
        sha256 = known_sha256(cache, source, sample=sample)
        if sha256 is not None:
            contents.setdefault(sha256, set()).add(source.url)
    freed = 0
    for sha256 in sorted(contents):
        with file_lock(cache.lock_path("content", sha256), what=f"releasing {sample.id}"):
            for url in sorted(contents[sha256]):
                _adopt(cache, url, sha256)  # other slides waiting for the same URL keep its bytes
            folder = _pin_dir(cache, content_key(sha256))
            (folder / name).unlink(missing_ok=True)
            if folder.is_dir() and any(folder.iterdir()):
                continue  # another slide still needs these bytes
            with contextlib.suppress(OSError):
                folder.rmdir()
            if delete:
                freed += _evict(cache, sha256)
                for url in sorted(contents[sha256]):  # a range-read TIFF's partial copy goes with its bytes
                    with file_lock(cache.lock_path("url", url_key(url)), what=f"evicting {url}"):
                        freed += evict_copy(cache, url)
    return freed


def reclaim(cache: Cache, wanted: int) -> int:
    """Delete inputs no slide pins, oldest first, until ``wanted`` bytes are freed; returns the bytes freed.

    Bytes pinned only by URL (a slide that has just downloaded them and not yet pinned them by
    content, ``hold``) are kept too: the URL index says which blob a pinned URL holds.
    """
    blobs = list((cache.root / "blobs" / "sha256").glob("*/*"))
    # Read after the blobs: a download records its URL before its blob lands, so every blob seen has its record.
    by_url = _url_pinned(cache)
    candidates = []
    for blob in blobs:
        if is_sha256(blob.name) and blob.name not in by_url and not _pin_dir(cache, content_key(blob.name)).is_dir():
            with contextlib.suppress(FileNotFoundError):
                candidates.append((blob.stat().st_mtime_ns, blob.name))
    freed = 0
    for _, sha256 in sorted(candidates):
        if freed >= wanted:
            break
        with file_lock(cache.lock_path("content", sha256), what="making room under the cache budget"):
            if not _pin_dir(cache, content_key(sha256)).is_dir():
                freed += _evict(cache, sha256)
    return freed


def _url_pinned(cache: Cache) -> set[str]:
    """The digests the URL index records for the URLs slides pin by URL."""
    found = set()
    for folder in (cache.root / "pins").glob(f"{_URL}*"):
        try:
            record = json.loads(cache.url_key_index_path(folder.name.removeprefix(_URL)).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not downloaded yet (or being written): nothing of it to keep
        if is_sha256(record.get("sha256")):
            found.add(str(record["sha256"]))
    return found


def _evict(cache: Cache, sha256: str) -> int:
    """Delete the blob with this digest, its named links and its unpacked folder (the caller holds its lock)."""
    freed = 0
    blob = cache.blob_path(sha256)
    with contextlib.suppress(FileNotFoundError):
        freed += blob.stat().st_size
        blob.unlink()
    shutil.rmtree(cache.root / "named" / sha256[:2] / sha256, ignore_errors=True)
    unpacked = cache.unpacked_path(sha256)
    if unpacked.exists():
        freed += sum(p.stat().st_size for p in unpacked.rglob("*") if p.is_file() and not p.is_symlink())
        shutil.rmtree(unpacked, ignore_errors=True)
    return freed
