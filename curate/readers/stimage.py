"""An STimage-1K4M slide -> ``Slide``.

Sources: ``counts`` (``<slide>_count.csv``), ``coords`` (``<slide>_coord.csv``), ``image``
(``<slide>.png``). Layouts, as published in JiawenChenn/STimage-1K4M (``example/
Human_Breast_Andersson_10142021_ST_A1_coord.csv``; ``code_reproducibility/data_process/
01-crop-image.py`` and ``docs/docs/10_ST_analysis_quick_start.md`` read them with
``pd.read_csv(..., index_col=0)``):

* coord CSV: header ``,yaxis,xaxis,r`` -- an unnamed index column of spot ids, then the spot
  centre's row (``yaxis``) and column (``xaxis``) in image pixels, and the spot radius ``r``
  in pixels (the crop script cuts ``(xaxis - r, yaxis - r, xaxis + r, yaxis + r)``).
* count CSV: the same unnamed index of spot ids, one column per gene symbol, raw counts.
* spot ids are ``<slide>_<spot>``: ``Human_Breast_Andersson_10142021_ST_A1_10x13`` for legacy
  ST (``<x>x<y>`` array position, x along ``xaxis``; some ST studies use decimals such as
  ``10.5x13.2``), a 10x barcode for Visium.

Decisions: barcodes are the spot ids without the ``<slide>_`` prefix (the slide name is
the coord file name without ``_coord.csv``). um/px = spot diameter (55 um Visium, 100 um ST) /
(2 r), ``mpp_source="spot_radius"``, unless the manifest sets ``mpp``. Reader option
``spot_diameter_um`` (a float) overrides the diameter for a study whose ``r`` was computed
another way -- e.g. ``65.0`` if a study's ``r`` is half Space Ranger's ``spot_diameter_fullres``
(a theoretical 65 um spot); QC's lattice check shows such a study as a ~15% disagreement. ST array coordinates
come from the ``<x>x<y>`` ids (rounded to the nearest lattice site); Visium slides carry no
array coordinates, so they are derived from the pixel lattice (``curate.geometry``: neighbours exact,
origin and orientation arbitrary), which is all the neighbour features need. STimage lists
only the spots it kept, with no tissue flag: every spot is taken as in tissue. Counts are
parsed in blocks (pyarrow) straight into a sparse matrix, so a 300 MB CSV never becomes a
dense array; whole-number values are stored as int32.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from stcorpus.curate.errors import CorruptSourceError, UnsupportedAssayError
from stcorpus.curate.geometry import GEOMETRIES, Geometry, assay_geometry, square_bins
from stcorpus.curate.imaging import DEFAULT_IMAGES, ImageSettings, open_image
from stcorpus.curate.readers._common import (
    TEXT_ERRORS,
    coordinate,
    join_spots,
    lattice_coords,
    open_text,
    option,
    raw_counts,
    read_count_table,
    require_file,
)
from stcorpus.curate.slide import Features, MppSource, Slide, Spots

if TYPE_CHECKING:
    from stcorpus.curate.manifest import Sample

# --- STimage-1K4M's literal names ----------------------------------------------------------
COORD_SUFFIX: Final = "_coord.csv"
COUNT_SUFFIX: Final = "_count.csv"
X_COLUMN: Final = "xaxis"
Y_COLUMN: Final = "yaxis"
RADIUS_COLUMN: Final = "r"
ST_SPOT_ID: Final = re.compile(r"^(\d+(?:\.\d+)?)x(\d+(?:\.\d+)?)$")


FloatArray = npt.NDArray[np.float64]


def _read_coords(path: Path, *, sample: Sample) -> tuple[npt.NDArray[np.str_], FloatArray, FloatArray, FloatArray]:
    """Spot ids, x, y and r of a ``_coord.csv``."""
    try:
        with open_text(path) as handle:
            rows = [row for row in csv.reader(handle) if row]
    except TEXT_ERRORS as exc:
        raise CorruptSourceError(f"{path}: cannot read: {exc}", slide_id=sample.id) from exc
    if len(rows) < 2:
        raise CorruptSourceError(f"{path}: no spot rows", slide_id=sample.id)
    columns = [c.strip().lower() for c in rows[0]]
    missing = [c for c in (X_COLUMN, Y_COLUMN, RADIUS_COLUMN) if c not in columns[1:]]
    if missing:
        raise CorruptSourceError(
            f"{path}: header {rows[0]} lacks {', '.join(missing)}; expected ',yaxis,xaxis,r'", slide_id=sample.id
        )
    ix, iy, ir = (columns.index(c) for c in (X_COLUMN, Y_COLUMN, RADIUS_COLUMN))
    try:
        ids = np.array([r[0].strip() for r in rows[1:]], dtype=np.str_)
        x = np.array([coordinate(r[ix]) for r in rows[1:]], dtype=np.float64)
        y = np.array([coordinate(r[iy]) for r in rows[1:]], dtype=np.float64)
        radius = np.array([float(r[ir]) for r in rows[1:]], dtype=np.float64)
    except (IndexError, ValueError) as exc:
        raise CorruptSourceError(f"{path}: malformed row: {exc}", slide_id=sample.id) from exc
    return ids, x, y, radius


def _strip_prefix(ids: npt.NDArray[np.str_], prefix: str) -> npt.NDArray[np.str_]:
    if prefix and ids.shape[0] and all(i.startswith(prefix) for i in ids.tolist()):
        return np.array([i[len(prefix) :] for i in ids.tolist()], dtype=np.str_)
    return ids


def _geometry(sample: Sample) -> Geometry:
    """The assay's lattice; square bins of the reader option ``bin_size_um`` for Visium HD."""
    bin_size = option(sample, "bin_size_um", default=None)
    if bin_size is not None:
        return square_bins(float(bin_size))
    geometry = assay_geometry(
        sample.assay,
        slide_id=sample.id,
        pitch_hint="STimage's files do not state it: set the reader option `bin_size_um` (e.g. 8.0)",
    )
    if not geometry.is_lattice:
        raise UnsupportedAssayError(
            f"{sample.describe()}: assay {sample.assay!r} is {geometry.describe()}; STimage slides are spots on a "
            "lattice: check the sample's `assay`",
            slide_id=sample.id,
        )
    return geometry


