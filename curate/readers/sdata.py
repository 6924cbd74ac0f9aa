"""A SpatialData zarr store -> ``Slide`` (the ``spatialdata`` technology; extra ``stcorpus[spatialdata]``).

Source (see ``READERS["spatialdata"]``): ``store``, a SpatialData ``.zarr`` folder, as written
by ``SpatialData.write`` (spatialdata-io's readers, squidpy, the ``curate export --to X.zarr``
of a built slide).

What is read, and how it is chosen:

* The table (reader option ``table``; default: the store's only table): counts from ``X``, or
  from the layer named by the option ``layer``; features from ``var`` (Ensembl ids from the
  ``gene_ids`` column, or the var names where those are Ensembl ids; symbols from the var names),
  only ``Gene Expression`` rows where ``feature_types`` says; ``in_tissue``, ``array_row`` and
  ``array_col`` from ``obs`` where present.
* The sites: the element the table annotates (its ``spatialdata_attrs`` region; the option
  ``region`` picks one of several), a shapes element (circle centres or polygon centroids) or a
  points element, joined to the table rows by the table's instance key.
* The H&E: the option ``image``, else the finest image that shares a coordinate system with
  the sites and is not blank (spatialdata-io's Visium stores hold a placeholder hires PNG on
  some runs, as Space Ranger's folders do). Its finest scale is level 0.
* Positions: each site's centre mapped through the coordinate transformations, sites ->
  coordinate system -> image pixels (the option ``coordinate_system`` pins which system;
  default: the first, by name, that both have), so any affine the store records (a scale to a
  downscaled image, an H&E registration) is applied.
* um/px, in order: the manifest's ``mpp``; the scale of the image to a coordinate system in
  micrometres named by the option ``micron_coordinate_system`` (``curate export --to X.zarr``
  writes ``global`` in micrometres; spatialdata-io's Xenium stores put ``global`` in
  morphology pixels, so set the manifest's ``mpp`` for those);
  circle sites' radius against their physical diameter ``spot_diameter_um`` (default 65 for
  stores spatialdata-io's Visium reader wrote, whose circles span Space Ranger's
  ``spot_diameter_fullres``, a theoretical 65 um spot, as the Space Ranger reader uses it); a
  fit of the positions to the lattice of the sample's assay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from stcorpus.curate.errors import CorruptSourceError, NoReaderError, SourceMissingError
from stcorpus.curate.geometry import assay_geometry, fit_lattice
from stcorpus.curate.imaging import DEFAULT_IMAGES, ArrayImage, ImageSettings, SlideImage
from stcorpus.curate.qc import image_blank_reason
from stcorpus.curate.readers._common import (
    as_str_array,
    is_ensembl,
    join_spots,
    lattice_coords,
    option,
    raw_counts,
    require_file,
    whole_numbers,
)
from stcorpus.curate.readers._tenx import GENE_EXPRESSION
from stcorpus.curate.slide import Features, MppSource, Slide, Spots

if TYPE_CHECKING:
    from stcorpus.curate.manifest import Sample

# --- SpatialData's literal names ------------------------------------------------------------
TABLE_ATTRS: Final = "spatialdata_attrs"
REGION: Final = "region"
REGION_KEY: Final = "region_key"
INSTANCE_KEY: Final = "instance_key"
READER_ATTR: Final = "spatialdata_io_reader"  # SpatialData.attrs: which spatialdata-io reader wrote it
RADIUS: Final = "radius"  # circle shapes' radius column
POINT_AXES: Final = ("x", "y")  # a points element's coordinate columns
H_AND_E_CHANNELS: Final = (1, 3, 4)  # grey, RGB, RGBA
_MIN_SCALE: Final = 1e-9  # an affine scaling lengths by less is singular for our purpose
# --- columns of the table's obs and var (scanpy's read_10x_h5 names) -------------------------
OBS_IN_TISSUE: Final = "in_tissue"
OBS_ARRAY_ROW: Final = "array_row"
OBS_ARRAY_COL: Final = "array_col"
VAR_GENE_IDS: Final = "gene_ids"
VAR_FEATURE_TYPES: Final = "feature_types"
#: Physical diameter of the circles spatialdata-io writes, by the reader that wrote the store:
#: its Visium reader gives circles Space Ranger's spot_diameter_fullres (a 65 um spot, 10x docs).
SPOT_DIAMETER_BY_READER: Final[Mapping[str, float]] = {"visium": 65.0}
EXTRA_HINT: Final = "install the optional extra: pip install 'stcorpus[spatialdata]'"

Affine = npt.NDArray[np.float64]  # 3x3, (x, y, 1) -> (x, y, 1)


def _import_spatialdata() -> Any:
    try:
        import spatialdata
    except ImportError as exc:
        raise NoReaderError(f"technology 'spatialdata' needs the spatialdata package: {EXTRA_HINT}") from exc
    return spatialdata


def _affine(element: Any, system: str) -> Affine:
    """The 3x3 affine taking the element's intrinsic (x, y) to coordinate system ``system``."""
    from spatialdata.transformations import get_transformation

    transformation = get_transformation(element, to_coordinate_system=system)
    return np.asarray(transformation.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)


