"""Crafted bad inputs for the binned and cell-level readers (issue 14): Visium HD, Xenium, SpatialData.

As ``tests/test_bad_inputs.py`` does for Space Ranger, HEST, ST and STimage: every crafted slide is
built once, together, beside one good slide of each of these readers (``cells_build``). A bad slide
must be refused deliberately (a reason code, never ``error``/``worker_lost``), its reason naming the
file or option and the fault, and be visible in slides.parquet, the summary and the QC report; an
odd but usable one is built with the oddity counted and said. The outputs are generated as 10x
lays them out (``tests/spatial_fixtures.py``), then damaged the way real downloads and hand-edited
folders are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stcorpus import schema
from stcorpus.curate.build.pipeline import BuildSettings, BuildSummary, build
from stcorpus.curate.build.unit import UnitSettings
from stcorpus.curate.manifest import load_manifest
from stcorpus.curate.readers import check_sample
from stcorpus.curate.tiles import TileSettings
from tests.build_fixtures import manifest
from tests.spatial_fixtures import real_genes, write_visium_hd, write_xenium
from tests.test_bad_inputs import SlideCase, _cut, _replace, refusal_problems

HTML = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Please log in</body></html>"
BIN = "square_008um"
POSITIONS = "tissue_positions.parquet"
HD_POSITIONS = f"spatial/{POSITIONS}"
SCALEFACTORS = "scalefactors_json.json"
HD_MATRIX = "filtered_feature_bc_matrix.h5"
XEN_MATRIX = "cell_feature_matrix.h5"


# ---------------------------------------------------------------------------------------------
# Edits: each takes the folder it damages
# ---------------------------------------------------------------------------------------------


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / name).write_bytes(data)

    return apply


def _remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def _parquet(name: str, edit: Callable[[pa.Table], pa.Table]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        pq.write_table(edit(pq.read_table(folder / name)), folder / name)

    return apply


def _set(table: pa.Table, name: str, values: Any) -> pa.Table:
    if isinstance(values, pa.Array):
        array = values
    else:
        array = pa.array(values if isinstance(values, list) else [values] * table.num_rows)
    return table.set_column(table.schema.get_field_index(name), name, array)


def _json(name: str, edit: Callable[[dict[str, Any]], object]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        edit(data)
        (folder / name).write_text(json.dumps(data))

    return apply


def _h5(name: str, edit: Callable[[h5py.File], object]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        with h5py.File(folder / name, "r+") as f:
            edit(f)

    return apply


def _cut_file(name: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        _cut(folder / name, folder / name)

    return apply


def _sequence(*edits: Callable[[Path], object]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        for edit in edits:
            edit(folder)

    return apply


def _entry(slide_id: str, technology: str, assay: str, sources: dict[str, Path], reader: dict[str, Any]) -> str:
    lines = [
        f"- id: {slide_id}",
        f"  technology: {technology}",
        f"  assay: {assay}",
        "  species: human",
        "  organ: breast",
        f"  patient: {slide_id}",
        "  sources: {" + ", ".join(f"{name}: '{path}'" for name, path in sources.items()) + "}",
    ]
    if reader:
        lines.append(f"  reader: {json.dumps(reader)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# SpatialData stores: a good one (cells as circles in um, an H&E at 0.5 um/px) and its damaged kin
# ---------------------------------------------------------------------------------------------

N_CELLS = 24
SD_READER = {"micron_coordinate_system": "global"}


def _store_parts(seed: int = 7) -> dict[str, dict[str, Any]]:
    """The elements of a good store: images ``he``, shapes ``cells``, table ``table``."""
    import anndata as ad
    import pandas as pd  # type: ignore[import-untyped]
    import scipy.sparse as sp
    from geopandas import GeoDataFrame
    from shapely.geometry import Point
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    rng = np.random.default_rng(seed)
    centres = rng.uniform(60, 240, size=(N_CELLS, 2))  # um
    ids = [f"c{i}" for i in range(N_CELLS)]
    cells = ShapesModel.parse(
        GeoDataFrame(
            {"geometry": [Point(x, y) for x, y in centres], "radius": np.full(N_CELLS, 5.0)},
            index=pd.Index(ids, name="cell_id"),
        ),
        transformations={"global": Identity()},
    )
    pixels = rng.integers(0, 255, size=(3, 600, 600), dtype=np.uint8)  # not blank
    image = Image2DModel.parse(pixels, dims=("c", "y", "x"), transformations={"global": Scale([0.5, 0.5], ("x", "y"))})
    gene_ids, names = real_genes(8)
    adata = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(3.0, size=(N_CELLS, 8)).astype(np.int32)),
        obs=pd.DataFrame({"cell_id": ids, "region": "cells"}, index=[f"b{i}" for i in range(N_CELLS)]),
        var=pd.DataFrame({"gene_ids": gene_ids}, index=names),
    )
    adata.obs["region"] = adata.obs["region"].astype("category")
    table = TableModel.parse(adata, region="cells", region_key="region", instance_key="cell_id")
    return {"images": {"he": image}, "shapes": {"cells": cells}, "points": {}, "tables": {"table": table}}


def _store(path: Path, edit: Callable[[dict[str, dict[str, Any]]], object] | None = None) -> Path:
    from spatialdata import SpatialData

    parts = _store_parts()
    if edit is not None:
        edit(parts)
    SpatialData(**parts).write(path)
    return path


def _second_table(parts: dict[str, dict[str, Any]]) -> None:
    parts["tables"]["table2"] = parts["tables"]["table"].copy()


def _region_elsewhere(parts: dict[str, dict[str, Any]]) -> None:
    import pandas as pd

    table = parts["tables"]["table"]
    table.uns["spatialdata_attrs"]["region"] = "nuclei"
    table.obs["region"] = pd.Categorical(["nuclei"] * table.n_obs)


def _float_counts(parts: dict[str, dict[str, Any]]) -> None:
    table = parts["tables"]["table"]
    table.X = table.X.astype(np.float32).multiply(1 / 7).tocsr()


def _blank_image(parts: dict[str, dict[str, Any]]) -> None:
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    parts["images"]["he"] = Image2DModel.parse(
        np.full((3, 600, 600), 255, dtype=np.uint8),
        dims=("c", "y", "x"),
        transformations={"global": Scale([0.5, 0.5], ("x", "y"))},
    )


def _obs(**columns: Any) -> Callable[[dict[str, dict[str, Any]]], None]:
    def apply(parts: dict[str, dict[str, Any]]) -> None:
        for name, value in columns.items():
            parts["tables"]["table"].obs[name] = value

    return apply


def _singular_image(parts: dict[str, dict[str, Any]]) -> None:
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Affine

    flat = Affine(np.array([[0.5, 1.0, 0], [0.25, 0.5, 0], [0, 0, 1]]), input_axes=("x", "y"), output_axes=("x", "y"))
    pixels = np.asarray(parts["images"]["he"].data)
    parts["images"]["he"] = Image2DModel.parse(pixels, dims=("c", "y", "x"), transformations={"global": flat})


def _flat_sites(parts: dict[str, dict[str, Any]]) -> None:
    from spatialdata.transformations import Scale, set_transformation

    set_transformation(parts["shapes"]["cells"], Scale([0.0, 1.0], ("x", "y")), "global")


def _no_x(parts: dict[str, dict[str, Any]]) -> None:
    parts["tables"]["table"].X = None


def _fluorescence(parts: dict[str, dict[str, Any]]) -> None:
    """A 5-channel immunofluorescence stack where the H&E should be."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    stack = np.random.default_rng(5).integers(0, 255, size=(5, 600, 600), dtype=np.uint8)
    transformations = {"global": Scale([0.5, 0.5], ("x", "y"))}
    parts["images"]["he"] = Image2DModel.parse(stack, dims=("c", "y", "x"), transformations=transformations)


