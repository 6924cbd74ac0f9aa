"""One slide's work unit, as a line of stages (what flows between them in brackets)::

    fetch           [the sources as local paths; url, sha256 and size of each recorded]
    read            [Slide: counts, features, spots, image; the spots the reader dropped, by reason]
    check           [every QC check recorded; blocking failures quarantine the slide, all of them named]
    map genes       [counts on the slide's measured Ensembl ids]
    choose sites    [Sites: in-tissue spots with counts, in lattice order; zero-count spots rejected]
    neighbours      [Niche: each site's in-tissue lattice neighbours and their summed counts]
    tiles           [the sites' accepted patch/region tiles; rejected ones counted by reason]
    columns         [samples.arrow in the unit work format (``workdir.unit_sample_schema``)]

``run_unit`` runs the line for one slide and writes the result into the work folder (``workdir``),
atomically. It is the unit of parallel (and distributed) work: it takes a manifest ``Sample`` and
settings, reads its inputs from the fetch cache itself (large slides never travel through a
scheduler), and returns a small ``UnitResult``.

A unit's identity (``unit_key``) is the build settings and the sample's resolved manifest entry
(every field, its sources' URLs and pinned digests, its reader options); a finished unit is reused
only when that identity matches and its recorded inputs are still the bytes of its sources
(``reusable_unit``, checked without network). Any change rebuilds that slide and only it.

Outcomes: a slide that cannot be built from its data (a ``SlideError``: corrupt file, blank image,
too coarse, unmapped genes, ...) is ``quarantined`` with every reason found and is not retried while
its identity and inputs stay the same. A slide whose sources could not be fetched (a ``FetchError``),
or on which anything else went wrong (an exception of a reader or a library: ``EOFError``,
``UnicodeDecodeError``, ``MemoryError``, ...) is ``failed`` with the exception's type, message,
stage and files, and is retried by the next run. No exception of one slide leaves its unit.

Which spots become samples: in-tissue spots with a non-zero total over the mapped genes, whose
tiles were not rejected (outside the image, background). Samples are stored in lattice order
(array_row, array_col). Their niche expression is the sum over in-tissue lattice neighbours
with counts (whether or not the neighbour's own tiles were kept); for cell-level sites, over
the neighbours the geometry's radius/kNN rule gives, and array_row/array_col are null.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import shutil
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from stcorpus import __version__, schema
from stcorpus.curate.build.workdir import (
    QC_SUBDIR,
    SAMPLES_FILE,
    UNIT_KEY,
    UnitResult,
    WorkDir,
    settings_digest,
    unit_sample_schema,
    write_samples,
)
from stcorpus.curate.errors import CurateError, FetchError, SettingsError, SlideError
from stcorpus.curate.genes.mapping import DEFAULT_MIN_MAPPED_FRACTION
from stcorpus.curate.imaging import ImageSettings
from stcorpus.curate.qc import QCSettings
from stcorpus.curate.tiles import TileSettings
from stcorpus.schema import sample_key

if TYPE_CHECKING:
    import pyarrow as pa
    import scipy.sparse as sp

    from stcorpus.curate.fetch import FetchSettings
    from stcorpus.curate.fetch.budget import Need
    from stcorpus.curate.fetch.fetcher import Fetched
    from stcorpus.curate.geometry import Neighbors
    from stcorpus.curate.manifest import Sample
    from stcorpus.curate.slide import Slide
    from stcorpus.curate.tiles import TileResult

log = logging.getLogger(__name__)

#: Patches shown per slide in the QC report's montage.
MONTAGE_SIZE = 32

#: Bumped whenever what a unit computes changes (e.g. revision 2: the counts fingerprint is taken
#: before gene mapping; 3: the identity covers the manifest entry and reader drops are recorded),
#: so units made by older code are never reused.
UNIT_REVISION = 3


@dataclass(frozen=True)
class GeneSettings:
    """How features map onto the gene vocabulary (see ``stcorpus.curate.genes``)."""

    min_mapped_fraction: float = DEFAULT_MIN_MAPPED_FRACTION
    panel: tuple[str, ...] | None = None  # named panels to keep (None: every mapped gene)

    def __post_init__(self) -> None:
        fraction = self.min_mapped_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise SettingsError(
                f"min_mapped_fraction must be a fraction in 0..1 (curate build --min-mapped-fraction), not {fraction!r}"
            )


@dataclass(frozen=True)
class UnitSettings:
    """Everything that decides what a unit contains (and the fetch settings, which do not)."""

    tiles: TileSettings = field(default_factory=TileSettings)
    qc: QCSettings = field(default_factory=QCSettings)
    genes: GeneSettings = field(default_factory=GeneSettings)
    images: ImageSettings = field(default_factory=ImageSettings)

    def digest(self) -> str:
        """A digest of the content-relevant settings and the tool version."""
        return settings_digest(
            {
                "tiles": self.tiles.to_dict(),
                "qc": asdict(self.qc),
                "genes": asdict(self.genes),
                "images": asdict(self.images),
                "version": __version__,
                "unit_revision": UNIT_REVISION,
            }
        )


# ---------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------

#: Sample fields that do not change what a unit contains: where the manifest was read from (its
#: relative paths are checked through the inputs' digests instead) and whether local paths were allowed.
_NOT_IDENTITY = ("manifest_path", "allow_local", "mirrors")


def manifest_entry(sample: Sample) -> dict[str, Any]:
    """The sample's resolved manifest entry as JSON-ready values: every field, sources and reader options."""
    entry: dict[str, Any] = {f.name: getattr(sample, f.name) for f in fields(sample) if f.name not in _NOT_IDENTITY}
    entry["sources"] = {name: sample.sources[name].model_dump() for name in sorted(sample.sources)}
    entry["reader"] = dict(sorted(sample.reader.items()))
    entry["image_size"] = list(sample.image_size) if sample.image_size is not None else None
    return entry


