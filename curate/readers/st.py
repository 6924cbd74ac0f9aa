"""Legacy Spatial Transcriptomics (ST, Ståhl et al. 2016) as its studies published it -> ``Slide``.

Sources (see ``READERS["st"]``):

* ``counts``: the spots x genes count table, tab-separated, gzipped or not. The first column
  keys each row ``<x>x<y>`` by the spot's array coordinates (``10x14``; some studies key rows by
  the spot-corrected coordinates, ``16.918x16.996``); the header names the genes, as symbols or
  (versioned) Ensembl ids, with or without an empty cell above the keys. A table written the
  other way round (genes x spots: the keys in the header) is read transposed, and said so.
* ``spots``: the spot file (ST Spot Detector's ``<section>_selection.tsv``), header
  ``x y new_x new_y pixel_x pixel_y selected``: array coordinates that key the count rows,
  spot-corrected array coordinates, the spot centre in full-resolution image pixels (x the
  column, y the row) and ``selected = 1`` for spots under tissue.
* ``image``: the full-resolution H&E (a JPEG or TIFF, or a folder holding one).

Decisions:

* Geometry: 100 um spots on a square lattice of 200 um pitch (``curate.geometry.LEGACY_ST``);
  array row = ``y``, array column = ``x``.
* um/px: the manifest's ``mpp`` if set, else a fit of ``pixel_x, pixel_y`` against the
  corrected coordinates ``new_x, new_y`` at 200 um per array unit (``mpp_source="lattice"``).
  Never from the image: the JPEGs' JFIF density (72 dpi) is not a physical resolution. A
  downscaled image shows as too coarse or as spots outside the image, and QC refuses it.
* Spots: every count row with a spot record and a finite centre is kept; off-tissue spots
  (``selected = 0``) that have a count row are kept flagged off tissue (tiles are cut for
  in-tissue spots only). Count rows without a spot record, selected spots without a count row,
  repeated keys and NaN centres are counted in ``Slide.dropped_spots`` and said in notes.
* Features: HTSeq-count's summary rows (``__no_feature``, ``__ambiguous``, ...) are not genes
  and are counted in ``dropped_features``; Ensembl ids (``ENSG…``, ``ENSMUSG….1``) go to the
  feature ids, anything else is a symbol.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from stcorpus.curate.errors import CorruptSourceError
from stcorpus.curate.geometry import LEGACY_ST, fit_lattice
from stcorpus.curate.imaging import DEFAULT_IMAGES, PIL_SUFFIXES, TIFF_SUFFIXES, ImageSettings, open_image
from stcorpus.curate.readers._common import (
    TEXT_ERRORS,
    coordinate,
    is_ensembl,
    join_spots,
    open_text,
    raw_counts,
    read_count_table,
    require_file,
    single_file_in,
)
from stcorpus.curate.slide import Features, MppSource, Slide, Spots

if TYPE_CHECKING:
    import scipy.sparse as sp

    from stcorpus.curate.manifest import Sample

# --- legacy ST's literal names -------------------------------------------------------------
SPOT_X: Final = "x"
SPOT_Y: Final = "y"
CORRECTED_X: Final = "new_x"
CORRECTED_Y: Final = "new_y"
PIXEL_X: Final = "pixel_x"
PIXEL_Y: Final = "pixel_y"
SELECTED: Final = "selected"
REQUIRED_SPOT_COLUMNS: Final = (SPOT_X, SPOT_Y, PIXEL_X, PIXEL_Y)
COUNTS_DELIMITER: Final = "\t"
#: A count-table row key: ``<x>x<y>``, integer or decimal array coordinates.
SPOT_KEY: Final = re.compile(r"^\s*(-?\d+(?:\.\d+)?)x(-?\d+(?:\.\d+)?)\s*$")
#: HTSeq-count appends these summary rows (columns, once transposed) to its tables.
HTSEQ_PREFIX: Final = "__"
IMAGE_SUFFIXES: Final = TIFF_SUFFIXES + PIL_SUFFIXES
#: Decimal keys match the corrected coordinates to this many array units (files give 3 decimals).
_KEY_TOLERANCE: Final = 0.01

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class SpotFile:
    """The columns of a spot file that the reader uses, one entry per row."""

    keys: npt.NDArray[np.str_]  # ``<x>x<y>`` from x, y: what keys the count rows
    x: FloatArray
    y: FloatArray
    new_x: FloatArray
    new_y: FloatArray
    pixel_x: FloatArray
    pixel_y: FloatArray
    selected: npt.NDArray[np.bool_]

    def __len__(self) -> int:
        return int(self.x.shape[0])


def read_spot_file(path: Path, *, sample: Sample, notes: list[str]) -> SpotFile:
    """Read a spot file (tab-, comma- or space-separated, with a header naming its columns)."""
    try:
        with open_text(path) as handle:
            lines = [line.rstrip("\r\n") for line in handle if line.strip()]
    except TEXT_ERRORS as exc:
        raise CorruptSourceError(f"{path}: cannot read the spot file: {exc}", slide_id=sample.id) from exc
    if len(lines) < 2:
        raise CorruptSourceError(f"{path}: no spot rows", slide_id=sample.id)
    separator = "\t" if "\t" in lines[0] else ("," if "," in lines[0] else None)

    def split(line: str) -> list[str]:
        return [field.strip().strip('"') for field in line.split(separator)]

    header = [name.lower() for name in split(lines[0])]
    missing = [name for name in REQUIRED_SPOT_COLUMNS if name not in header]
    if missing:
        raise CorruptSourceError(
            f"{path}: header {' '.join(header)!r} lacks {', '.join(missing)}; a legacy ST spot file has "
            f"'{' '.join((SPOT_X, SPOT_Y, CORRECTED_X, CORRECTED_Y, PIXEL_X, PIXEL_Y, SELECTED))}'",
            slide_id=sample.id,
        )
    rows = [split(line) for line in lines[1:]]
    # A table written with row names has one more field than its header: drop the names.
    rows = [row[1:] if len(row) == len(header) + 1 else row for row in rows]
    bad = next((i for i, row in enumerate(rows) if len(row) != len(header)), None)
    if bad is not None:
        raise CorruptSourceError(
            f"{path}: row {bad + 2} has {len(rows[bad])} fields, the header {len(header)}", slide_id=sample.id
        )

    def column(name: str) -> FloatArray:
        index = header.index(name)
        try:
            return np.array([coordinate(row[index]) for row in rows], dtype=np.float64)
        except ValueError as exc:
            raise CorruptSourceError(f"{path}: column {name!r} is not numeric: {exc}", slide_id=sample.id) from exc

    x, y = column(SPOT_X), column(SPOT_Y)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise CorruptSourceError(
            f"{path}: {SPOT_X}/{SPOT_Y} hold NaN or infinite values, and they key the count rows", slide_id=sample.id
        )
    if CORRECTED_X in header and CORRECTED_Y in header:
        new_x, new_y = column(CORRECTED_X), column(CORRECTED_Y)
    else:
        new_x, new_y = x.copy(), y.copy()
        notes.append(f"{path.name} has no {CORRECTED_X}/{CORRECTED_Y}: the scale is fitted to {SPOT_X}/{SPOT_Y}")
    if SELECTED in header:
        flags = column(SELECTED)
        if not np.isfinite(flags).all():
            raise CorruptSourceError(
                f"{path}: column {SELECTED!r} is missing for {int((~np.isfinite(flags)).sum())} spot(s): which spots "
                "are under tissue is unknown",
                slide_id=sample.id,
            )
        selected = flags != 0
    else:
        selected = np.ones(x.shape[0], dtype=bool)
        notes.append(f"{path.name} has no {SELECTED} column: every spot taken as under tissue")
    return SpotFile(
        keys=np.array([_key(a, b) for a, b in zip(x, y, strict=True)], dtype=np.str_),
        x=x,
        y=y,
        new_x=new_x,
        new_y=new_y,
        pixel_x=column(PIXEL_X),
        pixel_y=column(PIXEL_Y),
        selected=selected,
    )


def _key(x: float, y: float) -> str:
    """``<x>x<y>`` as the count tables write it (integers without a decimal point)."""

    def text(value: float) -> str:
        return str(int(value)) if float(value).is_integer() else f"{value:g}"

    return f"{text(x)}x{text(y)}"


def _parse_keys(keys: npt.NDArray[np.str_]) -> tuple[FloatArray, FloatArray, npt.NDArray[np.bool_]]:
    """The (x, y) of every ``<x>x<y>`` key (NaN where a key is not one), and which keys are."""
    matches = [SPOT_KEY.match(key) for key in keys.tolist()]
    x = np.array([float(m.group(1)) if m else np.nan for m in matches], dtype=np.float64)
    y = np.array([float(m.group(2)) if m else np.nan for m in matches], dtype=np.float64)
    return x, y, np.array([m is not None for m in matches], dtype=bool)


def _mostly_keys(keys: npt.NDArray[np.str_]) -> bool:
    """Whether most of ``keys`` are spot keys (a stray summary row does not turn a table around)."""
    return bool(keys.shape[0]) and float(_parse_keys(keys)[2].mean()) > 0.5


def _read_counts(
    path: Path, *, sample: Sample, notes: list[str]
) -> tuple[npt.NDArray[np.str_], npt.NDArray[np.str_], sp.csr_matrix]:
    """Spot keys, feature names and counts (spots x features) of a count table, either way round."""
    ids, columns, values = read_count_table(path, delimiter=COUNTS_DELIMITER, sample=sample)
    ids, columns = np.char.strip(ids), np.char.strip(columns)
    if _mostly_keys(ids):
        return ids, columns, values
    if _mostly_keys(columns):
        notes.append(f"{path.name} is genes x spots (the spot keys head the columns): read transposed")
        return columns, ids, values.T.tocsr()
    examples = ", ".join(repr(k) for k in ids[:3].tolist())
    raise CorruptSourceError(
        f"{path}: rows are keyed {examples}, not '<x>x<y>' array coordinates, and neither are the columns; a legacy "
        "ST count table is spots x genes with rows keyed like '10x14'",
        slide_id=sample.id,
    )


def _canonical_keys(keys: npt.NDArray[np.str_], spots: SpotFile) -> tuple[npt.NDArray[np.str_], str]:
    """Count keys rewritten as the spot file's ``<x>x<y>`` keys, and how they were matched.

    Integer keys are array coordinates and need only a uniform spelling (``10.0x14`` is
    ``10x14``). Decimal keys are corrected coordinates: each is matched to the spot whose
    ``new_x, new_y`` it gives (within 0.01 array units). A key that matches none stays as it
    is (and is counted as a count row without a spot).
    """
    x, y, ok = _parse_keys(keys)
    whole = ok & (x == np.round(x)) & (y == np.round(y))
    canonical = keys.astype(object)  # a spot key may be longer than the key it replaces
    if whole[ok].all():
        canonical[ok] = [_key(a, b) for a, b in zip(x[ok], y[ok], strict=True)]
        return canonical.astype(np.str_), "by array coordinates"
    from scipy.spatial import cKDTree

    known = np.flatnonzero(np.isfinite(spots.new_x) & np.isfinite(spots.new_y))
    distance, index = cKDTree(np.column_stack([spots.new_x[known], spots.new_y[known]])).query(
        np.column_stack([x[ok], y[ok]])
    )
    matched = distance <= _KEY_TOLERANCE
    rows = np.flatnonzero(ok)
    canonical[rows[matched]] = spots.keys[known[index[matched]]]
    return canonical.astype(np.str_), f"by corrected coordinates ({int(matched.sum()):,} of {keys.shape[0]:,} matched)"


def read(*, sample: Sample, files: Mapping[str, Path], images: ImageSettings = DEFAULT_IMAGES) -> Slide:
    """Read a legacy ST section into a :class:`Slide` (see the module docstring)."""
    notes: list[str] = []
    counts_path = require_file(files, "counts", sample=sample)
    spots_path = require_file(files, "spots", sample=sample)
    image_source = require_file(files, "image", sample=sample)
    image_path = (
        single_file_in(image_source, IMAGE_SUFFIXES, what="image", sample=sample)
        if image_source.is_dir()
        else image_source
    )

    keys, names, matrix = _read_counts(counts_path, sample=sample, notes=notes)
    genes = ~np.char.startswith(names, HTSEQ_PREFIX)
    dropped_features = int((~genes).sum())
    if dropped_features:
        notes.append(
            f"{dropped_features} HTSeq summary column(s) ({', '.join(names[~genes][:3].tolist())}...) are not genes: "
            "dropped"
        )
        matrix, names = matrix[:, np.flatnonzero(genes)], names[genes]
    ensembl = is_ensembl(names)
    features = Features(
        ids=np.where(ensembl, names, "").astype(np.str_), names=np.where(ensembl, "", names).astype(np.str_)
    )
    if ensembl.any():
        notes.append(f"{int(ensembl.sum()):,} of {names.shape[0]:,} features are Ensembl ids")

    spot_file = read_spot_file(spots_path, sample=sample, notes=notes)
    canonical, how = _canonical_keys(keys, spot_file)
    join = join_spots(
        canonical,
        spot_file.keys,
        in_tissue=spot_file.selected,
        finite=np.isfinite(spot_file.pixel_x) & np.isfinite(spot_file.pixel_y),
        sample=sample,
        counts_name=counts_path.name,
        positions_name=spots_path.name,
        notes=notes,
    )
    rows, spot_rows = join.rows, join.position_rows
    notes.append(f"count rows matched to {spots_path.name} {how}")
    counts = raw_counts(matrix[rows], sample=sample, source=counts_path, notes=notes)
    in_tissue = spot_file.selected[spot_rows]
    off_tissue = int((~in_tissue).sum())
    if off_tissue:
        notes.append(f"{off_tissue:,} count row(s) are spots off tissue (selected = 0): kept, flagged off tissue")

    mpp_source: MppSource
    if sample.mpp is not None:
        mpp, mpp_source = sample.mpp, "manifest"
    else:
        fit = fit_lattice(
            spot_file.pixel_x,
            spot_file.pixel_y,
            spot_file.new_y,
            spot_file.new_x,
            lattice=LEGACY_ST.kind,
            pitch_um=LEGACY_ST.pitch_um,
        )
        if fit is None:
            raise CorruptSourceError(
                f"{spots_path}: the spot centres cannot fix the scale (fewer than 3 spots, or all on one line); "
                "set the sample's `mpp` in the manifest",
                slide_id=sample.id,
            )
        mpp, mpp_source = fit.mpp, "lattice"
        notes.append(
            f"um/px {fit.mpp:.4f} fitted from {fit.n_inliers} of {fit.n_spots} spots of {spots_path.name} "
            f"({CORRECTED_X}/{CORRECTED_Y} at {LEGACY_ST.pitch_um:g} um per array unit, rms {fit.rms_residual_px:.2f} "
            f"px, anisotropy {fit.anisotropy:.3f})"
        )

    return Slide(
        sample=sample,
        counts=counts,
        features=features,
        spots=Spots(
            barcode=keys[rows],
            in_tissue=in_tissue,
            array_row=np.rint(spot_file.y[spot_rows]).astype(np.int32),
            array_col=np.rint(spot_file.x[spot_rows]).astype(np.int32),
            x_px=spot_file.pixel_x[spot_rows],
            y_px=spot_file.pixel_y[spot_rows],
        ),
        image=open_image(image_path, max_pixels=images.max_pixels),
        mpp=mpp,
        mpp_source=mpp_source,
        geometry=LEGACY_ST,
        qc=[join.check],
        notes=notes,
        dropped_features=dropped_features,
        dropped_spots=join.dropped,
    )
