"""Slide units as tasks on a Dask cluster: a ``LocalCluster``, a running scheduler, or SLURM/PBS/SGE jobs.

``DaskExecutor`` implements the ``UnitExecutor`` protocol of ``executors.py``: every pending
slide becomes one task (``run_dask_unit``), which reads its inputs from the fetch cache or their
URLs on the worker, writes its unit into the work folder and sends back only the small
``UnitResult``. The pack and everything after it run where the build was started, on the units
in the work folder, so the corpus is byte-identical to a local build.

What the cluster must share with the client:

- **The work folder** (``--work-dir``, default ``<out>/.work``): a path on a filesystem that
  the client and every worker see under the same name (Lustre, GPFS, NFS, a laptop's disk for a
  ``LocalCluster``). The client writes a marker file there and every worker checks it before
  running a unit, so a worker that cannot see the folder fails with a message saying so instead
  of writing units nobody reads.
- **The fetch cache** (``FetchSettings.cache_dir``, ``--cache``): either shared (downloads are
  locked per URL with ``flock``, so workers never fetch a file twice; on NFS this needs working
  lock support) or a node-local path that exists on every node (each node then downloads what
  its units need). The path travels to the workers as the client resolved it.
- **Local sources**: manifest entries with local paths are read by the workers at the same
  (absolute) paths.
- **The same stcorpus version**: units record the version in their settings digest; a worker
  with another version is refused.

Object storage (an ``s3://`` work folder) is not supported yet: the work folder is a path that
the pack memory-maps unit by unit and the QC report reads plots from; supporting it means
staging units on the workers, uploading them with a final marker object and bringing them
back to the client before the pack.

Failures: a slide that cannot be built comes back as the same ``quarantined`` or ``failed``
``UnitResult`` as locally. A worker lost mid-slide (killed, out of memory, its job's walltime
over) makes the scheduler run the slide again on another worker, up to ``allowed_failures``
times, after which the slide is recorded as ``failed`` (``worker_lost``) and retried by the next
build. A half-written unit is never read: a unit is written into a temporary folder and renamed
into place, and the temporaries of lost workers are deleted when the build's units are done.
Any exception inside a slide's unit makes that slide ``failed`` in the unit itself; a task that
raises outside it (a bug, a full disk) is retried ``retries`` times and then recorded as that
slide's ``failed`` result too: one slide never stops a build. Only a worker that cannot run units
at all (an ``ExecutorError``: another stcorpus version, no shared work folder) stops it.

The Dask extra is optional (``pip install 'stcorpus[dask]'``); nothing here imports Dask until
an executor is made.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import Field, ValidationError, model_validator

from stcorpus import __version__
from stcorpus.curate.build.executors import Prefetcher, unit_task
from stcorpus.curate.build.unit import UnitSettings, failed_unit, worker_lost_unit
from stcorpus.curate.build.workdir import UnitResult
from stcorpus.curate.errors import TIMEOUT_ERRORS, ExecutorError, SettingsError
from stcorpus.settings import SettingsModel, format_validation_error, load_yaml, one_of, type_message

#: What a target or scheduler that cannot be reached raises.
_UNREACHABLE: tuple[type[BaseException], ...] = (OSError, *TIMEOUT_ERRORS)

if TYPE_CHECKING:
    from stcorpus.curate.build.admission import WorkAdmission
    from stcorpus.curate.fetch import FetchSettings
    from stcorpus.curate.manifest import Sample

log = logging.getLogger(__name__)

#: What to install when Dask is missing.
EXTRA_HINT: Final = "pip install 'stcorpus[dask]'"
#: Seconds a worker keeps looking for the client's marker before it says it cannot see the work
#: folder (network filesystems may show a new file to other nodes a little late).
MARKER_WAIT: Final = 10.0
_MARKER_PREFIX: Final = ".dask-"


def _distributed() -> Any:
    """The ``distributed`` module, or an error naming the extra to install.

    Typed ``Any``: its functions carry no annotations, so strict mypy would refuse every call.
    """
    try:
        import dask  # noqa: F401
        import distributed
    except ImportError as exc:
        raise ExecutorError(
            f"the Dask executor needs the 'dask' extra ({exc.name} is not installed): {EXTRA_HINT}"
        ) from None
    return distributed


# ---------------------------------------------------------------------------------------------
# dask-jobqueue cluster files (SLURM, PBS, SGE)
# ---------------------------------------------------------------------------------------------


class JobOptions(SettingsModel):
    """Keyword arguments every dask-jobqueue cluster takes; one batch job runs ``processes`` workers.

    ``processes`` defaults to ``cores``: one single-threaded worker process per core, because
    units hold the GIL in places (parsing, tile bookkeeping), so threads would not add speed.
    """

    cores: int = Field(ge=1)  # cores per job
    memory: str  # memory per job, e.g. "64GB" (split evenly between its worker processes)
    processes: int | None = Field(default=None, ge=1)
    queue: str | None = None
    walltime: str | None = None
    interface: str | None = None  # network interface of the workers, e.g. "ib0"
    local_directory: str | None = None  # node-local scratch for the workers' own files
    log_directory: str | None = None
    job_name: str | None = None
    python: str | None = None  # the Python that runs the workers (default: the client's)
    shebang: str | None = None
    death_timeout: float | None = Field(default=None, gt=0)
    job_script_prologue: tuple[str, ...] = ()  # shell lines before the worker starts (module load, venv)
    job_extra_directives: tuple[str, ...] = ()  # extra #SBATCH / #PBS / #$ lines
    job_directives_skip: tuple[str, ...] = ()
    worker_extra_args: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _whole_threads(self) -> JobOptions:
        if self.processes is not None and self.cores % self.processes:
            raise ValueError(f"cores ({self.cores}) must be a multiple of processes ({self.processes})")
        return self


class SlurmOptions(JobOptions):
    """``dask_jobqueue.SLURMCluster`` keyword arguments."""

    account: str | None = None
    job_cpu: int | None = Field(default=None, ge=1)
    job_mem: str | None = None


class PBSOptions(JobOptions):
    """``dask_jobqueue.PBSCluster`` keyword arguments."""

    account: str | None = None
    resource_spec: str | None = None


class SGEOptions(JobOptions):
    """``dask_jobqueue.SGECluster`` keyword arguments."""

    project: str | None = None
    resource_spec: str | None = None


class _ClusterFile(SettingsModel):
    jobs: int = Field(ge=1)  # batch jobs to scale to
    adaptive: bool = False  # scale between 0 and `jobs` with the work left instead of holding `jobs`
    worker_timeout: float = Field(default=3600.0, gt=0)  # seconds to wait for the first worker (jobs queue)
    allowed_failures: int = Field(default=3, ge=0)  # worker losses a slide may cause before it is `failed`
    retries: int = Field(default=2, ge=0)  # re-runs of a unit whose task raised
    dashboard_address: str = ":8787"


class SlurmClusterFile(_ClusterFile):
    """A SLURM cluster file (``cluster: slurm``)."""

    cluster: Literal["slurm"]
    options: SlurmOptions


class PBSClusterFile(_ClusterFile):
    """A PBS cluster file (``cluster: pbs``)."""

    cluster: Literal["pbs"]
    options: PBSOptions


class SGEClusterFile(_ClusterFile):
    """An SGE cluster file (``cluster: sge``)."""

    cluster: Literal["sge"]
    options: SGEOptions


ClusterFile = SlurmClusterFile | PBSClusterFile | SGEClusterFile
#: The cluster file's model for each ``cluster:`` value.
CLUSTER_FILES: Final[Mapping[str, type[ClusterFile]]] = {
    "slurm": SlurmClusterFile,
    "pbs": PBSClusterFile,
    "sge": SGEClusterFile,
}
_CLUSTER_CLASSES: Final = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster"}


def load_cluster_file(path: Path) -> ClusterFile:
    """Read and check a dask-jobqueue cluster file (see ``curate/build/slurm-example.yaml``).

    Unknown keys, wrong types and a missing ``cluster``/``jobs``/``options.cores``/``options.memory``
    are errors that name the key.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read the cluster file {path} (--dask-cluster): {exc}") from None
    return parse_cluster_config(load_yaml(text, source=str(path), error=SettingsError), source=str(path))