def unit_key(sample: Sample, settings: UnitSettings) -> str:
    """The identity of a sample's unit: the build settings and the resolved manifest entry."""
    return settings_digest({"settings": settings.digest(), "entry": manifest_entry(sample)})


def known_inputs(sample: Sample, fetch: FetchSettings) -> list[dict[str, str]] | None:
    """(name, url, sha256) of every source as it is now, without network; None when one is not known.

    Local files are hashed (memoised in the fetch cache by size, mtime and inode); a remote source's
    digest is the manifest's pinned ``sha256`` or, unpinned, the one the cache holds for its URL.
    """
    from stcorpus.curate.fetch.cache import Cache
    from stcorpus.curate.fetch.local import local_path, tree_digest

    cache = Cache(fetch.cache_dir)
    inputs = []
    for name in sorted(sample.sources):
        source = sample.sources[name]
        if source.is_local:
            path = local_path(source.url, base_dir=sample.base_dir)
            if not path.exists():
                return None
            sha256 = tree_digest(path, cache=cache)[0] if path.is_dir() else cache.local_sha256(path)
        elif source.sha256 is not None:
            sha256 = source.sha256
        else:
            # The record outlives a released blob: what the URL held when the unit was built.
            record = cache.lookup_url(source.url, require_blob=False)
            if record is None:
                return None
            sha256 = record.sha256
        inputs.append({"name": name, "url": source.url, "sha256": sha256})
    return inputs


