"""``--work-budget``: the admission rule on its own, then builds whose work folder is sampled throughout.

The bound the builds show (``curate/build/admission.py``): ``max(B + u, H + S)``, ``B`` the budget,
``S`` the largest slide's samples, ``H`` what the pack holds with no unit running and ``u`` how far
the units in flight exceed their estimates. With ``--shuffle-window 1``, one split and 7 samples
per shard, ``H`` is one slide at most (the last one drawn, until the shard with its last rows
commits); each estimate is the largest finished unit, so ``u`` is at most ``largest - smallest``
per unit in flight (2 per worker locally). Both terms are within ``B + S`` for a budget of a slide
or more; under a budget below one slide units run one at a time and the folder holds ``2 S`` at most.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from types import TracebackType

import pytest

from stcorpus.curate.build.admission import WorkAdmission
from stcorpus.curate.build.pack import PackSettings
from stcorpus.curate.build.pipeline import BuildSettings, build
from stcorpus.curate.build.splits import SplitSettings
from stcorpus.curate.build.workdir import SAMPLES_FILE, UnitResult, WorkDir
from stcorpus.curate.cli import main
from stcorpus.curate.errors import SettingsError
from stcorpus.curate.manifest import Sample
from tests.build_fixtures import good_slides, manifest
from tests.test_build import digests

#: Window 1, one split, small shards: what the pack holds with nothing running is one slide at most.
STREAMING = BuildSettings(
    progress=False,
    name="c",
    workers=2,
    pack=PackSettings(window=1, samples_per_shard=7),
    splits=SplitSettings(train=1.0, validation=0.0, test=0.0),
)


class WorkFolderProbe:
    """A thread that sums the work folder's ``samples.arrow`` bytes every ``every`` seconds and keeps the peak.

    Units being written (``units/.<slide>.<tag>.tmp/``) count too; a slide seen both under its
    temporary and its final name (a rename between two directory reads) counts once.
    """

    def __init__(self, units: Path, *, every: float = 0.002) -> None:
        self.units = units
        self.every = every
        self.peak = 0
        self.samples = 0  # how many times the folder was summed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def measure(self) -> int:
        """Bytes of samples in the work folder now."""
        sizes: dict[str, int] = {}
        try:
            entries = list(os.scandir(self.units))
        except FileNotFoundError:
            return 0
        for entry in entries:
            slide = entry.name[1:].split(".", 1)[0] if entry.name.startswith(".") else entry.name
            try:
                size = (Path(entry.path) / SAMPLES_FILE).stat().st_size
            except (FileNotFoundError, NotADirectoryError):
                continue
            sizes[slide] = max(size, sizes.get(slide, 0))
        return sum(sizes.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.measure())
            self.samples += 1
            time.sleep(self.every)

    def __enter__(self) -> WorkFolderProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()


def slide_sizes(work: Path) -> dict[str, int]:
    """Bytes of each unit's samples in a work folder that kept them (a build without --release-units)."""
    return {p.parent.name: p.stat().st_size for p in (work / "units").glob(f"*/{SAMPLES_FILE}")}


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, int]]:
    """A manifest of 6 real-data slides, its corpus built without a budget, and each slide's samples bytes."""
    root = tmp_path_factory.mktemp("budget")
    path = manifest(root / "m", good_slides(root / "data", 6))
    reference = root / "reference"
    build([path], out=reference, settings=STREAMING)
    sizes = slide_sizes(reference / ".work")
    assert len(sizes) == 6
    return path, reference, sizes


# --- the admission rule, shared-nothing --------------------------------------------------------


def _sample(slide_id: str, *, spots: int | None = None) -> Sample:
    return Sample(
        id=slide_id,
        study_id="study",
        source="hest",
        source_id=slide_id,
        technology="hest",
        assay="visium",
        species="mouse",
        licence="CC-BY-4.0",
        counts="raw",
        sources={},
        manifest="m",
        manifest_path=Path("m.yaml"),
        allow_local=True,
        spots=spots,
    )


def _finish(work: WorkDir, slide_id: str, size: int, *, n_samples: int = 10) -> UnitResult:
    """A finished unit with ``size`` bytes of samples (what the admission stats)."""
    folder = work.unit_dir(slide_id)
    folder.mkdir(parents=True)
    (folder / SAMPLES_FILE).write_bytes(b"x" * size)
    return UnitResult(slide_id=slide_id, status="built", settings_digest="", n_samples=n_samples)


def test_admission_waits_for_room_and_learns_sizes_from_disk(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / ".work")
    work.prepare()
    admission = WorkAdmission(work, limit=250)
    a, b, c, d = (_sample(x) for x in "abcd")
    assert admission.may_start(a)  # nothing runs: always
    admission.started(a)
    assert not admission.may_start(b)  # no unit finished yet: nothing to size it by, one at a time
    admission.finished(_finish(work, "a", 100))
    assert admission.on_disk() == 100 and admission.estimate(b) == 100
    assert admission.may_start(b)  # 100 on disk + 100 for b
    admission.started(b)
    assert not admission.may_start(c)  # 100 + 100 running + 100 > 250
    assert admission.stats.waited == 2
    (work.unit_dir("a") / SAMPLES_FILE).unlink()  # the pack released a
    assert admission.on_disk() == 0 and admission.may_start(c)
    admission.started(c)
    # A unit that wrote no samples (quarantined, failed) frees its estimate and holds nothing.
    admission.finished(UnitResult(slide_id="b", status="quarantined", settings_digest=""))
    admission.finished(_finish(work, "c", 120))
    assert admission.on_disk() == 120 and admission.estimate(d) == 120  # the largest finished unit
    assert admission.stats.forced == 0 and admission.note() is None


