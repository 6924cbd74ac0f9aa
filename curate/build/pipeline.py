"""``curate build``: manifests -> a corpus folder, deterministic and resumable.

The pipeline, stage by stage (what flows between stages in brackets)::

    load manifests            [Sample per slide]
    plan (curate.plan)        [validated manifests and filters; Sample | excluded: licence allow-list,
                               holdouts; the split of every slide; the holdout list that applied]
    run units (in parallel)   [UnitResult per slide; samples.arrow in the work folder]
    on_bad_sample policy      [stop at the first bad slide, or count and go on]
    deduplicate               [built slides minus copies of a kept slide]
    vocabulary                [genes.parquet: the references' genes, which ones measured]
    pack                      [wds/ and/or parquet/ shards (--formats), shards.parquet]
    describe                  [slides.parquet, corpus.json, README.md, qc/]

Units are the expensive part (reading whole-slide images, cutting tiles) and are never redone
once finished with the same identity (settings, manifest entry, input bytes): a build killed at
any moment and started again finishes the remaining slides and produces the same bytes, and a
build after a manifest edit rebuilds the slides whose entries or files changed. The pack and the
description are cheap and always rewritten.

One slide never stops a build: whatever goes wrong in a slide's unit makes that slide
``quarantined`` (its data cannot give samples) or ``failed`` (fetch errors, exceptions; retried by
the next run), and the build goes on. ``BuildSummary.exit_code`` is 1 when some slide failed.

``--out`` holding a corpus (or a killed build) of other manifests is refused unless
``overwrite``; the same manifests resume, in the formats the corpus holds (another ``--formats``
is refused unless ``overwrite`` or ``reshuffle``, which rewrite every shard).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from stcorpus import __version__, schema
from stcorpus.curate.atomic import write_atomic
from stcorpus.curate.build.admission import WorkAdmission, format_bytes
from stcorpus.curate.build.append import (
    GENERATIONS_KEY,
    Existing,
    check_formats,
    check_settings,
    corpus_digests,
    generation_record,
    genes_outside,
    merged_manifests,
    merged_sources,
    read_existing,
    split_new,
)
from stcorpus.curate.build.executors import LocalExecutor, UnitExecutor
from stcorpus.curate.build.pack import PackSettings, StreamPack, consumption_order
from stcorpus.curate.build.splits import DEFAULT, SplitSettings, resolve_holdout
from stcorpus.curate.build.unit import UnitSettings, pins_inputs, reusable_unit, slide_row
from stcorpus.curate.build.workdir import BuildRecord, UnitResult, WorkDir
from stcorpus.curate.errors import BuildError, SettingsError
from stcorpus.curate.manifest import Manifest, Sample, load_manifests
from stcorpus.curate.plan import Plan, Selection, make_plan
from stcorpus.curate.shards import write_parquet_atomic, write_shard_index

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import pyarrow as pa

    from stcorpus.curate.fetch import FetchSettings

log = logging.getLogger(__name__)

OnBadSample = Literal["error", "warn", "skip"]
BUILD_MARKER = ".work"

#: Exit codes of ``curate build`` (README: "Exit codes").
EXIT_OK = 0  # the corpus was written; no slide failed (quarantined slides are reported, not failures)
#: How far (relative) the um/px a build used may differ from a sample's ``reference_mpp`` unflagged.
MPP_REFERENCE_TOLERANCE = 0.02
EXIT_SLIDES_FAILED = 1  # the corpus was written without some slides that failed: run again to retry them
EXIT_ERROR = 2  # nothing was written: bad arguments or manifests, no slide built, a stop on a bad slide

__all__ = ["BuildSettings", "BuildSummary", "Selection", "build", "run_units"]


@dataclass(frozen=True)
class BuildSettings:
    """Every setting of a build; stored resolved in ``corpus.json``."""

    name: str | None = None  # the corpus's name (default: the output folder's name)
    workers: int = 1
    on_bad_sample: OnBadSample = "skip"
    selection: Selection = field(default_factory=Selection)
    unit: UnitSettings = field(default_factory=UnitSettings)
    splits: SplitSettings = field(default_factory=SplitSettings)
    pack: PackSettings = field(default_factory=PackSettings)
    holdout: str | Path = DEFAULT  # "default" (the list shipped with stcorpus), a holdout file, or "none"
    work_dir: Path | None = None  # default: <out>/.work
    allow_local: bool = False
    overwrite: bool = False  # replace a corpus of other manifests in `out`
    #: Add the slides `out` does not hold yet as a new generation of shards (curate.build.append).
    append: bool = False
    #: Rebuild every shard in one shuffle over all slides, whatever manifests the corpus had (units reused).
    reshuffle: bool = False
    #: Delete each slide's samples from the work folder once they are packed (``--release-units``): the
    #: build's disk stays bounded, but a rerun that repacks (a changed, added or retried slide,
    #: --reshuffle) builds the released slides again. Default: kept, so such a rerun rebuilds only
    #: the slides that changed.
    release_units: bool = False
    #: Most bytes of samples the work folder may hold, finished and running (``--work-budget``): a
    #: slide's unit waits until the pack has released enough (``admission.WorkAdmission``). Needs
    #: ``release_units``. Where units ran, never what they wrote: not in ``to_dict``.
    work_budget: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise SettingsError(f"--workers must be >= 1, not {self.workers}")
        if self.append and (self.reshuffle or self.overwrite):
            raise SettingsError(
                "--append keeps every existing shard; it cannot go with --reshuffle or --overwrite, which rewrite them"
            )
        if self.work_budget is not None and not self.release_units:
            raise SettingsError(
                "--work-budget needs --release-units: without it every slide's samples stay in the work folder "
                "until the build ends, so no budget can hold; add --release-units (or drop --work-budget)"
            )
        if self.work_budget is not None and self.work_budget < 1:
            raise SettingsError(f"--work-budget must be at least 1 byte, not {self.work_budget}")
        if self.on_bad_sample not in ("error", "warn", "skip"):
            raise SettingsError(f"--on-bad-sample must be error, warn or skip, not {self.on_bad_sample!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings that decide the corpus's content, as JSON-ready values (what corpus.json records).

        Where units ran (workers, executor) is left out: it never changes a byte of the output.
        """
        return {
            "on_bad_sample": self.on_bad_sample,
            "selection": {k: (sorted(v) if v is not None else None) for k, v in asdict(self.selection).items()},
            "tiles": self.unit.tiles.to_dict(),
            "qc": asdict(self.unit.qc),
            "genes": {"min_mapped_fraction": self.unit.genes.min_mapped_fraction, "panel": self.unit.genes.panel},
            "splits": asdict(self.splits),
            "pack": asdict(self.pack),
            "holdout": str(self.holdout),
        }