def parse_cluster_config(raw: Any, *, source: str = "cluster file") -> ClusterFile:
    """Check a cluster file's content (a mapping) and return it typed."""
    if not isinstance(raw, Mapping):
        raise SettingsError(f"{source}: a cluster file is a YAML mapping with `cluster: slurm|pbs|sge` at the top")
    # The model follows from `cluster`, so that every other message names the keys of that kind.
    model = CLUSTER_FILES.get(raw.get("cluster"))  # type: ignore[arg-type]
    if model is None:
        raise SettingsError(f"{source}: {type_message('cluster', [one_of(CLUSTER_FILES)], raw.get('cluster'))}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc, source=source, raw=raw, model=model)) from None


def jobqueue_kwargs(config: ClusterFile) -> dict[str, Any]:
    """The keyword arguments of the dask-jobqueue cluster class: the options written in the file,
    ``processes`` defaulting to ``cores``, and the scheduler settings (dashboard, allowed failures)."""
    kwargs: dict[str, Any] = {
        name: (list(value) if isinstance(value, tuple) else value)
        for name, value in config.options.model_dump(exclude_unset=True).items()
    }
    kwargs.setdefault("processes", config.options.cores)
    kwargs["scheduler_options"] = {
        "dashboard_address": config.dashboard_address,
        "allowed_failures": config.allowed_failures,
    }
    return kwargs


# ---------------------------------------------------------------------------------------------
# What runs on a worker
# ---------------------------------------------------------------------------------------------


def marker_path(work_root: Path, token: str) -> Path:
    """The file the client writes into the work folder and every worker must see."""
    return work_root / f"{_MARKER_PREFIX}{token}.marker"


def _sees_marker(work_root: Path, token: str, *, wait: float) -> bool:
    marker = marker_path(work_root, token)
    deadline = time.monotonic() + wait
    while True:
        try:
            text = marker.read_text(encoding="utf-8")
        except OSError:
            text = ""  # not there (yet): a network filesystem may show a new file late
        if text.strip() == token:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def sees_client_cache(cache_dir: str, token: str, *, wait: float = 2.0) -> bool:
    """True when this worker reads the client's marker in the fetch cache: it shares the build process's cache."""
    return _sees_marker(Path(cache_dir) / "tmp", token, wait=wait)


def worker_problems(
    work_root: str, token: str, version: str, cache_dir: str, *, wait: float = MARKER_WAIT
) -> list[str]:
    """What keeps this worker from running units (empty when nothing does).

    Checks that it runs the client's stcorpus version, sees the client's marker in the work
    folder and can write there, and can create and write the fetch cache.
    """
    where = f"worker on {socket.gethostname()} (pid {os.getpid()})"
    problems = []
    if version != __version__:
        problems.append(f"{where} runs stcorpus {__version__}, the client {version}: install the same version")
    root = Path(work_root)
    if not _sees_marker(root, token, wait=wait):
        problems.append(
            f"{where} cannot see the work folder {work_root} (the client's marker file is not there): put "
            "--work-dir on a filesystem shared by the client and every worker"
        )
    else:
        probe = root / f"{_MARKER_PREFIX}{token}.{socket.gethostname()}.{os.getpid()}.probe"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            problems.append(f"{where} cannot write into the work folder {work_root}: {exc}")
    cache = Path(cache_dir)
    probe = cache / "tmp" / f".probe-{uuid.uuid4().hex}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        problems.append(
            f"{where} cannot write the fetch cache {cache_dir}: {exc} (--cache must be a shared folder or a "
            "node-local one that every worker can create)"
        )
    return problems


