"""The one timing rule of the in-process benchmarks: the best (least CPU) of ``repeat`` runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timed:
    """One run: how many items it made, its CPU seconds (this process) and wall seconds."""

    count: int
    cpu_s: float
    wall_s: float


def best_of(repeat: int, run: Callable[[], int]) -> Timed:
    """Run ``run`` (which returns how many items it made) ``repeat`` times; keep the least CPU time."""
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    best: Timed | None = None
    for _ in range(repeat):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        count = run()
        timed = Timed(count, time.process_time() - cpu0, time.perf_counter() - wall0)
        if best is None or timed.cpu_s < best.cpu_s:
            best = timed
    assert best is not None
    return best
