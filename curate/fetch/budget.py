"""The cache budget (``--cache-budget``): an admission limit on the bytes the fetch cache holds.

A slide reserves the bytes of the inputs it still has to download, all at once, before it
fetches any of them; the reservation waits (never fails) while the cache's bytes plus the other
slides' outstanding reservations would exceed the budget, and ends when the slide's downloads
are done (their bytes are then in the cache, counted as such). Reserving a slide's inputs
together means two slides can never each hold half of what they need and wait for each other.

The ledger lives in the cache folder (``budget/<holder>.json``, under ``locks/budget.lock``), so
it holds across the threads, processes and workers of one cache, local or Dask. A reservation
counts what is still to come: its size less what its partial download already holds (counted on
disk) and nothing once the URL's blob is in the cache. Reservations of processes that died on
this host are dropped. Bytes on disk are those of ``blobs/``, ``unpacked/``, ``partial/`` and
``tmp/`` (the ``named/`` hard links share the blobs' bytes).

While a slide waits, inputs no slide pins (kept by ``--keep-sources``, or left by an earlier
build) are deleted, oldest first, to make room (``evict.reclaim``): the budget wins over keeping.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from stcorpus.curate.errors import BudgetExceededError, SettingsError
from stcorpus.curate.fetch.cache import Cache, url_key
from stcorpus.locking import file_lock

log = logging.getLogger(__name__)

_SIZE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)
_UNITS: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
#: Folders of the cache whose files take disk space of their own.
_COUNTED: Final = ("blobs", "unpacked", "partial", "tmp")


def parse_size(text: str) -> int:
    """Bytes of a size such as ``200G``, ``500M``, ``1.5T`` or ``123`` (K, M, G, T are powers of 1024).

    >>> parse_size("500M"), parse_size("2GiB"), parse_size("1024")
    (524288000, 2147483648, 1024)
    """
    match = _SIZE.match(text)
    if match is None:
        raise SettingsError(f"{text!r} is not a size: write a number with an optional K, M, G or T (e.g. 200G, 500M)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_size(n: float) -> str:
    """``1.5 GiB``-style text for a byte count.

    >>> format_size(1536), format_size(3 << 30)
    ('1.5 KiB', '3.0 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Need:
    """An input a slide still has to download: its URL (as written) and its size in bytes."""

    url: str
    size: int


def disk_bytes(cache: Cache) -> int:
    """Bytes the cache's files take (blobs, unpacked archives, partial downloads, temporaries)."""
    total = 0
    for name in _COUNTED:
        for dirpath, _, filenames in os.walk(cache.root / name):
            for filename in filenames:
                with contextlib.suppress(OSError):
                    total += (Path(dirpath) / filename).lstat().st_size
    return total


class CacheBudget:
    """Admission to a cache of at most ``limit`` bytes (``--cache-budget``), shared through the cache folder.

    ``reclaim`` is called with the bytes to free while a reservation waits (``evict.reclaim``);
    ``poll`` is the longest pause between two looks at the ledger.
    """

    flag: Final = "--cache-budget"

    def __init__(
        self, cache: Cache, limit: int, *, reclaim: Callable[[int], int] | None = None, poll: float = 1.0
    ) -> None:
        if limit < 1:
            raise SettingsError(f"{self.flag} must be at least 1 byte, not {limit}")
        self.cache = cache
        self.limit = limit
        self._reclaim = reclaim
        self._poll = poll

    @property
    def _dir(self) -> Path:
        return self.cache.root / "budget"

    def _lock(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.cache.lock_path("budget", "ledger"), what="the cache budget")

    def outstanding(self, *, exclude: str | None = None) -> int:
        """Bytes the live reservations still have to bring in (the caller holds the ledger's lock)."""
        return sum(self._still_to_come(url, size) for url, size in self._reserved(exclude=exclude))

    def _reserved(self, *, exclude: str | None = None) -> list[tuple[str, int]]:
        """(url, size) of every input of the live reservations (the caller holds the ledger's lock)."""
        reserved: list[tuple[str, int]] = []
        for path in sorted(self._dir.glob("*.json")):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if path.stem == exclude:
                continue
            if not _alive(record):
                path.unlink(missing_ok=True)  # a process that died with a reservation
                continue
            reserved.extend((str(item["url"]), int(item["size"])) for item in record.get("needs", []))
        return reserved

    def _still_to_come(self, url: str, size: int) -> int:
        if self.cache.lookup_url(url) is not None:
            return 0
        try:
            have = self.cache.partial_path(url).stat().st_size
        except FileNotFoundError:
            have = 0
        return max(0, size - have)

    @contextlib.contextmanager
    def reserve(
        self,
        holder: str,
        needs: Sequence[Need],
        *,
        what: str,
        held: int = 0,
        spare: Callable[[], Sequence[Need]] | None = None,
    ) -> Iterator[None]:
        """Hold room for ``needs`` (waiting for it) for the ``with`` block; ``what`` names the slide in messages.

        ``held``: bytes of the slide's inputs already in the cache (they stay while it runs, so the
        slide can never fit if they and ``needs`` together exceed the budget).

        ``spare``: inputs others are yet to download whose room must stay free (asked again at every
        look): the reservation waits until they fit too, without holding their room. A prefetch
        passes the inputs of the slides before it, so it can never take room a running slide
        still needs (``executors.Prefetcher``); an exception it raises ends the wait.
        """
        wanted = sum(need.size for need in needs)
        if wanted + held > self.limit:
            largest = max(needs, key=lambda need: need.size)
            raise BudgetExceededError(
                f"{what}: its inputs take {format_size(wanted + held)} ({format_size(held)} already in the cache; "
                f"the largest to download, {largest.url}, {format_size(largest.size)}), more than {self.flag} "
                f"{format_size(self.limit)}; raise {self.flag} to at least {format_size(wanted + held)}"
            )
        key = url_key(holder)
        path = self._dir / f"{key}.json"
        last_said = time.monotonic()
        pause = 0.02
        while True:
            with self._lock():
                # What is on disk counts once: a partial download left by a killed run is in disk_bytes.
                # One URL's bytes come once: what another reservation holds room for counts there.
                reserved = dict(self._reserved(exclude=key))
                ours = {need.url: need.size for need in [*(spare() if spare is not None else ()), *needs]}
                coming = sum(self._still_to_come(url, size) for url, size in ours.items() if url not in reserved)
                used = disk_bytes(self.cache) + sum(self._still_to_come(url, size) for url, size in reserved.items())
                if used + coming > self.limit and self._reclaim is not None:
                    used -= self._reclaim(used + coming - self.limit)
                if used + coming <= self.limit:
                    record = {
                        "holder": holder,
                        "host": socket.gethostname(),
                        "pid": os.getpid(),
                        "needs": [{"url": n.url, "size": n.size} for n in needs],
                    }
                    self.cache.write_json(path, record)
                    break
            now = time.monotonic()
            if now - last_said >= 30.0:
                last_said = now
                log.info(
                    "%s: waiting for %s of room under %s %s (%s in use or on its way)",
                    what,
                    format_size(wanted),
                    self.flag,
                    format_size(self.limit),
                    format_size(used),
                )
            time.sleep(pause)
            pause = min(self._poll, pause * 2)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def _alive(record: dict[str, object]) -> bool:
    """False for a reservation of a process on this host that no longer runs."""
    if record.get("host") != socket.gethostname():
        return True  # another node's process: it removes its own reservation
    pid = record.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