def run_dask_unit(
    sample: Sample, work_root: str, token: str, version: str, unit: UnitSettings, fetch: FetchSettings
) -> UnitResult:
    """One slide's unit on a Dask worker, after checking that the worker may run it.

    The check is repeated in every task (a stat, normally) because workers of a batch-job
    cluster join after the build has started.
    """
    problems = worker_problems(work_root, token, version, str(fetch.cache_dir))
    if problems:
        raise ExecutorError("; ".join(problems))
    return unit_task(sample, work_root, unit, fetch)


# ---------------------------------------------------------------------------------------------
# The executor
# ---------------------------------------------------------------------------------------------


class DaskExecutor:
    """Units as Dask tasks, one per slide; the pack stays where the build runs.

    >>> with DaskExecutor.local(4) as executor:  # doctest: +SKIP
    ...     build(["manifests/hest.yaml"], out=Path("corpus"), settings=settings, executor=executor)

    ``client`` is a connected ``distributed.Client`` (typed ``Any``, see ``_distributed``); the
    constructors ``local``, ``connect`` and ``jobqueue`` make one (and close it, and the cluster
    they started, on ``close``). ``retries``: re-runs of a task that raised; ``worker_timeout``:
    seconds to wait for a first worker; ``progress_every``: seconds between progress log lines.
    """

    def __init__(
        self,
        client: Any,
        *,
        retries: int = 2,
        worker_timeout: float = 120.0,
        progress_every: float = 30.0,
        cluster: Any = None,
        owns_client: bool = False,
        label: str = "dask",
    ) -> None:
        if retries < 0:
            raise SettingsError(f"retries must be >= 0, not {retries}")
        self.client = client
        self.cluster = cluster
        self.retries = retries
        self.worker_timeout = worker_timeout
        self.progress_every = progress_every
        self._owns_client = owns_client
        self._label = label

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def local(
        cls,
        workers: int,
        *,
        allowed_failures: int = 3,
        dashboard_address: str = ":8787",
        memory_limit: str | float | None = "auto",
        **options: Any,
    ) -> DaskExecutor:
        """Start a ``LocalCluster`` of ``workers`` single-threaded worker processes on this machine."""
        dd = _distributed()
        if workers < 1:
            raise SettingsError(f"workers must be >= 1, not {workers}")
        cluster = dd.LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=dashboard_address,
            memory_limit=memory_limit,
            scheduler_kwargs={"allowed_failures": allowed_failures},
        )
        try:
            client = dd.Client(cluster)
        except BaseException:
            cluster.close()
            raise
        label = f"dask LocalCluster, {workers} worker process{'es' if workers > 1 else ''}"
        return cls(client, cluster=cluster, owns_client=True, label=label, **options)

    @classmethod
    def connect(cls, address: str, *, timeout: float = 30.0, **options: Any) -> DaskExecutor:
        """Connect to a running scheduler (``tcp://host:8786``, or a scheduler file's path)."""
        dd = _distributed()
        try:
            if address.endswith(".json") and Path(address).is_file():
                client = dd.Client(scheduler_file=address, timeout=timeout)
            else:
                client = dd.Client(address, timeout=timeout)
        except _UNREACHABLE as exc:
            raise ExecutorError(
                f"cannot reach the Dask scheduler at {address}: {exc} (start one with `dask scheduler` and workers "
                "with `dask worker <address> --nthreads 1`, or check the address)"
            ) from None
        return cls(client, owns_client=True, label=f"dask scheduler {address}", **options)

    @classmethod
    def jobqueue(cls, config: ClusterFile | Path, **options: Any) -> DaskExecutor:
        """Start a dask-jobqueue cluster (SLURM, PBS or SGE) as a cluster file describes it."""
        dd = _distributed()
        if isinstance(config, Path):
            config = load_cluster_file(config)
        try:
            import dask_jobqueue
        except ImportError:
            raise ExecutorError(f"a {config.cluster} cluster needs dask-jobqueue: {EXTRA_HINT}") from None

        kwargs = jobqueue_kwargs(config)
        if kwargs["processes"] != config.options.cores:
            log.warning(
                "%d cores in %d processes: each worker runs %d threads, which share the GIL; processes = cores "
                "is faster for curate build",
                config.options.cores,
                kwargs["processes"],
                config.options.cores // kwargs["processes"],
            )
        cluster_class = getattr(dask_jobqueue, _CLUSTER_CLASSES[config.cluster])
        cluster = cluster_class(**kwargs)
        try:
            if config.adaptive:
                cluster.adapt(minimum_jobs=0, maximum_jobs=config.jobs)
            else:
                cluster.scale(jobs=config.jobs)
            client = dd.Client(cluster)
        except BaseException:
            cluster.close()
            raise
        options.setdefault("worker_timeout", config.worker_timeout)
        options.setdefault("retries", config.retries)
        label = f"dask {_CLUSTER_CLASSES[config.cluster]}, {config.jobs} jobs x {kwargs['processes']} workers"
        return cls(client, cluster=cluster, owns_client=True, label=label, **options)

    # -- the UnitExecutor protocol -----------------------------------------------------------

    @property
    def dashboard_link(self) -> str | None:
        """The Dask dashboard's address (None when the scheduler serves none)."""
        link: str | None = self.client.dashboard_link
        return link

    def describe(self) -> str:
        """Where units run: the cluster, its scheduler and its dashboard."""
        address = self.client.scheduler.address if self.client.scheduler is not None else "?"
        dashboard = self.dashboard_link
        return f"{self._label} (scheduler {address}" + (f", dashboard {dashboard})" if dashboard else ")")

    def map_units(
        self,
        samples: Sequence[Sample],
        *,
        work_root: Path,
        unit: UnitSettings,
        fetch: FetchSettings,
        admission: WorkAdmission | None = None,
    ) -> Iterator[UnitResult]:
        """Submit one task per sample and yield each ``UnitResult`` as it finishes.

        Every task is submitted at once (the scheduler runs them in ``samples`` order, by
        priority), except under ``admission`` (``--work-budget``): then a task is submitted only
        when the admission lets its slide in, the next ones as results come back. Closing the
        iterator cancels the tasks not yet finished (running ones finish on their workers and
        their units are reused by the next build).
        """
        dd = _distributed()
        if not samples:
            return
        token = uuid.uuid4().hex
        root = work_root.resolve()
        # Workers start in other folders (a batch job's): every path they get is absolute.
        fetch = dataclasses.replace(fetch, cache_dir=fetch.cache_dir.resolve())
        samples = [dataclasses.replace(s, manifest_path=s.manifest_path.resolve()) for s in samples]
        marker = marker_path(root, token)
        marker.write_text(token + "\n", encoding="utf-8")
        futures: dict[Any, int] = {}  # distributed.Future -> index in samples
        finished = False
        ahead: Prefetcher | None = None
        try:
            self._check_workers(root, token, fetch)
            ahead = self._prefetch(samples, token=token, unit=unit, fetch=fetch)
            progress = _Progress(self, total=len(samples))
            pending: set[Any] = set()
            submitted = 0
            while True:
                while submitted < len(samples) and (admission is None or admission.may_start(samples[submitted])):
                    sample = samples[submitted]
                    if admission is not None:
                        admission.started(sample)
                    future = self.client.submit(
                        run_dask_unit,
                        sample,
                        str(root),
                        token,
                        __version__,
                        unit,
                        fetch,
                        key=f"stcorpus-unit-{sample.id}-{token[:8]}",
                        retries=self.retries,
                        priority=len(samples) - submitted,  # manifest order, as locally
                        pure=False,
                    )
                    futures[future] = submitted
                    pending.add(future)
                    submitted += 1
                if not pending:
                    break  # every slide submitted and finished (the admission admits one whenever none runs)
                try:
                    done, pending = dd.wait(pending, timeout=self.progress_every, return_when="FIRST_COMPLETED")
                except TIMEOUT_ERRORS:
                    progress.log(running=len(pending) + len(samples) - submitted)
                    continue
                for future in sorted(done, key=futures.__getitem__):
                    sample = samples[futures[future]]
                    try:
                        result = future.result()
                    except dd.KilledWorker as exc:
                        result = worker_lost_unit(
                            sample, settings=unit, detail=f"every worker that ran this slide died ({exc})"
                        )
                    except dd.client.FutureCancelledError as exc:
                        raise ExecutorError(
                            f"the Dask scheduler dropped slide {sample.id}'s task ({exc}); units finished so far "
                            "are kept: run the same command again to finish the build"
                        ) from None
                    except ExecutorError:
                        raise  # a worker that cannot run units at all (wrong version, no shared folder)
                    except Exception as exc:  # noqa: BLE001 - one slide never stops a build
                        result = failed_unit(sample, settings=unit, exc=exc, stage="running on a Dask worker")
                    # Drop the future: the worker then frees the result (its gene list can be ~1 MB).
                    del futures[future]
                    future.release()
                    progress.count(result, running=len(pending) + len(samples) - submitted)
                    if ahead is not None:
                        ahead.finished(result.slide_id)
                    if admission is not None:
                        admission.finished(result)  # measured before the pack can release it
                    yield result
            progress.log(running=0, final=True)
            finished = True
        finally:
            if ahead is not None:
                ahead.close()
            left = [f for f in futures if not f.done()]
            if left:
                self.client.cancel(left)
            marker.unlink(missing_ok=True)
            if finished:
                removed = remove_stale_temporaries(root, [s.id for s in samples])
                if removed:
                    log.info("deleted %d temporary unit folder(s) left by lost workers", removed)

    def _prefetch(
        self, samples: Sequence[Sample], *, token: str, unit: UnitSettings, fetch: FetchSettings
    ) -> Prefetcher | None:
        """Prefetch in this process (``--prefetch``) when every worker shares its fetch cache, else None.

        Workers on other nodes with caches of their own fetch their inputs themselves: what this
        process downloaded would not be where they look. Sharing is tested, not assumed: each
        worker must read a marker this process writes into the cache.
        """
        if not fetch.prefetch:
            return None
        marker = marker_path(fetch.cache_dir / "tmp", token)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(token + "\n", encoding="utf-8")
        try:
            answers: dict[str, bool] = self.client.run(sees_client_cache, str(fetch.cache_dir), token)
        finally:
            marker.unlink(missing_ok=True)
        if not answers or not all(answers.values()):
            log.info(
                "--prefetch: %d of %d Dask worker(s) do not share this process's fetch cache %s: each slide's unit "
                "fetches its own inputs",
                sum(not v for v in answers.values()),
                len(answers),
                fetch.cache_dir,
            )
            return None
        threads = sum(int(w.get("nthreads", 1)) for w in self.client.scheduler_info(n_workers=-1)["workers"].values())
        log.info(
            "--prefetch %d: the %d Dask worker(s) share the fetch cache %s",
            fetch.prefetch,
            len(answers),
            fetch.cache_dir,
        )
        return Prefetcher(samples, fetch=fetch, running=max(1, threads), unit=unit)

    def _check_workers(self, root: Path, token: str, fetch: FetchSettings) -> None:
        """Wait for a first worker, then ask every worker present whether it can run units."""
        try:
            self.client.wait_for_workers(1, timeout=self.worker_timeout)
        except TIMEOUT_ERRORS:
            raise ExecutorError(
                f"no Dask worker joined within {self.worker_timeout:.0f} s: are the batch jobs still queued "
                "(squeue / qstat), or did the workers fail to start (their job logs say why)?"
            ) from None
        answers: dict[str, list[str]] = self.client.run(
            worker_problems, str(root), token, __version__, str(fetch.cache_dir)
        )
        problems = [p for found in answers.values() for p in found]
        if problems:
            raise ExecutorError("; ".join(problems))
        log.info("%d Dask worker(s) see the work folder %s", len(answers), root)

    def close(self) -> None:
        """Close the client, and the cluster if this executor started it."""
        if self._owns_client:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Progress:
    """Slides finished across the cluster, by status, as log lines every ``progress_every`` seconds."""

    def __init__(self, executor: DaskExecutor, *, total: int) -> None:
        self.executor = executor
        self.total = total
        self.statuses: Counter[str] = Counter()
        self.last = time.monotonic()

    def count(self, result: UnitResult, *, running: int) -> None:
        self.statuses[result.status] += 1
        if time.monotonic() - self.last >= self.executor.progress_every:
            self.log(running=running)

    def log(self, *, running: int, final: bool = False) -> None:
        self.last = time.monotonic()
        workers = len(self.executor.client.scheduler_info(n_workers=-1).get("workers", {}))
        by_status = ", ".join(f"{n} {status}" for status, n in sorted(self.statuses.items())) or "none yet"
        log.info(
            "dask: %d/%d slides finished (%s)%s on %d worker(s)%s",
            sum(self.statuses.values()),
            self.total,
            by_status,
            "" if final else f", {running} queued or running",
            workers,
            f"; dashboard {self.executor.dashboard_link}" if self.executor.dashboard_link and not final else "",
        )