def _same_inputs(recorded: list[dict[str, Any]], current: list[dict[str, Any]]) -> bool:
    def key(inputs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
        return sorted((str(i["name"]), str(i["url"]), str(i["sha256"])) for i in inputs)

    return key(recorded) == key(current)


def reusable_unit(
    sample: Sample, *, work: WorkDir, settings: UnitSettings, fetch: FetchSettings, need_samples: bool = True
) -> UnitResult | None:
    """The sample's finished unit when its identity matches and its inputs are unchanged (no network).

    ``need_samples=False`` also returns a built unit whose samples the pack released (``WorkDir.reusable``).
    """
    done = work.reusable(sample.id, unit_key(sample, settings), need_samples=need_samples)
    if done is None:
        return None
    current = known_inputs(sample, fetch)
    return done if current is not None and _same_inputs(done.inputs, current) else None


# ---------------------------------------------------------------------------------------------
# The unit
# ---------------------------------------------------------------------------------------------


def slide_row(slide_or_sample: Slide | Sample) -> dict[str, Any]:
    """The sample's manifest metadata as a ``slides.parquet`` row (less the corpus-level fields)."""
    sample = slide_or_sample.sample if hasattr(slide_or_sample, "sample") else slide_or_sample
    return {
        "slide_id": sample.id,
        "study_id": sample.study_id,
        "source": sample.source,
        "source_id": sample.source_id,
        "technology": sample.technology,
        "assay": sample.assay,
        "chemistry": sample.chemistry,
        "species": sample.species,
        "organ": sample.organ,
        "disease_state": sample.disease_state,
        "oncotree_code": sample.oncotree_code,
        "patient": sample.patient,
        "preservation": sample.preservation,
        "count_kind": sample.counts,
        "licence": sample.licence,
        "distribution_licence": sample.distribution_licence,
        "citation": sample.citation,
        "manifest": sample.manifest,
    }


@dataclass
class _Where:
    """The stage a unit is in and the files it works on, for the report of an unexpected exception."""

    stage: str = "start"
    files: list[str] = field(default_factory=list)

    def enter(self, stage: str, files: list[str] | None = None) -> None:
        self.stage = stage
        if files is not None:
            self.files = files


def run_unit(
    sample: Sample, *, work: WorkDir, settings: UnitSettings, fetch: FetchSettings, reuse: bool = True
) -> UnitResult:
    """Build one slide into the work folder (or return its finished unit) and say what happened.

    Never raises for a problem of this slide: the result is ``quarantined`` or ``failed`` with why.
    """
    if reuse:
        done = reusable_unit(sample, work=work, settings=settings, fetch=fetch)
        if done is not None:
            return done
    key = unit_key(sample, settings)
    start = time.perf_counter()
    tmp = work.begin(sample.id)
    result = UnitResult(
        slide_id=sample.id, status="built", settings_digest=settings.digest(), unit_key=key, slide=slide_row(sample)
    )
    where = _Where()
    try:
        where.enter("fetching", [f"{name}={sample.sources[name].url}" for name in sorted(sample.sources)])
        files = _fetch(sample, fetch=fetch, result=result)
        earlier = work.reusable(sample.id, key) if reuse else None
        if earlier is not None and _same_inputs(earlier.inputs, result.inputs):
            # The cache had lost the inputs' record, and the bytes fetched again are the same.
            shutil.rmtree(tmp, ignore_errors=True)
            _release(sample, fetch, inputs=result.inputs)
            return earlier
        _build(sample, files, tmp=tmp, result=result, settings=settings, where=where)
    except SlideError as exc:
        result.status, result.reason, result.failures = "quarantined", exc.reason, exc.codes
        _no_samples(tmp, result)
    except FetchError as exc:
        result.status, result.reason, result.failures = "failed", f"fetch: {exc}", ["fetch"]
        _no_samples(tmp, result)
    except Exception as exc:  # noqa: BLE001 - one slide never stops a build: any error of this slide is its `failed` record
        _failed(result, exc, where=where)
        _no_samples(tmp, result)
    result.seconds = round(time.perf_counter() - start, 3)
    work.commit(tmp, result)
    _release(sample, fetch, inputs=result.inputs)
    return result


def pins_inputs(fetch: FetchSettings) -> bool:
    """Whether a build pins slides' inputs: to release them (the default), or to guard them under a cache budget."""
    return not fetch.keep_sources or fetch.cache_budget is not None


def _release(sample: Sample, fetch: FetchSettings, *, inputs: Sequence[Mapping[str, Any]]) -> None:
    """Unpin the slide's inputs now that its unit is committed; delete them unless ``keep_sources`` (``evict.py``)."""
    if not pins_inputs(fetch):
        return
    from stcorpus.curate.fetch.cache import Cache
    from stcorpus.curate.fetch.evict import release

    digests = [str(item["sha256"]) for item in inputs]
    freed = release(Cache(fetch.cache_dir), sample, digests=digests, delete=not fetch.keep_sources)
    log.debug("slide %s: released its inputs (%d bytes freed)", sample.id, freed)


def failed_unit(sample: Sample, *, settings: UnitSettings, exc: BaseException, stage: str) -> UnitResult:
    """The ``failed`` result of a unit that did not return one (its worker died, its task raised)."""
    result = UnitResult(
        slide_id=sample.id,
        status="failed",
        settings_digest=settings.digest(),
        unit_key=unit_key(sample, settings),
        slide=slide_row(sample),
    )
    where = _Where(stage=stage, files=[f"{name}={sample.sources[name].url}" for name in sorted(sample.sources)])
    _failed(result, exc, where=where)
    return result


def worker_lost_unit(sample: Sample, *, settings: UnitSettings, detail: str) -> UnitResult:
    """The ``failed`` result of a slide whose worker process died (killed, out of memory, past a walltime)."""
    return UnitResult(
        slide_id=sample.id,
        status="failed",
        settings_digest=settings.digest(),
        unit_key=unit_key(sample, settings),
        reason=f"worker_lost: {detail}; often out of memory: give workers more memory (or use fewer --workers) "
        "and run the build again to retry it",
        failures=["worker_lost"],
        slide=slide_row(sample),
    )


def lost_unit(
    sample: Sample,
    *,
    work: WorkDir,
    settings: UnitSettings,
    fetch: FetchSettings,
    before: tuple[int, int] | None,
    detail: str,
) -> UnitResult:
    """What a slide whose worker process died comes to, once no process of the pool is left.

    A worker can commit its unit and die (or be killed with the pool) before its result reaches
    the build: that unit is the slide's result, as the worker would have returned it. ``before``
    is the unit's ``WorkDir.stamp`` when the slide was handed out, so a unit committed by an
    earlier run is never taken for this one. Otherwise the slide fails as ``worker_lost``.
    """
    if work.stamp(sample.id) != before:
        done = work.result(sample.id)
        if done is not None and done.unit_key == unit_key(sample, settings):
            log.info("slide %s: its worker died after committing its unit; the unit is kept", sample.id)
            _release(sample, fetch, inputs=done.inputs)  # what the worker did not live to do (idempotent)
            return done
    return worker_lost_unit(sample, settings=settings, detail=detail)


def _no_samples(tmp: Path, result: UnitResult) -> None:
    (tmp / SAMPLES_FILE).unlink(missing_ok=True)
    result.n_samples = result.sample_bytes = 0
    result.slide["n_spots_written"] = 0


def _failed(result: UnitResult, exc: BaseException, *, where: _Where) -> None:
    """Record an unexpected exception: its type, message, the stage, the files and where it was raised."""
    kind = type(exc).__name__
    message = str(exc)
    filename = getattr(exc, "filename", None)
    files = [str(filename)] if filename else where.files
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "stcorpus" in f.filename or "/curate/" in f.filename]
    raised = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    called = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else ""
    where_raised = raised + (f", called from {called}" if called and called != raised else "")
    hint = (
        "give the build more memory (fewer --workers) and run it again"
        if isinstance(exc, MemoryError)
        else "check that file; failed slides are retried by the next run"
    )
    result.status = "failed"
    result.failures = ["error"]
    result.error = {
        "type": kind,
        "message": message,
        "stage": where.stage,
        "files": files,
        "raised_at": raised,
        "called_from": called,
    }
    result.reason = (
        f"error: {kind}{': ' + message if message else ''} (while {where.stage}: {', '.join(files) or 'no file'}; "
        f"raised at {where_raised or 'an unknown place'}); {hint}"
    )
    log.debug("slide %s failed", result.slide_id, exc_info=exc)


