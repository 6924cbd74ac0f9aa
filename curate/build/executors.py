"""Where slide units run: this machine's processes (``LocalExecutor``) or a cluster.

An executor runs ``run_unit`` for samples and yields each ``UnitResult`` as it finishes; the
build decides what to do with it (count it, stop on the first bad slide). Closing the iterator
cancels the units not yet started. Units read their inputs from the fetch cache or their URLs
themselves and write into the work folder, so only a ``Sample`` and settings travel to a worker
and only a small ``UnitResult`` travels back.

The local executor also prefetches (``--prefetch N``, ``Prefetcher``): threads of the build
process download the sources of the next N slides into the fetch cache while the workers
compute, so a unit's fetch finds its inputs cached and a build takes about max(download,
compute) rather than their sum. The Dask executor does the same when every worker shares the
build process's fetch cache (tested with a marker file; workers on other nodes with caches of
their own fetch their inputs themselves).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from stcorpus.curate.build.unit import UnitSettings, failed_unit, input_needs, lost_unit, prefetch, run_unit
from stcorpus.curate.build.workdir import UnitResult, WorkDir
from stcorpus.curate.errors import BudgetExceededError, SettingsError

if TYPE_CHECKING:
    from stcorpus.curate.build.admission import WorkAdmission
    from stcorpus.curate.fetch import FetchSettings
    from stcorpus.curate.fetch.budget import Need
    from stcorpus.curate.manifest import Sample

log = logging.getLogger(__name__)


class UnitExecutor(Protocol):
    """Runs slide units somewhere and yields their results as they finish."""

    def map_units(
        self,
        samples: Sequence[Sample],
        *,
        work_root: Path,
        unit: UnitSettings,
        fetch: FetchSettings,
        admission: WorkAdmission | None = None,
    ) -> Iterator[UnitResult]:
        """Run the unit of every sample, in order; closing the iterator cancels what has not started.

        With ``admission`` (``--work-budget``) a unit is submitted only when ``admission.may_start``
        allows it; the executor reports each submission (``started``) and each result, before
        yielding it (``finished``).
        """
        ...

    def describe(self) -> str:
        """One line saying where units run (for logs and corpus.json)."""
        ...


def unit_task(sample: Sample, work_root: str, unit: UnitSettings, fetch: FetchSettings) -> UnitResult:
    """One unit, as a picklable module-level function (what process pools and clusters call)."""
    return run_unit(sample, work=WorkDir(Path(work_root)), settings=unit, fetch=fetch)


_LOST = (
    "a worker process died while this slide was in its pool (this slide's or another's unit killed it: "
    "the units in flight at that moment that had not been committed all fail)"
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
        self,
        samples: Sequence[Sample],
        *,
        work_root: Path,
        unit: UnitSettings,
        fetch: FetchSettings,
        admission: WorkAdmission | None = None,
    ) -> Iterator[UnitResult]:
        """Run the units here, yielding each result as it finishes, prefetching the next slides' sources."""
        ahead = Prefetcher(samples, fetch=fetch, running=self.workers, unit=unit)
        try:
            for result in self._run(samples, work_root=work_root, unit=unit, fetch=fetch, admission=admission):
                ahead.finished(result.slide_id)
                if admission is not None:
                    admission.finished(result)  # measured before the pack can release it
                yield result
        finally:
            ahead.close()

    def _run(
        self,
        samples: Sequence[Sample],
        *,
        work_root: Path,
        unit: UnitSettings,
        fetch: FetchSettings,
        admission: WorkAdmission | None,
    ) -> Iterator[UnitResult]:
        if self.workers == 1:
            for sample in samples:
                if admission is not None:
                    admission.may_start(sample)  # True (nothing else runs); it counts a start over the budget
                    admission.started(sample)
                yield unit_task(sample, str(work_root), unit, fetch)
            return
        import multiprocessing

        # spawn: workers start clean (no inherited locks, threads or open files from the parent).
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
        futures: dict[Future[UnitResult], Sample] = {}
        stamps: dict[str, tuple[int, int] | None] = {}  # each running slide's unit commit when handed out
        work = WorkDir(work_root)
        queue = list(reversed(samples))
        try:
            while queue or futures:
                # Keep a short queue per worker so a stop leaves little running work behind; under
                # --work-budget the next slide also waits for room (always admitted when none runs).
                while (
                    queue and len(futures) < 2 * self.workers and (admission is None or admission.may_start(queue[-1]))
                ):
                    sample = queue.pop()
                    if admission is not None:
                        admission.started(sample)
                    stamps[sample.id] = work.stamp(sample.id)
                    futures[pool.submit(unit_task, sample, str(work_root), unit, fetch)] = sample
                finished, _ = wait(futures, return_when=FIRST_COMPLETED)
                lost: list[Sample] = []
                for future in finished:
                    sample = futures.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        lost.append(sample)
                        continue
                    except Exception as exc:  # noqa: BLE001 - one slide never stops a build
                        result = failed_unit(sample, settings=unit, exc=exc, stage="running in a worker process")
                    del stamps[sample.id]
                    yield result
                if lost:
                    # A worker process died (killed, out of memory): the pool is gone with every unit it
                    # held. Once its processes are all gone (shutdown waits), a slide whose unit was
                    # committed keeps it; the others fail (and are retried by the next run); the rest go on.
                    lost += futures.values()
                    futures.clear()
                    pool.shutdown(wait=True, cancel_futures=True)
                    for sample in lost:
                        before = stamps.pop(sample.id)
                        yield lost_unit(sample, work=work, settings=unit, fetch=fetch, before=before, detail=_LOST)
                    pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
        finally:
            for future in futures:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


