"""The Dask executor: a build on a LocalCluster is byte-identical to a local one, a worker killed
mid-slide changes nothing, cluster files are checked, and workers that cannot run units say why."""

from __future__ import annotations

import importlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from stcorpus import __version__, schema
from stcorpus.curate.build.pipeline import BuildSettings, build
from stcorpus.curate.cli import main
from stcorpus.curate.errors import ExecutorError, SettingsError
from tests.build_fixtures import bad_slides, good_slides, manifest
from tests.test_build import DEMO, QUIET, digests

pytest.importorskip("distributed")  # the `dask` extra; `make test` installs it

ROOT = Path(__file__).resolve().parents[1]
SLURM_EXAMPLE = ROOT / "curate" / "build" / "slurm-example.yaml"


def _leftovers(out: Path) -> list[str]:
    """Temporary unit folders and executor markers left in the work folder."""
    return sorted(p.name for p in (out / ".work").rglob(".*") if p.name.endswith((".tmp", ".marker", ".probe")))


def test_local_cluster_build_is_byte_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Real-data slides that build, one the reader's QC quarantines (a low-resolution Space Ranger
    # image) and, in a second manifest, one quarantined for unmapped genes.
    bad = bad_slides(tmp_path / "bad")
    first = manifest(
        tmp_path / "m1", [*good_slides(tmp_path / "good", 2, integer=True), bad["BAD-too-coarse"][0]], name="one"
    )
    second = manifest(tmp_path / "m2", [bad["BAD-unmapped"][0]], name="two")
    common = [str(first), str(second), "--name", "c", "--no-progress", "--cache", str(tmp_path / "cache")]

    assert main(["build", *common, "--out", str(tmp_path / "local")]) == 0
    capsys.readouterr()
    assert main(["build", *common, "--out", str(tmp_path / "dask"), "--dask-cluster", "local", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "dask LocalCluster, 2 worker processes" in printed and "dashboard http://" in printed

    local, dask = digests(tmp_path / "local"), digests(tmp_path / "dask")
    assert local == dask
    assert sum(name.startswith("wds/") for name in dask) >= 1 and sum(name.startswith("parquet/") for name in dask) >= 1
    rows = {r["slide_id"]: r for r in pq.read_table(tmp_path / "dask" / schema.SLIDES_FILE).to_pylist()}
    statuses = {slide: (row["status"], (row["reason"] or "").split(":")[0]) for slide, row in rows.items()}
    assert statuses == {
        "GOOD-0": ("built", ""),
        "GOOD-1": ("built", ""),
        "BAD-too-coarse": ("quarantined", bad["BAD-too-coarse"][1]),
        "BAD-unmapped": ("quarantined", "unmapped_genes"),
    }
    assert _leftovers(tmp_path / "dask") == []


# --- workers lost mid-slide ----------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A LocalCluster of 2 single-threaded worker processes, shared by the worker-loss tests."""
    local_cluster: Any = importlib.import_module("distributed").LocalCluster
    with local_cluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as running:
        yield running


def _patch_unit(slide_id: str, flag: str, action: str) -> int:
    """Run on each worker with ``client.run``: the first unit of ``slide_id`` (on any worker; the
    work folder is shared) starts writing its unit, records its pid in ``flag``, then hangs
    (``action="hang"``) or kills its own process (``"die"``). Every other unit runs normally.

    A worker process that the nanny starts again imports the module afresh, without the patch.
    """
    import stcorpus.curate.build.dask_executor as module
    from stcorpus.curate.build.workdir import WorkDir

    original = vars(module).setdefault("_original_unit_task", vars(module)["unit_task"])

    def patched(sample: Any, work_root: str, unit: Any, fetch: Any) -> Any:
        if sample.id != slide_id or Path(flag).exists():
            return original(sample, work_root, unit, fetch)
        tmp = WorkDir(Path(work_root)).begin(sample.id)
        (tmp / "samples.arrow").write_bytes(b"half a unit")  # what a worker lost mid-write leaves
        Path(flag + ".part").write_text(f"{os.getpid()} {tmp}")
        Path(flag + ".part").rename(flag)
        if action == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(300)
        raise AssertionError("this worker should have been killed")

    vars(module)["unit_task"] = patched
    return os.getpid()


def _unpatch_unit() -> None:
    import stcorpus.curate.build.dask_executor as module

    if "_original_unit_task" in vars(module):
        vars(module)["unit_task"] = vars(module).pop("_original_unit_task")


def test_worker_killed_mid_slide(tmp_path: Path, cluster: Any) -> None:
    from stcorpus.curate.build.dask_executor import DaskExecutor

    path = manifest(tmp_path / "m", good_slides(tmp_path / "data", 3))
    settings = BuildSettings(progress=False, name="c")
    build([path], out=tmp_path / "reference", settings=settings)

    flag = tmp_path / "hanging"
    killed: dict[str, Any] = {}

    def kill_the_hanging_worker() -> None:
        deadline = time.monotonic() + 120
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not flag.exists():
            return
        pid, tmp = flag.read_text().split(" ", 1)
        killed["tmp_existed"] = Path(tmp).is_dir()
        killed["tmp"] = tmp
        os.kill(int(pid), signal.SIGKILL)
        killed["pid"] = int(pid)

    with DaskExecutor.connect(cluster.scheduler_address, progress_every=1.0) as executor:
        before = executor.client.run(_patch_unit, "GOOD-1", str(flag), "hang")
        try:
            killer = threading.Thread(target=kill_the_hanging_worker, daemon=True)
            killer.start()
            summary = build([path], out=tmp_path / "dask", settings=settings, executor=executor)
            killer.join(timeout=5)
        finally:
            executor.client.run(_unpatch_unit)
        after = executor.client.run(os.getpid)

    assert killed.get("pid") in before.values(), "the slide never reached the patched worker"
    assert killed["pid"] not in after.values()  # the nanny replaced the killed process
    assert killed["tmp_existed"] and not Path(killed["tmp"]).exists()  # its half-written unit is gone
    assert summary.slides == {"built": 3}
    assert digests(tmp_path / "dask") == digests(tmp_path / "reference")
    assert _leftovers(tmp_path / "dask") == []


def _set_allowed_failures(dask_scheduler: Any, n: int) -> int:
    previous: int = dask_scheduler.allowed_failures
    dask_scheduler.allowed_failures = n
    return previous


def test_slide_that_keeps_killing_workers_is_failed_not_fatal(tmp_path: Path, cluster: Any) -> None:
    from stcorpus.curate.build.dask_executor import DaskExecutor

    path = manifest(tmp_path / "m", good_slides(tmp_path / "data", 2))
    with DaskExecutor.connect(cluster.scheduler_address) as executor:
        # No second chance: the first lost worker makes the slide `failed` (KilledWorker).
        previous = executor.client.run_on_scheduler(_set_allowed_failures, n=0)
        executor.client.run(_patch_unit, "GOOD-0", str(tmp_path / "died"), "die")
        try:
            summary = build([path], out=tmp_path / "out", settings=QUIET, executor=executor)
        finally:
            executor.client.run(_unpatch_unit)
            executor.client.run_on_scheduler(_set_allowed_failures, n=previous)
    assert (tmp_path / "died").exists()
    assert summary.slides == {"built": 1, "failed": 1}
    rows = {r["slide_id"]: r for r in pq.read_table(tmp_path / "out" / schema.SLIDES_FILE).to_pylist()}
    assert rows["GOOD-0"]["status"] == "failed" and rows["GOOD-0"]["reason"].startswith("worker_lost: ")
    assert rows["GOOD-1"]["status"] == "built"
    # `failed` units are retried by the next build: the same command then builds the slide.
    with DaskExecutor.connect(cluster.scheduler_address) as executor:
        again = build([path], out=tmp_path / "out", settings=QUIET, executor=executor)
    assert again.slides == {"built": 2} and again.reused_units == 1


def _patch_reader(slide_id: str, kind: str) -> int:
    """Run on each worker: the HEST reader raises ``kind`` (MemoryError, EOFError) for ``slide_id``."""
    import stcorpus.curate.readers.hest as hest

    original = vars(hest).setdefault("_original_read", vars(hest)["read"])
    error = {"MemoryError": MemoryError, "EOFError": EOFError}[kind]

    def read(*, sample: Any, files: Any, images: Any) -> Any:
        if sample.id == slide_id:
            raise error("crafted")
        return original(sample=sample, files=files, images=images)

    vars(hest)["read"] = read
    return os.getpid()


def _unpatch_reader() -> None:
    import stcorpus.curate.readers.hest as hest

    if "_original_read" in vars(hest):
        vars(hest)["read"] = vars(hest).pop("_original_read")


def _patch_task_raise(slide_id: str) -> None:
    """Run on each worker: the unit task of ``slide_id`` raises outside the unit (a broken task)."""
    import stcorpus.curate.build.dask_executor as module

    original = vars(module).setdefault("_original_unit_task", vars(module)["unit_task"])

    def patched(sample: Any, work_root: str, unit: Any, fetch: Any) -> Any:
        if sample.id == slide_id:
            raise RuntimeError("a task that raised")
        return original(sample, work_root, unit, fetch)

    vars(module)["unit_task"] = patched


def test_an_exception_in_one_slide_does_not_stop_a_dask_build(tmp_path: Path, cluster: Any) -> None:
    from stcorpus.curate.build.dask_executor import DaskExecutor

    path = manifest(tmp_path / "m", good_slides(tmp_path / "data", 3))
    with DaskExecutor.connect(cluster.scheduler_address, retries=0) as executor:
        executor.client.run(_patch_reader, "GOOD-0", "MemoryError")
        executor.client.run(_patch_task_raise, "GOOD-2")
        try:
            summary = build([path], out=tmp_path / "out", settings=QUIET, executor=executor)
        finally:
            executor.client.run(_unpatch_reader)
            executor.client.run(_unpatch_unit)
    assert summary.slides == {"built": 1, "failed": 2} and summary.exit_code == 1
    rows = {r["slide_id"]: r for r in pq.read_table(tmp_path / "out" / schema.SLIDES_FILE).to_pylist()}
    assert rows["GOOD-0"]["reason"].startswith("error: MemoryError: crafted (while reading: ")
    assert rows["GOOD-2"]["reason"].startswith("error: RuntimeError: a task that raised (while running on a Dask")
    assert rows["GOOD-1"]["status"] == "built"


def test_dask_workers_sharing_the_cache_get_the_next_slides_prefetched(
    tmp_path: Path, cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Workers that read the build process's --cache: slide 2 is downloaded while slides 0 and 1
    compute, its unit finds it cached; a worker that does not share the cache is found out."""
    import logging
    import shutil

    from stcorpus.curate.build.dask_executor import DaskExecutor, marker_path, sees_client_cache
    from tests.build_fixtures import IMAGE, hest_entry, variant_h5ad
    from tests.httpserver import serve
    from tests.test_fetch_http import settings

    www = tmp_path / "www"
    www.mkdir()
    for i in range(3):
        variant_h5ad(www, f"st{i}", drop=i)
    shutil.copyfile(IMAGE, www / "img.jpg")
    with serve(www) as server, DaskExecutor.connect(cluster.scheduler_address) as executor:
        server.rate = 1.2e6
        entries = [
            hest_entry(f"DP-{i}", st=server.file_url(f"st{i}.h5ad"), wsi=server.file_url("img.jpg"), patient=f"P{i}")
            for i in range(3)
        ]
        out = tmp_path / "out"
        with caplog.at_level(logging.INFO, logger="stcorpus"):
            summary = build(
                [manifest(tmp_path / "m", entries)],
                out=out,
                settings=QUIET,
                fetch=settings(tmp_path, progress_every=None, prefetch=1),
                executor=executor,
            )
    assert summary.slides == {"built": 3}
    assert "--prefetch 1: the 2 Dask worker(s) share the fetch cache" in caplog.text
    first_done = min((out / ".work" / "units" / f"DP-{i}" / "result.json").stat().st_mtime for i in (0, 1))
    assert server.requests_for("/st2.h5ad", method="GET")[0].at < first_done
    assert server.count("/st2.h5ad", method="GET") == 1  # the unit found the prefetched file
    # A cache the worker does not share: it does not see the marker, and says so without a long wait.
    marker = marker_path(tmp_path / "mine" / "tmp", "tok")
    marker.parent.mkdir(parents=True)
    marker.write_text("tok\n")
    assert sees_client_cache(str(tmp_path / "mine"), "tok", wait=0)
    assert not sees_client_cache(str(tmp_path / "elsewhere"), "tok", wait=0)


def test_a_dask_build_stays_within_the_work_budget(
    tmp_path: Path, cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """--work-budget on Dask: tasks are submitted as the work folder has room, with the same bytes."""
    import dataclasses
    import logging

    from stcorpus.curate.build.dask_executor import DaskExecutor
    from tests.test_work_budget import STREAMING, WorkFolderProbe, slide_sizes

    path = manifest(tmp_path / "m", good_slides(tmp_path / "data", 4))
    reference = tmp_path / "reference"
    build([path], out=reference, settings=dataclasses.replace(STREAMING, workers=1))
    sizes = slide_sizes(reference / ".work")
    largest = max(sizes.values())
    budget = int(2.5 * sum(sizes.values()) / len(sizes))  # two slides, not three
    out = tmp_path / "dask"
    caplog.set_level(logging.DEBUG, logger="stcorpus.curate.build.admission")
    with (
        DaskExecutor.connect(cluster.scheduler_address) as executor,
        WorkFolderProbe(out / ".work" / "units") as probe,
    ):
        summary = build(
            [path],
            out=out,
            settings=dataclasses.replace(STREAMING, release_units=True, work_budget=budget),
            executor=executor,
        )
    assert summary.slides == {"built": 4}
    # At most 2 units in flight under this budget, each over its estimate by largest - smallest at most
    # (tests/test_work_budget.py states the bound).
    slack = 2 * (largest - min(sizes.values()))
    assert 0 < probe.peak <= max(budget + slack, 2 * largest) <= budget + largest, (probe.peak, budget, sizes)
    assert any("waits for room in the work folder" in r.getMessage() for r in caplog.records)
    assert digests(out) == digests(reference)
    assert _leftovers(out) == []


# --- cluster files --------------------------------------------------------------------------


def test_slurm_example_file_makes_a_job_script(tmp_path: Path) -> None:
    from stcorpus.curate.build.dask_executor import jobqueue_kwargs, load_cluster_file

    slurm_cluster: Any = importlib.import_module("dask_jobqueue").SLURMCluster

    config = load_cluster_file(SLURM_EXAMPLE)
    assert config.cluster == "slurm" and config.jobs >= 1
    kwargs = jobqueue_kwargs(config)
    assert kwargs["processes"] == config.options.cores  # one single-threaded worker per core
    kwargs["scheduler_options"]["dashboard_address"] = ":0"
    kwargs["log_directory"] = str(tmp_path / "logs")  # SLURMCluster creates it
    with slurm_cluster(**kwargs) as cluster:
        script = cluster.job_script()
    assert f"#SBATCH --cpus-per-task={config.options.cores}" in script
    assert f"#SBATCH -A {config.options.account}" in script
    assert f"#SBATCH -t {config.options.walltime}" in script
    assert f"--nworkers {config.options.cores}" in script and "--nthreads 1" in script
    assert all(line in script for line in config.options.job_script_prologue)


FAKE_SBATCH = """#!/usr/bin/env bash
# SLURM's sbatch, as far as dask-jobqueue uses it: run (a copy of) the job script, print its id.
id=$RANDOM$RANDOM
cp "$1" "{jobs}/job-$id.sh"
SLURM_JOB_ID=$id setsid bash "{jobs}/job-$id.sh" > "{jobs}/job-$id.log" 2>&1 &
echo $! > "{jobs}/job-$id.pid"
echo "Submitted batch job $id"
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
for id in "$@"; do kill -- -"$(cat "{jobs}/job-$id.pid")" 2>/dev/null; done
exit 0
"""


def test_slurm_cluster_file_runs_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No SLURM here: a stand-in sbatch runs dask-jobqueue's real job script on this machine.
    import sys

    jobs, bin_dir = tmp_path / "jobs", tmp_path / "bin"
    jobs.mkdir()
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text.format(jobs=jobs))
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"""cluster: slurm
jobs: 1
worker_timeout: 120
dashboard_address: ":0"
options:
  cores: 2
  memory: 4GB
  walltime: "00:10:00"
  account: mylab
  python: {sys.executable}
  local_directory: {tmp_path / "scratch"}
  log_directory: {tmp_path / "logs"}
  job_script_prologue: ["echo prologue ran on $SLURM_JOB_ID"]
"""
    )
    out = tmp_path / "out"
    bad = bad_slides(tmp_path / "bad")
    path = manifest(tmp_path / "m", [*good_slides(tmp_path / "good", 2), bad["BAD-too-coarse"][0]])
    assert main(["build", str(path), "--out", str(out), "--no-progress", "--dask-cluster", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "dask SLURMCluster, 1 jobs x 2 workers" in printed and "slides: 2 built, 1 quarantined" in printed
    (script,) = jobs.glob("job-*.sh")
    assert "#SBATCH -A mylab" in script.read_text()
    log = script.with_suffix(".log").read_text()
    assert "prologue ran on " in log and log.count("Start Nanny") == 2
    # scancel (on closing the cluster) ended the job's processes.
    pid = int(script.with_suffix(".pid").read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "cluster: slurm\njobs: 2\noptions: {cores: 4, memory: 8GB, acount: lab}\n",
            "cluster.yaml: unknown key(s) in options: acount (did you mean 'account'?); known: cores, memory",
        ),
        (
            "cluster: slurm\njobs: 2\nworkers: 3\noptions: {cores: 4, memory: 8GB}\n",
            "unknown key(s): workers; known: jobs, adaptive",
        ),
        (
            "cluster: slurm\njobs: 2\noptions: {cores: four, memory: 8GB}\n",
            "options.cores must be an integer, not 'four'",
        ),
        # pydantic's lax mode read 'no' as false
        (
            "cluster: slurm\njobs: 2\nadaptive: 'no'\noptions: {cores: 4, memory: 8GB}\n",
            "adaptive must be true or false",
        ),
        ("cluster: slurm\njobs: 2\nadaptive: no\noptions: {cores: 4, memory: 8GB}\n", "not 'no'"),
        (
            "cluster: slurm\njobs: 2\nadaptive: 0\noptions: {cores: 4, memory: 8GB}\n",
            "adaptive must be true or false, not 0",
        ),
        ("cluster: slurm\njobs: '2'\noptions: {cores: 4, memory: 8GB}\n", "jobs must be an integer, not '2'"),
        (
            "cluster: lsf\njobs: 2\noptions: {cores: 4, memory: 8GB}\n",
            "cluster.yaml: cluster must be one of 'slurm', 'pbs' or 'sge', not 'lsf'",
        ),
        ("cluster: pbs\noptions: {cores: 4, memory: 8GB}\n", "cluster.yaml: jobs is missing (it is required)"),
        (
            "cluster: sge\njobs: 1\noptions: {cores: 4, memory: 8GB, account: lab}\n",
            "unknown key(s) in options: account; known: cores, memory",
        ),
        (
            "cluster: slurm\njobs: 1\noptions: {cores: 4, processes: 3, memory: 8GB}\n",
            "options: cores (4) must be a multiple of processes (3)",
        ),
        ("- a list\n", "a cluster file is a YAML mapping"),
    ],
)
def test_cluster_file_errors(tmp_path: Path, text: str, message: str) -> None:
    from stcorpus.curate.build.dask_executor import jobqueue_kwargs, load_cluster_file

    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(SettingsError, match=r"cluster\.yaml") as raised:
        jobqueue_kwargs(load_cluster_file(path))
    assert message in str(raised.value)


def test_sge_file_keeps_its_own_keys(tmp_path: Path) -> None:
    from stcorpus.curate.build.dask_executor import jobqueue_kwargs, load_cluster_file

    path = tmp_path / "sge.yaml"
    path.write_text("cluster: sge\njobs: 3\nadaptive: true\noptions: {cores: 8, memory: 32GB, project: p1}\n")
    config = load_cluster_file(path)
    assert config.adaptive and config.jobs == 3
    assert jobqueue_kwargs(config) == {
        "cores": 8,
        "memory": "32GB",
        "project": "p1",
        "processes": 8,
        "scheduler_options": {"dashboard_address": ":8787", "allowed_failures": 3},
    }


# --- workers that cannot run units, a missing extra, conflicting options ----------------------


def test_worker_problems_name_the_folder_the_cache_and_the_version(tmp_path: Path) -> None:
    from stcorpus.curate.build.dask_executor import marker_path, worker_problems

    work = tmp_path / "work"
    work.mkdir()
    assert worker_problems(str(work), "t0k3n", __version__, str(tmp_path / "cache"), wait=0) == [
        f"worker on {os.uname().nodename} (pid {os.getpid()}) cannot see the work folder {work} (the client's marker "
        "file is not there): put --work-dir on a filesystem shared by the client and every worker"
    ]
    marker_path(work, "t0k3n").write_text("t0k3n\n")
    assert worker_problems(str(work), "t0k3n", __version__, str(tmp_path / "cache"), wait=0) == []
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache should be")
    problems = worker_problems(str(work), "t0k3n", "0.0.0-other", str(blocked), wait=0)
    assert len(problems) == 2
    assert f"runs stcorpus {__version__}, the client 0.0.0-other" in problems[0]
    assert f"cannot write the fetch cache {blocked}" in problems[1]


def test_stale_temporaries_of_other_slides_are_kept(tmp_path: Path) -> None:
    from stcorpus.curate.build.dask_executor import remove_stale_temporaries

    units = tmp_path / "units"
    for name in (".GOOD-1.123.tmp", ".GOOD-1.77.old.tmp", ".GOOD-10.123.tmp", "GOOD-1", ".GOOD-2.5.tmp"):
        (units / name).mkdir(parents=True)
    assert remove_stale_temporaries(tmp_path, ["GOOD-1", "GOOD-3"]) == 2
    assert sorted(p.name for p in units.iterdir()) == [".GOOD-10.123.tmp", ".GOOD-2.5.tmp", "GOOD-1"]


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from stcorpus.curate.build.dask_executor import DaskExecutor

    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` now raises ImportError
    with pytest.raises(ExecutorError, match=r"needs the 'dask' extra .*pip install 'stcorpus\[dask\]'"):
        DaskExecutor.local(2)


def test_conflicting_executor_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    assert main(["build", str(DEMO), "--out", out, "--executor", "local", "--scheduler", "tcp://h:8786"]) == 2
    assert "need --executor dask" in capsys.readouterr().err
    assert main(["build", str(DEMO), "--out", out, "--scheduler", "tcp://h:8786", "--dask-cluster", "local"]) == 2
    assert "either --scheduler or --dask-cluster" in capsys.readouterr().err
    assert main(["build", str(DEMO), "--out", out, "--dask-cluster", str(tmp_path / "nope.yaml")]) == 2
    assert "not 'local' and not a cluster file" in capsys.readouterr().err