#: Downloads of one input a unit tries before it gives up pinning it (another slide's release raced it).
_HOLD_TRIES = 3


def _fetch(sample: Sample, *, fetch: FetchSettings, result: UnitResult) -> dict[str, Path]:
    """Fetch the slide's sources: within the cache budget, pinned for this slide, with progress lines."""
    got, _ = _fetch_sources(sample, fetch=fetch, label=sample.id)
    for name in sorted(got):
        item = got[name]
        result.inputs.append({"name": name, "url": item.url, "sha256": item.sha256, "size": item.size})
    return {name: got[name].target for name in sorted(got)}


def prefetch(
    sample: Sample,
    fetch: FetchSettings,
    *,
    spare: Callable[[], Sequence[Need]] | None = None,
    settings: UnitSettings | None = None,
) -> int:
    """Download the slide's sources into the cache ahead of its unit (``curate build --prefetch``); the bytes.

    The unit's own fetch (the same code) then finds them cached. ``spare``: the inputs of the
    slides before this one that are still to come, whose room under ``--cache-budget`` this
    download must leave free (``CacheBudget.reserve``). Raises what the unit's fetch would raise.

    A TIFF read by byte range (``--no-range-reads`` not given) is only opened by the fetch; with
    the unit's ``settings`` the tiles its views will read under the slide's in-tissue spots are
    downloaded too (:func:`_prefetch_tiles`), so the unit finds them in the partial copy.
    """
    got, downloaded = _fetch_sources(sample, fetch=fetch, label=f"{sample.id} (prefetch)", spare=spare)
    if settings is not None and any(_is_partial(item.path) for item in got.values()):
        # A unit that starts meanwhile waits for these downloads into the copy and then finds the
        # tiles there (PartialFile serialises downloads across processes), never fetching them twice.
        downloaded += _prefetch_tiles(sample, {name: got[name].target for name in sorted(got)}, settings)
    return downloaded


def _is_partial(path: Path) -> bool:
    from stcorpus.curate.fetch.ranges import RECORD_SUFFIX

    return path.with_name(path.name + RECORD_SUFFIX).is_file()


def _prefetch_tiles(sample: Sample, files: Mapping[str, Path], settings: UnitSettings) -> int:
    """Download the image tiles the slide's views will read (a superset: every in-tissue spot); the bytes.

    The unit reads the same bytes from the partial copy (the corpus is the same); a slide that
    cannot be read or tiled downloads nothing more here and fails in its unit, as without prefetch.
    """
    from stcorpus.curate.readers import read_slide
    from stcorpus.curate.tiles import Tiler

    try:
        slide = read_slide(sample, files, images=settings.images)
    except Exception as exc:  # noqa: BLE001 - its unit reads it again and reports why
        log.debug("prefetch of %s: its tiles not prefetched (%s: %s)", sample.id, type(exc).__name__, exc)
        return 0
    try:
        if not slide.image.is_remote:
            return 0
        spots = slide.spots
        rows = np.flatnonzero(spots.in_tissue)
        keys = [sample_key(slide.id, str(barcode)) for barcode in spots.barcode[rows]]
        try:
            tiler = Tiler(slide.image, mpp=slide.mpp, settings=settings.tiles)
        except CurateError as exc:  # too coarse, bad settings: the unit says so
            log.debug("prefetch of %s: its tiles not prefetched (%s)", sample.id, exc)
            return 0
        windows = tiler.windows(spots.x_px[rows], spots.y_px[rows], keys)
        windows.add(slide.image.thumbnail_window(max_size=QC_THUMBNAIL_PX))  # the QC plots' thumbnail
        return int(slide.image.prefetch(windows))
    finally:
        slide.image.close()


