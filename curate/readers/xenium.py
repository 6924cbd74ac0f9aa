"""10x Xenium Onboard Analysis output + a registered H&E -> ``Slide`` (cells, or pseudo-spots).

Sources (see ``READERS["xenium"]``): ``outs``, the Xenium output bundle folder; ``image``, the
H&E of the same section; ``alignment``, the 3x3 affine (CSV, no header) that takes H&E pixels
to Xenium morphology-image pixels, as Xenium Explorer's image alignment writes it
(``<name>_imagealignment.csv``; spatialdata-io's ``xenium_aligned_image`` reads it the same way).
Without ``alignment`` the H&E is taken to be in morphology-image pixels already.

10x's names (Xenium Onboard Analysis "Output files"; spatialdata-io's ``XeniumKeys``):

* ``experiment.xenium`` (JSON): ``pixel_size``, um per morphology-image pixel (0.2125);
* ``cell_feature_matrix.h5``: the 10x v3 feature-barcode matrix, cells x features; besides
  ``Gene Expression`` it holds control features (negative control probes and codewords,
  unassigned, deprecated and genomic-control codewords), which are dropped;
* ``cells.parquet``: ``cell_id``, ``x_centroid``, ``y_centroid`` (um), ``cell_area``, ...;
* ``transcripts.parquet``: ``cell_id``, ``feature_name``, ``x_location``, ``y_location``,
  ``z_location`` (um), ``qv`` (Phred-scaled quality), ...

Reader option ``samples``:

* ``cells`` (default): one sample per cell, counts from ``cell_feature_matrix.h5``, placed at
  its centroid. Neighbours follow the cell-level rule (``neighbour_radius_um``, default 50;
  ``neighbour_k``, default 6: squidpy's generic default, bounded by the radius); there are no
  array coordinates. Tiles are cut at the build's view sizes (``curate build --patch-size
  --patch-mpp``: e.g. 128 px at 0.5 um/px, 64 um, for cell-scale tiles).
* ``pseudo-spots``: the transcripts pooled onto a declared grid (``grid``, ``pitch_um``,
  ``spot_diameter_um`` as for Visium HD: by default 55 um spots on a 100 um hex lattice), after
  dropping transcripts of control features (any ``feature_name`` that is not a ``Gene
  Expression`` feature of the matrix) and those with ``qv`` below ``min_qv`` (default 20, the
  threshold Xenium's own counts use).

Positions: um / ``pixel_size`` gives morphology pixels, the inverse of the alignment gives H&E
pixels; um/px of the H&E is ``pixel_size`` times the alignment's scale (the square root of its
area factor), unless the manifest sets ``mpp``.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from stcorpus.curate.errors import CorruptSourceError, SourceMissingError
from stcorpus.curate.geometry import CELLS, Geometry, pool_to_grid
from stcorpus.curate.imaging import DEFAULT_IMAGES, ImageSettings, open_image
from stcorpus.curate.readers import _tenx
from stcorpus.curate.readers._common import (
    as_str_array,
    join_spots,
    option,
    pool_grid,
    raw_counts,
    read_json,
    require_file,
)
from stcorpus.curate.slide import Features, MppSource, Slide, Spots

if TYPE_CHECKING:
    from stcorpus.curate.manifest import Sample

# --- Xenium's literal names -----------------------------------------------------------------
SPECS_FILE: Final = "experiment.xenium"
PIXEL_SIZE: Final = "pixel_size"
MATRIX_FILE: Final = "cell_feature_matrix.h5"
CELLS_FILE: Final = "cells.parquet"
TRANSCRIPTS_FILE: Final = "transcripts.parquet"
CELL_ID: Final = "cell_id"
CELL_X: Final = "x_centroid"
CELL_Y: Final = "y_centroid"
FEATURE_NAME: Final = "feature_name"
TRANSCRIPT_X: Final = "x_location"
TRANSCRIPT_Y: Final = "y_location"
QUALITY: Final = "qv"
#: Xenium's own counts keep transcripts of Q20 and above.
DEFAULT_MIN_QV: Final = 20.0
SAMPLE_KINDS: Final = ("cells", "pseudo-spots")
#: The bundle's own morphology images (``morphology.ome.tif``, ``morphology_mip.ome.tif``,
#: ``morphology_focus.ome.tif`` or ``morphology_focus/morphology_focus_0000.ome.tif``): never the H&E.
MORPHOLOGY_IMAGE: Final = re.compile(r"^morphology(_mip|_focus(_\d+)?)?\.ome\.tiff?$", re.IGNORECASE)
MORPHOLOGY_FOLDER: Final = "morphology_focus"
#: um per morphology pixel a real instrument gives (Xenium: 0.2125); outside, the file is damaged.
_PLAUSIBLE_PIXEL_SIZE: Final = (0.01, 100.0)
SITE_BARCODE: Final = "{grid}{size:03.0f}um_r{row:04d}_c{col:04d}"

Affine = npt.NDArray[np.float64]


def _outs(path: Path, *, sample: Sample) -> Path:
    """The bundle folder holding ``experiment.xenium``: ``path`` or its one subfolder (an unpacked archive)."""
    candidates = [path]
    if path.is_dir():
        subfolders = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(subfolders) == 1:
            candidates.append(subfolders[0])
    for candidate in candidates:
        if (candidate / SPECS_FILE).is_file():
            return candidate
    raise SourceMissingError(
        f"source 'outs': {path} holds no {SPECS_FILE}; point it at the Xenium output bundle folder",
        slide_id=sample.id,
    )


def _alignment(path: Path, *, sample: Sample) -> Affine:
    export = "export it again from Xenium Explorer's image alignment"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptSourceError(
            f"{path}: not a 3x3 alignment matrix CSV: {exc}; {export}", slide_id=sample.id
        ) from exc
    if not text.strip():
        raise CorruptSourceError(
            f"{path}: the file is empty; the alignment is a 3x3 matrix CSV (H&E px -> morphology px): {export}",
            slide_id=sample.id,
        )
    try:
        matrix = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise CorruptSourceError(
            f"{path}: not a 3x3 alignment matrix CSV (comma-separated numbers, no header): {exc}; {export}",
            slide_id=sample.id,
        ) from exc
    if matrix.shape != (3, 3) or not np.isfinite(matrix).all():
        raise CorruptSourceError(
            f"{path}: the alignment must be a 3x3 matrix of finite numbers (H&E px -> morphology px), found "
            f"{matrix.shape[0]}x{matrix.shape[1] if matrix.ndim > 1 else 1}"
            + ("" if np.isfinite(matrix).all() else " with NaN or infinite values")
            + f"; {export}",
            slide_id=sample.id,
        )
    if not np.allclose(matrix[2], [0.0, 0.0, 1.0]):
        raise CorruptSourceError(
            f"{path}: not an affine: its last row is {matrix[2].tolist()}, expected [0, 0, 1]; {export}",
            slide_id=sample.id,
        )
    if abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
        raise CorruptSourceError(
            f"{path}: not an invertible affine (its 2x2 part {matrix[:2, :2].tolist()} has determinant 0: it maps "
            f"the H&E onto a line); {export}",
            slide_id=sample.id,
        )
    return matrix


#: What to do when a table a kind of samples needs is missing: the other kind reads another file.
_OTHER_KIND: Final = {
    CELLS_FILE: f"or set the reader option samples: pseudo-spots, which reads {TRANSCRIPTS_FILE} instead",
    TRANSCRIPTS_FILE: f"or set the reader option samples: cells, which reads {CELLS_FILE} instead",
}


def _table(path: Path, columns: list[str], *, sample: Sample) -> Any:
    import pyarrow.parquet as pq

    if not path.is_file():
        other = _OTHER_KIND.get(path.name)
        raise SourceMissingError(
            f"{path.parent}: no {path.name}; copy the whole Xenium output bundle" + (f", {other}" if other else ""),
            slide_id=sample.id,
        )
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise CorruptSourceError(f"{path}: not a readable Parquet file: {exc}", slide_id=sample.id) from exc
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise CorruptSourceError(
            f"{path}: lacks column(s) {', '.join(missing)} (has {', '.join(table.column_names)})", slide_id=sample.id
        )
    return table


def _column(table: Any, name: str) -> npt.NDArray[Any]:
    return np.asarray(table.column(name).to_numpy(zero_copy_only=False))


def _numbers(table: Any, name: str, *, path: Path, sample: Sample) -> npt.NDArray[np.float64]:
    """Column ``name`` as float64 (nulls become NaN); a :class:`CorruptSourceError` naming it when it is text."""
    values = _column(table, name)
    try:
        return values.astype(np.float64)
    except (TypeError, ValueError) as exc:
        example = next((v for v in values.tolist() if not isinstance(v, int | float)), None)
        raise CorruptSourceError(
            f"{path}: column {name!r} is not numeric (e.g. {example!r}); Xenium writes numbers there: fetch the "
            "bundle again from its source",
            slide_id=sample.id,
        ) from exc


def read(*, sample: Sample, files: Mapping[str, Path], images: ImageSettings = DEFAULT_IMAGES) -> Slide:
    """Read a Xenium output bundle and its H&E into a :class:`Slide` (see the module docstring)."""
    import scipy.sparse as sp

    kind = str(option(sample, "samples", default="cells"))
    if kind not in SAMPLE_KINDS:
        raise SourceMissingError(
            f"{sample.describe()}: reader option samples={kind!r}; use one of {', '.join(SAMPLE_KINDS)}",
            slide_id=sample.id,
        )
    notes: list[str] = []
    outs = _outs(require_file(files, "outs", sample=sample), sample=sample)
    specs = read_json(outs / SPECS_FILE, sample=sample)
    pixel_size = specs.get(PIXEL_SIZE)
    if not isinstance(pixel_size, int | float) or isinstance(pixel_size, bool) or not pixel_size > 0:
        raise CorruptSourceError(
            f"{outs / SPECS_FILE}: no positive {PIXEL_SIZE!r} (um per morphology pixel), found {pixel_size!r}",
            slide_id=sample.id,
        )
    if not _PLAUSIBLE_PIXEL_SIZE[0] <= pixel_size <= _PLAUSIBLE_PIXEL_SIZE[1]:
        raise CorruptSourceError(
            f"{outs / SPECS_FILE}: {PIXEL_SIZE}={pixel_size!r} um per morphology pixel is no microscope's (Xenium "
            f"writes 0.2125; expected {_PLAUSIBLE_PIXEL_SIZE[0]:g}..{_PLAUSIBLE_PIXEL_SIZE[1]:g}): the file is "
            "damaged, fetch the bundle again",
            slide_id=sample.id,
        )
    if "alignment" in files:
        alignment = _alignment(require_file(files, "alignment", sample=sample), sample=sample)
        notes.append(f"H&E registered through {files['alignment'].name} (H&E px -> morphology px)")
    else:
        alignment = np.eye(3)
        notes.append("no alignment source: the H&E is taken to be in morphology-image pixels")
    # um -> morphology px -> H&E px
    um_to_pixels = np.asarray(
        np.linalg.inv(alignment) @ np.diag([1.0 / pixel_size, 1.0 / pixel_size, 1.0]), dtype=np.float64
    )

    matrix_path = outs / MATRIX_FILE
    if not matrix_path.is_file():
        raise SourceMissingError(f"{outs}: no {MATRIX_FILE}", slide_id=sample.id)
    matrix = _tenx.read_h5(matrix_path)
    genes = matrix.types == _tenx.GENE_EXPRESSION
    if not genes.any():
        raise CorruptSourceError(f"{matrix_path}: no '{_tenx.GENE_EXPRESSION}' features", slide_id=sample.id)
    dropped_features = int((~genes).sum())
    if dropped_features:
        kinds = ", ".join(f"{n} {t}" for t, n in zip(*np.unique(matrix.types[~genes], return_counts=True), strict=True))
        notes.append(f"{dropped_features} control features dropped ({kinds})")
    gene_columns = np.flatnonzero(genes)
    features = Features(ids=matrix.ids[gene_columns], names=matrix.names[gene_columns])

    geometry: Geometry
    if kind == "cells":
        cells_path = outs / CELLS_FILE
        cells = _table(cells_path, [CELL_ID, CELL_X, CELL_Y], sample=sample)
        cell_ids = as_str_array(_column(cells, CELL_ID))
        xy_um = np.column_stack(
            [
                _numbers(cells, CELL_X, path=cells_path, sample=sample),
                _numbers(cells, CELL_Y, path=cells_path, sample=sample),
            ]
        )
        join = join_spots(
            matrix.barcodes,
            cell_ids,
            in_tissue=np.ones(cell_ids.shape[0], dtype=bool),
            finite=np.asarray(np.isfinite(xy_um).all(axis=1), dtype=bool),
            sample=sample,
            counts_name=MATRIX_FILE,
            positions_name=CELLS_FILE,
            notes=notes,
        )
        counts = raw_counts(matrix.counts[join.rows][:, gene_columns], sample=sample, source=matrix_path, notes=notes)
        barcodes = matrix.barcodes[join.rows]
        site_um = xy_um[join.position_rows]
        radius = float(option(sample, "neighbour_radius_um", default=CELLS.neighbour_radius_um))
        k = option(sample, "neighbour_k", default=CELLS.neighbour_k)
        try:
            geometry = replace(CELLS, key="xenium-cells", neighbour_radius_um=radius, neighbour_k=k)
        except ValueError as exc:  # the geometry's own check: a positive radius and k
            raise SourceMissingError(
                f"{sample.describe()}: reader options neighbour_radius_um={radius!r}, neighbour_k={k!r}: {exc}",
                slide_id=sample.id,
            ) from exc
        array_row = array_col = np.zeros(barcodes.shape[0], dtype=np.int32)
        qc, dropped_spots = [join.check], join.dropped
    else:
        min_qv = float(option(sample, "min_qv", default=DEFAULT_MIN_QV))
        transcripts_path = outs / TRANSCRIPTS_FILE
        transcripts = _table(transcripts_path, [FEATURE_NAME, TRANSCRIPT_X, TRANSCRIPT_Y, QUALITY], sample=sample)
        names = as_str_array(_column(transcripts, FEATURE_NAME))
        quality = _numbers(transcripts, QUALITY, path=transcripts_path, sample=sample)
        x_all = _numbers(transcripts, TRANSCRIPT_X, path=transcripts_path, sample=sample)
        y_all = _numbers(transcripts, TRANSCRIPT_Y, path=transcripts_path, sample=sample)
        column_of = {str(name): i for i, name in enumerate(features.names.tolist())}
        gene_index = np.array([column_of.get(str(n), -1) for n in names.tolist()], dtype=np.int64)
        is_gene, good = gene_index >= 0, quality >= min_qv  # a NaN qv is not good
        placed = np.isfinite(x_all) & np.isfinite(y_all)
        keep = is_gene & good & placed
        n_unplaced = int((is_gene & good & ~placed).sum())
        summary = (
            f"{TRANSCRIPTS_FILE}: {names.shape[0]:,} transcripts; {int((~is_gene).sum()):,} of control features (no "
            f"'{_tenx.GENE_EXPRESSION}' feature of {MATRIX_FILE}) and {int((is_gene & ~good).sum()):,} gene "
            f"transcripts with {QUALITY} < {min_qv:g} dropped"
            + (f"; {n_unplaced:,} with a NaN or infinite location dropped" if n_unplaced else "")
        )
        if not keep.any():
            if n_unplaced:
                fix = f"the x/y locations are broken: fetch {TRANSCRIPTS_FILE} again from its source"
            elif not is_gene.any():
                fix = f"check that {TRANSCRIPTS_FILE} and {MATRIX_FILE} come from the same run"
            else:
                fix = f"lower the reader option min_qv (now {min_qv:g}) if the run's qualities are low"
            raise CorruptSourceError(
                f"{transcripts_path}: no transcript is left to pool ({summary.split(': ', 1)[1]}); {fix}",
                slide_id=sample.id,
            )
        notes.append(summary)
        grid, geometry = pool_grid(sample, key="xenium-hex", square_side="the side of a pseudo-spot")
        x_um = x_all[keep]
        y_um = y_all[keep]
        pool = pool_to_grid(x_um, y_um, geometry=geometry)
        if len(pool) == 0:
            raise CorruptSourceError(
                f"{outs / TRANSCRIPTS_FILE}: no kept transcript falls in a pseudo-spot of the {geometry.describe()}",
                slide_id=sample.id,
            )
        inside = pool.site >= 0
        counts = sp.csr_matrix(
            (
                np.ones(int(inside.sum()), dtype=np.int32),
                (pool.site[inside], gene_index[keep][inside]),
            ),
            shape=(len(pool), len(features)),
        )
        counts.sum_duplicates()
        notes.append(
            f"{int(keep.sum()):,} transcripts pooled onto a {geometry.describe()}: {len(pool):,} pseudo-spots, "
            f"{int((~inside).sum()):,} transcripts between them"
        )
        size = float((geometry.spot_diameter_um if grid == "hex" else geometry.pitch_um) or 0.0)
        barcodes = np.array(
            [
                SITE_BARCODE.format(grid=grid, size=size, row=int(r), col=int(c))
                for r, c in zip(pool.row.tolist(), pool.col.tolist(), strict=True)
            ],
            dtype=np.str_,
        )
        site_um = np.column_stack([pool.x_um, pool.y_um])
        array_row, array_col = pool.row, pool.col
        qc, dropped_spots = [], {}

    pixels = np.column_stack([site_um, np.ones(site_um.shape[0])]) @ um_to_pixels.T
    image_path = require_file(files, "image", sample=sample)
    if MORPHOLOGY_IMAGE.match(image_path.name) or image_path.parent.name == MORPHOLOGY_FOLDER:
        raise CorruptSourceError(
            f"source 'image': {image_path.name} is the Xenium morphology image (DAPI / stains), not the H&E: name "
            "the H&E scanned after the run, with its `alignment` CSV from Xenium Explorer's image alignment",
            slide_id=sample.id,
        )
    image = open_image(image_path, max_pixels=images.max_pixels)
    mpp_source: MppSource
    if sample.mpp is not None:
        mpp, mpp_source = float(sample.mpp), "manifest"
    else:
        mpp = float(pixel_size) * math.sqrt(abs(float(np.linalg.det(alignment[:2, :2]))))
        mpp_source = "metadata"
        notes.append(f"um/px {mpp:.4f}: {SPECS_FILE} {PIXEL_SIZE}={pixel_size:g} times the alignment's scale")
    return Slide(
        sample=sample,
        counts=counts,
        features=features,
        spots=Spots(
            barcode=barcodes,
            in_tissue=np.ones(barcodes.shape[0], dtype=bool),
            array_row=array_row,
            array_col=array_col,
            x_px=pixels[:, 0],
            y_px=pixels[:, 1],
        ),
        image=image,
        mpp=mpp,
        mpp_source=mpp_source,
        geometry=geometry,
        qc=qc,
        notes=notes,
        dropped_features=dropped_features,
        dropped_spots=dropped_spots,
    )
