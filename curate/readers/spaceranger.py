"""Space Ranger 1.x-3.x (10x Visium) output -> ``Slide``.

Sources (see ``READERS["spaceranger"]``): a whole ``outs/`` folder (or an archive of one), or
its parts: ``matrix`` (a 10x ``.h5``, an MTX folder, or a folder holding either) with a
``spatial/`` folder, or with ``positions`` and ``scalefactors`` named one by one; ``image`` is
the full-resolution H&E the run was registered to. Parts named one by one win over the same
part found in ``outs``/``spatial``.

Reader options: ``matrix: filtered | raw`` picks the matrix of an ``outs/`` folder (default
filtered, falling back to raw with a note); ``image_fallback: true | false`` (default true)
allows Space Ranger's downscaled ``tissue_hires_image.png`` (then ``tissue_lowres_image.png``)
when no full-resolution image is named, with coordinates and um/px scaled by the matching
scale factor. A blank hires image (some re-published folders carry a placeholder) is skipped.

What the reader decides and records in ``Slide.notes``:

* um/px: the manifest's ``mpp`` if set, else ``microns_per_pixel`` where Space Ranger 3.x
  states it (Visium HD, whose ``bin_size_um`` also makes the lattice square with the bin
  size as pitch), else ``65 / spot_diameter_fullres`` -- Space Ranger
  defines ``spot_diameter_fullres`` as the pixels spanning a *theoretical 65 um spot* (10x
  Space Ranger 1.3 docs, "Spatial outputs"), not the 55 um capture spot; on the real fixtures
  this agrees with the 100 um lattice fit within 0.3%, while 55 would be 15% off. Without a
  spot diameter the scale comes from a fit of the positions to the lattice.
* Features: only ``Gene Expression`` is kept; antibody/CRISPR/custom features are counted in
  ``dropped_features``.
* Counts: integer dtypes as int32; whole-number floats cast to int32 losslessly.
* CytAssist (Space Ranger >= 2.0): ``spatial/cytassist_image.tiff`` is the CytAssist
  instrument's eosin image and ``aligned_fiducials.jpg`` / ``aligned_tissue_image.jpg`` are
  QC renderings; the H&E is always the manifest's ``image``. Positions of a run that was given
  a microscope image are in that image's pixels, so the CytAssist image is never used, and
  naming it as the ``image`` is an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np

from stcorpus.curate.errors import CorruptSourceError, SourceMissingError
from stcorpus.curate.geometry import Geometry, assay_geometry, fit_lattice, square_bins
from stcorpus.curate.imaging import DEFAULT_IMAGES, PIL_SUFFIXES, TIFF_SUFFIXES, ImageSettings, SlideImage, open_image
from stcorpus.curate.qc import image_blank_reason
from stcorpus.curate.readers import _tenx
from stcorpus.curate.readers._common import (
    join_spots,
    option,
    positive_float,
    raw_counts,
    read_json,
    require_file,
    single_file_in,
)
from stcorpus.curate.slide import Features, MppSource, Slide, Spots

if TYPE_CHECKING:
    from stcorpus.curate.manifest import Sample

# --- Space Ranger's literal names ----------------------------------------------------------
OUTS: Final = "outs"
SPATIAL: Final = "spatial"
#: Positions file names, in the order they are preferred when a folder holds several
#: (2.x/3.x CSV with header, 1.x CSV without, 3.x / HD Parquet).
POSITION_FILES: Final = ("tissue_positions.csv", "tissue_positions_list.csv", "tissue_positions.parquet")
SCALEFACTORS_FILE: Final = "scalefactors_json.json"
HIRES_IMAGE: Final = "tissue_hires_image.png"
LOWRES_IMAGE: Final = "tissue_lowres_image.png"
HIRES_SCALEF: Final = "tissue_hires_scalef"
LOWRES_SCALEF: Final = "tissue_lowres_scalef"
SPOT_DIAMETER: Final = "spot_diameter_fullres"
#: Space Ranger's spot_diameter_fullres spans a theoretical 65 um spot (10x docs, SR 1.3).
SPOT_DIAMETER_FULLRES_UM: Final = 65.0
#: Space Ranger 3.x (Visium HD binned outputs) states the scale and the bin size outright.
MICRONS_PER_PIXEL: Final = "microns_per_pixel"
BIN_SIZE: Final = "bin_size_um"
MATRIX_KINDS: Final = ("filtered", "raw")
#: CytAssist instrument images and QC renderings: never the H&E.
CYTASSIST_FILES: Final = ("cytassist_image.tiff", "aligned_fiducials.jpg", "aligned_tissue_image.jpg")
IMAGE_SUFFIXES: Final = TIFF_SUFFIXES + PIL_SUFFIXES


def _h5_name(kind: str) -> str:
    return f"{kind}_feature_bc_matrix.h5"


def _mtx_name(kind: str) -> str:
    return f"{kind}_feature_bc_matrix"


def _outs_root(path: Path, *, sample: Sample) -> Path:
    """The folder holding the outputs: ``path``, ``path/outs``, or those under a single top folder."""
    if not path.is_dir():
        raise SourceMissingError(
            f"source 'outs': {path} is not a folder (or an archive unpacked to one)", slide_id=sample.id
        )
    candidates = [path, path / OUTS]
    subfolders = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subfolders) == 1:  # an archive that unpacks to <sample>/ or <sample>/outs/
        candidates += [subfolders[0], subfolders[0] / OUTS]
    for candidate in candidates:
        if (candidate / SPATIAL).is_dir() or any(
            (candidate / name).exists() for kind in MATRIX_KINDS for name in (_h5_name(kind), _mtx_name(kind))
        ):
            return candidate
    raise SourceMissingError(
        f"source 'outs': {path} holds no Space Ranger outputs (no spatial/ and no *_feature_bc_matrix[.h5]); "
        "point it at the outs/ folder",
        slide_id=sample.id,
    )


def _matrix_in(folder: Path, *, kind: str, notes: list[str], sample: Sample) -> Path:
    """The matrix of ``kind`` in an outs-like folder (h5 preferred over MTX), else of the other kind."""
    order = [kind] + [k for k in MATRIX_KINDS if k != kind]
    for candidate_kind in order:
        h5, mtx = folder / _h5_name(candidate_kind), folder / _mtx_name(candidate_kind)
        found = h5 if h5.is_file() else (mtx if _tenx.is_mtx_folder(mtx) else None)
        if found is None:
            continue
        if candidate_kind != kind:
            notes.append(f"no {kind} matrix in {folder.name}/: fell back to the {candidate_kind} matrix {found.name}")
        if found is h5 and _tenx.is_mtx_folder(mtx):
            notes.append(f"{h5.name} read; the MTX copy {mtx.name}/ beside it was ignored")
        return found
    raise SourceMissingError(
        f"{folder}: no feature-barcode matrix ({', '.join(_h5_name(k) + ' / ' + _mtx_name(k) + '/' for k in order)})",
        slide_id=sample.id,
    )


def _resolve_matrix(path: Path, *, kind: str, notes: list[str], sample: Sample) -> Path:
    if path.is_file():
        return path
    if _tenx.is_mtx_folder(path):
        return path
    nested = [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []
    if len(nested) == 1 and _tenx.is_mtx_folder(nested[0]):  # archive unpacked to <name>/matrix.mtx.gz
        return nested[0]
    return _matrix_in(path, kind=kind, notes=notes, sample=sample)


def _read_matrix(path: Path, *, sample: Sample) -> _tenx.FeatureMatrix:
    if path.is_dir():
        return _tenx.read_mtx(path)
    if path.name.lower().endswith((".h5", ".hdf5")):
        return _tenx.read_h5(path)
    raise CorruptSourceError(
        f"{path}: not a 10x matrix (expected a .h5 file or an MTX folder with matrix.mtx[.gz])", slide_id=sample.id
    )


def _resolve_spatial(path: Path, *, sample: Sample) -> Path:
    if not path.is_dir():
        raise SourceMissingError(
            f"source 'spatial': {path} is a single file ({path.name}); it must be the whole spatial folder "
            f"({SCALEFACTORS_FILE}, the positions file and the images): give the folder, an archive of it "
            "(.tar.gz or .zip), or the `outs` source instead",
            slide_id=sample.id,
        )
    for candidate in (path, path / SPATIAL):
        if candidate.is_dir() and (candidate / SCALEFACTORS_FILE).is_file():
            return candidate
    raise SourceMissingError(
        f"source 'spatial': {path} holds no {SCALEFACTORS_FILE} (nor does {path / SPATIAL})", slide_id=sample.id
    )


def _positions_in(spatial: Path, notes: list[str], *, sample: Sample) -> Path:
    present = [spatial / name for name in POSITION_FILES if (spatial / name).is_file()]
    if not present:
        raise SourceMissingError(f"{spatial}: no positions file ({', '.join(POSITION_FILES)})", slide_id=sample.id)
    if len(present) > 1:
        notes.append(f"positions read from {present[0].name} (also present: {', '.join(p.name for p in present[1:])})")
    return present[0]


def _full_resolution_image(path: Path, *, sample: Sample) -> Path:
    image = single_file_in(path, IMAGE_SUFFIXES, what="image", sample=sample) if path.is_dir() else path
    if image.name.lower() in CYTASSIST_FILES:
        raise CorruptSourceError(
            f"source 'image': {image.name} is a CytAssist instrument image or QC rendering, not the H&E; name the "
            "microscope H&E image the run was registered to",
            slide_id=sample.id,
        )
    return image


def _fallback_image(
    spatial: Path | None,
    scalefactors: Mapping[str, object],
    notes: list[str],
    *,
    sample: Sample,
    images: ImageSettings,
) -> tuple[SlideImage, float]:
    """Space Ranger's hires PNG, else lowres PNG, skipping a blank one; with its scale factor."""
    tried: list[str] = []
    for name, key in ((HIRES_IMAGE, HIRES_SCALEF), (LOWRES_IMAGE, LOWRES_SCALEF)):
        path = spatial / name if spatial is not None else None
        if path is None or not path.is_file():
            tried.append(f"{name}: absent")
            continue
        scale = positive_float(scalefactors.get(key))
        if scale is None:
            said = f"{key}={scalefactors[key]!r} in {SCALEFACTORS_FILE} is not a positive number"
            tried.append(f"{name}: {said}" if key in scalefactors else f"{name}: no {key} in {SCALEFACTORS_FILE}")
            continue
        image = open_image(path, max_pixels=images.max_pixels)
        blank = image_blank_reason(image)
        if blank is not None:
            image.close()
            tried.append(f"{name}: {blank}")
            notes.append(f"{name} skipped: {blank}")
            continue
        notes.append(
            f"no full-resolution image: fell back to {name} ({image.width}x{image.height}); coordinates and um/px "
            f"scaled by {key}={scale:g}"
        )
        return image, scale
    raise SourceMissingError(
        "no usable image: no `image` source is named and Space Ranger's downscaled images are unusable "
        f"({'; '.join(tried)}); name the full-resolution H&E as the sample's `image` source",
        slide_id=sample.id,
    )