def input_needs(sample: Sample, fetch: FetchSettings) -> list[Need]:
    """The remote inputs of the slide that go through the cache, with their sizes (0 where none is known)."""
    from stcorpus.curate.fetch import Fetcher
    from stcorpus.curate.fetch.budget import Need
    from stcorpus.curate.fetch.evict import remote_sources

    needs = []
    with Fetcher(fetch) as fetcher:
        for source in remote_sources(sample):
            if fetcher.is_mirrored(source, sample=sample):
                continue
            try:
                size = fetcher.size_of(source, sample=sample)
            except FetchError as exc:  # the slide's own fetch meets (and reports) it again
                log.debug("%s: no size for %s (%s)", sample.describe(), source.url, exc)
                size = None
            needs.append(Need(source.url, size or 0))
    return needs


def _fetch_sources(
    sample: Sample, *, fetch: FetchSettings, label: str, spare: Callable[[], Sequence[Need]] | None = None
) -> tuple[dict[str, Fetched], int]:
    """The slide's sources by name, fetched within the cache budget and pinned for it; and the bytes downloaded."""
    from stcorpus.curate.fetch import Fetcher
    from stcorpus.curate.fetch.budget import CacheBudget, Need
    from stcorpus.curate.fetch.evict import hold, reclaim, remote_sources
    from stcorpus.curate.fetch.progress import DownloadProgress

    files: dict[str, Fetched] = {}
    progress = DownloadProgress(label, total=None, every=fetch.progress_every or 0.0)
    with Fetcher(fetch, on_bytes=progress if fetch.progress_every is not None else None) as fetcher:
        to_download = [s for _, s in sorted(sample.sources.items()) if fetcher.needs_download(s, sample=sample)]
        room: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if fetch.cache_budget is not None:
            sizes = [fetcher.size_of(s, sample=sample) for s in to_download]
            unknown = [s.url for s, size in zip(to_download, sizes, strict=True) if size is None]
            if unknown:
                log.warning(
                    "%s: no size known for %s (no `size` in the manifest, no lock file entry, no Content-Length): "
                    "--cache-budget cannot reserve room for it; run `curate fetch` once to write the lock file",
                    sample.describe(),
                    ", ".join(unknown),
                )
            needs = [Need(s.url, size or 0) for s, size in zip(to_download, sizes, strict=True)]
            progress.total = sum(n.size for n in needs) or None
            cached = [
                s for s in remote_sources(sample) if s not in to_download and not fetcher.is_mirrored(s, sample=sample)
            ]
            held = sum(fetcher.expected(s, sample=sample)[1] or 0 for s in cached)
            budget = CacheBudget(fetcher.cache, fetch.cache_budget, reclaim=functools.partial(reclaim, fetcher.cache))
            room = budget.reserve(label, needs, what=sample.describe(), held=held, spare=spare)
        else:
            sizes = [fetcher.expected(s, sample=sample)[1] for s in to_download]
            progress.total = None if None in sizes else sum(size or 0 for size in sizes) or None
        with room:
            for name in sorted(sample.sources):
                source = sample.sources[name]
                # A pinned remote TIFF is read by byte range as the tiles need it (unless --no-range-reads):
                # its partial copy is kept by the slide's pin and deleted with it (evict.release).
                ranged = fetcher.open_ranged(source, sample=sample, name=name) if fetch.range_reads else None
                got = ranged if ranged is not None else fetcher.fetch(source, sample=sample, name=name)
                if ranged is None and pins_inputs(fetch) and not got.local:
                    # Pinned by content before anything else may delete it; gone meanwhile: fetch again.
                    for attempt in range(1, _HOLD_TRIES + 1):
                        paths = [got.path] if got.unpacked is None else [got.path, got.unpacked]
                        if hold(fetcher.cache, sample.id, url=got.url, sha256=got.sha256, paths=paths):
                            break
                        if attempt < _HOLD_TRIES:
                            got = fetcher.fetch(source, sample=sample, name=name)
                    else:
                        raise FetchError(
                            f"{sample.describe()}: source {name!r} was deleted from the cache {_HOLD_TRIES} times "
                            "between its download and its use: is another program cleaning the cache folder (--cache)?"
                        )
                files[name] = got
    if fetch.progress_every is not None:
        progress.finish()
    return files, progress.done


