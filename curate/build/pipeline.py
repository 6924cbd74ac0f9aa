"""``curate build``: manifests -> a corpus folder, deterministic and resumable.

The pipeline, stage by stage (what flows between stages in brackets)::

    load manifests            [Sample per slide]
    select                    [Sample | excluded: filters, licence allow-list, holdouts]
    run units (in parallel)   [UnitResult per slide; samples.arrow in the work folder]
    on_bad_sample policy      [stop at the first bad slide, or count and go on]
    deduplicate               [built slides minus copies of a kept slide]
    vocabulary                [genes.parquet: the union of measured genes]
    pack                      [wds/ + parquet/ shards, shards.parquet]
    describe                  [slides.parquet, corpus.json, README.md, qc/]

Units are the expensive part (reading whole-slide images, cutting tiles) and are never redone
once finished with the same settings: a build killed at any moment and started again finishes
the remaining slides and produces the same bytes. The pack and the description are cheap and
always rewritten.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from stcorpus import __version__, schema
from stcorpus.curate.atomic import write_atomic
from stcorpus.curate.build.executors import LocalExecutor, UnitExecutor
from stcorpus.curate.build.pack import PackSettings, pack
from stcorpus.curate.build.splits import Holdout, SplitSettings, assign_splits, load_holdouts
from stcorpus.curate.build.unit import UnitSettings, slide_row
from stcorpus.curate.build.workdir import UnitResult, WorkDir
from stcorpus.curate.errors import BuildError, SettingsError
from stcorpus.curate.manifest import Manifest, Sample, load_manifests
from stcorpus.curate.shards import write_parquet_atomic, write_shard_index

if TYPE_CHECKING:
    import pyarrow as pa

    from stcorpus.curate.fetch import FetchSettings

log = logging.getLogger(__name__)

OnBadSample = Literal["error", "warn", "skip"]
BUILD_MARKER = ".work"


@dataclass(frozen=True)
class Selection:
    """Which samples of the manifests a build takes (None: no restriction)."""

    technologies: frozenset[str] | None = None
    species: frozenset[str] | None = None
    organs: frozenset[str] | None = None  # compared case-insensitively
    ids: frozenset[str] | None = None
    licences: frozenset[str] | None = None  # the licence allow-list

    def matches(self, sample: Sample) -> bool:
        """True when the sample passes the technology/species/organ/id filters (not the licence list)."""
        if self.technologies is not None and sample.technology not in self.technologies:
            return False
        if self.species is not None and sample.species not in self.species:
            return False
        if self.organs is not None and (sample.organ or "").lower() not in {o.lower() for o in self.organs}:
            return False
        return self.ids is None or sample.id in self.ids

    def licence_ok(self, sample: Sample) -> bool:
        """True when every licence of the sample (its own and its distribution's) is on the allow-list."""
        return self.licences is None or all(licence in self.licences for licence in sample.licences)


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
    holdout: Path | None = None  # a holdout list (manifests/holdout.yaml)
    work_dir: Path | None = None  # default: <out>/.work
    allow_local: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise SettingsError(f"workers must be >= 1, not {self.workers}")
        if self.on_bad_sample not in ("error", "warn", "skip"):
            raise SettingsError(f"on_bad_sample must be error, warn or skip, not {self.on_bad_sample!r}")

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
            "holdout": self.holdout.name if self.holdout else None,
        }


@dataclass
class BuildSummary:
    """What a build did: the numbers printed at the end and stored in corpus.json."""

    slides: Counter[str] = field(default_factory=Counter)  # by status
    samples: dict[str, int] = field(default_factory=dict)  # by split
    spots_rejected: Counter[str] = field(default_factory=Counter)  # by reason
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (slide, status, reason)
    bytes: int = 0
    seconds: float = 0.0
    reused_units: int = 0

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
            f"shard bytes: {self.bytes / 1e6:,.1f} MB; time: {self.seconds:,.1f} s "
            f"({self.reused_units} slides reused from an earlier run)",
        ]
        lines += [f"  {slide}: {status}: {reason}" for slide, status, reason in self.bad]
        return lines


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
) -> dict[str, UnitResult]:
    """Run (or reuse) the unit of every sample; ``on_result`` returning False stops the rest."""
    results: dict[str, UnitResult] = {}
    digest = settings.unit.digest()
    pending: list[Sample] = []
    for sample in samples:
        done = work.reusable(sample.id, digest)
        if done is not None:
            results[sample.id] = done
        else:
            pending.append(sample)
    for result in list(results.values()):
        if on_result is not None and not on_result(result):
            return results
    if not pending:
        return results
    running = executor.map_units(pending, work_root=work.root, unit=settings.unit, fetch=fetch)
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


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        marks = (out / BUILD_MARKER).exists() or (out / schema.CORPUS_FILE).exists()
        if not marks:
            raise BuildError(
                f"--out {out} is a non-empty folder that is not an stcorpus build; choose an empty or new folder"
            )


