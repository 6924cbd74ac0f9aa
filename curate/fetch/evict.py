"""Releasing a slide's fetched inputs once its unit is committed (issue 17 item 1).

A build pins every remote source of every slide it is about to run: an empty file
``pins/<url key>/<slide id>`` under the cache root. When a slide's unit is committed, the
worker that ran it removes that slide's pins and deletes every input no other slide still pins:
the blob, its named link, its unpacked folder and its URL index entry. Slides that share an
archive therefore keep it until the last of them is done (a reference count kept on the file
system, so it holds across threads, processes and the workers of one shared cache), and a cache
that is local to a node is emptied on the node that filled it, because the worker evicts.

Deleting happens under the URL's download lock, so it never races a download of the same URL. A
pin left behind by a killed build only keeps bytes (never loses them); the next build re-pins
what it still has to run and releases the pins of the slides it finds finished.

Local sources (paths, ``file://``) are used in place and never deleted. Releasing is opt-in
(``--release-sources``, ``FetchSettings.keep_sources=False``): pins are per URL, so two URLs with
the same bytes (a copy under another dataset) are fetched twice when the first is released early.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from stcorpus.curate.fetch.cache import Cache, is_sha256, url_key
from stcorpus.curate.fetch.fetcher import url_scheme
from stcorpus.curate.fetch.ranges import evict_copy
from stcorpus.curate.manifest import Sample
from stcorpus.locking import file_lock


def _pin_dir(cache: Cache, url: str) -> Path:
    return cache.root / "pins" / url_key(url)


def _pin_name(slide_id: str) -> str:
    # Slide ids are manifest ids (letters, digits, ``._-``); the key keeps any other id safe.
    return url_key(slide_id)


def remote_urls(sample: Sample) -> list[str]:
    """The URLs of the sample's sources that go through the cache (not local paths)."""
    return sorted({s.url for s in sample.sources.values() if url_scheme(s.url) not in (None, "file")})


def pin(cache: Cache, samples: Iterable[Sample]) -> int:
    """Pin the remote sources of ``samples`` (before their units run); returns the pins written."""
    count = 0
    for sample in samples:
        for url in remote_urls(sample):
            folder = _pin_dir(cache, url)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / _pin_name(sample.id)).touch()
            count += 1
    return count


def release(cache: Cache, sample: Sample) -> int:
    """Remove the sample's pins and delete the inputs nobody pins any more; returns the bytes freed."""
    freed = 0
    for url in remote_urls(sample):
        folder = _pin_dir(cache, url)
        (folder / _pin_name(sample.id)).unlink(missing_ok=True)
        with file_lock(cache.lock_path("url", url_key(url)), what=f"evicting {url}"):
            if folder.is_dir() and any(folder.iterdir()):
                continue  # another slide still needs it
            with contextlib.suppress(OSError):
                folder.rmdir()
            freed += _evict_url(cache, url) + evict_copy(cache, url)
    return freed


def _evict_url(cache: Cache, url: str) -> int:
    """Delete what the cache holds for ``url`` (the caller holds the URL's lock)."""
    index = cache.url_index_path(url)
    try:
        sha256 = str(json.loads(index.read_text(encoding="utf-8")).get("sha256"))
    except (OSError, ValueError):
        return 0
    index.unlink(missing_ok=True)
    if not is_sha256(sha256):
        return 0
    if _still_indexed(cache, sha256):
        return 0  # another URL names the same bytes and is not released
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


def _still_indexed(cache: Cache, sha256: str) -> bool:
    for entry in (cache.root / "urls").glob("*/*.json"):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(entry.read_text(encoding="utf-8")).get("sha256") == sha256:
                return True
    return False