def _build(
    sample: Sample,
    files: Mapping[str, Path],
    *,
    tmp: Path,
    result: UnitResult,
    settings: UnitSettings,
    where: _Where,
) -> None:
    from stcorpus.curate.genes import map_slide_genes
    from stcorpus.curate.qc import check_slide
    from stcorpus.curate.readers import read_slide

    where.enter("reading", [f"{name}={files[name]}" for name in sorted(files)])
    slide = read_slide(sample, files, images=settings.images)
    try:
        # What was read is recorded before any check, so a quarantined slide keeps its numbers.
        result.dropped_spots = {str(reason): int(n) for reason, n in sorted(slide.dropped_spots.items()) if n}
        result.slide.update(
            mpp=slide.mpp,
            mpp_source=slide.mpp_source,
            notes=list(slide.notes),
            n_spots=int(np.count_nonzero(slide.spots.in_tissue)),
        )
        where.enter("checking", [str(slide.image.path)])
        try:
            check_slide(slide, settings=settings.qc)
        finally:
            result.qc = [asdict(check) for check in slide.qc]
            result.slide["qc_flags"] = slide.flags
        where.enter("mapping genes", [f"{name}={files[name]}" for name in sorted(files)])
        genes = map_slide_genes(
            slide.features,
            slide.counts,
            species=sample.species,
            panel=list(settings.genes.panel) if settings.genes.panel else None,
            min_mapped_fraction=settings.genes.min_mapped_fraction,
            slide_id=sample.id,
        )
        # Fingerprinted before gene mapping: two sources of one slide may name genes differently (Ensembl
        # ids vs symbols) and so map different subsets of the same features.
        result.content_digest = content_digest(slide.counts, rows=slide.spots.in_tissue.astype(bool))
        result.mapping = genes.report.to_dict()
        result.gene_ids = [str(g) for g in genes.gene_ids]
        result.slide["mapping_rate"] = float(genes.report.mapped_fraction)
        if genes.report.merged:  # duplicate ids or symbols: summed (CORPUS.md), and said
            result.slide["notes"].append(
                f"{genes.report.merged} feature(s) summed into a gene another feature also maps to "
                "(duplicate gene ids or symbols in the source)"
            )
        _samples(slide, genes.counts, tmp=tmp, result=result, settings=settings, where=where)
    finally:
        slide.image.close()


# ---------------------------------------------------------------------------------------------
# Sites -> neighbours -> tiles -> columns
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sites:
    """The spots that may become samples, in lattice order: rows of ``slide.spots``, keys, counts."""

    spots: npt.NDArray[np.intp]
    keys: list[str]
    counts: sp.csr_matrix  # one row per site, indices sorted


@dataclass(frozen=True)
class Niche:
    """Each site's in-tissue lattice neighbours (their keys, how many) and their summed counts."""

    keys: list[list[str]]
    n_neighbors: npt.NDArray[np.int32]
    counts: sp.csr_matrix  # one row per site, indices sorted


def choose_sites(slide: Slide, counts: sp.csr_matrix, *, rejected: Counter[str]) -> Sites:
    """In-tissue spots with a non-zero total on the mapped genes, in lattice order (array_row, array_col)."""
    from stcorpus.curate.errors import NoSpotsError

    spots = slide.spots
    counts = counts.tocsr()
    totals = np.asarray(counts.sum(axis=1)).ravel()
    in_tissue = spots.in_tissue.astype(bool)
    keep = np.flatnonzero(in_tissue & (totals > 0))
    rejected["zero_counts"] += int(np.count_nonzero(in_tissue & (totals <= 0)))
    if keep.size == 0:
        raise NoSpotsError(
            f"no in-tissue spot has counts on the mapped genes ({int(np.count_nonzero(in_tissue))} in tissue)",
            slide_id=slide.id,
        )
    keep = keep[np.lexsort((spots.array_col[keep], spots.array_row[keep]))]
    kept = counts[keep]
    kept.sort_indices()
    return Sites(spots=keep, keys=[sample_key(slide.id, str(b)) for b in spots.barcode[keep]], counts=kept)


def neighbours(slide: Slide, sites: Sites) -> Niche:
    """The neighbours of every site among the sites, by the slide's rule, and their summed counts.

    Lattices: the in-tissue lattice neighbours; cell-level sites: the geometry's radius/kNN rule.
    """
    from stcorpus.curate.geometry import spot_neighbors

    adjacency: Neighbors = spot_neighbors(slide.spots.subset(sites.spots), geometry=slide.geometry, mpp=slide.mpp)
    summed = (adjacency.to_csr() @ sites.counts).tocsr()
    summed.sort_indices()
    return Niche(keys=adjacency.keys(sites.keys), n_neighbors=adjacency.counts, counts=summed)