def test_admission_always_starts_a_slide_when_nothing_runs(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / ".work")
    work.prepare()
    _finish(work, "held", 500)  # left by an earlier build, or a slide in the pack's window
    (work.units / ".running.host-1-abc.tmp").mkdir()  # temporaries are not finished units
    admission = WorkAdmission(work, limit=100)
    assert admission.on_disk() == 500
    assert admission.may_start(_sample("next"))  # over the budget, but the pack needs it: no deadlock
    admission.started(_sample("next"))
    assert not admission.may_start(_sample("after"))
    assert admission.stats.forced == 1 and admission.stats.largest_forced == 1000  # 500 + the largest, 500
    note = admission.note()
    assert note is not None and "--work-budget" in note and "1 slide(s) started alone" in note


def test_a_slide_with_spots_is_estimated_by_the_largest_bytes_per_sample(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / ".work")
    work.prepare()
    admission = WorkAdmission(work, limit=10_000)
    admission.started(_sample("a"))
    admission.finished(_finish(work, "a", 1000, n_samples=100))  # 10 bytes per sample
    admission.started(_sample("b"))
    admission.finished(_finish(work, "b", 1000, n_samples=50))  # 20
    assert admission.estimate(_sample("small", spots=10)) == 200
    assert admission.estimate(_sample("unknown")) == 1000  # no spots in the manifest: the largest unit


def test_a_budget_of_nothing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="--work-budget must be at least 1 byte"):
        WorkAdmission(WorkDir(tmp_path), limit=0)


# --- builds ----------------------------------------------------------------------------------


def test_a_local_build_stays_within_the_work_budget(
    slides: tuple[Path, Path, dict[str, int]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, reference, sizes = slides
    largest = max(sizes.values())
    budget = int(2.5 * sum(sizes.values()) / len(sizes))  # holds two slides, not three
    out = tmp_path / "budget"
    settings = dataclasses.replace(STREAMING, release_units=True, work_budget=budget)
    caplog.set_level(logging.DEBUG, logger="stcorpus.curate.build.admission")
    with WorkFolderProbe(out / ".work" / "units") as probe:
        summary = build([path], out=out, settings=settings)
    assert probe.samples > 100
    # Units in flight exceed their estimates (the largest finished unit) by at most largest - smallest
    # each; a slide started with nothing running adds one to the one slide the pack holds then.
    slack = 2 * STREAMING.workers * (largest - min(sizes.values()))  # the local executor submits 2 per worker
    assert 0 < probe.peak <= max(budget + slack, 2 * largest) <= budget + largest, (probe.peak, budget, sizes)
    assert any("waits for room in the work folder" in r.getMessage() for r in caplog.records)
    assert not any("--work-budget" in note for note in summary.notes)  # nothing had to start over it
    assert digests(out) == digests(reference)
    assert not list((out / ".work" / "units").glob(f"*/{SAMPLES_FILE}"))


def test_a_budget_below_one_slide_builds_one_at_a_time_and_says_so(
    slides: tuple[Path, Path, dict[str, int]], tmp_path: Path
) -> None:
    path, reference, sizes = slides
    out = tmp_path / "tiny"
    settings = dataclasses.replace(STREAMING, release_units=True, work_budget=1024)
    with WorkFolderProbe(out / ".work" / "units") as probe:
        summary = build([path], out=out, settings=settings)
    # One unit at a time, plus the one slide the pack still holds: the next-needed slide always starts.
    assert probe.peak <= 2 * max(sizes.values())
    notes = [note for note in summary.notes if note.startswith("--work-budget 1.0 KiB")]
    assert len(notes) == 1 and "started alone" in notes[0] and "raise --work-budget" in notes[0]
    assert summary.slides == {"built": 6}
    assert digests(out) == digests(reference)


def test_work_budget_needs_release_units(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SettingsError, match="--work-budget needs --release-units"):
        BuildSettings(work_budget=1 << 30)
    path = manifest(tmp_path / "m", good_slides(tmp_path / "data", 1))
    assert main(["build", str(path), "--out", str(tmp_path / "out"), "--work-budget", "50G", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "--work-budget needs --release-units" in error and "add --release-units" in error
    assert not (tmp_path / "out").exists()
    # Where units run, not what they write: the budget is not among the settings corpus.json records.
    budgeted = BuildSettings(release_units=True, work_budget=1 << 30)
    assert budgeted.to_dict() == BuildSettings(release_units=True).to_dict()
    with pytest.raises(SystemExit):
        main(["build", str(path), "--out", str(tmp_path / "out"), "--work-budget", "lots"])
    assert "'lots' is not a size" in capsys.readouterr().err