@dataclass
class BuildSummary:
    """What a build did: the numbers printed at the end and stored in corpus.json."""

    slides: Counter[str] = field(default_factory=Counter)  # by status
    samples: dict[str, int] = field(default_factory=dict)  # by split
    spots_rejected: Counter[str] = field(default_factory=Counter)  # by reason (reader drops and rejections)
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (slide, status, reason)
    bytes: int = 0
    seconds: float = 0.0
    reused_units: int = 0
    formats: tuple[str, ...] = schema.FORMATS  # the shard formats written (--formats)
    holdout: str = ""  # which holdout list applied and how many slides it held out
    notes: list[str] = field(default_factory=list)  # what an append added, genes it dropped
    built: list[tuple[str, str, float | None, str, float | None]] = field(
        default_factory=list
    )  # (slide, split, um/px, its source, the manifest's reference_mpp)

    def built_lines(self) -> list[str]:
        """``  HER2ST-B4: built: validation, 0.6878 um/px (fit), HEST-reference 0.6889 (-0.2%)``."""
        lines = []
        for slide, split, mpp, source, reference in self.built:
            line = f"  {slide}: built: {split}, " + (f"{mpp:.4f} um/px ({source})" if mpp else "um/px unknown")
            if reference and mpp:
                off = mpp / reference - 1
                flag = "" if abs(off) <= MPP_REFERENCE_TOLERANCE else f" OFF BY MORE THAN {MPP_REFERENCE_TOLERANCE:.0%}"
                line += f"; reference_mpp {reference:.4f} ({off:+.1%}){flag}"
            lines.append(line)
        return lines

    @property
    def exit_code(self) -> int:
        """``EXIT_SLIDES_FAILED`` when some slide failed (and can be retried), else ``EXIT_OK``."""
        return EXIT_SLIDES_FAILED if self.slides.get("failed") else EXIT_OK

    def lines(self) -> list[str]:
        """The summary as lines of text."""
        total = sum(self.samples.values())
        reasons = ", ".join(f"{reason} {n:,}" for reason, n in sorted(self.spots_rejected.items()) if n)
        lines = [
            "slides: " + (", ".join(f"{n} {status}" for status, n in sorted(self.slides.items())) or "none"),
            f"samples written: {total:,} ("
            + ", ".join(f"{split} {n:,}" for split, n in self.samples.items())
            + f"); spots rejected: {sum(self.spots_rejected.values()):,}"
            + (f" ({reasons})" if reasons else ""),
            f"shard bytes: {self.bytes / 1e6:,.1f} MB ({_formats_phrase(self.formats)}); time: {self.seconds:,.1f} s "
            f"({self.reused_units} slides reused from an earlier run)",
        ]
        if self.holdout:
            lines.append(self.holdout)
        lines += self.notes
        lines += self.built_lines()
        lines += [f"  {slide}: {status}: {reason}" for slide, status, reason in self.bad]
        if self.slides.get("failed"):
            lines.append(
                f"{self.slides['failed']} slide(s) failed: fix what their reasons name and run the same command "
                "again; only the failed slides are redone"
            )
        return lines


def _formats_phrase(formats: Sequence[str]) -> str:
    """``parquet and wds`` / ``parquet only``: the shard formats a build wrote, for the summary."""
    return " and ".join(formats) if len(formats) > 1 else f"{formats[0]} only"


# ---------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------