def site_tiles(
    slide: Slide, sites: Sites, *, settings: TileSettings, rejected: Counter[str]
) -> tuple[dict[int, TileResult], dict[str, Any]]:
    """The accepted tiles by site position, and the tile run's statistics; rejections counted by reason."""
    from stcorpus.curate.tiles import cut_tiles

    position = {int(spot): i for i, spot in enumerate(sites.spots)}
    tiles: dict[int, TileResult] = {}
    run = cut_tiles(slide, indices=sites.spots, settings=settings)
    for tile in run:
        if tile.accepted:
            tiles[position[tile.index]] = tile
    for reason, n in run.stats.rejected.items():
        rejected[reason] += n
    return tiles, run.stats.as_dict() | {"rejected": dict(rejected)}


def counts_dtype(counts: sp.csr_matrix) -> str:
    """How a unit stores a slide's counts: int32 for integer counts, float32 otherwise."""
    return "int32" if np.issubdtype(counts.dtype, np.integer) else "float32"


def columns(slide: Slide, sites: Sites, niche: Niche, tiles: Mapping[int, TileResult]) -> tuple[pa.Table, int]:
    """The samples of the sites with tiles, as a table in the unit work format, and their bytes."""
    import pyarrow as pa

    counts = sites.counts
    dtype = counts_dtype(counts)
    out: dict[str, list[Any]] = {name: [] for name in unit_sample_schema(dtype).names}
    spots, mpp = slide.spots, slide.mpp
    lattice = slide.geometry.is_lattice
    sample_bytes = 0
    for i in sorted(tiles):
        tile, spot = tiles[i], sites.spots[i]
        assert tile.patch is not None, "an accepted tile has its patch"
        genes = counts.indices[counts.indptr[i] : counts.indptr[i + 1]]
        values = counts.data[counts.indptr[i] : counts.indptr[i + 1]]
        niche_genes = niche.counts.indices[niche.counts.indptr[i] : niche.counts.indptr[i + 1]]
        niche_values = niche.counts.data[niche.counts.indptr[i] : niche.counts.indptr[i + 1]]
        out[UNIT_KEY].append(sites.keys[i])
        out[schema.PATCH_COLUMN].append(tile.patch)
        out[schema.REGION_COLUMN].append(tile.region)
        out[schema.Expr.GENES.value].append(genes.astype(np.int32))
        out[schema.Expr.COUNTS.value].append(values)
        out[schema.Expr.NICHE_GENES.value].append(niche_genes.astype(np.int32))
        out[schema.Expr.NICHE_COUNTS.value].append(niche_values)
        out["barcode"].append(str(spots.barcode[spot]))
        out["x_um"].append(float(spots.x_px[spot]) * mpp)
        out["y_um"].append(float(spots.y_px[spot]) * mpp)
        # cell-level sites have no lattice position: null, as the schema allows
        out["array_row"].append(int(spots.array_row[spot]) if lattice else None)
        out["array_col"].append(int(spots.array_col[spot]) if lattice else None)
        out[schema.POS].append(int(tile.pos))
        out[schema.NEIGHBORS].append(niche.keys[i])
        out[schema.N_NEIGHBORS].append(int(niche.n_neighbors[i]))
        out["total_counts"].append(float(values.sum()))
        out["n_genes"].append(int(genes.size))
        out["outside_fraction"].append(float(tile.outside_fraction))
        sample_bytes += len(tile.patch) + len(tile.region or b"") + 8 * genes.size + 8 * niche_genes.size
    return pa.Table.from_pydict(out, schema=unit_sample_schema(dtype)), sample_bytes


#: Longer side of the thumbnail the QC spot plot is drawn on.
QC_THUMBNAIL_PX: Final = 1024

#: A slide with at least this fraction of its sites' tiles outside the image gets a hint on its um/px.
OUTSIDE_HINT_FRACTION: Final = 0.9


def _outside_hint(slide: Slide, rejected: Counter[str], *, n_sites: int) -> str:
    """``': <hint>'`` when nearly every tile fell outside the image (a wrong um/px puts them there), else ``''``."""
    from stcorpus.curate.tiles import REJECT_OUTSIDE

    outside = rejected.get(REJECT_OUTSIDE, 0)
    if n_sites == 0 or outside < OUTSIDE_HINT_FRACTION * n_sites:
        return ""
    return (
        f": {outside:,} of {n_sites:,} sites' tiles fall outside {slide.image.path.name} "
        f"({slide.image.width}x{slide.image.height} px) at {slide.mpp:.4g} um/px ({slide.mpp_source}); "
        "a wrong um/px does that: check the sample's `mpp` in the manifest (or remove it to use the "
        "source's own scale), and that the image is the one the positions were registered to"
    )