def _other_ids(parts: dict[str, dict[str, Any]]) -> None:
    table = parts["tables"]["table"]
    table.obs["cell_id"] = [f"z{i}" for i in range(table.n_obs)]


def _antibodies(parts: dict[str, dict[str, Any]]) -> None:
    table = parts["tables"]["table"]
    table.var["feature_types"] = "Antibody Capture"


def _as_points(parts: dict[str, dict[str, Any]]) -> None:
    """The cells as a points element (bead centres) named ``cells``, not shapes."""
    import pandas as pd
    from spatialdata.models import PointsModel
    from spatialdata.transformations import Identity

    shapes = parts["shapes"].pop("cells")
    frame = pd.DataFrame(
        {"x": shapes.geometry.x.to_numpy(), "y": shapes.geometry.y.to_numpy()},
        index=pd.Index(shapes.index.to_numpy(), name="cell_id"),
    )
    parts["points"]["cells"] = PointsModel.parse(
        frame, coordinates={"x": "x", "y": "y"}, transformations={"global": Identity()}
    )


def _points_without_xy(store: Path) -> None:
    """The points element's Parquet columns renamed (a store written by a tool that calls them ``gx``, ``gy``)."""
    for part in [p for p in (store / "points" / "cells").rglob("*.parquet") if p.is_file()]:
        table = pq.read_table(part)
        names = [{"x": "gx", "y": "gy"}.get(n, n) for n in table.column_names]
        pq.write_table(table.rename_columns(names), part)


def _table_chunks_gone(store: Path) -> None:
    """The table's count chunks deleted (a store copied without its chunk files)."""
    x = store / "tables" / "table" / "X"
    for chunk in [p for p in x.rglob("*") if p.is_file() and not p.name.startswith((".", "zarr"))]:
        chunk.unlink()


# ---------------------------------------------------------------------------------------------
# The crafted slides
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Crafted:
    """The crafted slides (refused) and the unusual ones (built, their oddity said in notes)."""

    cases: dict[str, SlideCase]
    unusual: dict[str, tuple[str, str]]  # slide id -> (entry, a fragment its notes or reason must hold)
    good: dict[str, str]  # slide id -> entry