def _systems(element: Any) -> list[str]:
    from spatialdata.transformations import get_transformation

    return sorted(get_transformation(element, get_all=True))


def _scale_of(affine: Affine) -> float:
    """The mean linear scale of an affine (the square root of its area factor)."""
    return math.sqrt(abs(float(np.linalg.det(affine[:2, :2]))))


def _pick(names: list[str], chosen: str | None, *, what: str, key: str, store: Path, sample: Sample) -> str:
    if chosen is not None:
        if chosen not in names:
            raise SourceMissingError(
                f"{store}: no {what} {chosen!r} (reader option {key}); the store has: {', '.join(names) or 'none'}",
                slide_id=sample.id,
            )
        return chosen
    if len(names) != 1:
        raise SourceMissingError(
            f"{store}: {len(names)} {what}s ({', '.join(names) or 'none'}); name one with the reader option {key}",
            slide_id=sample.id,
        )
    return names[0]


@dataclass(frozen=True)
class _Sites:
    ids: npt.NDArray[np.str_]  # the instance ids, as text
    xy: npt.NDArray[np.float64]  # (n, 2) intrinsic centres
    radius: npt.NDArray[np.float64] | None  # circles only


def _sites(sdata: Any, region: str, *, store: Path, sample: Sample) -> tuple[Any, _Sites]:
    if region in sdata.shapes:
        shapes = sdata.shapes[region]
        geometry = shapes.geometry
        kinds = set(geometry.geom_type.unique().tolist())
        points = geometry if kinds == {"Point"} else geometry.centroid
        xy = np.column_stack([points.x.to_numpy(dtype=float), points.y.to_numpy(dtype=float)])
        radius = shapes[RADIUS].to_numpy(dtype=float) if kinds == {"Point"} and RADIUS in shapes.columns else None
        return shapes, _Sites(ids=as_str_array(shapes.index.to_numpy()), xy=xy, radius=radius)
    if region in sdata.points:
        points_element = sdata.points[region]
        frame = points_element.compute()
        missing = [axis for axis in POINT_AXES if axis not in frame.columns]
        if missing:
            raise CorruptSourceError(
                f"{store}: points element {region!r} has no column(s) {', '.join(missing)} (has "
                f"{', '.join(map(str, frame.columns)) or 'none'}); SpatialData points keep their coordinates in x "
                "and y: write the element with PointsModel.parse(..., coordinates={'x': ..., 'y': ...})",
                slide_id=sample.id,
            )
        try:
            xy = np.column_stack([frame[axis].to_numpy(dtype=float) for axis in POINT_AXES])
        except (TypeError, ValueError) as exc:
            raise CorruptSourceError(
                f"{store}: points element {region!r}: x/y are not numeric ({exc})", slide_id=sample.id
            ) from exc
        return points_element, _Sites(ids=as_str_array(frame.index.to_numpy()), xy=xy, radius=None)
    raise CorruptSourceError(
        f"{store}: the table annotates {region!r}, which is neither a shapes nor a points element of the store "
        f"(shapes: {', '.join(sdata.shapes) or 'none'}; points: {', '.join(sdata.points) or 'none'})",
        slide_id=sample.id,
    )


def _scales(element: Any) -> list[Any]:
    """The dask arrays of an image element, finest first (a multiscale tree or a single array)."""
    if hasattr(element, "children") and hasattr(element, "keys"):  # xarray DataTree: scale0, scale1, ...
        arrays = []
        for name in sorted(element.keys(), key=lambda k: int(str(k).removeprefix("scale") or 0)):
            node = element[name]
            (variable,) = node.data_vars.values() if hasattr(node, "data_vars") else (node,)
            arrays.append(variable.data)
        return arrays
    return [element.data]