class _Stopped(Exception):
    """The build no longer wants prefetches (raised inside a prefetch's wait for room)."""


class Prefetcher:
    """Threads that download the sources of the slides after the running ones (``FetchSettings.prefetch``).

    Slides run in ``samples`` order; the first ``running`` unfinished ones are taken to be
    running (a pool starts units in the order they were submitted), and the next ``prefetch``
    slides with remote sources are downloaded into the cache, in order, where their units
    will find them; for a TIFF read by byte range, the tiles its unit will read (with the unit
    settings, ``unit.prefetch``). Slides the build reuses never reach the executor, and local sources need
    nothing. A failed prefetch is logged and otherwise ignored: the slide's unit fetches again
    and reports what goes wrong as usual.

    Under ``--cache-budget`` the prefetched bytes stay in the cache (pinned) until their slides
    run, so they must never take the room a running slide still needs: there is one thread,
    every reservation leaves room for the inputs still to come of every unfinished slide before
    it (``CacheBudget.reserve(spare=...)``), and the first failed prefetch ends prefetching (a
    slide larger than the budget is only skipped: it is refused before it takes anything).
    Downloads share the cross-process per-host cap of ``--per-host`` with the workers (it lives
    in the cache folder). ``close`` stops the threads: a prefetch waiting for room or for its
    turn ends at once; one in the middle of a download is left to finish (daemon threads).
    """

    def __init__(
        self, samples: Sequence[Sample], *, fetch: FetchSettings, running: int, unit: UnitSettings | None = None
    ) -> None:
        from stcorpus.curate.fetch.evict import remote_sources

        self._samples = list(samples)
        self._fetch = fetch
        self._unit = unit  # with it, the tiles a range-read TIFF's unit will read are prefetched too
        self._running = running
        self._ahead = fetch.prefetch
        self._budget = fetch.cache_budget is not None
        self._remote = [bool(remote_sources(sample)) for sample in self._samples]
        self._done: set[str] = set()
        self._needs: dict[str, list[Need]] = {}
        self._next = 0
        self._stop = False
        self._failed = False
        self._changed = threading.Condition()
        self.prefetched: list[str] = []
        self._threads: list[threading.Thread] = []
        if self._ahead < 1 or not any(self._remote):
            return
        for i in range(1 if self._budget else self._ahead):
            thread = threading.Thread(target=self._work, name=f"stcorpus-prefetch-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def finished(self, slide_id: str) -> None:
        """The unit of ``slide_id`` is done: the window moves on."""
        with self._changed:
            self._done.add(slide_id)
            self._changed.notify_all()

    def close(self, *, timeout: float = 1.0) -> None:
        """Stop prefetching; wait up to ``timeout`` seconds for threads in a download, then leave them."""
        with self._changed:
            self._stop = True
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(timeout=timeout)
            timeout = 0.0  # one wait in all: a thread still downloading dies with the process

    def _take(self) -> int | None:
        """The index of the next slide to prefetch once it is within the window; None when there is none."""
        with self._changed:
            while True:
                if self._stop or (self._budget and self._failed):
                    return None
                before = sum(1 for sample in self._samples[: self._next] if sample.id not in self._done)
                while self._next < len(self._samples) and (
                    not self._remote[self._next]
                    or self._samples[self._next].id in self._done
                    or before < self._running  # running (or about to start): its unit fetches it
                ):
                    before += self._samples[self._next].id not in self._done
                    self._next += 1
                if self._next >= len(self._samples):
                    return None
                if before < self._running + self._ahead:
                    self._next += 1
                    return self._next - 1
                self._changed.wait()

    def _work(self) -> None:
        while (index := self._take()) is not None:
            sample = self._samples[index]
            try:
                spare = None
                if self._budget:
                    self._learn_needs(index)  # here, not under the ledger's lock: it may ask servers for sizes
                    spare = functools.partial(self._spare, index)
                downloaded = prefetch(sample, self._fetch, spare=spare, settings=self._unit)
            except _Stopped:
                return
            except BudgetExceededError as exc:
                # Refused before any byte or room was taken: nothing to undo, the next slides may fit.
                log.info("not prefetching %s: %s", sample.id, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a failed prefetch is never fatal: the unit fetches again
                with self._changed:
                    self._failed = True
                log.warning(
                    "prefetch of %s failed (%s: %s); its unit will fetch it again%s",
                    sample.id,
                    type(exc).__name__,
                    exc,
                    " (no more prefetching under --cache-budget)" if self._budget else "",
                )
                continue
            with self._changed:
                self.prefetched.append(sample.id)
            log.debug("prefetched %s (%d bytes downloaded)", sample.id, downloaded)

    def _learn_needs(self, index: int) -> None:
        """Know the inputs of every unfinished slide before ``index`` (once per slide)."""
        with self._changed:
            earlier = [s for s in self._samples[:index] if s.id not in self._done and s.id not in self._needs]
        for sample in earlier:
            self._needs[sample.id] = input_needs(sample, self._fetch)

    def _spare(self, index: int) -> list[Need]:
        """The inputs of the unfinished slides before ``index`` (their room stays free); raises once stopped."""
        with self._changed:
            if self._stop:
                raise _Stopped
            earlier = [s.id for s in self._samples[:index] if s.id not in self._done]
        return [need for slide_id in earlier for need in self._needs.get(slide_id, [])]