def crafted_slides(folder: Path) -> Crafted:
    """Every crafted slide of the shared build, by slide id."""
    cases: dict[str, SlideCase] = {}
    unusual: dict[str, tuple[str, str]] = {}

    # --- Visium HD ---------------------------------------------------------------------------
    marks = np.meshgrid(np.arange(20.0, 350.0, 25.0), np.arange(20.0, 320.0, 25.0))  # not a blank image
    base = write_visium_hd(folder / "hd-base", bin_um=8, markers_um=(marks[0].ravel(), marks[1].ravel()))

    def hd_outs(name: str, edit: Callable[[Path], object] | None) -> Path:
        outs = folder / f"hd-{name}" / "outs"
        shutil.copytree(base.outs, outs)
        if edit is not None:
            edit(outs / "binned_outputs" / BIN)
        return outs

    def hd(
        slide_id: str,
        edit: Callable[[Path], object] | None,
        fault: str,
        names: str,
        *,
        reader: dict[str, Any] | None = None,
        image: Path | None = base.image,
    ) -> None:
        sources = {"outs": hd_outs(slide_id, edit)} | ({"image": image} if image is not None else {})
        cases[slide_id] = SlideCase(_entry(slide_id, "visium-hd", "visium-hd", sources, reader or {}), fault, names)

    good = {"GOOD-HD": _entry("GOOD-HD", "visium-hd", "visium-hd", {"outs": base.outs, "image": base.image}, {})}

    def rename_bin(bins: Path) -> None:
        bins.rename(bins.parent / "square_010um")

    hd("HD-bin-folder-renamed", rename_bin, "has no square_008um/", "square_010um")
    hd("HD-bin-16-absent", None, "has no square_016um/", "bin_um", reader={"bin_um": 16})
    hd(
        "HD-positions-no-pixels",
        _parquet(HD_POSITIONS, lambda t: t.drop_columns(["pxl_row_in_fullres"])),
        "lacks column(s) pxl_row_in_fullres",
        POSITIONS,
    )
    hd(
        "HD-positions-all-nan",
        _parquet(HD_POSITIONS, lambda t: _set(t, "pxl_col_in_fullres", float("nan"))),
        "NaN or infinite centre",
        POSITIONS,
    )
    hd(
        "HD-positions-text-rows",
        _parquet(HD_POSITIONS, lambda t: _set(t, "array_row", "r1")),
        "array_row",
        POSITIONS,
    )
    hd(
        "HD-positions-text-pixels",
        _parquet(HD_POSITIONS, lambda t: _set(t, "pxl_row_in_fullres", "12.5px")),
        "is not numeric",
        POSITIONS,
    )
    hd(
        "HD-positions-nan-tissue",
        _parquet(HD_POSITIONS, lambda t: _set(t, "in_tissue", float("nan"))),
        "in_tissue",
        POSITIONS,
    )
    hd("HD-positions-zero-bytes", _write(HD_POSITIONS, b""), "not a readable Parquet", POSITIONS)
    hd("HD-positions-html", _write(HD_POSITIONS, HTML), "not a readable Parquet", POSITIONS)
    hd(
        "HD-no-tissue",
        _parquet(HD_POSITIONS, lambda t: _set(t, "in_tissue", 0)),
        "in_tissue",
        POSITIONS,
    )
    hd("HD-scalefactors-html", _write(f"spatial/{SCALEFACTORS}", HTML), "not readable JSON", SCALEFACTORS)
    hd("HD-scalefactors-missing", _remove(f"spatial/{SCALEFACTORS}"), f"no {SCALEFACTORS}", SCALEFACTORS)
    hd(
        "HD-bin-size-mismatch",
        _json(f"spatial/{SCALEFACTORS}", lambda d: d.update(bin_size_um=16.0)),
        "bin_size_um=16.0, but the folder is square_008um/",
        SCALEFACTORS,
    )
    hd(
        "HD-bin-size-missing",
        _json(f"spatial/{SCALEFACTORS}", lambda d: d.pop("bin_size_um")),
        "bin_size_um",
        SCALEFACTORS,
    )
    hd("HD-h5-truncated", _cut_file(HD_MATRIX), "HDF5", HD_MATRIX)
    hd("HD-h5-zero-bytes", _write(HD_MATRIX, b""), "not a readable HDF5", HD_MATRIX)
    hd(
        "HD-h5-data-short",
        _h5(HD_MATRIX, lambda f: _replace(f, "matrix/data", f["matrix/data"][()][:-5])),
        "values but /matrix/indices",
        HD_MATRIX,
    )
    hd("HD-h5-missing", _remove(HD_MATRIX), "raw_feature_bc_matrix", BIN)
    hd(
        "HD-barcodes-absent",
        _h5(HD_MATRIX, lambda f: _replace(f, "matrix/barcodes", np.char.add(f["matrix/barcodes"][()], b"-X"))),
        "barcode",
        POSITIONS,
    )
    hd("HD-square-no-pitch", None, "needs the reader option pitch_um", "pitch_um", reader={"grid": "square"})
    hd(
        "HD-square-pitch-odd",
        None,
        "not a whole multiple of the 8 um bins",
        "pitch_um",
        reader={"grid": "square", "pitch_um": 30.0},
    )
    hd(
        "HD-spots-overlap",
        None,
        "spot_diameter_um",
        "pitch_um",
        reader={"spot_diameter_um": 150.0},
    )
    hd(
        "HD-spots-smaller-than-bins",
        None,
        "smaller than the 8 um bins",
        "spot_diameter_um",
        reader={"spot_diameter_um": 4.0},
    )
    hd(
        "HD-array-coords-repeated",
        _parquet(HD_POSITIONS, lambda t: _set(t, "array_row", 0)),
        "repeat the array_row/array_col of another",
        POSITIONS,
    )
    hd("HD-pixels-shuffled", _parquet(HD_POSITIONS, _shuffle_pixels), "depart from an affine", POSITIONS)
    cases["HD-outs-is-other-bin"] = SlideCase(
        _entry(
            "HD-outs-is-other-bin",
            "visium-hd",
            "visium-hd",
            {"outs": base.outs / "binned_outputs" / BIN, "image": base.image},
            {"bin_um": 16},
        ),
        "is the square_008um/ bin folder, but the reader option bin_um is 16",
        BIN,
    )
    hd("HD-no-image", None, "image", "tissue_hires_image.png", image=None)
    hd("HD-image-zero-bytes", None, "not a readable", "empty.png", image=_empty(folder / "empty.png"))
    hd("HD-image-html", None, "not a readable", "image.tif", image=_html(folder / "image.tif"))
    hd("HD-outs-empty", lambda bins: shutil.rmtree(bins.parent), "bin sizes present: none", "square_008um")
    hd("HD-lowres-only", _lowres_only(base.image), "tissue_lowres_image.png", "tissue_lowres_image.png", image=None)
    hd(
        "HD-cytassist-image",
        None,
        "lie outside image",
        "CAVG_cytassist_image.tif",
        image=_cytassist(folder / "CAVG_cytassist_image.tif"),
    )

    def hd_odd(slide_id: str, seed: int, edit: Callable[[Path], object], says: str) -> None:
        """A built slide: its own counts (a distinct seed), so that it is no duplicate of the good one."""
        odd = write_visium_hd(
            folder / f"hd-{slide_id}", bin_um=8, seed=seed, markers_um=(marks[0].ravel(), marks[1].ravel())
        )
        edit(odd.outs / "binned_outputs" / BIN)
        unusual[slide_id] = (
            _entry(slide_id, "visium-hd", "visium-hd", {"outs": odd.outs, "image": odd.image}, {}),
            says,
        )

    scalefactors = f"spatial/{SCALEFACTORS}"
    hd_odd("HD-mpp-missing", 1, _json(scalefactors, lambda d: d.pop("microns_per_pixel")), "fitted")
    hd_odd("HD-mpp-zero", 2, _json(scalefactors, lambda d: d.update(microns_per_pixel=0)), "microns_per_pixel=0")
    hd_odd(
        "HD-h5-no-feature-type", 4, _h5(HD_MATRIX, lambda f: f.__delitem__("matrix/features/feature_type")), "10x h5"
    )
    hd_odd("HD-mpp-negative", 3, _json(scalefactors, lambda d: d.update(microns_per_pixel=-0.5)), "is not a positive")

    # --- Xenium ------------------------------------------------------------------------------
    xen = write_xenium(folder / "xen-base")

    def xen_outs(name: str, edit: Callable[[Path], object] | None) -> Path:
        outs = folder / f"xen-{name}" / "outs"
        shutil.copytree(xen.outs, outs)
        if edit is not None:
            edit(outs)
        return outs

    def xenium(
        slide_id: str,
        edit: Callable[[Path], object] | None,
        fault: str,
        names: str,
        *,
        reader: dict[str, Any] | None = None,
        alignment: Path = xen.alignment,
        image: Path = xen.image,
    ) -> None:
        sources = {"outs": xen_outs(slide_id, edit), "image": image, "alignment": alignment}
        cases[slide_id] = SlideCase(_entry(slide_id, "xenium", "xenium", sources, reader or {}), fault, names)

    good["GOOD-XEN"] = _entry(
        "GOOD-XEN", "xenium", "xenium", {"outs": xen.outs, "image": xen.image, "alignment": xen.alignment}, {}
    )
    spots = {"samples": "pseudo-spots"}
    specs = "experiment.xenium"
    xenium("XEN-specs-missing", _remove(specs), "holds no experiment.xenium", specs)
    xenium("XEN-specs-not-json", _write(specs, b"pixel_size = 0.2125\n"), "not readable JSON", specs)
    xenium("XEN-specs-zero-bytes", _write(specs, b""), "not readable JSON", specs)
    xenium("XEN-specs-no-pixel-size", _json(specs, lambda d: d.pop("pixel_size")), "pixel_size", specs)
    xenium("XEN-specs-pixel-size-text", _json(specs, lambda d: d.update(pixel_size="0.2125")), "pixel_size", specs)
    xenium("XEN-specs-pixel-size-tiny", _json(specs, lambda d: d.update(pixel_size=1e-300)), "pixel_size", specs)
    xenium("XEN-specs-list", _write(specs, b"[0.2125]"), "expected a JSON object", specs)
    xenium("XEN-matrix-missing", _remove(XEN_MATRIX), f"no {XEN_MATRIX}", XEN_MATRIX)
    xenium("XEN-matrix-truncated", _cut_file(XEN_MATRIX), "HDF5", XEN_MATRIX)
    xenium("XEN-matrix-html", _write(XEN_MATRIX, HTML), "not a readable HDF5", XEN_MATRIX)
    xenium(
        "XEN-matrix-data-short",
        _h5(XEN_MATRIX, lambda f: _replace(f, "matrix/data", f["matrix/data"][()][:-3])),
        "values but /matrix/indices",
        XEN_MATRIX,
    )
    xenium(
        "XEN-matrix-controls-only",
        _h5(
            XEN_MATRIX,
            lambda f: _replace(f, "matrix/features/feature_type", np.array([b"Negative Control Probe"] * 14)),
        ),
        "no 'Gene Expression' features",
        XEN_MATRIX,
    )
    cells = "cells.parquet"
    xenium("XEN-cells-missing", _remove(cells), "samples: pseudo-spots", cells)
    xenium("XEN-cells-zero-bytes", _write(cells, b""), "not a readable Parquet", cells)
    xenium(
        "XEN-cells-no-centroid",
        _parquet(cells, lambda t: t.drop_columns(["y_centroid"])),
        "lacks column(s) y_centroid",
        cells,
    )
    xenium(
        "XEN-cells-nan-centroids",
        _parquet(cells, lambda t: _set(t, "x_centroid", float("nan"))),
        "NaN or infinite centre",
        cells,
    )
    xenium(
        "XEN-cells-text-centroids",
        _parquet(cells, lambda t: _set(t, "x_centroid", "12.5 um")),
        "x_centroid",
        cells,
    )
    xenium(
        "XEN-cells-other-ids",
        _parquet(cells, lambda t: _set(t, "cell_id", [f"other-{i}" for i in range(t.num_rows)])),
        "barcode",
        cells,
    )
    alignment = folder / "xen-alignments"
    alignment.mkdir()
    for slide_id, name, text, fault in (
        ("XEN-alignment-2x3", "two-rows.csv", "1,0,0\n0,1,0\n", "3x3"),
        ("XEN-alignment-text", "text.csv", "a,b,c\nd,e,f\ng,h,i\n", "not a 3x3 alignment matrix CSV"),
        ("XEN-alignment-singular", "singular.csv", "1,2,0\n2,4,0\n0,0,1\n", "not an invertible affine"),
        ("XEN-alignment-html", "page.csv", HTML.decode(), "alignment"),
        ("XEN-alignment-zero-bytes", "empty.csv", "", "3x3"),
        ("XEN-alignment-semicolons", "semicolons.csv", "1;0;0\n0;1;0\n0;0;1\n", "alignment"),
    ):
        (alignment / name).write_text(text)
        xenium(slide_id, None, fault, name, alignment=alignment / name)
    transcripts = "transcripts.parquet"
    xenium(
        "XEN-transcripts-no-qv",
        _parquet(transcripts, lambda t: t.drop_columns(["qv"])),
        "lacks column(s) qv",
        transcripts,
        reader=spots,
    )
    xenium(
        "XEN-transcripts-no-feature-name",
        _parquet(transcripts, lambda t: t.drop_columns(["feature_name"])),
        "lacks column(s) feature_name",
        transcripts,
        reader=spots,
    )
    xenium(
        "XEN-transcripts-all-low-qv",
        _parquet(transcripts, lambda t: _set(t, "qv", pa.array(np.full(t.num_rows, 12.0, np.float32)))),
        "no transcript is left to pool",
        transcripts,
        reader=spots,
    )
    xenium(
        "XEN-transcripts-all-controls",
        _parquet(transcripts, lambda t: _set(t, "feature_name", "NegControlProbe_00001")),
        "of control features",
        transcripts,
        reader=spots,
    )
    xenium(
        "XEN-transcripts-text-qv",
        _parquet(transcripts, lambda t: _set(t, "qv", "high")),
        "qv",
        transcripts,
        reader=spots,
    )
    xenium("XEN-transcripts-missing", _remove(transcripts), "samples: cells", transcripts, reader=spots)
    xenium(
        "XEN-min-qv-too-high",
        None,
        "lower the reader option min_qv (now 60)",
        transcripts,
        reader={**spots, "min_qv": 60.0},
    )
    xenium(
        "XEN-transcripts-nan-locations",
        _parquet(transcripts, lambda t: _set(t, "x_location", pa.array(np.full(t.num_rows, np.nan, np.float32)))),
        "NaN or infinite location",
        transcripts,
        reader=spots,
    )
    xenium("XEN-image-html", None, "not a readable", "he.png", image=_html(folder / "he.png"))
    # the bundle's own DAPI image given as the H&E (a real mix-up: it sits beside the outputs)
    dapi = folder / "xen-dapi" / "morphology_focus" / "morphology_focus_0000.ome.tif"
    dapi.parent.mkdir(parents=True)
    shutil.copyfile(xen.image, dapi)
    xenium("XEN-image-morphology", None, "is the Xenium morphology image", dapi.name, image=dapi)
    mip = folder / "xen-dapi" / "morphology_mip.ome.tif"
    shutil.copyfile(xen.image, mip)
    xenium("XEN-image-morphology-mip", None, "not the H&E", mip.name, image=mip)
    unusual["XEN-some-nan-centroids"] = (
        _entry(
            "XEN-some-nan-centroids",
            "xenium",
            "xenium",
            {
                "outs": xen_outs(
                    "some-nan",
                    _parquet(
                        cells,
                        lambda t: _set(t, "x_centroid", [np.nan, np.nan, *t.column("x_centroid").to_pylist()[2:]]),
                    ),
                ),
                "image": xen.image,
                "alignment": xen.alignment,
            },
            {},
        ),
        "NaN or infinite centre",
    )
    unusual["XEN-pseudo-some-nan"] = (
        _entry(
            "XEN-pseudo-some-nan",
            "xenium",
            "xenium",
            {
                "outs": xen_outs("pseudo-some-nan", _parquet(transcripts, _nan_first_locations)),
                "image": xen.image,
                "alignment": xen.alignment,
            },
            spots,
        ),
        "with a NaN or infinite location dropped",
    )

    # --- SpatialData -------------------------------------------------------------------------
    def sdata(
        slide_id: str,
        store: Path,
        fault: str,
        names: str,
        *,
        reader: dict[str, Any] | None = None,
        micron: bool = True,
        assay: str = "xenium",
    ) -> None:
        options = {**(SD_READER if micron else {}), **(reader or {})}
        entry = _entry(slide_id, "spatialdata", assay, {"store": store}, options)
        cases[slide_id] = SlideCase(entry, fault, names)

    sd = folder / "sdata"
    sd.mkdir()
    good_store = _store(sd / "good.zarr")
    good["GOOD-SD"] = _entry("GOOD-SD", "spatialdata", "xenium", {"store": good_store}, SD_READER)
    sdata("SD-no-table", _store(sd / "no-table.zarr", lambda p: p["tables"].clear()), "0 tables", "no-table.zarr")
    sdata("SD-two-tables", _store(sd / "two.zarr", _second_table), "reader option table", "two.zarr")
    sdata("SD-table-absent", good_store, "no table 'counts'", "table", reader={"table": "counts"})
    sdata("SD-region-absent", _store(sd / "region.zarr", _region_elsewhere), "'nuclei'", "region.zarr")
    sdata("SD-no-image", _store(sd / "no-image.zarr", lambda p: p["images"].clear()), "no image", "no-image.zarr")
    sdata("SD-image-absent", good_store, "no image 'HE'", "image", reader={"image": "HE"})
    sdata(
        "SD-coordinate-system-absent",
        good_store,
        "aligned",
        "coordinate_system",
        reader={"coordinate_system": "aligned"},
    )
    sdata(
        "SD-micron-system-absent",
        good_store,
        "no coordinate system 'um'",
        "micron_coordinate_system",
        reader={"micron_coordinate_system": "um"},
    )
    sdata("SD-layer-absent", good_store, "no layer 'counts'", "layer", reader={"layer": "counts"})
    sdata("SD-float-counts", _store(sd / "float.zarr", _float_counts), "not whole non-negative", "float.zarr")
    sdata("SD-blank-image", _store(sd / "blank.zarr", _blank_image), "blank", "blank.zarr")
    sdata("SD-other-ids", _store(sd / "ids.zarr", _other_ids), "barcode", "element 'cells'")
    sdata("SD-no-X", _store(sd / "no-x.zarr", _no_x), "has no X; name the layer", "no-x.zarr")
    fluorescence = _store(sd / "if.zarr", _fluorescence)
    sdata("SD-fluorescence-only", fluorescence, "5 channels, not an RGB or grey H&E", "if.zarr")
    sdata("SD-fluorescence-named", fluorescence, "5 channels", "reader option image", reader={"image": "he"})
    sdata(
        "SD-image-transform-singular",
        _store(sd / "singular.zarr", _singular_image),
        "transformation of image 'he' to coordinate system 'global' is not invertible",
        "singular.zarr",
    )
    sdata(
        "SD-sites-scale-zero",
        _store(sd / "flat.zarr", _flat_sites),
        "transformation of the sites to coordinate system 'global' is not invertible",
        "flat.zarr",
    )
    sdata("SD-antibodies", _store(sd / "ab.zarr", _antibodies), "no 'Gene Expression' features", "ab.zarr")
    sdata(
        "SD-in-tissue-text",
        _store(sd / "tissue.zarr", _obs(in_tissue="yes")),
        "obs column 'in_tissue' is not numeric",
        "tissue.zarr",
    )
    sdata(
        "SD-array-rows-nan",
        _store(sd / "rows.zarr", _obs(array_row=np.nan, array_col=1.0)),
        "obs column 'array_row': 24 of 24 values are missing",
        "rows.zarr",
        assay="visium",
    )
    points = _store(sd / "no-xy.zarr", _as_points)
    _points_without_xy(points)
    sdata("SD-points-no-xy", points, "has no column(s) x, y", "no-xy.zarr")
    chunks = _store(sd / "chunks.zarr")
    _table_chunks_gone(chunks)
    sdata("SD-table-chunks-gone", chunks, "holds no non-zero count", "chunks.zarr")
    sdata(
        "SD-no-mpp",
        good_store,
        "nothing in the store fixes the um/px",
        "good.zarr",
        micron=False,
    )
    sdata("SD-store-zero-bytes", _empty(sd / "empty.zarr"), "not a readable SpatialData", "empty.zarr")
    sdata("SD-store-html", _html(sd / "page.zarr"), "not a readable SpatialData", "page.zarr")
    (sd / "empty-folder.zarr").mkdir()
    sdata("SD-store-empty-folder", sd / "empty-folder.zarr", "not a readable SpatialData", "empty-folder.zarr")
    return Crafted(cases, unusual, good)


