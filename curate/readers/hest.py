"""A HEST-1k sample -> ``Slide``.

Sources: ``st`` (``st/<id>.h5ad``), ``wsi`` (``wsis/<id>.tif``, a pyramidal generic TIFF) and
optionally ``metadata`` (``metadata/<id>.json``, the same fields as the columns of HEST's
``HEST_v1_1_0.csv``: ``pixel_size_um_estimated``, ``inter_spot_dist``, ``st_technology``,
``fullres_px_width``/``height``, ``spots_under_tissue``, ...). Reader option ``spatial_key``
names the ``obsm`` entry holding the coordinates (default ``spatial``).

The h5ad as HEST writes it (mahmoodlab/HEST ``HESTData.save``): raw counts in ``X``;
``var_names`` gene symbols (some studies give Ensembl ids; a ``gene_ids`` column, where
present, holds the ids); ``obs`` with ``in_tissue``, ``array_row``, ``array_col``,
``pxl_col_in_fullres``, ``pxl_row_in_fullres`` and scanpy QC metrics; ``obsm['spatial']`` the
spot centres in full-resolution pixels as (x, y); ``uns['spatial']['ST']`` a downscaled image.

um/px, in order: the manifest's ``mpp``; the metadata's ``pixel_size_um_estimated`` (HEST's
own estimate from the spot lattice); a fit of the coordinates to the assay's lattice. The
TIFF resolution tags are never used: HEST's are off by 10x. ``uns`` scale factors are not
used either: HEST writes ``spot_diameter_fullres`` for a 55 um spot while Space Ranger's
spans a 65 um spot, so the number alone is ambiguous.

Counts: whole-number floats (HEST stores float32) are cast to int32 losslessly. Missing
``array_row``/``array_col`` are derived from the pixel lattice (``curate.geometry``); missing
``in_tissue`` means every spot is in tissue (HEST keeps spots under tissue); both are noted.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from stcorpus.curate.errors import CorruptSourceError
from stcorpus.curate.geometry import GEOMETRIES, Geometry, assay_geometry, fit_lattice, square_bins
from stcorpus.curate.imaging import DEFAULT_IMAGES, ImageSettings, open_image
from stcorpus.curate.readers._common import (
    as_str_array,
    count_drop,
    drop_duplicates,
    is_ensembl,
    lattice_coords,
    option,
    positive_float,
    raw_counts,
    read_json,
    require_file,
    whole_numbers,
)
from stcorpus.curate.slide import Features, MppSource, Slide, SpotDrop, Spots

if TYPE_CHECKING:
    from stcorpus.curate.manifest import Sample

# --- HEST's literal names ------------------------------------------------------------------
SPATIAL_KEY: Final = "spatial"
OBS_IN_TISSUE: Final = "in_tissue"
OBS_ARRAY_ROW: Final = "array_row"
OBS_ARRAY_COL: Final = "array_col"
OBS_PXL_X: Final = "pxl_col_in_fullres"
OBS_PXL_Y: Final = "pxl_row_in_fullres"
VAR_GENE_IDS: Final = ("gene_ids", "gene_id", "ensembl_id")
VAR_SYMBOLS: Final = ("gene_symbols", "gene_name", "symbol", "features")
VAR_FEATURE_TYPES: Final = "feature_types"
META_MPP: Final = "pixel_size_um_estimated"
META_PITCH: Final = "inter_spot_dist"
META_WIDTH: Final = "fullres_px_width"
META_HEIGHT: Final = "fullres_px_height"
META_SPOTS: Final = "spots_under_tissue"
GENE_EXPRESSION: Final = "Gene Expression"
#: HEST pools the transcripts of these assays into square pseudo-spots of this side (um):
#: ``xenium_to_pseudo_visium`` bins every transcript at ``floor(x / 100 um)``.
PSEUDO_SPOT_UM: Final[Mapping[str, float]] = {"xenium": 100.0}


def _column(frame: Any, names: tuple[str, ...]) -> npt.NDArray[np.str_] | None:
    for name in names:
        if name in frame.columns:
            return as_str_array(frame[name].to_numpy())
    return None


def _features(adata: Any, notes: list[str]) -> tuple[Features, npt.NDArray[np.bool_]]:
    """Ids and symbols as given, and which columns are gene expression."""
    var_names = as_str_array(adata.var_names.to_numpy())
    ids = _column(adata.var, VAR_GENE_IDS)
    symbols = _column(adata.var, VAR_SYMBOLS)
    ensembl_names = is_ensembl(var_names)
    if ids is None:
        ids = np.where(ensembl_names, var_names, "").astype(np.str_)
    if symbols is None:
        symbols = np.where(ensembl_names, "", var_names).astype(np.str_)
    if ensembl_names.any():
        notes.append(f"{int(ensembl_names.sum()):,} of {var_names.shape[0]:,} var names are Ensembl ids")
    keep = np.ones(var_names.shape[0], dtype=bool)
    if VAR_FEATURE_TYPES in adata.var.columns:
        keep = as_str_array(adata.var[VAR_FEATURE_TYPES].to_numpy()) == GENE_EXPRESSION
    return Features(ids=ids, names=symbols), keep


def _coordinates(
    adata: Any, key: str, *, path: Path, sample: Sample
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    if key in adata.obsm:
        try:
            xy = np.asarray(adata.obsm[key], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise CorruptSourceError(
                f"{path}: obsm[{key!r}] is not numeric ({exc}); name the obsm entry holding the pixel coordinates "
                "with the reader option `spatial_key`",
                slide_id=sample.id,
            ) from exc
        if xy.ndim != 2 or xy.shape[1] < 2:
            raise CorruptSourceError(
                f"{path.name}: obsm[{key!r}] has shape {xy.shape}, expected (spots, 2)", slide_id=sample.id
            )
        return xy[:, 0].copy(), xy[:, 1].copy()
    if OBS_PXL_X in adata.obs.columns and OBS_PXL_Y in adata.obs.columns:
        try:
            return (
                adata.obs[OBS_PXL_X].to_numpy(dtype=np.float64),
                adata.obs[OBS_PXL_Y].to_numpy(dtype=np.float64),
            )
        except (TypeError, ValueError) as exc:
            raise CorruptSourceError(
                f"{path}: obs {OBS_PXL_X}/{OBS_PXL_Y} are not numeric ({exc})", slide_id=sample.id
            ) from exc
    raise CorruptSourceError(
        f"{path.name}: no spot coordinates: neither obsm[{key!r}] nor obs {OBS_PXL_X}/{OBS_PXL_Y} "
        f"(obsm has {', '.join(adata.obsm.keys()) or 'nothing'}); set the reader option `spatial_key`",
        slide_id=sample.id,
    )


def _obs_integers(obs: Any, name: str, *, path: Path, sample: Sample) -> npt.NDArray[np.int64]:
    """An obs column of whole numbers (tissue flags, array coordinates), refused if missing or not numeric."""
    return whole_numbers(obs[name].to_numpy(), what=f"{path}: obs {name}", slide_id=sample.id)


def _geometry(sample: Sample, meta_pitch: float | None, notes: list[str]) -> Geometry:
    """The assay's geometry, with the metadata's ``inter_spot_dist`` as pitch where it states one."""
    pseudo = PSEUDO_SPOT_UM.get(sample.assay)
    if pseudo is not None:
        side = meta_pitch if meta_pitch is not None else pseudo
        notes.append(f"HEST pools {sample.assay} transcripts into square pseudo-spots: {side:g} um bins")
        return square_bins(side)
    geometry = assay_geometry(
        sample.assay,
        pitch_um=meta_pitch,
        slide_id=sample.id,
        pitch_hint=f"name the sample's `metadata` source (metadata/<id>.json, whose {META_PITCH} states it)",
    )
    default = GEOMETRIES[sample.assay].pitch_um
    if meta_pitch is not None and default is not None and abs(meta_pitch - default) > 1e-6:
        notes.append(f"metadata {META_PITCH}={meta_pitch:g} um used as the lattice pitch (assay default {default:g})")
    return geometry


def read(*, sample: Sample, files: Mapping[str, Path], images: ImageSettings = DEFAULT_IMAGES) -> Slide:
    """Read a HEST-1k sample into a :class:`Slide` (see the module docstring)."""
    import anndata
    import scipy.sparse as sp

    notes: list[str] = []
    st_path = require_file(files, "st", sample=sample)
    wsi_path = require_file(files, "wsi", sample=sample)
    metadata: dict[str, Any] = (
        read_json(require_file(files, "metadata", sample=sample), sample=sample) if "metadata" in files else {}
    )
    try:
        adata = anndata.read_h5ad(st_path)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CorruptSourceError(f"{st_path}: not a readable h5ad file: {exc}", slide_id=sample.id) from exc

    features, keep = _features(adata, notes)
    matrix = adata.X
    if matrix is None:
        raise CorruptSourceError(f"{st_path.name}: X is empty", slide_id=sample.id)
    if getattr(matrix, "dtype", None) == np.float16:  # scipy.sparse has no float16
        matrix = matrix.astype(np.float32)
    try:
        counts = sp.csr_matrix(matrix)
    except (TypeError, ValueError) as exc:
        raise CorruptSourceError(
            f"{st_path}: X ({type(matrix).__name__}, dtype {getattr(matrix, 'dtype', '?')}) is not a count matrix: "
            f"{exc}",
            slide_id=sample.id,
        ) from exc
    dropped = int((~keep).sum())
    if dropped:
        notes.append(f"{dropped} non 'Gene Expression' features dropped (var {VAR_FEATURE_TYPES})")
        counts = counts[:, np.flatnonzero(keep)]
        features = Features(ids=features.ids[keep], names=features.names[keep])
    counts = raw_counts(counts, sample=sample, source=st_path, notes=notes)

    # Spots: one per obs name with a finite centre; the others are counted as dropped.
    dropped_spots: dict[str, int] = {}
    barcodes = as_str_array(adata.obs_names.to_numpy())
    rows = drop_duplicates(barcodes, what=f"{st_path.name} obs names", dropped=dropped_spots, notes=notes)
    key = str(option(sample, "spatial_key", default=SPATIAL_KEY))
    x, y = _coordinates(adata, key, path=st_path, sample=sample)
    finite = np.isfinite(x[rows]) & np.isfinite(y[rows])
    if not finite.all():
        if not finite.any():
            raise CorruptSourceError(
                f"{st_path.name}: every spot's centre is NaN or infinite (obsm[{key!r}]); the file is broken: fetch "
                "it again, or name the obsm entry holding the coordinates with the reader option `spatial_key`",
                slide_id=sample.id,
            )
        count_drop(dropped_spots, SpotDrop.NAN_COORDINATES, int((~finite).sum()))
        notes.append(
            f"{int((~finite).sum()):,} spot(s) of {st_path.name} have a NaN or infinite centre "
            f"(e.g. {str(barcodes[rows][~finite][0])!r}): dropped"
        )
        rows = rows[finite]
    if rows.shape[0] != barcodes.shape[0]:
        counts, barcodes, x, y = counts[rows], barcodes[rows], x[rows], y[rows]
    obs = adata.obs.iloc[rows]
    if OBS_IN_TISSUE in obs.columns:
        in_tissue = (
            whole_numbers(obs[OBS_IN_TISSUE].to_numpy(), what=f"{st_path}: obs {OBS_IN_TISSUE}", slide_id=sample.id)
            != 0
        )
    else:
        in_tissue = np.ones(barcodes.shape[0], dtype=bool)
        notes.append(f"obs has no {OBS_IN_TISSUE}: every spot taken as in tissue")

    geometry = _geometry(sample, positive_float(metadata.get(META_PITCH)), notes)
    meta_mpp = positive_float(metadata.get(META_MPP))
    known_mpp = sample.mpp if sample.mpp is not None else meta_mpp
    if OBS_ARRAY_ROW in obs.columns and OBS_ARRAY_COL in obs.columns:
        array_row = whole_numbers(
            obs[OBS_ARRAY_ROW].to_numpy(), what=f"{st_path}: obs {OBS_ARRAY_ROW}", slide_id=sample.id
        ).astype(np.int32)
        array_col = whole_numbers(
            obs[OBS_ARRAY_COL].to_numpy(), what=f"{st_path}: obs {OBS_ARRAY_COL}", slide_id=sample.id
        ).astype(np.int32)
    elif geometry.is_lattice:
        array_row, array_col = lattice_coords(
            x,
            y,
            geometry=geometry,
            mpp=known_mpp,
            mpp_source="manifest" if sample.mpp is not None else "metadata",
            sample=sample,
            notes=notes,
            why=f"obs has no {OBS_ARRAY_ROW}/{OBS_ARRAY_COL}: ",
        )
    else:  # cell-level sites have no array coordinates
        array_row = array_col = np.zeros(barcodes.shape[0], dtype=np.int32)

    image = open_image(wsi_path, max_pixels=images.max_pixels)
    width, height = positive_float(metadata.get(META_WIDTH)), positive_float(metadata.get(META_HEIGHT))
    if width is not None and height is not None and (round(width), round(height)) != (image.width, image.height):
        notes.append(
            f"metadata says the image is {width:.0f}x{height:.0f} but {wsi_path.name} is {image.width}x{image.height}"
        )
    expected_spots = positive_float(metadata.get(META_SPOTS))
    if expected_spots is not None and round(expected_spots) != int(in_tissue.sum()):
        notes.append(f"metadata {META_SPOTS}={expected_spots:.0f}, the h5ad has {int(in_tissue.sum())} in-tissue spots")

    mpp_source: MppSource
    if sample.mpp is not None:
        mpp, mpp_source = sample.mpp, "manifest"
    elif meta_mpp is not None:
        mpp, mpp_source = meta_mpp, "metadata"
    else:
        fit = fit_lattice(x, y, array_row, array_col, lattice=geometry.kind, pitch_um=geometry.pitch_um)
        if fit is None:
            image.close()
            raise CorruptSourceError(
                f"{sample.describe()}: no {META_MPP} (metadata {'absent' if not metadata else 'lacks it'}) and the "
                "spots cannot fix the scale; add the `metadata` source or set the sample's `mpp`",
                slide_id=sample.id,
            )
        mpp, mpp_source = fit.mpp, "lattice"
        notes.append(f"no {META_MPP}: um/px {fit.mpp:.4f} fitted from {fit.n_inliers} spots ({geometry.describe()})")

    return Slide(
        sample=sample,
        counts=counts,
        features=features,
        spots=Spots(
            barcode=barcodes,
            in_tissue=in_tissue,
            array_row=array_row,
            array_col=array_col,
            x_px=x,
            y_px=y,
        ),
        image=image,
        mpp=mpp,
        mpp_source=mpp_source,
        geometry=geometry,
        notes=notes,
        dropped_features=dropped,
        dropped_spots=dropped_spots,
    )
