"""One slide's work unit: fetch -> read -> QC -> genes -> neighbours -> tiles -> samples.

``run_unit`` does everything one slide needs and writes the result into the work folder
(``workdir``), atomically. It is the unit of parallel (and distributed) work: it takes a
manifest ``Sample`` and settings, reads its inputs from the fetch cache itself (large slides
never travel through a scheduler), and returns a small ``UnitResult``.

A slide that cannot be built (a ``SlideError``: corrupt file, blank image, too coarse, unmapped
genes, ...) is recorded as ``quarantined`` with its reason and is not retried by later runs
with the same settings; a slide whose sources could not be fetched (a ``FetchError``) is
recorded as ``failed`` and is retried by the next run.

Which spots become samples: in-tissue spots with a non-zero total over the mapped genes, whose
tiles were not rejected (outside the image, background). Samples are stored in lattice order
(array_row, array_col). Their niche expression is the sum over in-tissue lattice neighbours
with counts (whether or not the neighbour's own tiles were kept).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from stcorpus import __version__
from stcorpus.curate.build.workdir import QC_SUBDIR, SAMPLES_FILE, UnitResult, WorkDir, settings_digest, write_samples
from stcorpus.curate.errors import FetchError, SlideError
from stcorpus.curate.genes.mapping import DEFAULT_MIN_MAPPED_FRACTION
from stcorpus.curate.imaging import ImageSettings
from stcorpus.curate.qc import QCSettings
from stcorpus.curate.tiles import TileSettings
from stcorpus.schema import sample_key

if TYPE_CHECKING:
    import scipy.sparse as sp

    from stcorpus.curate.fetch import FetchSettings
    from stcorpus.curate.manifest import Sample
    from stcorpus.curate.slide import Slide

log = logging.getLogger(__name__)

#: Patches shown per slide in the QC report's montage.
MONTAGE_SIZE = 32

#: Bumped whenever what a unit computes changes (e.g. revision 2: the counts fingerprint is taken
#: before gene mapping), so units made by older code are never reused.
UNIT_REVISION = 2


@dataclass(frozen=True)
class GeneSettings:
    """How features map onto the gene vocabulary (see ``stcorpus.curate.genes``)."""

    min_mapped_fraction: float = DEFAULT_MIN_MAPPED_FRACTION
    panel: tuple[str, ...] | None = None  # named panels to keep (None: every mapped gene)


@dataclass(frozen=True)
class UnitSettings:
    """Everything that decides what a unit contains (and the fetch settings, which do not)."""

    tiles: TileSettings = field(default_factory=TileSettings)
    qc: QCSettings = field(default_factory=QCSettings)
    genes: GeneSettings = field(default_factory=GeneSettings)
    images: ImageSettings = field(default_factory=ImageSettings)

    def digest(self) -> str:
        """A digest of the content-relevant settings and the tool version: units are reused only on a match."""
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


def run_unit(
    sample: Sample, *, work: WorkDir, settings: UnitSettings, fetch: FetchSettings, reuse: bool = True
) -> UnitResult:
    """Build one slide into the work folder (or return its finished unit) and say what happened."""
    digest = settings.digest()
    if reuse:
        done = work.reusable(sample.id, digest)
        if done is not None:
            return done
    start = time.perf_counter()
    tmp = work.begin(sample.id)
    result = UnitResult(slide_id=sample.id, status="built", settings_digest=digest, slide=slide_row(sample))
    try:
        _build(sample, tmp=tmp, result=result, settings=settings, fetch=fetch)
    except SlideError as exc:
        result.status, result.reason = "quarantined", exc.reason
        (tmp / SAMPLES_FILE).unlink(missing_ok=True)
        result.n_samples = result.sample_bytes = 0
    except FetchError as exc:
        result.status, result.reason = "failed", f"fetch: {exc}"
    result.seconds = round(time.perf_counter() - start, 3)
    work.commit(tmp, result)
    return result


def _fetch(sample: Sample, *, fetch: FetchSettings, result: UnitResult) -> dict[str, Path]:
    from stcorpus.curate.fetch import Fetcher

    files: dict[str, Path] = {}
    with Fetcher(fetch) as fetcher:
        for name in sorted(sample.sources):
            got = fetcher.fetch(sample.sources[name], sample=sample, name=name)
            files[name] = got.target
            result.inputs.append({"name": name, "url": got.url, "sha256": got.sha256, "size": got.size})
    return files


def _build(sample: Sample, *, tmp: Path, result: UnitResult, settings: UnitSettings, fetch: FetchSettings) -> None:
    from stcorpus.curate.genes import map_slide_genes
    from stcorpus.curate.qc import check_slide
    from stcorpus.curate.readers import read_slide

    files = _fetch(sample, fetch=fetch, result=result)
    slide = read_slide(sample, files, images=settings.images)
    try:
        result.slide.update(mpp=slide.mpp, mpp_source=slide.mpp_source, notes=list(slide.notes))
        try:
            check_slide(slide, settings=settings.qc)
        finally:
            result.qc = [asdict(check) for check in slide.qc]
            result.slide["qc_flags"] = slide.flags
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
        _samples(slide, genes.counts, tmp=tmp, result=result, settings=settings)
    finally:
        slide.image.close()


def _samples(slide: Slide, counts: sp.csr_matrix, *, tmp: Path, result: UnitResult, settings: UnitSettings) -> None:
    import pyarrow as pa

    from stcorpus.curate.build.pack import unit_sample_schema
    from stcorpus.curate.errors import NoSpotsError
    from stcorpus.curate.geometry import lattice_neighbors
    from stcorpus.curate.tiles import cut_tiles

    spots = slide.spots
    counts = counts.tocsr()
    totals = np.asarray(counts.sum(axis=1)).ravel()
    in_tissue = spots.in_tissue.astype(bool)
    keep = np.flatnonzero(in_tissue & (totals > 0))
    rejected: Counter[str] = Counter({"zero_counts": int(np.count_nonzero(in_tissue & (totals <= 0)))})
    result.slide["n_spots"] = int(np.count_nonzero(in_tissue))
    if keep.size == 0:
        raise NoSpotsError(
            f"no in-tissue spot has counts on the mapped genes ({int(np.count_nonzero(in_tissue))} in tissue)",
            slide_id=slide.id,
        )
    # Lattice order: samples of a slide are stored (and packed with order="slide") row by row.
    keep = keep[np.lexsort((spots.array_col[keep], spots.array_row[keep]))]
    keys = [sample_key(slide.id, str(b)) for b in spots.barcode[keep]]
    neighbors = lattice_neighbors(spots.array_row[keep], spots.array_col[keep], lattice=slide.lattice)
    kept_counts = counts[keep]
    niche = (neighbors.to_csr() @ kept_counts).tocsr()
    niche.sort_indices()
    kept_counts.sort_indices()
    neighbor_keys = neighbors.keys(keys)
    n_neighbors = neighbors.counts

    position = {int(spot): i for i, spot in enumerate(keep)}
    tiles: dict[int, Any] = {}
    run = cut_tiles(slide, indices=keep, settings=settings.tiles)
    for tile in run:
        if tile.accepted:
            tiles[position[tile.index]] = tile
    for reason, n in run.stats.rejected.items():
        rejected[reason] += n
    result.tiles = run.stats.as_dict() | {"rejected": dict(rejected)}

    chosen = sorted(tiles)
    if not chosen:
        raise NoSpotsError(f"every spot's tiles were rejected ({dict(rejected)})", slide_id=slide.id)
    dtype = "int32" if np.issubdtype(kept_counts.dtype, np.integer) else "float32"
    columns: dict[str, list[Any]] = {name: [] for name in unit_sample_schema(dtype).names}
    mpp = slide.mpp
    sample_bytes = 0
    for i in chosen:
        tile = tiles[i]
        spot = keep[i]
        row = kept_counts.indices[kept_counts.indptr[i] : kept_counts.indptr[i + 1]]
        values = kept_counts.data[kept_counts.indptr[i] : kept_counts.indptr[i + 1]]
        nrow = niche.indices[niche.indptr[i] : niche.indptr[i + 1]]
        nvalues = niche.data[niche.indptr[i] : niche.indptr[i + 1]]
        columns["key"].append(keys[i])
        columns["patch"].append(tile.patch)
        columns["region"].append(tile.region)
        columns["genes"].append(row.astype(np.int32))
        columns["counts"].append(values)
        columns["niche_genes"].append(nrow.astype(np.int32))
        columns["niche_counts"].append(nvalues)
        columns["barcode"].append(str(spots.barcode[spot]))
        columns["x_um"].append(float(spots.x_px[spot]) * mpp)
        columns["y_um"].append(float(spots.y_px[spot]) * mpp)
        columns["array_row"].append(int(spots.array_row[spot]))
        columns["array_col"].append(int(spots.array_col[spot]))
        columns["pos"].append(int(tile.pos))
        columns["neighbors"].append(neighbor_keys[i])
        columns["n_neighbors"].append(int(n_neighbors[i]))
        columns["total_counts"].append(float(values.sum()))
        columns["n_genes"].append(int(row.size))
        columns["outside_fraction"].append(float(tile.outside_fraction))
        sample_bytes += len(tile.patch) + len(tile.region or b"") + 8 * row.size + 8 * nrow.size
    table = pa.Table.from_pydict(columns, schema=unit_sample_schema(dtype))
    write_samples(tmp / SAMPLES_FILE, table)
    result.counts_dtype = dtype
    result.n_samples = len(chosen)
    result.sample_bytes = sample_bytes
    result.slide["n_spots_written"] = len(chosen)
    _qc_plots(slide, tmp / QC_SUBDIR, keep=keep, totals=totals, patches=[tiles[i].patch for i in chosen[:MONTAGE_SIZE]])


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
    thumbnail = slide.image.thumbnail(max_size=1024)
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


def read_unit_histograms(work: WorkDir, slide_id: str) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Total counts and detected genes of a built unit's samples, for the QC report."""
    table = work.samples(slide_id)
    return (
        table.column("total_counts").to_numpy(),
        table.column("n_genes").to_numpy(),
    )


__all__ = ["GeneSettings", "UnitSettings", "content_digest", "run_unit", "slide_row"]


def describe(result: UnitResult) -> str:
    """One line about a unit, for logs and summaries."""
    if result.status == "built":
        return f"{result.slide_id}: {result.n_samples} samples ({result.seconds:.1f}s)"
    return f"{result.slide_id}: {result.status}: {result.reason}"


def results_by_status(results: Mapping[str, UnitResult]) -> Counter[str]:
    """How many units ended in each status."""
    return Counter(r.status for r in results.values())