def _samples(
    slide: Slide, counts: sp.csr_matrix, *, tmp: Path, result: UnitResult, settings: UnitSettings, where: _Where
) -> None:
    from stcorpus.curate.errors import NoSpotsError

    # sites -> neighbours -> tiles -> columns; every in-tissue spot not written is counted in `rejected`.
    rejected: Counter[str] = Counter()
    where.enter("choosing sites")
    try:
        sites = choose_sites(slide, counts, rejected=rejected)
    finally:
        result.tiles = {"rejected": dict(rejected)}
    where.enter("finding neighbours")
    niche = neighbours(slide, sites)
    where.enter("cutting tiles", [str(slide.image.path)])
    tiles, result.tiles = site_tiles(slide, sites, settings=settings.tiles, rejected=rejected)
    hint = _outside_hint(slide, rejected, n_sites=len(sites.keys))
    if not tiles:
        raise NoSpotsError(f"every spot's tiles were rejected ({dict(rejected)}){hint}", slide_id=slide.id)
    if hint:
        result.slide["notes"].append(hint.removeprefix(": "))
    where.enter("writing samples", [str(tmp / SAMPLES_FILE)])
    table, sample_bytes = columns(slide, sites, niche, tiles)
    write_samples(tmp / SAMPLES_FILE, table)
    result.counts_dtype = counts_dtype(sites.counts)
    result.n_samples = table.num_rows
    result.sample_bytes = sample_bytes
    result.slide["n_spots_written"] = table.num_rows
    where.enter("drawing QC plots", [str(slide.image.path)])
    totals = np.asarray(counts.sum(axis=1)).ravel()
    chosen = sorted(tiles)[:MONTAGE_SIZE]
    _qc_plots(
        slide,
        tmp / QC_SUBDIR,
        keep=sites.spots,
        totals=totals,
        patches=[p for i in chosen if (p := tiles[i].patch) is not None],
    )


def content_digest(counts: sp.csr_matrix, *, rows: npt.NDArray[np.bool_] | None = None) -> str:
    """A fingerprint of a counts matrix that ignores spot order, barcode spelling and gene naming.

    The sorted per-spot totals (of ``rows``, e.g. the in-tissue spots, that have counts) and the
    sorted non-zero per-gene totals of the counts as the reader gave them: two sources of the same
    slide (e.g. HEST and STimage copies) agree on them even when they name spots and genes
    differently, while two different slides practically never do.
    """
    counts = counts.tocsr()
    if rows is not None:
        counts = counts[np.flatnonzero(rows)]
    spot_totals = np.asarray(counts.sum(axis=1)).ravel()
    spot_totals = np.sort(spot_totals[spot_totals > 0])
    gene_totals = np.sort(np.asarray(counts.sum(axis=0)).ravel())
    gene_totals = gene_totals[gene_totals > 0]
    digest = hashlib.sha256()
    for values in (spot_totals, gene_totals):
        digest.update(np.round(values.astype(np.float64), 3).tobytes())
    return digest.hexdigest()


def _qc_plots(
    slide: Slide,
    folder: Path,
    *,
    keep: npt.NDArray[np.intp],
    totals: npt.NDArray[Any],
    patches: list[bytes],
) -> None:
    from stcorpus.curate.build.report import plot_montage, plot_spots

    folder.mkdir(parents=True, exist_ok=True)
    thumbnail = slide.image.thumbnail(max_size=QC_THUMBNAIL_PX)
    scale = thumbnail.shape[1] / slide.image.width
    plot_spots(
        folder / "spots.png",
        thumbnail=thumbnail,
        x=slide.spots.x_px[keep] * scale,
        y=slide.spots.y_px[keep] * scale,
        values=totals[keep],
        title=f"{slide.id}: {keep.size} in-tissue spots with counts",
    )
    plot_montage(folder / "patches.png", jpegs=patches, title=f"{slide.id}: first patches in lattice order")


def describe(result: UnitResult) -> str:
    """One line about a unit, for logs and summaries."""
    if result.status == "built":
        return f"{result.slide_id}: {result.n_samples} samples ({result.seconds:.1f}s)"
    return f"{result.slide_id}: {result.status}: {result.reason}"


def results_by_status(results: Mapping[str, UnitResult]) -> Counter[str]:
    """How many units ended in each status."""
    return Counter(r.status for r in results.values())


__all__ = [
    "GeneSettings",
    "Niche",
    "Sites",
    "UnitSettings",
    "choose_sites",
    "columns",
    "content_digest",
    "counts_dtype",
    "failed_unit",
    "input_needs",
    "known_inputs",
    "lost_unit",
    "manifest_entry",
    "neighbours",
    "prefetch",
    "reusable_unit",
    "run_unit",
    "site_tiles",
    "slide_row",
    "unit_key",
    "worker_lost_unit",
]