def _image(
    sdata: Any,
    sites_element: Any,
    *,
    store: Path,
    sample: Sample,
    notes: list[str],
    system: str | None,
) -> tuple[SlideImage, str, Affine, str]:
    """The H&E as a lazily read image, its name, and the affine from site coordinates to its pixels."""
    site_systems = _systems(sites_element)
    if system is not None and system not in site_systems:
        raise SourceMissingError(
            f"{store}: the sites have no coordinate system {system!r} (reader option coordinate_system); they have: "
            f"{', '.join(site_systems) or 'none'}",
            slide_id=sample.id,
        )
    chosen = option(sample, "image", default=None)
    candidates: list[tuple[float, str, str]] = []
    for name in sorted(sdata.images):
        shared = [s for s in _systems(sdata.images[name]) if s in site_systems and (system is None or s == system)]
        if shared:
            scale = _scale_of(_affine(sdata.images[name], shared[0]))
            candidates.append((scale, name, shared[0]))
    if chosen is not None:
        named = [c for c in candidates if c[1] == chosen]
        if not named:
            raise SourceMissingError(
                f"{store}: no image {chosen!r} sharing a coordinate system with the sites (reader option image); "
                f"images that do: {', '.join(c[1] for c in candidates) or 'none'}",
                slide_id=sample.id,
            )
        candidates = named
    if not candidates:
        raise SourceMissingError(
            f"{store}: no image shares a coordinate system with the sites ({', '.join(site_systems)}); images: "
            f"{', '.join(sdata.images) or 'none'}. Add the H&E to the store, or pin the system with the reader "
            "option coordinate_system",
            slide_id=sample.id,
        )
    skipped: list[str] = []
    for _, name, common in sorted(candidates):
        site_affine = _affine(sites_element, common)
        scales = _scales(sdata.images[name])
        n_channels = int(scales[0].shape[0]) if len(scales[0].shape) == 3 else 0
        if n_channels not in H_AND_E_CHANNELS:  # a fluorescence stack, not an H&E: its first 3 channels are no RGB
            unusable = f"{n_channels} channels, not an RGB or grey H&E"
            if chosen is not None:
                raise SourceMissingError(
                    f"{store}: image {name!r} (reader option image) has {unusable}; name the H&E element instead",
                    slide_id=sample.id,
                )
            skipped.append(f"{name} ({unusable})")
            continue
        image = ArrayImage(store / "images" / name, scales)
        blank = image_blank_reason(image) if chosen is None else None
        if blank is not None:
            image.close()
            skipped.append(f"{name} (blank: {blank})")
            continue
        if skipped:
            notes.append(f"image(s) skipped: {'; '.join(skipped)}")
        for what, affine in (("image " + repr(name), _affine(sdata.images[name], common)), ("the sites", site_affine)):
            if not np.isfinite(affine).all() or _scale_of(affine) < _MIN_SCALE:  # the store's own broken record
                image.close()
                raise CorruptSourceError(
                    f"{store}: the transformation of {what} to coordinate system {common!r} is not invertible "
                    f"({affine[:2].tolist()}): it maps the plane onto a line or a point; fix it with "
                    "spatialdata.transformations.set_transformation and write the store again",
                    slide_id=sample.id,
                )
        to_pixels: Affine = np.linalg.inv(_affine(sdata.images[name], common)) @ site_affine
        notes.append(f"image {name} ({image.width}x{image.height}), sites mapped through coordinate system {common}")
        return image, name, to_pixels, common
    raise SourceMissingError(
        f"{store}: no image is a usable H&E ({'; '.join(skipped)}); add the real H&E to the store, or name it with "
        "the reader option image",
        slide_id=sample.id,
    )


def _features(table: Any, *, store: Path, sample: Sample, notes: list[str]) -> tuple[npt.NDArray[np.intp], Features]:
    var = table.var
    names = as_str_array(var.index.to_numpy())
    if VAR_GENE_IDS in var.columns:
        ids = as_str_array(var[VAR_GENE_IDS].to_numpy())
    else:
        ids = np.where(is_ensembl(names), names, "").astype(np.str_)
    keep = np.ones(names.shape[0], dtype=bool)
    if VAR_FEATURE_TYPES in var.columns:
        keep = as_str_array(var[VAR_FEATURE_TYPES].to_numpy()) == GENE_EXPRESSION
        if not keep.any():
            raise CorruptSourceError(f"{store}: the table has no '{GENE_EXPRESSION}' features", slide_id=sample.id)
        if not keep.all():
            notes.append(f"{int((~keep).sum())} non '{GENE_EXPRESSION}' features dropped")
    columns = np.flatnonzero(keep)
    return columns, Features(ids=ids[columns], names=names[columns])