def default_holdout(manifests: Sequence[Manifest]) -> Path | None:
    """``holdout.yaml`` beside the first manifest, if there is one."""
    if not manifests:
        return None
    candidate = manifests[0].path.parent / "holdout.yaml"
    return candidate if candidate.is_file() else None


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
    _check_out(out)
    manifests = load_manifests(manifest_paths, allow_local=settings.allow_local)
    work = WorkDir(settings.work_dir or out / BUILD_MARKER)
    work.prepare()
    summary = BuildSummary()

    # select
    samples = [s for m in manifests for s in m.samples if settings.selection.matches(s)]
    if not samples:
        raise BuildError("no sample of the manifests passes the filters: nothing to build")
    holdouts: Mapping[str, Holdout] = load_holdouts(settings.holdout) if settings.holdout else {}
    splits = assign_splits(samples, settings=settings.splits, holdouts=holdouts)
    excluded: dict[str, tuple[Sample, str]] = {}
    for sample in samples:
        if not settings.selection.licence_ok(sample):
            outside = ", ".join(lic for lic in sample.licences if lic not in (settings.selection.licences or ()))
            excluded[sample.id] = (sample, f"licence: {outside} is not on the allow-list")
        elif splits[sample.id] is None:
            excluded[sample.id] = (sample, f"holdout: {holdouts[sample.id].reason}")
    todo = [s for s in samples if s.id not in excluded]
    log.info("building %d slides (%d excluded) into %s", len(todo), len(excluded), out)

    # units
    progress = _progress(len(todo), enabled=settings.progress)
    first_bad: list[UnitResult] = []

    totals: Counter[str] = Counter()

    def on_result(result: UnitResult) -> bool:
        totals[result.status] += 1
        totals["tiles"] += result.n_samples
        totals["bytes"] += result.sample_bytes
        progress.set_postfix_str(
            f"{totals['built']} built, {totals['quarantined']} quarantined, {totals['failed']} failed; "
            f"{totals['tiles']:,} tiles, {totals['bytes'] / 1e6:,.0f} MB",
            refresh=False,
        )
        progress.update(1)
        if result.status != "built":
            if settings.on_bad_sample == "warn":
                log.warning("slide %s %s: %s", result.slide_id, result.status, result.reason)
            else:
                log.info("slide %s %s: %s", result.slide_id, result.status, result.reason)
            if settings.on_bad_sample == "error":
                first_bad.append(result)
                return False
        return True

    digest = settings.unit.digest()
    summary.reused_units = sum(1 for s in todo if work.reusable(s.id, digest) is not None)
    try:
        executor = executor or LocalExecutor(settings.workers)
        log.info("units run on %s", executor.describe())
        results = run_units(todo, work=work, settings=settings, fetch=fetch, executor=executor, on_result=on_result)
    finally:
        progress.close()
    if first_bad:
        bad = first_bad[0]
        raise BuildError(
            f"slide {bad.slide_id} {bad.status}: {bad.reason} (on_bad_sample=error stops the build at the "
            "first bad slide; use --on-bad-sample skip to build the others and report this one)"
        )

    # deduplicate, vocabulary, pack
    built = [results[s.id] for s in todo if results[s.id].status == "built"]
    duplicates = find_duplicates(built)
    kept = [u for u in built if u.slide_id not in duplicates]
    if not kept:
        describe_only = _slide_rows(samples, results, excluded, duplicates, splits, measured={})
        _write_slides(out, describe_only)
        raise BuildError(_nothing_built(results, excluded))
    from stcorpus.curate.genes import GeneIndex, MeasuredGenes, build_vocabulary, reference_sources, vocabulary_digest

    vocabulary = build_vocabulary(
        [MeasuredGenes(species=u.slide["species"], gene_ids=_ids(u.gene_ids)) for u in kept],
        panel=list(settings.unit.genes.panel) if settings.unit.genes.panel else None,
    )
    index = GeneIndex(vocabulary)
    pack_progress = _progress(sum(u.n_samples for u in kept), enabled=settings.progress, unit="samples")
    try:
        packed = pack(
            out,
            work=work,
            units=kept,
            splits={u.slide_id: str(splits[u.slide_id]) for u in kept},
            gene_index=index,
            settings=settings.pack,
            workers=settings.workers,
            progress=pack_progress,
        )
    finally:
        pack_progress.close()
    write_shard_index(out, packed.shards)
    for warning in hub_layout_warnings(packed.shards):
        log.warning("%s", warning)
    write_parquet_atomic(out / schema.GENES_FILE, vocabulary)
    measured = {u.slide_id: index.indices(_ids(u.gene_ids)).tolist() for u in kept}
    rows = _slide_rows(samples, results, excluded, duplicates, splits, measured=measured)
    _write_slides(out, rows)

    # summary, provenance, card, report
    for row in rows:
        summary.slides[row["status"]] += 1
        if row["status"] not in ("built",):
            summary.bad.append((row["slide_id"], row["status"], row["reason"] or ""))
    for unit in built:
        for reason, n in (unit.tiles.get("rejected") or {}).items():
            summary.spots_rejected[reason] += int(n)
    summary.samples = dict(packed.n_samples)
    summary.bytes = sum(s.bytes for s in packed.shards)
    summary.seconds = time.perf_counter() - started
    name = settings.name or out.resolve().name
    corpus = {
        "schema": schema.SCHEMA_ID,
        "name": name,
        "tool": "stcorpus",
        "tool_version": __version__,
        "counts_dtype": packed.counts_dtype,
        "n_genes": vocabulary.num_rows,
        "vocabulary_sha256": vocabulary_digest(vocabulary),
        "splits": packed.n_samples,
        "samples_per_shard": packed.samples_per_shard,
        "slides": dict(sorted(summary.slides.items())),
        "spots_rejected": dict(sorted(summary.spots_rejected.items())),
        "manifests": [{"name": m.name, "file": m.path.name, "sha256": m.sha256} for m in manifests],
        "sources": sorted(
            ({"slide_id": r.slide_id, **i} for r in results.values() for i in r.inputs),
            key=lambda s: (s["slide_id"], s["name"]),
        ),
        schema.CorpusKey.VIEWS.value: schema.views_record(corpus_views(settings)),
        schema.CorpusKey.EXPRESSION.value: packed.tar_dtypes.record(),
        "settings": settings.to_dict(),
        "references": {"genes": reference_sources()},
        "software": software_versions(),
        # The only field that changes between two builds of the same inputs.
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_atomic(out / schema.CORPUS_FILE, (json.dumps(corpus, indent=1, sort_keys=True) + "\n").encode())
    _write_card(out, name=name, rows=rows, packed=packed, n_genes=vocabulary.num_rows, settings=settings)
    _write_report(out, name=name, rows=rows, work=work, kept=kept, summary=summary)
    return summary


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


def _ids(gene_ids: Iterable[str]) -> Any:
    import numpy as np

    return np.asarray(list(gene_ids), dtype=np.str_)


def find_duplicates(units: Sequence[UnitResult]) -> dict[str, str]:
    """Slides whose counts fingerprint equals that of an earlier-kept slide: slide id -> kept id.

    The kept copy is the first by (source preference, slide id); sources earlier in
    ``SOURCE_PREFERENCE`` are kept over later ones.
    """
    by_digest: dict[str, list[UnitResult]] = {}
    for unit in units:
        if unit.content_digest:
            by_digest.setdefault(unit.content_digest, []).append(unit)
    duplicates: dict[str, str] = {}
    for group in by_digest.values():
        if len(group) < 2:
            continue
        ordered = sorted(group, key=lambda u: (_source_rank(str(u.slide.get("source"))), u.slide_id))
        for unit in ordered[1:]:
            duplicates[unit.slide_id] = ordered[0].slide_id
    return duplicates


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
    "polars",
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
SOURCE_PREFERENCE = ("10x", "geo", "hest", "stimage")


def _source_rank(source: str) -> int:
    return SOURCE_PREFERENCE.index(source) if source in SOURCE_PREFERENCE else len(SOURCE_PREFERENCE)


def _nothing_built(results: Mapping[str, UnitResult], excluded: Mapping[str, tuple[Sample, str]]) -> str:
    """Why a build has no slide to pack: every slide's reason (the first 10 of each kind)."""
    kinds = [
        ("not built", [f"{r.slide_id} {r.status}: {r.reason}" for r in results.values() if r.status != "built"]),
        ("excluded", [f"{slide}: {why}" for slide, (_, why) in excluded.items()]),
    ]
    parts = [
        f"{len(lines)} {kind} ({'; '.join(lines[:10])}{f'; ... {len(lines) - 10} more' if len(lines) > 10 else ''})"
        for kind, lines in kinds
        if lines
    ]
    hint = " Widen the licence allow-list or the filters." if excluded else ""
    return "no slide could be built: " + ", ".join(parts) + "; slides.parquet lists every slide's status." + hint


def _slide_rows(
    samples: Sequence[Sample],
    results: Mapping[str, UnitResult],
    excluded: Mapping[str, tuple[Sample, str]],
    duplicates: Mapping[str, str],
    splits: Mapping[str, str | None],
    *,
    measured: Mapping[str, list[int]],
) -> list[dict[str, Any]]:
    rows = []
    for sample in sorted(samples, key=lambda s: s.id):
        row: dict[str, Any] = dict.fromkeys(schema.SLIDE_COLUMNS)
        row.update({k: v for k, v in slide_row(sample).items() if k in row})
        row["split"] = splits.get(sample.id)
        row["measured_genes"] = measured.get(sample.id, [])
        row["qc_flags"] = []
        row["n_spots"] = row["n_spots_written"] = 0
        result = results.get(sample.id)
        if sample.id in excluded:
            row["status"], row["reason"] = "excluded", excluded[sample.id][1]
        elif result is None:
            row["status"], row["reason"] = "failed", "not run (the build stopped before this slide)"
        else:
            for name in ("mpp", "mpp_source", "n_spots", "n_spots_written", "mapping_rate", "qc_flags"):
                if result.slide.get(name) is not None:
                    row[name] = result.slide[name]
            row["status"], row["reason"] = result.status, result.reason or None
            if sample.id in duplicates:
                row["status"] = "duplicate"
                row["duplicate_of"] = duplicates[sample.id]
                row["reason"] = f"duplicate: same counts as {duplicates[sample.id]}"
                row["n_spots_written"] = 0
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
    out: Path, *, name: str, rows: Sequence[Mapping[str, Any]], packed: Any, n_genes: int, settings: BuildSettings
) -> None:
    from stcorpus.curate.build.card import CardInputs, render_card

    text = render_card(
        CardInputs(
            name=name,
            slides=rows,
            shards=packed.shards,
            n_genes=n_genes,
            counts_dtype=packed.counts_dtype,
            tool_version=__version__,
            settings=settings.to_dict(),
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
    summary: BuildSummary,
) -> None:
    from stcorpus.curate.build.report import write_report
    from stcorpus.curate.build.unit import read_unit_histograms

    write_report(
        out / schema.QC_DIR,
        name=name,
        slides=rows,
        unit_qc_dirs={u.slide_id: work.unit_dir(u.slide_id) / "qc" for u in kept},
        histograms={u.slide_id: read_unit_histograms(work, u.slide_id) for u in kept},
        mapping={
            r["slide_id"]: _mapping_of(work, r["slide_id"]) for r in rows if r["status"] in ("built", "duplicate")
        },
        summary={
            "slides": ", ".join(f"{n} {s}" for s, n in sorted(summary.slides.items())),
            "samples": ", ".join(f"{k}: {v:,}" for k, v in summary.samples.items()),
            "spots rejected": ", ".join(f"{k}: {v:,}" for k, v in sorted(summary.spots_rejected.items())),
        },
    )


def _mapping_of(work: WorkDir, slide_id: str) -> Mapping[str, Any]:
    result = work.result(slide_id)
    return result.mapping if result is not None else {}


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