def remove_stale_temporaries(work_root: Path, slide_ids: Sequence[str]) -> int:
    """Delete the temporary unit folders of these slides (left by workers lost mid-unit); return how many.

    Only safe once no worker runs these slides' units any more.
    """
    units = work_root / "units"
    if not units.is_dir():
        return 0
    wanted = {re.escape(s) for s in slide_ids}
    if not wanted:
        return 0
    # `.<slide>.<tag>.tmp` and `.<slide>.<tag>.old.tmp` (see WorkDir.begin/commit); slide ids hold no dots.
    pattern = re.compile(rf"\.(?:{'|'.join(sorted(wanted))})\.[^/]+\.tmp")
    removed = 0
    for path in units.iterdir():
        if path.is_dir() and pattern.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def open_executor(
    *, scheduler: str | None = None, cluster: str | None = None, workers: int = 1, quiet_dask: bool = False
) -> DaskExecutor:
    """The executor the command line describes: ``scheduler`` (an address), or ``cluster``
    (``"local"`` for a ``LocalCluster`` of ``workers`` processes, or a cluster file's path).

    ``quiet_dask``: log only Dask's warnings (it logs every worker and connection at INFO).
    """
    _distributed()  # the missing-extra error first; importing also installs Dask's log levels
    if quiet_dask:
        logging.getLogger("distributed").setLevel(logging.WARNING)
        for name in list(logging.Logger.manager.loggerDict):
            if name.startswith("distributed."):
                logging.getLogger(name).setLevel(logging.NOTSET)  # inherit the WARNING above
    if scheduler and cluster:
        raise SettingsError("give either --scheduler or --dask-cluster, not both")
    if scheduler:
        return DaskExecutor.connect(scheduler)
    if cluster is None or cluster == "local":
        return DaskExecutor.local(workers)
    path = Path(cluster)
    if not path.is_file():
        raise SettingsError(f"--dask-cluster {cluster}: not 'local' and not a cluster file (no such file)")
    return DaskExecutor.jobqueue(path)


__all__ = [
    "CLUSTER_FILES",
    "ClusterFile",
    "DaskExecutor",
    "JobOptions",
    "PBSClusterFile",
    "PBSOptions",
    "SGEClusterFile",
    "SGEOptions",
    "SlurmClusterFile",
    "SlurmOptions",
    "jobqueue_kwargs",
    "load_cluster_file",
    "open_executor",
    "parse_cluster_config",
    "remove_stale_temporaries",
    "run_dask_unit",
    "worker_problems",
]