def run_units(
    samples: Sequence[Sample],
    *,
    work: WorkDir,
    settings: BuildSettings,
    fetch: FetchSettings,
    executor: UnitExecutor,
    on_result: Callable[[UnitResult], bool] | None = None,
    reused: set[str] | None = None,
    known: Mapping[str, UnitResult | None] | None = None,
    packed: Collection[str] = (),
    admission: WorkAdmission | None = None,
) -> dict[str, UnitResult]:
    """Run (or reuse) the unit of every sample; ``on_result`` returning False stops the rest.

    ``admission`` (``--work-budget``) holds each unit back until the work folder has room for it.

    The ids of the slides whose finished units were reused are added to ``reused``. ``known``:
    each sample's reusable unit when the caller looked already (``unit.reusable_unit``). A built
    unit whose samples the pack deleted is reused only for the slides in ``packed`` (those the
    pack does not need again); the others run again.
    """
    results: dict[str, UnitResult] = {}
    pending: list[Sample] = []
    for sample in samples:
        if known is not None and sample.id in known:
            done = known[sample.id]
        else:
            done = reusable_unit(sample, work=work, settings=settings.unit, fetch=fetch)
        if (
            done is not None
            and done.status == "built"
            and done.n_samples
            and sample.id not in packed
            and not work.has_samples(sample.id)
        ):
            done = None  # its samples were packed into shards this build no longer keeps
        if done is not None:
            results[sample.id] = done
            if reused is not None:
                reused.add(sample.id)
        else:
            pending.append(sample)
    if pins_inputs(fetch):
        _pin_and_release(samples, pending=pending, fetch=fetch, done=results)
    for result in list(results.values()):
        if on_result is not None and not on_result(result):
            return results
    if not pending:
        return results
    running = executor.map_units(pending, work_root=work.root, unit=settings.unit, fetch=fetch, admission=admission)
    try:
        for result in running:
            results[result.slide_id] = result
            if on_result is not None and not on_result(result):
                break
    finally:
        close = getattr(running, "close", None)
        if close is not None:
            close()  # cancels the units not yet started
    return results


def _pin_and_release(
    samples: Sequence[Sample], *, pending: Sequence[Sample], fetch: FetchSettings, done: Mapping[str, UnitResult]
) -> None:
    """Pin the inputs of the slides about to run; release those of slides already done (``evict.py``)."""
    from stcorpus.curate.fetch.cache import Cache
    from stcorpus.curate.fetch.evict import pin, release

    cache = Cache(fetch.cache_dir)
    _identify(pending, fetch=fetch)
    pin(cache, pending)
    waiting = {sample.id for sample in pending}
    for sample in samples:
        if sample.id not in waiting:
            # A pin a killed build left, or inputs fetched before this build.
            inputs = done[sample.id].inputs if sample.id in done else []
            release(cache, sample, digests=[str(i["sha256"]) for i in inputs], delete=not fetch.keep_sources)