def _shuffle_pixels(table: pa.Table) -> pa.Table:
    """Each bin's pixel centre given to another bin (rows of two columns sorted apart by a script)."""
    order = np.random.default_rng(2).permutation(table.num_rows)
    for name in ("pxl_row_in_fullres", "pxl_col_in_fullres"):
        table = _set(table, name, pa.array(table.column(name).to_numpy()[order]))
    return table


def _nan_first_locations(table: pa.Table) -> pa.Table:
    x = np.asarray(table.column("x_location").to_numpy(), dtype=np.float32).copy()
    x[:5] = np.nan
    return _set(table, "x_location", pa.array(x))


def _lowres_only(image: Path) -> Callable[[Path], None]:
    """Space Ranger's lowres PNG (2% of full resolution) as the only image of the bins."""

    def apply(bins: Path) -> None:
        from PIL import Image

        with Image.open(image) as full:
            full.resize((max(1, full.width // 50), max(1, full.height // 50))).save(
                bins / "spatial" / "tissue_lowres_image.png"
            )

    return apply


def _cytassist(path: Path) -> Path:
    """A CytAssist capture image given as the H&E: another camera's frame, 400 px a side, grey."""
    from PIL import Image

    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(60, 200, size=(400, 400), dtype=np.uint8)).save(path)
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _html(path: Path) -> Path:
    path.write_bytes(HTML)
    return path


# ---------------------------------------------------------------------------------------------
# One build of them all
# ---------------------------------------------------------------------------------------------

#: Markers on white (no tissue to find) and small images whose edge sites overhang them.
TILES = TileSettings(min_tissue_fraction=0, regions=False, max_outside_fraction=1.0)


@dataclasses.dataclass(frozen=True)
class CellsBuild:
    crafted: Crafted
    out: Path
    rows: dict[str, dict[str, Any]]
    summary: BuildSummary


@pytest.fixture(scope="module")
def cells_build(tmp_path_factory: pytest.TempPathFactory) -> CellsBuild:
    pytest.importorskip("spatialdata", reason="the spatialdata extra")
    root = tmp_path_factory.mktemp("cells")
    crafted = crafted_slides(root / "bad")
    entries = [*crafted.good.values(), *(e for e, _ in crafted.unusual.values())]
    entries += [case.entry for case in crafted.cases.values()]
    path = manifest(root / "m", entries)
    out = root / "out"
    settings = BuildSettings(progress=False, holdout="none", unit=UnitSettings(tiles=TILES))
    with contextlib.redirect_stdout(io.StringIO()):
        summary = build([path], out=out, settings=settings)
    rows = {r["slide_id"]: r for r in pq.read_table(out / schema.SLIDES_FILE).to_pylist()}
    return CellsBuild(crafted, out, rows, summary)


def test_the_crafted_inputs_are_many(cells_build: CellsBuild) -> None:
    by_reader = {
        prefix: sum(s.startswith(prefix) for s in cells_build.crafted.cases) for prefix in ("HD-", "XEN-", "SD-")
    }
    assert min(by_reader.values()) >= 15 and sum(by_reader.values()) >= 60, by_reader


def test_the_good_and_the_unusual_slides_are_built(cells_build: CellsBuild) -> None:
    problems = []
    for slide_id in [*cells_build.crafted.good, *cells_build.crafted.unusual]:
        row = cells_build.rows[slide_id]
        if row["status"] != "built" or row["n_spots_written"] == 0:
            problems.append(f"{slide_id}: {row['status']}: {row['reason']}")
    assert problems == []


def test_the_unusual_slides_say_their_oddity(cells_build: CellsBuild) -> None:
    from stcorpus.curate.build.workdir import UnitResult

    for slide_id, (_, says) in cells_build.crafted.unusual.items():
        unit = UnitResult.from_json((cells_build.out / ".work" / "units" / slide_id / "result.json").read_text())
        notes = " | ".join(unit.slide["notes"])
        assert says in notes, (slide_id, notes)
    rows = cells_build.rows
    assert dict(rows["XEN-some-nan-centroids"]["spots_rejected"]) == {"nan_coordinates": 2}
    # a scale factor that is no um/px is not used: the um/px is fitted from the bins, and the record says so
    assert {rows[s]["mpp_source"] for s in ("HD-mpp-missing", "HD-mpp-zero", "HD-mpp-negative")} == {"lattice"}
    assert all(abs(rows[s]["mpp"] - 0.5) < 1e-3 for s in ("HD-mpp-missing", "HD-mpp-zero", "HD-mpp-negative"))


def test_every_crafted_slide_is_refused_cleanly_and_visibly(cells_build: CellsBuild) -> None:
    """Each bad slide: not built, a deliberate reason code, its reason naming the fault and the file or
    option, in slides.parquet, the summary and the QC report; every problem listed at once."""
    build = cells_build
    assert refusal_problems(build.crafted.cases, build.rows, build.out, build.summary) == []


#: Reader options of the wrong type are the manifest's fault: `curate validate` (and the build's plan) names them.
OPTION_CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "hd-pitch-text": ("visium-hd", {"grid": "square", "pitch_um": "32um"}, "reader.pitch_um"),
    "hd-bin-float": ("visium-hd", {"bin_um": 8.5}, "reader.bin_um"),
    "hd-pitch-negative": ("visium-hd", {"pitch_um": -100.0}, "reader.pitch_um must be a positive number"),
    "hd-misspelt": ("visium-hd", {"bin_size": 8}, "bin_um"),
    "xen-min-qv-text": ("xenium", {"min_qv": "Q20"}, "reader.min_qv"),
    "xen-k-float": ("xenium", {"neighbour_k": 6.5}, "reader.neighbour_k"),
    "xen-k-zero": ("xenium", {"neighbour_k": 0}, "reader.neighbour_k must be a positive whole number"),
    "xen-min-qv-nan": ("xenium", {"min_qv": float("nan")}, "reader.min_qv must be a number"),
    "xen-misspelt": ("xenium", {"sample": "cells"}, "samples"),
    "sd-diameter-zero": ("spatialdata", {"spot_diameter_um": 0}, "reader.spot_diameter_um must be a positive"),
    "sd-table-number": ("spatialdata", {"table": 2}, "reader.table"),
    # values of the right type outside the few a reader takes: refused before any slide is read
    "hd-bin-um-4": ("visium-hd", {"bin_um": 4}, "reader.bin_um=4 is not one of 2, 8, 16"),
    "hd-grid-unknown": ("visium-hd", {"grid": "hexagon"}, "reader.grid='hexagon' is not one of 'hex', 'square'"),
    "xen-samples-misspelt": ("xenium", {"samples": "pseudo_spots"}, "reader.samples='pseudo_spots' is not one of"),
    "xen-grid-unknown": ("xenium", {"samples": "pseudo-spots", "grid": "hexagonal"}, "reader.grid='hexagonal'"),
    "sr-matrix-unknown": ("spaceranger", {"matrix": "filtred"}, "reader.matrix='filtred' is not one of 'filtered'"),
}


