"""The work budget (``--work-budget``): an admission limit on the samples the work folder holds.

A finished slide's samples (``units/<slide>/samples.arrow``) stay in the work folder until the
streaming pack has packed them and ``--release-units`` deletes them; a running unit is writing
its own. ``WorkAdmission`` is the one place that decides whether the next slide's unit may
start: both executors ask it before each submission (``may_start``) and tell it what started
(``started``) and finished (``finished``), so a slide waits rather than let the work folder grow
past the budget, and starts once the pack has released enough.

What counts, every time it decides:

- **on disk**: the ``samples.arrow`` of every finished unit in the work folder not yet released,
  measured (a stat per held unit: the pack deletes them from under us, which is the point);
- **running**: each unit submitted and not finished, by an estimate. A slide whose manifest
  gives ``spots`` is estimated at ``spots`` times the largest bytes per sample of the units
  finished so far; other slides at the largest finished unit. Both lean high on purpose (the
  budget is a limit on disk, so an over-estimate costs parallelism, an under-estimate disk).
  Before any unit with samples has finished there is no estimate: units then start one at a time.

It never deadlocks: a unit is always admitted when nothing is running. The executors submit in
the pack's order (``pipeline.build`` sorts the slides so), so with nothing running every slide
before the oldest pending one has finished and been taken by the pack: the oldest pending slide
is the one the pack needs next, and only it can let the pack draw, commit and release. Such a
slide, started although it takes the work folder past the budget, is counted (``forced``) and
the build's summary says so.

The bound that holds: with ``B`` the budget, ``S`` the largest slide's samples, ``H`` what the
pack holds with no unit running (the slides in its shuffle windows and those exhausted but not in
a committed shard; no admission rule can go below it) and ``u`` how far the units in flight
together exceed their estimates (none when each estimate is at least the slide's size, as for
slides of one size), the work folder's samples never exceed ``max(B + u, H + S)``: a unit admitted
while others run keeps measured + estimated within ``B``, and one admitted with nothing running
adds one slide to what the pack holds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from stcorpus.curate.build.workdir import SAMPLES_FILE, UnitResult, WorkDir
from stcorpus.curate.errors import SettingsError

if TYPE_CHECKING:
    from stcorpus.curate.manifest import Sample

log = logging.getLogger(__name__)

FLAG: Final = "--work-budget"


@dataclass
class AdmissionStats:
    """What the admission did in one build (for the summary and tests)."""

    admitted: int = 0  # units started
    waited: int = 0  # times the next slide was held back because it would not fit
    forced: int = 0  # units started with nothing running although they did not fit (the pack needed them)
    largest_forced: int = 0  # bytes the work folder would hold, by estimate, at the worst forced start
    peak: int = 0  # most bytes on disk + estimated running at any admission


class WorkAdmission:
    """Admits slide units while the work folder's samples (on disk and running) fit in ``limit`` bytes.

    >>> admission = WorkAdmission(WorkDir(Path(".work")), limit=50 << 30)  # doctest: +SKIP
    >>> if admission.may_start(sample):  # doctest: +SKIP
    ...     admission.started(sample); submit(sample)
    ... # and for every result: admission.finished(result), before the pack sees it

    Not thread-safe: the executor's submitting loop is its only caller.
    """

    def __init__(self, work: WorkDir, *, limit: int) -> None:
        if limit < 1:
            raise SettingsError(f"{FLAG} must be at least 1 byte, not {limit}")
        self.work = work
        self.limit = limit
        self.stats = AdmissionStats()
        self._held: dict[str, int] = {}  # slide -> bytes of its samples.arrow when last seen
        self._running: dict[str, int | None] = {}  # slide -> estimated bytes (None: no estimate yet)
        self._largest = 0  # bytes of the largest finished unit seen
        self._per_sample = 0.0  # largest bytes per sample of the units finished in this build
        self._scanned = False
        self._told: set[str] = set()  # slides whose wait was logged

    # -- what the work folder holds -----------------------------------------------------------

    def _scan(self) -> None:
        """The finished units already in the work folder (reused ones, or left by an earlier build)."""
        self._scanned = True
        if not self.work.units.is_dir():
            return
        for folder in self.work.units.iterdir():
            if folder.name.startswith("."):
                continue  # a running (or lost) unit's temporary folder: running units are estimated
            size = _size(folder / SAMPLES_FILE)
            if size is not None:
                self._held[folder.name] = size
                self._largest = max(self._largest, size)

    def on_disk(self) -> int:
        """Bytes of the unreleased finished units' samples, measured now."""
        if not self._scanned:
            self._scan()
        for slide_id in list(self._held):
            size = _size(self.work.unit_dir(slide_id) / SAMPLES_FILE)
            if size is None:
                del self._held[slide_id]  # released by the pack
            else:
                self._held[slide_id] = size
        return sum(self._held.values())

    def estimate(self, sample: Sample) -> int | None:
        """Bytes a unit of ``sample`` will write (see the module docstring); None before any unit finished."""
        if sample.spots is not None and self._per_sample > 0:
            return int(sample.spots * self._per_sample)
        return self._largest or None

    # -- the decision ---------------------------------------------------------------------------

    def may_start(self, sample: Sample) -> bool:
        """Whether the unit of ``sample`` may start now; True whenever nothing runs (never a deadlock)."""
        used = self.on_disk()
        estimate = self.estimate(sample)
        if not self._running:
            total = used + (estimate or 0)
            if total > self.limit:
                self.stats.forced += 1
                self.stats.largest_forced = max(self.stats.largest_forced, total)
                log.info(
                    "%s: starting %s although the work folder would hold ~%s of samples (budget %s): the pack "
                    "needs it next and nothing else is running",
                    FLAG,
                    sample.id,
                    format_bytes(total),
                    format_bytes(self.limit),
                )
            return True
        running = list(self._running.values())
        if estimate is None or any(e is None for e in running):
            return self._wait(sample, "no unit has finished yet to size it by")  # one unit at a time until then
        reserved = sum(e or 0 for e in running)
        if used + reserved + estimate > self.limit:
            return self._wait(
                sample,
                f"{format_bytes(used)} on disk + {len(running)} running (~{format_bytes(reserved)}) "
                f"+ ~{format_bytes(estimate)} for it > {format_bytes(self.limit)}",
            )
        return True

    def _wait(self, sample: Sample, why: str) -> bool:
        self.stats.waited += 1
        if sample.id not in self._told:
            self._told.add(sample.id)
            log.debug("%s: %s waits for room in the work folder (%s)", FLAG, sample.id, why)
        return False

    def started(self, sample: Sample) -> None:
        """The unit of ``sample`` was submitted: its estimate counts until it finishes."""
        estimate = self.estimate(sample)
        self._running[sample.id] = estimate
        self.stats.admitted += 1
        self.stats.peak = max(self.stats.peak, self.on_disk() + sum(e or 0 for e in self._running.values()))

    def finished(self, result: UnitResult) -> None:
        """A unit finished (any status): its samples, if any, are measured on disk from now on.

        Called before the pack sees the result, so the unit's size is learnt before it is released.
        """
        self._running.pop(result.slide_id, None)
        size = _size(self.work.unit_dir(result.slide_id) / SAMPLES_FILE)
        if size is None:
            return  # quarantined, failed, or no samples
        self._held[result.slide_id] = size
        self._largest = max(self._largest, size)
        if result.n_samples:
            self._per_sample = max(self._per_sample, size / result.n_samples)

    def forget(self, slide_ids: Iterable[str]) -> None:
        """Units that will not finish here (cancelled): their estimates no longer count."""
        for slide_id in slide_ids:
            self._running.pop(slide_id, None)

    def note(self) -> str | None:
        """A line for the build summary when some slide had to start over the budget, else None."""
        if not self.stats.forced:
            return None
        return (
            f"{FLAG} {format_bytes(self.limit)}: {self.stats.forced} slide(s) started alone although the work folder "
            f"then held more (up to ~{format_bytes(self.stats.largest_forced)}), because the pack needed them next; "
            "raise --work-budget (or lower --shuffle-window) to build slides in parallel"
        )


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def format_bytes(n: int) -> str:
    """``format_size`` of the cache budget (one size style for both budgets)."""
    from stcorpus.curate.fetch.budget import format_size

    return format_size(n)