def _identify(samples: Sequence[Sample], *, fetch: FetchSettings) -> None:
    """Learn the digests the Hub announces for unpinned ``hf://`` sources (HEADs, ``per_host`` at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    from stcorpus.curate.fetch import Fetcher
    from stcorpus.curate.fetch.evict import remote_sources

    todo = [
        (sample, source) for sample in samples for source in remote_sources(sample) if source.url.startswith("hf://")
    ]
    if not todo:
        return
    with Fetcher(fetch) as fetcher, ThreadPoolExecutor(max_workers=fetch.per_host) as pool:
        list(pool.map(lambda pair: fetcher.identify(pair[1], sample=pair[0]), todo))


# ---------------------------------------------------------------------------------------------
# The output folder
# ---------------------------------------------------------------------------------------------

#: What a build writes into ``out`` (and ``--overwrite`` removes).
_OUTPUT_FILES = (schema.CARD_FILE, schema.CORPUS_FILE, schema.GENES_FILE, schema.SLIDES_FILE, schema.SHARDS_FILE)
_OUTPUT_DIRS = (schema.WDS_DIR, schema.PARQUET_DIR, schema.QC_DIR)


def _corpus_info(out: Path) -> dict[str, Any] | None:
    """``corpus.json`` of the corpus in ``out``, or None when there is none."""
    corpus = out / schema.CORPUS_FILE
    if not corpus.is_file():
        return None
    try:
        info: dict[str, Any] = json.loads(corpus.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BuildError(
            f"--out {out}: {corpus.name} cannot be read ({exc}); pass --overwrite to replace the corpus"
        ) from None
    return info


def _previous_manifests(out: Path, work: WorkDir) -> tuple[str, ...] | None:
    """The manifest names of the corpus (or killed build) in ``out``, or None for a fresh folder."""
    info = _corpus_info(out)
    if info is not None:
        return tuple(sorted(str(m.get("name")) for m in info.get("manifests") or []))
    record = work.record()
    return tuple(sorted(record.manifests)) if record is not None else None


def check_out(
    out: Path,
    *,
    work: WorkDir,
    manifests: Sequence[Manifest],
    overwrite: bool,
    append: bool = False,
    reshuffle: bool = False,
    formats: Sequence[str] = schema.FORMATS,
) -> None:
    """Refuse an ``out`` that is not ours, or holds a corpus of other manifests (unless ``overwrite``).

    A corpus of the same manifests (by name: an edited manifest is the same build) is resumed, in
    the shard ``formats`` it holds: other formats are refused unless ``overwrite`` or ``reshuffle``.
    With ``overwrite`` the other corpus's files and units are removed first. ``append`` adds to
    the corpus whatever its manifests; ``reshuffle`` rebuilds it from ``manifests``, reusing units.
    A corpus grown by appends is rebuilt (every shard rewritten) only with ``reshuffle`` or ``overwrite``.
    """
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        marks = (out / BUILD_MARKER).exists() or (out / schema.CORPUS_FILE).exists()
        if not marks:
            raise BuildError(
                f"--out {out} is a non-empty folder that is not an stcorpus build; choose an empty or new folder"
            )
    if append:
        return  # append.read_existing checks that a corpus is there
    info = _corpus_info(out)
    generations = len((info or {}).get(GENERATIONS_KEY) or [])
    if generations > 1 and not (reshuffle or overwrite):
        raise BuildError(
            f"--out {out} holds a corpus grown by appends ({generations} generations of shards): pass --append to "
            "add slides to it, or --reshuffle to rebuild every shard in one shuffle over all its slides"
        )
    names = tuple(sorted(m.name for m in manifests))
    previous = _previous_manifests(out, work)
    if previous is None or reshuffle:
        return
    if previous == names:
        if info is not None and not overwrite:
            check_formats(out, info, formats, growing=False)
        return
    if not overwrite:
        raise BuildError(
            f"--out {out} holds a corpus built from manifest(s) {', '.join(previous)}, not from "
            f"{', '.join(names)}: choose another --out, or pass --overwrite to replace that corpus"
        )
    log.warning("--overwrite: replacing the corpus of %s in %s", ", ".join(previous), out)
    for name in _OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    for name in _OUTPUT_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    work.remove_units()


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------


def build(
    manifest_paths: Sequence[str | Path],
    *,
    out: Path,
    settings: BuildSettings,
    fetch: FetchSettings | None = None,
    executor: UnitExecutor | None = None,
) -> BuildSummary:
    """Build a corpus from manifests into ``out``; returns the summary (see module docstring).

    Units run on ``executor`` (default: ``LocalExecutor(settings.workers)``); the pack and
    everything after it run here.
    """
    from stcorpus.curate.fetch import FetchSettings

    started = time.perf_counter()
    fetch = fetch or FetchSettings(allow_local=settings.allow_local)
    manifests = load_manifests(manifest_paths, allow_local=settings.allow_local)
    plan = make_plan(
        manifests,
        selection=settings.selection,
        splits=settings.splits,
        holdout=resolve_holdout(settings.holdout),
        candidates=False,
    )
    work = WorkDir(settings.work_dir or out / BUILD_MARKER)
    check_out(
        out,
        work=work,
        manifests=manifests,
        overwrite=settings.overwrite,
        append=settings.append,
        reshuffle=settings.reshuffle,
        formats=settings.pack.formats,
    )
    names = {m.name for m in manifests}
    existing: Existing | None = None
    todo = plan.included
    if settings.append:
        existing = read_existing(out, work=work)
        check_settings(existing, settings.to_dict())
        names |= {str(m["name"]) for m in existing.info.get("manifests") or []}
        todo = split_new(todo, existing, unit=settings.unit, fetch=fetch)
        log.info("--append: %d slide(s) already in the corpus, %d to add", len(plan.included) - len(todo), len(todo))
    work.prepare()
    work.write_record(BuildRecord(name=settings.name, manifests=tuple(sorted(names))))
    summary = BuildSummary(holdout=plan.holdout_line())
    log.info("building %d slides (%d excluded) into %s", len(todo), len(plan.excluded), out)
    log.info("%s", summary.holdout)
    no_reader = plan.checked.no_reader_line()
    if no_reader:
        log.warning("%s", no_reader)

    # The pack runs as units finish (pack.StreamPack): its vocabulary, counts dtype and slide order
    # are known before any slide is built.
    import numpy as np

    from stcorpus.curate.genes import (
        MEASURED,
        GeneIndex,
        MeasuredGenes,
        build_vocabulary,
        reference_sources,
        vocabulary_digest,
        with_measured,
    )

    panel = list(settings.unit.genes.panel) if settings.unit.genes.panel else None
    base_vocabulary = existing.vocabulary if existing is not None else build_vocabulary([], panel=panel)
    index = GeneIndex(base_vocabulary)
    if existing is not None:
        counts_dtype = existing.counts_dtype
    else:
        # float32 only where a manifest declares transformed counts (the readers refuse other non-integers).
        counts_dtype = "float32" if any(s.counts == "normalized" for s in todo) else "int32"
    known = {s.id: reusable_unit(s, work=work, settings=settings.unit, fetch=fetch, need_samples=False) for s in todo}
    stream = StreamPack(
        out,
        work=work,
        order=consumption_order((s.id, s.source) for s in todo),
        splits={s.id: str(plan.splits[s.id]) for s in todo},
        gene_index=index,
        settings=settings.pack,
        counts_dtype=counts_dtype,
        generation=existing.next_generation if existing is not None else 0,
        first_index=existing.first_index() if existing is not None else None,
        tar_dtypes=existing.tar_dtypes if existing is not None else None,
        drop_outside_vocabulary=existing is not None,
        corpus_digests=corpus_digests(existing) if existing is not None else None,
        release=settings.release_units,
    )
    packed_already = stream.resume(known)

    # units, packed as they finish
    progress = _progress(len(todo), enabled=settings.progress)
    first_bad: list[UnitResult] = []

    totals: Counter[str] = Counter()
    # Each built slide's genes as vocabulary indices (-1: outside it), found while other slides compute:
    # genes.parquet's `measured` and slides.parquet's `measured_genes` come from these at the end.
    positions: dict[str, npt.NDArray[np.int32]] = {}

    def on_result(result: UnitResult) -> bool:
        totals[result.status] += 1
        if result.status == "built":
            positions[result.slide_id] = index.positions(_ids(result.gene_ids))
        totals["tiles"] += result.n_samples
        totals["bytes"] += result.sample_bytes
        if result.status != "built":
            if settings.on_bad_sample == "warn" or result.status == "failed":
                log.warning("slide %s %s: %s", result.slide_id, result.status, result.reason)
            else:
                log.info("slide %s %s: %s", result.slide_id, result.status, result.reason)
            if settings.on_bad_sample == "error":
                first_bad.append(result)
                progress.update(1)
                return False
        stream.add(result)
        progress.set_postfix_str(
            f"{totals['built']} built, {totals['quarantined']} quarantined, {totals['failed']} failed; "
            f"{totals['tiles']:,} tiles, {totals['bytes'] / 1e6:,.0f} MB; {stream.n_packed:,} packed",
            refresh=False,
        )
        progress.update(1)
        return True

    reused: set[str] = set()
    admission = WorkAdmission(work, limit=settings.work_budget) if settings.work_budget is not None else None
    try:
        executor = executor or LocalExecutor(settings.workers)
        log.info("units run on %s", executor.describe())
        if admission is not None:
            log.info(
                "--work-budget %s: a slide's unit waits until the work folder has room", format_bytes(admission.limit)
            )
        taken_order = {slide_id: i for i, slide_id in enumerate(stream.order)}
        results = run_units(
            sorted(todo, key=lambda s: taken_order[s.id]),  # the order the pack takes them: few wait
            work=work,
            settings=settings,
            fetch=fetch,
            executor=executor,
            on_result=on_result,
            reused=reused,
            known=known,
            packed=packed_already,
            admission=admission,
        )
    finally:
        progress.close()
    summary.reused_units = len(reused)
    if admission is not None and (note := admission.note()) is not None:
        summary.notes.append(note)
    if first_bad:
        bad = first_bad[0]
        raise BuildError(
            f"slide {bad.slide_id} {bad.status}: {bad.reason} (on_bad_sample=error stops the build at the "
            "first bad slide; use --on-bad-sample skip to build the others and report this one)"
        )
    packed = stream.finish()

    # deduplicated (against the corpus's slides too when appending) as packed; the vocabulary's `measured`
    built = [results[s.id] for s in todo if results[s.id].status == "built"]
    duplicates = packed.duplicates
    in_shards = set(packed.packed)
    kept = [results[s.id] for s in todo if s.id in in_shards]
    name = settings.name or out.resolve().name
    references = {s.id: s.reference_mpp for s in plan.samples}
    if not kept and existing is None:
        rows = _slide_rows(plan, results, duplicates, measured={})
        _write_slides(out, rows)
        _count(summary, rows, built, references)
        _write_report(out, name=name, rows=rows, work=work, kept=[], results=results, summary=summary)
        raise BuildError(_nothing_built(results, plan.excluded))

    for unit in kept:
        if unit.slide_id not in positions:
            positions[unit.slide_id] = index.positions(_ids(unit.gene_ids))
    write_vocabulary = existing is None
    if existing is not None:
        # The references' genes (of the panels), and which of them the slides built here measured.
        built_vocabulary = build_vocabulary(
            [MeasuredGenes(species=u.slide["species"], gene_ids=_ids(u.gene_ids)) for u in kept], panel=panel
        )
        # The corpus's vocabulary is kept so that every existing shard's gene indices stay valid.
        vocabulary = existing.vocabulary
        same_space = vocabulary_digest(vocabulary) == vocabulary_digest(built_vocabulary)
        if same_space and MEASURED in vocabulary.column_names:
            # Built on the same references and panels: every appended gene has its index already;
            # only `measured` may grow (genes.parquet is rewritten then, its indices unchanged).
            before = np.asarray(vocabulary.column(MEASURED).to_pylist(), dtype=np.bool_)
            after = before | np.asarray(built_vocabulary.column(MEASURED).to_pylist(), dtype=np.bool_)
            if not np.array_equal(before, after):
                vocabulary = with_measured(vocabulary, after)
                write_vocabulary = True
                summary.notes.append(
                    f"the appended slides measured {int(after.sum() - before.sum()):,} gene(s) no earlier slide had: "
                    f"{schema.GENES_FILE} marks them measured (its indices are unchanged)"
                )
        outside = genes_outside(kept, vocabulary)
        if outside:
            why = (
                "it is the union of the slides it was first built from (a corpus written before the vocabulary was the "
                "references')"
                if MEASURED not in vocabulary.column_names
                else "it was built with other gene references or panels"
            )
            summary.notes.append(
                f"{len(outside)} appended slide(s) measured {len({g for ids in outside.values() for g in ids}):,} "
                f"gene(s) outside the corpus's vocabulary of {vocabulary.num_rows:,} ({why}): dropped from their "
                "samples ("
                + ", ".join(f"{slide} {len(ids):,}" for slide, ids in sorted(outside.items()))
                + "); --reshuffle rebuilds the corpus on this stcorpus's reference vocabulary"
            )
    else:
        # The references' genes (of the panels), the ones the slides built here measured marked.
        vocabulary = _measured_vocabulary(base_vocabulary, kept, positions, panel=panel)
        outside = {}
    shards = [*(existing.shards if existing is not None else []), *packed.shards]
    write_shard_index(out, shards)
    for warning in hub_layout_warnings(shards):
        log.warning("%s", warning)
    if write_vocabulary:
        write_parquet_atomic(out / schema.GENES_FILE, vocabulary)
    measured = {u.slide_id: [int(i) for i in positions[u.slide_id] if i >= 0] for u in kept}
    run_rows = _slide_rows(plan, results, duplicates, measured=measured)
    rows = _merge_rows(existing, run_rows, todo={s.id for s in todo}) if existing is not None else run_rows
    _write_slides(out, rows)

    # summary, provenance, card, report
    this_run = {s.id for s in todo} if existing is not None else {r["slide_id"] for r in run_rows}
    _count(summary, [r for r in run_rows if r["slide_id"] in this_run], built, references)
    summary.samples = dict(packed.n_samples)
    summary.bytes = sum(s.bytes for s in packed.shards)
    summary.seconds = time.perf_counter() - started
    holdout = _holdout_record(plan, rows, policy=settings.splits.holdout)
    built_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    run_manifests = [{"name": m.name, "file": m.path.name, "sha256": m.sha256} for m in manifests]
    formats = settings.pack.formats
    summary.formats = formats
    generations = list(existing.generations) if existing is not None else []
    if packed.shards or existing is None:
        generation = existing.next_generation if existing is not None else 0
        generations.append(
            generation_record(
                generation,
                built_at=built_at,
                manifests=run_manifests,
                units=kept,
                samples=packed.n_samples,
                n_shards=sum(1 for s in packed.shards if s.format == formats[0]),
                genes_outside=outside,
            )
            | {"samples_per_shard": packed.samples_per_shard}
        )
        if existing is not None:
            summary.notes.insert(
                0,
                f"appended generation {generation}: {len(kept)} slide(s), {sum(packed.n_samples.values()):,} samples "
                f"in {len(packed.shards)} new shard files ({_formats_phrase(formats)}); "
                f"the {len(existing.shards)} earlier ones are untouched",
            )
    elif existing is not None:
        summary.notes.insert(0, "nothing to append: every selected slide is in the corpus or was not built")
    splits: Counter[str] = Counter()
    for shard in shards:
        if shard.format == formats[0]:
            splits[shard.split] += shard.n_samples
    spots_rejected = Counter(summary.spots_rejected)
    if existing is not None:
        spots_rejected.update(existing.info.get("spots_rejected") or {})
        # Counted from what corpus.json committed (not slides.parquet, which a killed append may have
        # rewritten), so a rerun records the same number: the corpus's, plus the new slides built into test.
        held_before = int((existing.info.get("holdout") or {}).get("held_out", 0))
        holdout["held_out"] = held_before + sum(1 for s in todo if s.id in plan.held_out)
    corpus = {
        "schema": schema.SCHEMA_ID,
        "name": name,
        "tool": "stcorpus",
        "tool_version": __version__,
        "counts_dtype": packed.counts_dtype,
        "count_kinds": count_kinds(rows),
        "n_genes": vocabulary.num_rows,
        "vocabulary_sha256": vocabulary_digest(vocabulary),
        "splits": {split: splits[split] for split in schema.SPLITS if splits[split]},
        "samples_per_shard": (existing.info.get("samples_per_shard") if existing is not None else None)
        or packed.samples_per_shard,
        "slides": dict(sorted(Counter(str(r["status"]) for r in rows).items())),
        "spots_rejected": dict(sorted(spots_rejected.items())),
        "holdout": holdout,
        "manifests": merged_manifests(existing.info.get("manifests") or [], run_manifests)
        if existing is not None
        else run_manifests,
        "sources": merged_sources(existing, results)
        if existing is not None
        else sorted(
            ({"slide_id": r.slide_id, **i} for r in results.values() for i in r.inputs),
            key=lambda s: (s["slide_id"], s["name"]),
        ),
        GENERATIONS_KEY: generations,
        schema.CorpusKey.VIEWS.value: schema.views_record(corpus_views(settings)),
        schema.CorpusKey.EXPRESSION.value: packed.tar_dtypes.record(),
        schema.CorpusKey.FORMATS.value: list(formats),
        "settings": settings.to_dict(),
        "references": {"genes": reference_sources()},
        "software": software_versions(),
        # The only fields that change between two builds of the same inputs (with generations' built_at).
        "built_at": built_at,
    }
    # Written last: corpus.json is what an append reads back, so a killed run leaves the previous one whole.
    write_atomic(out / schema.CORPUS_FILE, (json.dumps(corpus, indent=1, sort_keys=True) + "\n").encode())
    _write_card(
        out,
        name=name,
        rows=rows,
        shards=shards,
        counts_dtype=packed.counts_dtype,
        n_genes=vocabulary.num_rows,
        n_measured=sum(vocabulary.column(MEASURED).to_pylist()) if MEASURED in vocabulary.column_names else None,
        settings=settings,
        holdout=holdout,
        generations=generations,
        formats=formats,
    )
    report_units = kept
    if existing is not None:
        earlier = (work.result(slide) for slide in sorted(existing.slides))
        report_units = [u for u in earlier if u is not None and u.status == "built"] + kept
    _write_report(out, name=name, rows=rows, work=work, kept=report_units, results=results, summary=summary)
    return summary


def _merge_rows(existing: Existing, run_rows: Sequence[dict[str, Any]], *, todo: set[str]) -> list[dict[str, Any]]:
    """``slides.parquet`` after an append: the corpus's rows, with those of the slides this run built or first saw."""
    merged = dict(existing.rows)
    for row in run_rows:
        if row["slide_id"] in todo or row["slide_id"] not in merged:
            merged[row["slide_id"]] = row
    return [merged[slide] for slide in sorted(merged)]