def read(*, sample: Sample, files: Mapping[str, Path], images: ImageSettings = DEFAULT_IMAGES) -> Slide:
    """Read an STimage-1K4M slide into a :class:`Slide` (see the module docstring)."""
    notes: list[str] = []
    counts_path = require_file(files, "counts", sample=sample)
    coords_path = require_file(files, "coords", sample=sample)
    image_path = require_file(files, "image", sample=sample)
    geometry = _geometry(sample)
    diameter_option = option(sample, "spot_diameter_um", default=None)
    diameter_um = float(diameter_option) if diameter_option is not None else geometry.spot_diameter_um
    if diameter_um is None and sample.mpp is None:
        known = sorted(key for key, g in GEOMETRIES.items() if g.spot_diameter_um is not None)
        raise UnsupportedAssayError(
            f"{sample.describe()}: assay {sample.assay!r} has no spot diameter on record, so um/px cannot be taken "
            f"from the spot radius (known: {', '.join(known)}); set the sample's `mpp` or the reader option "
            "`spot_diameter_um`",
            slide_id=sample.id,
        )

    count_ids, genes, counts = read_count_table(counts_path, delimiter=",", sample=sample)
    coord_ids, x, y, radius = _read_coords(coords_path, sample=sample)
    slide_name = coords_path.name[: -len(COORD_SUFFIX)] if coords_path.name.endswith(COORD_SUFFIX) else ""
    prefix = f"{slide_name}_" if slide_name else ""
    count_barcodes, coord_barcodes = _strip_prefix(count_ids, prefix), _strip_prefix(coord_ids, prefix)
    # STimage lists only the spots it kept: every coord row is in tissue.
    join = join_spots(
        count_barcodes,
        coord_barcodes,
        in_tissue=np.ones(coord_barcodes.shape[0], dtype=bool),
        finite=np.isfinite(x) & np.isfinite(y),
        sample=sample,
        counts_name=counts_path.name,
        positions_name=coords_path.name,
        notes=notes,
    )
    rows, coord_rows = join.rows, join.position_rows
    counts = raw_counts(counts[rows], sample=sample, source=counts_path, notes=notes)
    barcodes = count_barcodes[rows]
    x, y, radius = x[coord_rows], y[coord_rows], radius[coord_rows]

    finite_r = radius[np.isfinite(radius)]
    median_r = float(np.median(finite_r)) if finite_r.size else float("nan")
    if not median_r > 0 and sample.mpp is None:  # r gives the um/px; with the manifest's `mpp` it is not needed
        raise CorruptSourceError(
            f"{coords_path}: spot radius r is {median_r} (median of {radius.shape[0]:,} spots), so the um/px cannot "
            "be derived from it; set the sample's `mpp` in the manifest",
            slide_id=sample.id,
        )
    if median_r > 0 and float(np.max(np.abs(finite_r - median_r))) > 0.01 * median_r:
        notes.append(f"spot radius varies ({radius.min():.2f}..{radius.max():.2f} px): the median {median_r:.2f} used")
    mpp_source: MppSource
    if sample.mpp is not None:
        mpp, mpp_source = sample.mpp, "manifest"
    elif diameter_um is not None:
        mpp, mpp_source = diameter_um / (2.0 * median_r), "spot_radius"
    else:  # unreachable: refused above
        raise UnsupportedAssayError(f"{sample.describe()}: no um/px", slide_id=sample.id)

    parsed = [ST_SPOT_ID.match(b) for b in barcodes.tolist()] if sample.assay == "st" else []
    if parsed and all(m is not None for m in parsed):
        array_col = np.array([round(float(m.group(1))) for m in parsed if m], dtype=np.int32)
        array_row = np.array([round(float(m.group(2))) for m in parsed if m], dtype=np.int32)
    else:
        if sample.assay == "st":
            notes.append("ST spot ids are not all '<x>x<y>'")
        array_row, array_col = lattice_coords(
            x, y, geometry=geometry, mpp=mpp, mpp_source=mpp_source, sample=sample, notes=notes
        )
    notes.append("STimage lists only the spots it kept and no tissue flag: every spot taken as in tissue")

    return Slide(
        sample=sample,
        counts=counts,
        features=Features(ids=np.full(genes.shape, "", dtype=np.str_), names=genes),
        spots=Spots(
            barcode=barcodes,
            in_tissue=np.ones(barcodes.shape[0], dtype=bool),
            array_row=array_row,
            array_col=array_col,
            x_px=x,
            y_px=y,
        ),
        image=open_image(image_path, max_pixels=images.max_pixels),
        mpp=mpp,
        mpp_source=mpp_source,
        geometry=geometry,
        qc=[join.check],
        notes=notes,
        dropped_spots=join.dropped,
    )