def read(*, sample: Sample, files: Mapping[str, Path], images: ImageSettings = DEFAULT_IMAGES) -> Slide:
    """Read a Space Ranger output into a :class:`Slide` (see the module docstring)."""
    notes: list[str] = []
    kind = str(option(sample, "matrix", default="filtered"))
    if kind not in MATRIX_KINDS:
        raise SourceMissingError(
            f"{sample.describe()}: reader option matrix={kind!r}; use one of {', '.join(MATRIX_KINDS)}",
            slide_id=sample.id,
        )
    fallback_allowed = bool(option(sample, "image_fallback", default=True))

    outs = _outs_root(require_file(files, "outs", sample=sample), sample=sample) if "outs" in files else None
    if "matrix" in files:
        matrix_path = _resolve_matrix(
            require_file(files, "matrix", sample=sample), kind=kind, notes=notes, sample=sample
        )
    elif outs is not None:
        matrix_path = _matrix_in(outs, kind=kind, notes=notes, sample=sample)
    else:
        raise SourceMissingError(f"{sample.describe()}: name an `outs` or a `matrix` source", slide_id=sample.id)
    if "spatial" in files:
        spatial: Path | None = _resolve_spatial(require_file(files, "spatial", sample=sample), sample=sample)
    elif outs is not None and (outs / SPATIAL).is_dir():
        spatial = outs / SPATIAL
    else:
        spatial = None
    if "positions" in files:
        positions_path = require_file(files, "positions", sample=sample)
    elif spatial is not None:
        positions_path = _positions_in(spatial, notes, sample=sample)
    else:
        raise SourceMissingError(
            f"{sample.describe()}: no positions: name a `spatial` or `positions` source", slide_id=sample.id
        )
    if "scalefactors" in files:
        scalefactors_path = require_file(files, "scalefactors", sample=sample)
    elif spatial is not None and (spatial / SCALEFACTORS_FILE).is_file():
        scalefactors_path = spatial / SCALEFACTORS_FILE
    else:
        raise SourceMissingError(
            f"{sample.describe()}: no {SCALEFACTORS_FILE}: name a `spatial` or `scalefactors` source",
            slide_id=sample.id,
        )

    # Counts: gene expression features only, integer dtype where the values allow.
    matrix = _read_matrix(matrix_path, sample=sample)
    keep = matrix.types == _tenx.GENE_EXPRESSION
    dropped = int((~keep).sum())
    if dropped:
        kinds = ", ".join(f"{n} {t}" for t, n in zip(*np.unique(matrix.types[~keep], return_counts=True), strict=True))
        notes.append(f"{dropped} non 'Gene Expression' features dropped ({kinds})")
    if not keep.any():
        raise CorruptSourceError(
            f"{matrix_path}: no 'Gene Expression' features (types: {sorted(set(matrix.types.tolist()))})",
            slide_id=sample.id,
        )
    counts = matrix.counts[:, np.flatnonzero(keep)] if dropped else matrix.counts
    notes.append(
        f"matrix {matrix_path.name} ({matrix.layout}): {counts.shape[0]:,} barcodes x {counts.shape[1]:,} features"
    )

    # Positions: keep every matrix barcode that has one with a finite centre; count the others.
    positions = _tenx.read_positions(positions_path)
    join = join_spots(
        matrix.barcodes,
        positions.barcode,
        in_tissue=positions.in_tissue,
        finite=np.isfinite(positions.pxl_col) & np.isfinite(positions.pxl_row),
        sample=sample,
        counts_name=matrix_path.name,
        positions_name=positions_path.name,
        notes=notes,
    )
    rows, position_rows = join.rows, join.position_rows
    counts = raw_counts(counts[rows], sample=sample, source=matrix_path, notes=notes)
    scalefactors = read_json(scalefactors_path, sample=sample)

    # Image: the named full-resolution image, else a downscaled PNG when allowed.
    if "image" in files:
        image = open_image(
            _full_resolution_image(require_file(files, "image", sample=sample), sample=sample),
            max_pixels=images.max_pixels,
        )
        scale = 1.0
    elif fallback_allowed:
        image, scale = _fallback_image(spatial, scalefactors, notes, sample=sample, images=images)
    else:
        raise SourceMissingError(
            f"{sample.describe()}: no full-resolution image: name it as the `image` source, or allow Space Ranger's "
            "downscaled images with the reader option `image_fallback: true`",
            slide_id=sample.id,
        )

    bin_size = positive_float(scalefactors.get(BIN_SIZE))
    geometry: Geometry
    if bin_size is not None:  # Visium HD binned outputs: square bins, one bin apart
        geometry = square_bins(bin_size)
        notes.append(f"{BIN_SIZE}={bin_size:g}: square lattice of {bin_size:g} um bins")
    else:
        geometry = assay_geometry(
            sample.assay,
            slide_id=sample.id,
            pitch_hint=f"name the binned output (square_<size>um/) whose {SCALEFACTORS_FILE} states {BIN_SIZE}",
        )
    pxl_x = positions.pxl_col[position_rows]
    pxl_y = positions.pxl_row[position_rows]
    array_row = positions.array_row[position_rows]
    array_col = positions.array_col[position_rows]
    diameter = positive_float(scalefactors.get(SPOT_DIAMETER))
    stated_mpp = positive_float(scalefactors.get(MICRONS_PER_PIXEL))
    for name, value in ((SPOT_DIAMETER, diameter), (MICRONS_PER_PIXEL, stated_mpp), (BIN_SIZE, bin_size)):
        if name in scalefactors and value is None:  # said, so that a fallback below is never silent
            notes.append(f"{SCALEFACTORS_FILE}: {name}={scalefactors[name]!r} is not a positive number: ignored")
    mpp_source: MppSource
    if sample.mpp is not None:
        full_mpp, mpp_source = sample.mpp, "manifest"
    elif stated_mpp is not None:
        full_mpp, mpp_source = stated_mpp, "scalefactors"
        notes.append(f"um/px from {MICRONS_PER_PIXEL} in {SCALEFACTORS_FILE}")
    elif diameter is not None and bin_size is None:
        full_mpp, mpp_source = SPOT_DIAMETER_FULLRES_UM / diameter, "scalefactors"
    else:
        fit = fit_lattice(
            positions.pxl_col,
            positions.pxl_row,
            positions.array_row,
            positions.array_col,
            lattice=geometry.kind,
            pitch_um=geometry.pitch_um,
        )
        if fit is None:
            raise CorruptSourceError(
                f"{scalefactors_path.name} has no {SPOT_DIAMETER} and the positions cannot fix the scale; set the "
                "sample's `mpp` in the manifest",
                slide_id=sample.id,
            )
        full_mpp, mpp_source = fit.mpp, "lattice"
        notes.append(f"no {SPOT_DIAMETER}: um/px {fit.mpp:.4f} fitted from {fit.n_inliers} positions on the lattice")

    spots = Spots(
        barcode=matrix.barcodes[rows],
        in_tissue=positions.in_tissue[position_rows],
        array_row=array_row.astype(np.int32),
        array_col=array_col.astype(np.int32),
        x_px=pxl_x * scale,
        y_px=pxl_y * scale,
    )
    return Slide(
        sample=sample,
        counts=counts,
        features=Features(ids=matrix.ids[keep], names=matrix.names[keep]),
        spots=spots,
        image=image,
        mpp=full_mpp / scale,
        mpp_source=mpp_source,
        geometry=geometry,
        qc=[join.check],
        notes=notes,
        dropped_features=dropped,
        dropped_spots=join.dropped,
    )