def _count(
    summary: BuildSummary,
    rows: Sequence[Mapping[str, Any]],
    built: Sequence[UnitResult],
    references: Mapping[str, float | None],
) -> None:
    """Slides by status, the bad ones with their reasons, and every rejected spot of the built slides."""
    for row in rows:
        summary.slides[row["status"]] += 1
        if row["status"] != "built":
            summary.bad.append((row["slide_id"], row["status"], row["reason"] or ""))
        else:
            reference = references.get(row["slide_id"])
            summary.built.append((row["slide_id"], str(row["split"]), row["mpp"], str(row["mpp_source"]), reference))
    for unit in built:
        summary.spots_rejected.update(unit.spots_rejected)


def count_kinds(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """The built slides by count kind (``raw`` | ``normalized``), as corpus.json records them."""
    kinds: dict[str, list[str]] = {}
    for row in rows:
        if row["status"] == "built":
            kinds.setdefault(str(row["count_kind"] or "raw"), []).append(str(row["slide_id"]))
    return {kind: sorted(ids) for kind, ids in sorted(kinds.items())}


def _holdout_record(plan: Plan, rows: Sequence[Mapping[str, Any]], *, policy: str) -> dict[str, Any]:
    """The holdout list as corpus.json and the card record it: name, digest, size, what it held out."""
    listed = plan.holdout.slides
    in_corpus = sorted(r["slide_id"] for r in rows if r["slide_id"] in listed and r["status"] == "built")
    held = len(plan.held_out) + sum(reason.startswith("holdout:") for reason in plan.excluded.values())
    return plan.holdout.to_dict() | {"policy": policy, "held_out": held, "held_out_built": in_corpus}


#: The Hub's guidance: under 10,000 files per folder (keep under 1,000) and 100,000 per repository.
HUB_FILES_PER_FOLDER = 1_000
HUB_FILES_PER_REPO = 100_000


def hub_layout_warnings(shards: Sequence[Any]) -> list[str]:
    """Warnings when a corpus's shards exceed what the Hub handles well (files per folder / repository)."""
    folders = Counter(str(Path(s.path).parent) for s in shards)
    warnings = [
        f"{folder}/ holds {n:,} shards (the Hub handles folders of under {HUB_FILES_PER_FOLDER:,} files best): "
        "raise --max-shard-mb or --samples-per-shard"
        for folder, n in sorted(folders.items())
        if n > HUB_FILES_PER_FOLDER
    ]
    if len(shards) > HUB_FILES_PER_REPO:
        warnings.append(f"{len(shards):,} shard files exceed the Hub's {HUB_FILES_PER_REPO:,} files per repository")
    return warnings


def _measured_vocabulary(
    base: pa.Table,
    kept: Sequence[UnitResult],
    positions: Mapping[str, npt.NDArray[np.int32]],
    *,
    panel: list[str] | None,
) -> pa.Table:
    """``base`` (the references' vocabulary) with the genes of ``kept`` marked measured, from their ``positions``.

    The same table as ``build_vocabulary`` of the slides, without looking their genes up again; a
    slide with a gene outside ``base`` or of another species goes through ``build_vocabulary``,
    which names the fault.
    """
    import numpy as np

    from stcorpus.curate.genes import MeasuredGenes, build_vocabulary, with_measured

    species = np.asarray(base.column("species").to_pylist(), dtype=np.str_)
    flags = np.zeros(base.num_rows, dtype=np.bool_)
    for unit in kept:
        found = positions[unit.slide_id]
        if found.size and (int(found.min()) < 0 or bool(np.any(species[found] != unit.slide["species"]))):
            return build_vocabulary(
                [MeasuredGenes(species=u.slide["species"], gene_ids=_ids(u.gene_ids)) for u in kept], panel=panel
            )
        flags[found] = True
    return with_measured(base, flags)


def _ids(gene_ids: Iterable[str]) -> Any:
    import numpy as np

    return np.asarray(list(gene_ids), dtype=np.str_)


#: Distributions whose versions decide the bytes a build writes (decoding, resampling, JPEG
#: encoding, h5/h5ad and TIFF reading, Parquet writing).
BYTE_DEPENDENCIES = (
    "numpy",
    "scipy",
    "pillow",
    "simplejpeg",
    "imagecodecs",
    "tifffile",
    "zarr",
    "h5py",
    "anndata",
    "pyarrow",
)


def software_versions() -> dict[str, str]:
    """Python and the versions of :data:`BYTE_DEPENDENCIES` in this process, for ``corpus.json``.

    Two builds give the same bytes when these agree (units run on Dask workers should use the
    same environment as the process that packs).
    """
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in BYTE_DEPENDENCIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


#: Which copy of a duplicated slide is kept: the original release first, re-distributions after.
def _nothing_built(results: Mapping[str, UnitResult], excluded: Mapping[str, str]) -> str:
    """Why a build has no slide to pack: every slide's reason (the first 10 of each kind)."""
    kinds = [
        ("not built", [f"{r.slide_id} {r.status}: {r.reason}" for r in results.values() if r.status != "built"]),
        ("excluded", [f"{slide}: {why}" for slide, why in excluded.items()]),
    ]
    parts = [
        f"{len(lines)} {kind} ({'; '.join(lines[:10])}{f'; ... {len(lines) - 10} more' if len(lines) > 10 else ''})"
        for kind, lines in kinds
        if lines
    ]
    hint = " Widen the licence allow-list or the filters." if excluded else ""
    return (
        "no slide could be built: "
        + ", ".join(parts)
        + "; slides.parquet and qc/index.html list every slide's status."
        + hint
    )


def _slide_rows(
    plan: Plan,
    results: Mapping[str, UnitResult],
    duplicates: Mapping[str, str],
    *,
    measured: Mapping[str, list[int]],
) -> list[dict[str, Any]]:
    """One ``slides.parquet`` row per selected slide, whatever became of it, with what was read."""
    rows = []
    for sample in sorted(plan.samples, key=lambda s: s.id):
        row: dict[str, Any] = dict.fromkeys(schema.SLIDE_COLUMNS)
        row.update({k: v for k, v in slide_row(sample).items() if k in row})
        row["split"] = plan.splits.get(sample.id)
        row["measured_genes"] = measured.get(sample.id, [])
        row["qc_flags"] = []
        row["reason_codes"] = []
        row["spots_rejected"] = {}
        row["n_spots_written"] = 0
        result = results.get(sample.id)
        if sample.id in plan.excluded:
            reason = plan.excluded[sample.id]
            row["status"], row["reason"], row["reason_codes"] = "excluded", reason, [reason.split(":")[0]]
        elif result is None:
            row["status"], row["reason"] = "failed", "not run (the build stopped before this slide)"
            row["reason_codes"] = ["not_run"]
        else:
            # What was read, also for a slide that was not built (n_spots stays null when nothing was).
            for name in ("mpp", "mpp_source", "n_spots", "n_spots_written", "mapping_rate", "qc_flags"):
                if result.slide.get(name) is not None:
                    row[name] = result.slide[name]
            row["spots_rejected"] = result.spots_rejected
            row["status"], row["reason"] = result.status, result.reason or None
            row["reason_codes"] = list(result.failures)
            if sample.id in duplicates:
                row["status"] = "duplicate"
                row["duplicate_of"] = duplicates[sample.id]
                row["reason"] = f"duplicate: same counts as {duplicates[sample.id]}"
                row["reason_codes"] = ["duplicate"]
        if row["status"] != "built":
            row["n_spots_written"] = 0
            row["measured_genes"] = []
        rows.append(row)
    return rows


def slides_arrow_schema() -> pa.Schema:
    """The Arrow schema of ``slides.parquet``: ``stcorpus.schema.SLIDE_TYPES``."""
    return schema.slides_arrow_schema()


def corpus_views(settings: BuildSettings) -> dict[str, schema.View]:
    """The views the build cuts (``corpus.json`` ``views``): tile size and um/px of each."""
    tiles = settings.unit.tiles
    views = {schema.PATCH_COLUMN: schema.View(schema.PATCH_COLUMN, tiles.patch_size, tiles.patch_mpp)}
    if tiles.regions:
        views[schema.REGION_COLUMN] = schema.View(schema.REGION_COLUMN, tiles.region_size, tiles.region_um_per_px)
    return views


def _write_slides(out: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    import pyarrow as pa

    table = pa.Table.from_pylist(list(rows), schema=slides_arrow_schema())
    write_parquet_atomic(out / schema.SLIDES_FILE, table)


def _write_card(
    out: Path,
    *,
    name: str,
    rows: Sequence[Mapping[str, Any]],
    shards: Sequence[Any],
    counts_dtype: str,
    n_genes: int,
    settings: BuildSettings,
    holdout: Mapping[str, Any],
    generations: Sequence[Mapping[str, Any]] = (),
    n_measured: int | None = None,
    formats: Sequence[str] = schema.FORMATS,
) -> None:
    from stcorpus.curate.build.card import CardInputs, render_card

    text = render_card(
        CardInputs(
            name=name,
            slides=rows,
            shards=shards,
            n_genes=n_genes,
            n_measured=n_measured,
            counts_dtype=counts_dtype,
            tool_version=__version__,
            settings=settings.to_dict(),
            holdout=holdout,
            generations=generations,
            formats=formats,
        )
    )
    write_atomic(out / schema.CARD_FILE, text.encode("utf-8"))


def _write_report(
    out: Path,
    *,
    name: str,
    rows: Sequence[Mapping[str, Any]],
    work: WorkDir,
    kept: Sequence[UnitResult],
    results: Mapping[str, UnitResult],
    summary: BuildSummary,
) -> None:
    from stcorpus.curate.build.report import write_report

    write_report(
        out / schema.QC_DIR,
        name=name,
        slides=rows,
        unit_qc_dirs={u.slide_id: work.unit_dir(u.slide_id) / "qc" for u in kept},
        histograms={u.slide_id: work.histograms(u.slide_id) for u in kept},
        mapping={slide_id: r.mapping for slide_id, r in sorted(results.items()) if r.mapping},
        notes={slide_id: list(r.slide.get("notes") or []) for slide_id, r in sorted(results.items())},
        summary={
            "slides": ", ".join(f"{n} {s}" for s, n in sorted(summary.slides.items())),
            "samples": ", ".join(f"{k}: {v:,}" for k, v in summary.samples.items()) or "none",
            "spots rejected": ", ".join(f"{k}: {v:,}" for k, v in sorted(summary.spots_rejected.items())) or "none",
            "holdout": summary.holdout,
        },
    )


class _NoProgress:
    def update(self, n: int = 1) -> None:
        """Nothing to show."""

    def set_postfix_str(self, text: str, *, refresh: bool = True) -> None:
        """Nothing to show."""

    def close(self) -> None:
        """Nothing to close."""


def _progress(total: int, *, enabled: bool, unit: str = "slides") -> Any:
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit[:-1] if unit.endswith("s") else unit, desc=unit, disable=None)


def cpu_count() -> int:
    """CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
