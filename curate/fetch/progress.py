"""Download progress for the build: bytes, rate and ETA as rate-limited lines on stderr (issue 17 item 3).

Each worker reports the slides it fetches; a line at most every ``every`` seconds per worker,
and one when a slide's downloads end, e.g.::

    fetch TENX95: 1.2 GiB of 3.4 GiB (35%), 45.1 MiB/s, ETA 50 s
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from stcorpus.curate.fetch.budget import format_size


class DownloadProgress:
    """Counts downloaded bytes (the ``on_bytes`` of a ``Fetcher``, called from its threads) and reports them."""

    def __init__(self, label: str, *, total: int | None, every: float = 10.0, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.every = every
        self.done = 0
        self._stream = stream
        self._start = time.monotonic()
        self._said = self._start
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        """Count ``n`` more bytes; say where things stand if ``every`` seconds passed since the last line."""
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._said >= self.every:
                self._said = now
                self._say(now)

    def line(self, now: float | None = None) -> str:
        """Where the downloads stand: bytes, share of the total, rate and ETA (when the total is known)."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._start, 1e-6)
        rate = self.done / elapsed
        text = f"fetch {self.label}: {format_size(self.done)}"
        if self.total:
            text += f" of {format_size(self.total)} ({100 * self.done / self.total:.0f}%)"
        text += f", {format_size(rate)}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {(self.total - self.done) / rate:.0f} s"
        return text

    def finish(self) -> None:
        """The last line, if anything was downloaded."""
        with self._lock:
            if self.done:
                self._say(time.monotonic())

    def _say(self, now: float) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write(self.line(now) + "\n")
        stream.flush()
