"""``FetchSettings``: where the cache lives and how hard the fetch layer tries."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Final

from stcorpus.curate.errors import SettingsError

#: Environment variable that moves the cache (wins over ``XDG_CACHE_HOME``).
CACHE_ENV: Final = "STCORPUS_CACHE"

_GIB: Final = 1 << 30

#: Connections per host a build opens at once across all its workers, their range reads and its
#: prefetch (``curate build --per-host``), however many workers it has: huggingface_hub's
#: ``snapshot_download`` runs 8 downloads at once by default too. Several streams, as a fast link
#: to a CDN needs; not one or more per worker.
DEFAULT_HOST_CAP: Final = 8


def default_cache_dir() -> Path:
    """The cache folder: ``$STCORPUS_CACHE``, else ``$XDG_CACHE_HOME/stcorpus``, else ``~/.cache/stcorpus``.

    Read at call time, so a test or a wrapper script can set the variables after import.
    """
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "stcorpus"


@dataclass(frozen=True)
class FetchSettings:
    """How sources are fetched and cached.

    >>> settings = FetchSettings(cache_dir=Path("/data/stcorpus-cache"), per_host=2)  # doctest: +SKIP
    """

    #: Root of the content-addressed cache (blobs, URL index, partial downloads, unpacked archives).
    cache_dir: Path = field(default_factory=default_cache_dir)
    #: Retries after the first attempt, for connection errors, timeouts, truncated bodies, 408, 429 and 5xx.
    #: An attempt that made the partial file grow does not use up a retry.
    retries: int = 5
    #: Exponential backoff: ``min(backoff_max, backoff_base * 2**n)`` seconds, times a jitter in [0.5, 1].
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    #: Longest ``Retry-After`` honoured (seconds); a longer one is waited for this long.
    retry_after_max: float = 300.0
    connect_timeout: float = 10.0
    #: Seconds without a byte from the server before the attempt is retried.
    read_timeout: float = 60.0
    #: Concurrent requests per host (scheme, host, port) within one ``Fetcher``.
    per_host: int = 4
    #: Bytes read from the network per write and hash update.
    chunk_size: int = 1 << 20
    #: Allow local paths and file:// URLs even where the sample's manifest does not.
    allow_local: bool = False
    #: Keep a slide's fetched inputs in the cache after its unit is committed (``--keep-sources``);
    #: by default a build releases them (``evict.py``: reference-counted by content across slides).
    keep_sources: bool = False
    #: Most bytes the cache may hold (``--cache-budget``); a slide's downloads wait for room (``budget.py``).
    cache_budget: int | None = None
    #: Concurrent requests per host across every process sharing the cache folder (``curate build
    #: --per-host``; ``hostcap.py``), on top of ``per_host``: the build's workers and prefetch threads
    #: hold it together (per node where each node has a cache of its own). None: no cross-process
    #: cap, each ``Fetcher`` opens up to ``per_host`` on its own (``curate fetch``, one process).
    host_cap: int | None = DEFAULT_HOST_CAP
    #: Source URL prefix -> local folder holding the same files (``--mirror PREFIX=PATH``); the
    #: manifest's ``mirrors`` add to these (these win on the same prefix).
    mirrors: tuple[tuple[str, Path], ...] = ()
    #: Use files of ``hf://`` sources that huggingface_hub's cache already holds (``hf_hub_download``,
    #: ``snapshot_download``) instead of downloading them again.
    use_hf_cache: bool = True
    #: Seconds between a build worker's download progress lines on stderr; None: none (``--no-progress``).
    progress_every: float | None = 10.0
    #: Read remote TIFFs by byte range where a build opens them (``ranges.py``): only the tiles
    #: it decodes are downloaded. ``curate build --no-range-reads`` sets False (whole files).
    range_reads: bool = True
    #: Slides ahead of the running ones whose sources a local build downloads meanwhile (``curate build
    #: --prefetch``, ``executors.Prefetcher``), so downloads overlap compute; 0: none (each unit fetches its own).
    prefetch: int = 2
    #: Unpacked bytes an archive may hold (declared sizes and bytes actually written both count).
    archive_max_bytes: int = 64 * _GIB
    #: Members an archive may hold.
    archive_max_members: int = 100_000
    #: Unpacked bytes per archive byte beyond which an archive is taken for a bomb (checked above 1 MiB).
    archive_max_ratio: float = 1000.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser())
        mirrors = tuple((str(prefix), Path(folder).expanduser().absolute()) for prefix, folder in self.mirrors)
        object.__setattr__(self, "mirrors", mirrors)
        problems = []
        if self.cache_dir.exists() and not self.cache_dir.is_dir():
            problems.append(f"cache_dir {self.cache_dir} is a file, not a folder (curate build/fetch --cache)")
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if item.name == "prefetch":
                continue  # checked below, as a whole number
            minimum = 0 if item.name in ("retries", "backoff_base", "backoff_max", "retry_after_max") else 1e-9
            if value < minimum:
                problems.append(f"{item.name}={value!r} (must be {'>= 0' if minimum == 0 else '> 0'})")
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 0:
            problems.append(f"prefetch={self.prefetch!r} (curate build --prefetch: a whole number of slides, >= 0)")
        if problems:
            raise SettingsError(f"invalid fetch settings: {', '.join(problems)}")
        if not isinstance(self.per_host, int) or not isinstance(self.chunk_size, int):
            raise SettingsError("invalid fetch settings: per_host and chunk_size must be integers")
