"""Space Ranger 3.x Visium HD binned outputs -> ``Slide``, bins pooled onto a declared grid.

Sources (see ``READERS["visium-hd"]``): ``outs``, the Space Ranger ``outs/`` folder (or its
``binned_outputs/``, or an archive of either), and ``image``, the full-resolution H&E the run
was registered to (without it, the bin's hires/lowres PNG as the Space Ranger reader allows).

10x's layout (Space Ranger 3.x "Binned outputs"; the names spatialdata-io's ``visium_hd``
reader reads)::

    outs/binned_outputs/square_002um/   square_008um/   square_016um/
        filtered_feature_bc_matrix.h5   raw_feature_bc_matrix.h5
        spatial/tissue_positions.parquet   (barcode, in_tissue, array_row, array_col,
                                            pxl_row_in_fullres, pxl_col_in_fullres)
        spatial/scalefactors_json.json     (bin_size_um, microns_per_pixel, spot_diameter_fullres, ...)

One bin size is read (reader option ``bin_um``: 2, 8 or 16; default 8, as spatialdata-io) with
the Space Ranger reader, which takes um/px from ``microns_per_pixel``. Its in-tissue bins are
then pooled onto the grid the option ``grid`` declares, counts summed:

* ``hex`` (default): Visium-like spots of ``spot_diameter_um`` (default 55) on a hex lattice of
  ``pitch_um`` (default 100); a bin joins the spot whose disc holds its centre, bins between
  discs join none (as Visium's gaps), and the spots get Space Ranger's array coordinates;
* ``square``: squares of ``pitch_um`` (required; a multiple of the bin size), each the sum of
  the bins it tiles.

The grid is laid in the bins' own frame (array_row/array_col times the bin size, in um), so
the tissue's rotation on the image does not matter; a site's centre is mapped to image pixels
by the affine fitted from the bins' array coordinates to their pixel centres (exact for Space
Ranger's positions, which that affine generates; the residual is noted).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from stcorpus.curate.errors import CorruptSourceError, SourceMissingError
from stcorpus.curate.geometry import pool_to_grid
from stcorpus.curate.imaging import DEFAULT_IMAGES, ImageSettings
from stcorpus.curate.readers import spaceranger
from stcorpus.curate.readers._common import option, pool_grid, require_file
from stcorpus.curate.slide import Slide, Spots

if TYPE_CHECKING:
    from stcorpus.curate.manifest import Sample

# --- 10x's literal names --------------------------------------------------------------------
BINNED_OUTPUTS: Final = "binned_outputs"
BIN_PREFIX: Final = "square_"
BIN_SIZES_UM: Final = (2, 8, 16)
DEFAULT_BIN_UM: Final = 8
POSITIONS_FILE: Final = "tissue_positions.parquet"
#: A pooled site's barcode: grid, size and lattice position, e.g. ``hex055um_r0012_c0034``.
SITE_BARCODE: Final = "{grid}{size:03.0f}um_r{row:04d}_c{col:04d}"
#: A fit of pixels to array coordinates that misses a bin by more than this is noted.
_FIT_TOLERANCE_PX: Final = 0.5
#: ... and one that misses a bin by more than this fraction of a pooled site is refused.
_MAX_FIT_DEPARTURE: Final = 0.1


def bin_folder_name(bin_um: int) -> str:
    """The folder of one bin size, e.g. ``square_008um``."""
    return f"{BIN_PREFIX}{bin_um:03d}um"


def _bin_folder(path: Path, bin_um: int, *, sample: Sample) -> Path:
    """``square_<bin>um/`` under ``path``: outs/, outs/binned_outputs/, or one folder above either."""
    name = bin_folder_name(bin_um)
    if path.name == name and path.is_dir():  # the bin folder itself
        return path
    if path.name.startswith(BIN_PREFIX) and path.name.endswith("um"):
        raise SourceMissingError(
            f"source 'outs': {path} is the {path.name}/ bin folder, but the reader option bin_um is {bin_um} "
            f"({name}/); set bin_um to that folder's size, or point outs at outs/ or {BINNED_OUTPUTS}/",
            slide_id=sample.id,
        )
    candidates = [path / name, path / BINNED_OUTPUTS / name]
    subfolders = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")] if path.is_dir() else []
    if len(subfolders) == 1:  # an archive unpacked to <sample>/outs/...
        top = subfolders[0]
        candidates += [top / BINNED_OUTPUTS / name, top / "outs" / BINNED_OUTPUTS / name]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    present = sorted({p.name for p in path.rglob(f"{BIN_PREFIX}*um") if p.is_dir()}) if path.is_dir() else []
    raise SourceMissingError(
        f"source 'outs': {path} has no {name}/ (looked in it and in {BINNED_OUTPUTS}/); bin sizes present: "
        f"{', '.join(present) or 'none'}; pick one with the reader option bin_um",
        slide_id=sample.id,
    )


def _fit_affine(
    col: npt.NDArray[np.float64], row: npt.NDArray[np.float64], x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], float]:
    """The 2x3 affine from (col, row, 1) to pixels (x, y), least squares, and its largest residual in pixels."""
    design = np.column_stack([col, row, np.ones_like(col)])
    coefficients, *_ = np.linalg.lstsq(design, np.column_stack([x, y]), rcond=None)
    residual = design @ coefficients - np.column_stack([x, y])
    return coefficients.T, float(np.hypot(residual[:, 0], residual[:, 1]).max())


def read(*, sample: Sample, files: Mapping[str, Path], images: ImageSettings = DEFAULT_IMAGES) -> Slide:
    """Read Visium HD binned outputs pooled onto the declared grid (see the module docstring)."""
    bin_um = option(sample, "bin_um", default=DEFAULT_BIN_UM)
    if bin_um not in BIN_SIZES_UM:
        raise SourceMissingError(
            f"{sample.describe()}: reader option bin_um={bin_um!r}; Space Ranger bins are "
            f"{', '.join(map(str, BIN_SIZES_UM))} um",
            slide_id=sample.id,
        )
    grid, target = pool_grid(
        sample,
        key="visium-hd-hex",
        square_side=f"the side of a pooled square, a multiple of the {int(bin_um)} um bins",
        bin_um=int(bin_um),
    )
    folder = _bin_folder(require_file(files, "outs", sample=sample), int(bin_um), sample=sample)
    parts: dict[str, Path] = {"matrix": folder, "spatial": folder / spaceranger.SPATIAL}
    if "image" in files:
        parts["image"] = require_file(files, "image", sample=sample)
    bins = spaceranger.read(sample=sample, files=parts, images=images)
    if bins.pitch_um is None or abs(bins.pitch_um - bin_um) > 1e-6:
        bins.image.close()
        raise CorruptSourceError(
            f"{folder / spaceranger.SPATIAL / spaceranger.SCALEFACTORS_FILE}: states {spaceranger.BIN_SIZE}="
            f"{bins.pitch_um!r}, but the folder is {folder.name}/",
            slide_id=sample.id,
        )
    notes = list(bins.notes)

    # The bins' own frame: array coordinates times the bin size, each bin's centre at +0.5.
    tissue = np.flatnonzero(bins.spots.in_tissue)
    if tissue.size < 3:  # an affine of array coordinates to pixels needs three bins
        bins.image.close()
        raise CorruptSourceError(
            f"{folder / spaceranger.SPATIAL / POSITIONS_FILE}: {tissue.size} of the "
            f"{bins.spots.in_tissue.shape[0]:,} matched bins are in tissue (column in_tissue); nothing to pool. "
            "The positions file is damaged or from another run: fetch the binned outputs again",
            slide_id=sample.id,
        )
    row = bins.spots.array_row[tissue].astype(np.float64)
    col = bins.spots.array_col[tissue].astype(np.float64)
    positions = folder / spaceranger.SPATIAL / POSITIONS_FILE
    n_repeated = int(tissue.size - np.unique(np.column_stack([row, col]), axis=0).shape[0])
    if n_repeated:  # two bins in one grid cell: the array coordinates do not describe the bins
        bins.image.close()
        raise CorruptSourceError(
            f"{positions}: {n_repeated:,} in-tissue bins repeat the array_row/array_col of another; each bin has its "
            "own cell of the grid in Space Ranger's output: the columns are damaged or from another run, fetch the "
            "binned outputs again",
            slide_id=sample.id,
        )
    to_pixels, residual = _fit_affine(col, row, bins.spots.x_px[tissue], bins.spots.y_px[tissue])
    # Sites are placed by this affine: off by a tenth of a site, a site's tile would show another place.
    site_um = float((target.spot_diameter_um if grid == "hex" else target.pitch_um) or 0.0)
    limit_px = _MAX_FIT_DEPARTURE * site_um / bins.mpp if bins.mpp else math.inf
    if residual > limit_px:
        bins.image.close()
        raise CorruptSourceError(
            f"{positions}: the bins' pixel centres depart from an affine of their array coordinates by up to "
            f"{residual:.1f} px, more than a tenth of a {site_um:g} um site ({limit_px:.1f} px): array_row/array_col "
            "and pxl_row_in_fullres/pxl_col_in_fullres do not describe the same bins; fetch the binned outputs again",
            slide_id=sample.id,
        )
    if residual > _FIT_TOLERANCE_PX:
        notes.append(f"bin centres depart from an affine of their array coordinates by up to {residual:.2f} px")
    pool = pool_to_grid((col + 0.5) * bin_um, (row + 0.5) * bin_um, geometry=target)
    if len(pool) == 0:
        bins.image.close()
        raise CorruptSourceError(
            f"{folder}: none of the {tissue.size:,} in-tissue bins falls in a site of the {target.describe()}",
            slide_id=sample.id,
        )
    counts = (pool.matrix() @ bins.counts[tissue]).tocsr()
    counts.sum_duplicates()
    site_col = pool.x_um / bin_um - 0.5
    site_row = pool.y_um / bin_um - 0.5
    centres = np.column_stack([site_col, site_row, np.ones_like(site_col)]) @ to_pixels.T
    per_site = np.bincount(pool.site[pool.site >= 0], minlength=len(pool))
    outside = int((pool.site < 0).sum())
    notes.append(
        f"{tissue.size:,} in-tissue {bin_um} um bins pooled onto a {target.describe()}: {len(pool):,} sites, "
        f"{int(np.median(per_site))} bins per site (median), {outside:,} bins between sites"
    )
    barcodes = np.array(
        [
            SITE_BARCODE.format(grid=grid, size=site_um, row=int(r), col=int(c))
            for r, c in zip(pool.row.tolist(), pool.col.tolist(), strict=True)
        ],
        dtype=np.str_,
    )
    return Slide(
        sample=sample,
        counts=counts,
        features=bins.features,
        spots=Spots(
            barcode=barcodes,
            in_tissue=np.ones(len(pool), dtype=bool),
            array_row=pool.row,
            array_col=pool.col,
            x_px=centres[:, 0],
            y_px=centres[:, 1],
        ),
        image=bins.image,
        mpp=bins.mpp,
        mpp_source=bins.mpp_source,
        geometry=target,
        qc=bins.qc,
        notes=notes,
        dropped_features=bins.dropped_features,
        dropped_spots=bins.dropped_spots,
    )