@pytest.mark.parametrize("name", sorted(OPTION_CASES))
def test_a_reader_option_of_the_wrong_type_or_value_is_named_by_validate(tmp_path: Path, name: str) -> None:
    technology, reader, says = OPTION_CASES[name]
    sources = {
        "visium-hd": {"outs": tmp_path},
        "xenium": {"outs": tmp_path, "image": tmp_path / "he.png"},
        "spaceranger": {"outs": tmp_path},
    }
    assay = {"spatialdata": "xenium", "spaceranger": "visium"}.get(technology, technology)
    entry = _entry("OPT-1", technology, assay, sources.get(technology, {"store": tmp_path}), reader)
    (sample,) = load_manifest(manifest(tmp_path, [entry]), allow_local=True).samples
    problems = check_sample(sample)
    assert any(says in p and "OPT-1" in p for p in problems), problems


def test_the_registry_offers_the_values_the_readers_take() -> None:
    from stcorpus.curate.readers import READERS, visium_hd, xenium

    assert READERS["visium-hd"].choices["bin_um"] == visium_hd.BIN_SIZES_UM
    assert READERS["xenium"].choices["samples"] == xenium.SAMPLE_KINDS


def test_outs_may_be_the_bin_folder_itself(tmp_path: Path) -> None:
    from stcorpus.curate.readers import read_slide
    from tests.test_readers_support import files_of, make_sample

    hd = write_visium_hd(tmp_path, markers_um=(np.array([50.0]), np.array([50.0])))
    sources = {"outs": hd.outs / "binned_outputs" / BIN, "image": hd.image}
    sample = make_sample(sources, technology="visium-hd", assay="visium-hd")
    slide = read_slide(sample, files_of(sample))
    assert slide.mpp == hd.mpp and len(slide.spots.barcode) > 0
    slide.image.close()


def test_a_min_qv_of_zero_is_a_valid_threshold_not_a_size(tmp_path: Path) -> None:
    """min_qv 0 keeps every transcript; only the options in um must be positive."""
    entry = _entry("OPT-2", "xenium", "xenium", {"outs": tmp_path, "image": tmp_path / "he.png"}, {"min_qv": 0})
    (sample,) = load_manifest(manifest(tmp_path, [entry]), allow_local=True).samples
    assert check_sample(sample) == []