def read(*, sample: Sample, files: Mapping[str, Path], images: ImageSettings = DEFAULT_IMAGES) -> Slide:
    """Read a SpatialData zarr store into a :class:`Slide` (see the module docstring)."""
    import scipy.sparse as sp

    spatialdata = _import_spatialdata()
    store = require_file(files, "store", sample=sample)
    notes: list[str] = []
    try:
        sdata = spatialdata.read_zarr(store)
    except (OSError, ValueError, KeyError) as exc:
        raise CorruptSourceError(f"{store}: not a readable SpatialData zarr store: {exc}", slide_id=sample.id) from exc

    table_name = _pick(
        sorted(sdata.tables),
        option(sample, "table", default=None),
        what="table",
        key="table",
        store=store,
        sample=sample,
    )
    table = sdata.tables[table_name]
    attrs = table.uns.get(TABLE_ATTRS, {})
    regions = attrs.get(REGION)
    region_names = [regions] if isinstance(regions, str) else sorted(str(r) for r in (regions or []))
    region = _pick(
        region_names,
        option(sample, "region", default=None),
        what="annotated region",
        key="region",
        store=store,
        sample=sample,
    )
    if len(region_names) > 1:
        table = table[table.obs[attrs[REGION_KEY]].astype(str).to_numpy() == region]
    instance_key = attrs.get(INSTANCE_KEY)
    if instance_key is None or instance_key not in table.obs.columns:
        raise CorruptSourceError(
            f"{store}: table {table_name!r} names no instance key column in uns[{TABLE_ATTRS!r}]", slide_id=sample.id
        )
    sites_element, sites = _sites(sdata, region, store=store, sample=sample)
    image, image_name, to_pixels, system = _image(
        sdata,
        sites_element,
        store=store,
        sample=sample,
        notes=notes,
        system=option(sample, "coordinate_system", default=None),
    )

    # Counts and features.
    layer = option(sample, "layer", default=None)
    if layer is not None and layer not in table.layers:
        raise SourceMissingError(
            f"{store}: table {table_name!r} has no layer {layer!r} (reader option layer); layers: "
            f"{', '.join(table.layers) or 'none'}",
            slide_id=sample.id,
        )
    values = table.layers[layer] if layer is not None else table.X
    if values is None:
        image.close()
        raise CorruptSourceError(
            f"{store}: table {table_name!r} has no X; name the layer holding the counts with the reader option layer "
            f"(layers: {', '.join(table.layers) or 'none'})",
            slide_id=sample.id,
        )
    try:
        matrix = sp.csr_matrix(values)
    except (TypeError, ValueError) as exc:
        image.close()
        where = f"layer {layer!r}" if layer is not None else "X"
        raise CorruptSourceError(
            f"{store}: table {table_name!r} {where} is not a matrix of numbers ({exc})", slide_id=sample.id
        ) from exc
    columns, features = _features(table, store=store, sample=sample, notes=notes)
    dropped_features = int(matrix.shape[1] - columns.shape[0])
    if dropped_features:
        matrix = matrix[:, columns]
    barcodes = as_str_array(table.obs_names.to_numpy())
    obs = table.obs
    instance_ids = as_str_array(obs[instance_key].to_numpy())

    # Sites: centres in image pixels, joined to the table rows by instance id.
    homogeneous = np.column_stack([sites.xy, np.ones(sites.xy.shape[0])])
    pixels = homogeneous @ to_pixels.T
    join = join_spots(
        instance_ids,
        sites.ids,
        in_tissue=np.ones(sites.ids.shape[0], dtype=bool),
        finite=np.asarray(np.isfinite(pixels[:, :2]).all(axis=1), dtype=bool),
        sample=sample,
        counts_name=f"table {table_name!r}",
        positions_name=f"element {region!r}",
        notes=notes,
    )
    rows, site_rows = join.rows, join.position_rows
    counts = raw_counts(matrix[rows], sample=sample, source=store, notes=notes)
    if counts.nnz == 0:  # zarr reads a chunk file that is missing as zeros: a partly copied store looks empty
        image.close()
        where = f"layer {layer!r}" if layer is not None else "X"
        raise CorruptSourceError(
            f"{store}: table {table_name!r} ({where}) holds no non-zero count in its {rows.shape[0]:,} matched rows; "
            "a store copied without its chunk files reads as zeros: copy or fetch the whole .zarr folder again",
            slide_id=sample.id,
        )
    x_px, y_px = pixels[site_rows, 0], pixels[site_rows, 1]

    def obs_numbers(column: str) -> npt.NDArray[np.int64]:
        values = np.asarray(obs[column].to_numpy())[rows]
        return whole_numbers(values, what=f"{store}: table {table_name!r} obs column {column!r}", slide_id=sample.id)

    in_tissue = obs_numbers(OBS_IN_TISSUE) != 0 if OBS_IN_TISSUE in obs.columns else np.ones(rows.shape[0], dtype=bool)
    geometry = assay_geometry(sample.assay, slide_id=sample.id, pitch_hint="set the sample's assay")
    # Array coordinates belong to a lattice; cell-level sites have none (as the xenium reader's).
    has_array = geometry.is_lattice and OBS_ARRAY_ROW in obs.columns and OBS_ARRAY_COL in obs.columns
    if has_array:
        array_row = obs_numbers(OBS_ARRAY_ROW).astype(np.int32)
        array_col = obs_numbers(OBS_ARRAY_COL).astype(np.int32)
    else:
        array_row = array_col = np.zeros(rows.shape[0], dtype=np.int32)

    # um/px of the image's finest scale.
    mpp_source: MppSource
    micron_system = option(sample, "micron_coordinate_system", default=None)
    diameter_um = option(
        sample, "spot_diameter_um", default=SPOT_DIAMETER_BY_READER.get(str(sdata.attrs.get(READER_ATTR)))
    )
    if sample.mpp is not None:
        mpp, mpp_source = float(sample.mpp), "manifest"
    elif micron_system is not None:
        image_element = sdata.images[image_name]
        if micron_system not in _systems(image_element):
            raise SourceMissingError(
                f"{store}: image {image_name!r} has no coordinate system {micron_system!r} (reader option "
                f"micron_coordinate_system); it has: {', '.join(_systems(image_element))}",
                slide_id=sample.id,
            )
        mpp, mpp_source = _scale_of(_affine(image_element, micron_system)), "metadata"
        notes.append(f"um/px from image {image_name!r} to coordinate system {micron_system!r} (micrometres)")
    elif sites.radius is not None and diameter_um is not None:
        radius_px = float(np.median(sites.radius[site_rows])) * _scale_of(to_pixels)
        mpp, mpp_source = float(diameter_um) / (2.0 * radius_px), "spot_radius"
        notes.append(f"um/px from circle radius {radius_px:.4g} px as a {float(diameter_um):g} um spot")
    else:
        fit = (
            fit_lattice(x_px, y_px, array_row, array_col, lattice=geometry.kind, pitch_um=geometry.pitch_um)
            if has_array and geometry.is_lattice
            else None
        )
        if fit is None:
            image.close()
            raise CorruptSourceError(
                f"{store}: nothing in the store fixes the um/px of image {image_name!r}; set the sample's `mpp`, or "
                "the reader option micron_coordinate_system (a coordinate system in micrometres) or spot_diameter_um "
                "(the physical diameter of circle sites)",
                slide_id=sample.id,
            )
        mpp, mpp_source = fit.mpp, "lattice"
        notes.append(f"um/px {fit.mpp:.4f} fitted from {fit.n_inliers} sites on the {geometry.describe()}")
    if not has_array and geometry.is_lattice:
        array_row, array_col = lattice_coords(
            x_px,
            y_px,
            geometry=geometry,
            mpp=mpp,
            mpp_source=mpp_source,
            sample=sample,
            notes=notes,
            why=f"obs has no {OBS_ARRAY_ROW}/{OBS_ARRAY_COL}: ",
        )
    notes.append(f"store {store.name}: table {table_name!r} over {region!r}, coordinate system {system!r}")
    return Slide(
        sample=sample,
        counts=counts,
        features=features,
        spots=Spots(
            barcode=barcodes[rows],
            in_tissue=in_tissue,
            array_row=array_row,
            array_col=array_col,
            x_px=x_px,
            y_px=y_px,
        ),
        image=image,
        mpp=mpp,
        mpp_source=mpp_source,
        geometry=geometry,
        qc=[join.check],
        notes=notes,
        dropped_features=dropped_features,
        dropped_spots=join.dropped,
    )
