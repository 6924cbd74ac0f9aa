"""A per-host connection cap across processes (``curate build --per-host``, on by default): file-lock slots.

``PerHostLimit`` (``stcorpus.http``) caps the requests of one process's threads; a build's
workers are separate processes (or Dask workers), each with its own. ``SharedHostLimit`` adds
``cap`` lock files per origin under ``<cache>/locks/``: a request holds one of them (``flock``,
which the kernel drops when a process dies, so a killed worker never keeps a slot) for as long
as it runs, so all the workers that share the cache folder open at most ``cap`` connections to
one host together. On a node-local cache the cap is per node. A build holds this cap by default
(``FetchSettings.host_cap``, ``DEFAULT_HOST_CAP``); ``curate fetch``, one process, does not need it.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stcorpus.http import PerHostLimit, origin
from stcorpus.locking import try_lock, unlock


class SharedHostLimit:
    """At most ``cap`` concurrent requests per origin across every process using ``root``, on top of ``local``."""

    def __init__(self, local: PerHostLimit, *, root: Path, cap: int, poll: float = 0.05) -> None:
        if cap < 1:
            raise ValueError(f"cap must be >= 1, not {cap}")
        self.local = local
        self.root = Path(root)
        self.cap = cap
        self.poll = poll

    def __getstate__(self) -> dict[str, Any]:
        return {"local": self.local, "root": str(self.root), "cap": self.cap, "poll": self.poll}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["local"], root=Path(state["root"]), cap=state["cap"], poll=state["poll"])  # type: ignore[misc]

    def _slot_path(self, url: str, index: int) -> Path:
        key = hashlib.sha256(repr(origin(url)).encode()).hexdigest()[:32]
        return self.root / "locks" / f"host-{key}-{index}.lock"

    @contextlib.contextmanager
    def slot(self, url: str) -> Iterator[None]:
        """Hold one of this process's slots for ``url``'s origin, then one of the shared ones."""
        with self.local.slot(url):
            fd = None
            pause = self.poll
            while fd is None:
                # Start at a random slot so waiting processes do not all queue on slot 0.
                start = random.randrange(self.cap)
                for step in range(self.cap):
                    fd = try_lock(self._slot_path(url, (start + step) % self.cap))
                    if fd is not None:
                        break
                if fd is None:
                    time.sleep(pause)
                    pause = min(0.5, pause * 1.5)
            try:
                yield
            finally:
                unlock(fd)
