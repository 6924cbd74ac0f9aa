"""Where slide units run: this machine's processes (``LocalExecutor``) or a cluster.

An executor runs ``run_unit`` for samples and yields each ``UnitResult`` as it finishes; the
build decides what to do with it (count it, stop on the first bad slide). Closing the iterator
cancels the units not yet started. Units read their inputs from the fetch cache or their URLs
themselves and write into the work folder, so only a ``Sample`` and settings travel to a worker
and only a small ``UnitResult`` travels back.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from stcorpus.curate.build.unit import UnitSettings, failed_unit, run_unit, worker_lost_unit
from stcorpus.curate.build.workdir import UnitResult, WorkDir
from stcorpus.curate.errors import SettingsError

if TYPE_CHECKING:
    from stcorpus.curate.fetch import FetchSettings
    from stcorpus.curate.manifest import Sample


class UnitExecutor(Protocol):
    """Runs slide units somewhere and yields their results as they finish."""

    def map_units(
        self, samples: Sequence[Sample], *, work_root: Path, unit: UnitSettings, fetch: FetchSettings
    ) -> Iterator[UnitResult]:
        """Run the unit of every sample; closing the iterator cancels what has not started."""
        ...

    def describe(self) -> str:
        """One line saying where units run (for logs and corpus.json)."""
        ...


def unit_task(sample: Sample, work_root: str, unit: UnitSettings, fetch: FetchSettings) -> UnitResult:
    """One unit, as a picklable module-level function (what process pools and clusters call)."""
    return run_unit(sample, work=WorkDir(Path(work_root)), settings=unit, fetch=fetch)


_LOST = (
    "a worker process died while this slide was in its pool (this slide's or another's unit killed it: "
    "the units in flight at that moment all fail)"
)


class LocalExecutor:
    """Units in this process (``workers=1``) or in a pool of fresh (spawned) processes."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise SettingsError(f"workers must be >= 1, not {workers}")
        self.workers = workers

    def describe(self) -> str:
        """Where units run."""
        return f"local, {self.workers} worker{'s' if self.workers > 1 else ''}"

    def map_units(
        self, samples: Sequence[Sample], *, work_root: Path, unit: UnitSettings, fetch: FetchSettings
    ) -> Iterator[UnitResult]:
        """Run the units here, yielding each result as it finishes."""
        if self.workers == 1:
            for sample in samples:
                yield unit_task(sample, str(work_root), unit, fetch)
            return
        import multiprocessing

        # spawn: workers start clean (no inherited locks, threads or open files from the parent).
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
        futures: dict[Future[UnitResult], Sample] = {}
        queue = list(reversed(samples))
        try:
            while queue or futures:
                # Keep a short queue per worker so a stop leaves little running work behind.
                while queue and len(futures) < 2 * self.workers:
                    sample = queue.pop()
                    futures[pool.submit(unit_task, sample, str(work_root), unit, fetch)] = sample
                finished, _ = wait(futures, return_when=FIRST_COMPLETED)
                broken = False
                for future in finished:
                    sample = futures.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        # A worker process died (killed, out of memory): the pool is gone with every unit
                        # it held. Those slides fail (and are retried by the next run); the rest go on.
                        broken = True
                        result = worker_lost_unit(sample, settings=unit, detail=_LOST)
                    except Exception as exc:  # noqa: BLE001 - one slide never stops a build
                        result = failed_unit(sample, settings=unit, exc=exc, stage="running in a worker process")
                    yield result
                if broken:
                    for sample in futures.values():
                        yield worker_lost_unit(sample, settings=unit, detail=_LOST)
                    futures.clear()
                    pool.shutdown(wait=True, cancel_futures=True)
                    pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
        finally:
            for future in futures:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
