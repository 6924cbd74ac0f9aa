"""Crafted bad inputs on every input surface (issue 14): 0 crashes, 0 silent results.

Each case is one bad input. A refusal must be a deliberate one (a ``CurateError``/loader error or a
clean CLI exit, never a traceback or a raw Python exception) that names the file or flag, the fault,
and what to do. A bad slide is ``quarantined`` or ``failed`` with its reason in slides.parquet, the
summary and qc/index.html, and the other slides are built.

Surfaces: slides of one build (Space Ranger h5/MTX/positions/scale factors, HEST h5ad, legacy ST,
images), built together beside good slides once (``crafted_build``); manifests (``curate validate``
and ``curate plan``); ``curate build`` flags; fetching from a server on 127.0.0.1; the loader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stcorpus import schema
from stcorpus.curate.build.pipeline import EXIT_SLIDES_FAILED, BuildSettings, BuildSummary, build
from stcorpus.curate.cli import main
from stcorpus.curate.errors import FetchError
from stcorpus.curate.fetch import Fetcher
from stcorpus.curate.imaging import open_image
from stcorpus.errors import StcorpusError
from stcorpus.loaders import CorpusDataset, CorpusLoader, LoaderSettings
from tests.build_fixtures import H5AD, IMAGE, MPP, good_slides, hest_entry, manifest, spaceranger_entry, variant_h5ad
from tests.conftest import HEART, MOUSE_BRAIN
from tests.corpus_fixture import FixtureCorpus, write_corpus
from tests.httpserver import Fault, LocalServer, serve
from tests.test_build_trust import report_tables
from tests.test_fetch_http import make_sample, put, settings
from tests.test_readers_stimage import SLIDE as STIMAGE_SLIDE
from tests.test_readers_stimage import _visium_from_mouse_brain

HEART_H5 = HEART / "filtered_feature_bc_matrix.h5"
HER2ST = Path(__file__).parent / "data" / "her2st-legacy-st" / "data"
ST_COUNTS = HER2ST / "ST-cnts" / "B4.tsv.gz"
ST_SPOTS = HER2ST / "ST-spotfiles" / "B4_selection.tsv"
ST_IMAGE = HER2ST / "ST-imgs" / "B" / "B4" / "BT10737_D2_HE.jpg"


# ---------------------------------------------------------------------------------------------
# Crafting: each function writes one bad file (or folder) under `folder` and returns its path
# ---------------------------------------------------------------------------------------------


def _h5(folder: Path, name: str, edit: Callable[[h5py.File], object]) -> Path:
    path = folder / f"{name}.h5"
    shutil.copyfile(HEART_H5, path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def _replace(f: h5py.File, key: str, value: Any) -> None:
    del f[key]
    f[key] = value


def _data(f: h5py.File) -> np.ndarray:
    return np.asarray(f["matrix/data"][()])


def _spatial(folder: Path, name: str, edit: Callable[[Path], object]) -> Path:
    spatial = folder / f"spatial-{name}"
    shutil.copytree(HEART / "spatial", spatial)
    edit(spatial)
    return spatial


POSITIONS = "tissue_positions_list.csv"
SCALEFACTORS = "scalefactors_json.json"


def _positions(edit: Callable[[list[list[str]]], list[list[str]]]) -> Callable[[Path], None]:
    def apply(spatial: Path) -> None:
        rows = [line.split(",") for line in (spatial / POSITIONS).read_text().splitlines()]
        (spatial / POSITIONS).write_text("\n".join(",".join(r) for r in edit(rows)) + "\n")

    return apply


PARQUET_POSITIONS = "tissue_positions.parquet"


def _parquet_positions(**column: Any) -> Callable[[Path], None]:
    """The positions as Space Ranger 3's Parquet file (the CSV removed), one column set to a single value."""

    def apply(spatial: Path) -> None:
        rows = [line.split(",") for line in (spatial / POSITIONS).read_text().splitlines()]
        names = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
        table: dict[str, list[Any]] = {name: [r[i] for r in rows] for i, name in enumerate(names)}
        for name in names[1:]:
            table[name] = [float(v) for v in table[name]]
        for name, value in column.items():
            table[name] = [value] * len(rows)
        pq.write_table(pa.table(table), spatial / PARQUET_POSITIONS)
        (spatial / POSITIONS).unlink()

    return apply


def _scalefactors(**values: Any) -> Callable[[Path], None]:
    def apply(spatial: Path) -> None:
        data = json.loads((spatial / SCALEFACTORS).read_text())
        data.update(values)
        (spatial / SCALEFACTORS).write_text(json.dumps(data))

    return apply


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / name).write_bytes(data)

    return apply


def _outs(folder: Path, name: str, edit: Callable[[Path], object]) -> Path:
    """The real mouse-brain outs/ with its MTX matrix only, the MTX folder edited."""
    outs = folder / f"outs-{name}"
    shutil.copytree(MOUSE_BRAIN / "outs", outs)
    (outs / "raw_feature_bc_matrix.h5").unlink()
    edit(outs / "raw_feature_bc_matrix")
    return outs


def _gzip_cut(name: str) -> Callable[[Path], None]:
    def apply(mtx: Path) -> None:
        packed = gzip.compress((mtx / name).read_bytes())
        (mtx / name).unlink()
        (mtx / f"{name}.gz").write_bytes(packed[: len(packed) // 2])

    return apply


def _text(name: str, edit: Callable[[str], str]) -> Callable[[Path], None]:
    def apply(mtx: Path) -> None:
        (mtx / name).write_text(edit((mtx / name).read_text()))

    return apply


def _h5ad(folder: Path, name: str, edit: Callable[[Any], Any]) -> Path:
    import anndata

    adata = anndata.read_h5ad(H5AD)
    changed = edit(adata)  # an edit returns a new AnnData (a slice) or edits in place
    path = folder / f"{name}.h5ad"
    (changed if isinstance(changed, anndata.AnnData) else adata).write_h5ad(path)
    return path


def _set_obsm_text(adata: Any) -> None:
    import pandas as pd  # type: ignore[import-untyped]

    adata.obsm["spatial"] = pd.DataFrame({"x": ["a"] * adata.n_obs, "y": ["b"] * adata.n_obs}, index=adata.obs_names)


def _text_pixels(adata: Any) -> None:
    del adata.obsm["spatial"]
    adata.obs = adata.obs.assign(pxl_col_in_fullres="x", pxl_row_in_fullres="y")


def _nan_array_rows(adata: Any) -> None:
    adata.obs = adata.obs.assign(array_row=np.nan, array_col=1.0)


def _derived_arrays(adata: Any) -> None:
    """The array coordinates HEST would carry, derived from the pixel lattice at the true um/px."""
    from stcorpus.curate.geometry import derive_array_coords

    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    derived = derive_array_coords(xy[:, 0], xy[:, 1], lattice="hex", pitch_px=100.0 / MPP)
    adata.obs = adata.obs.assign(array_row=derived.row, array_col=derived.col)


def _with_dropped_spots(adata: Any) -> None:
    """Two spots with NaN centres and one obs name listed twice: built, with three spots counted as dropped."""
    xy = np.array(adata.obsm["spatial"], dtype=np.float64)
    xy[[5, 9]] = np.nan
    adata.obsm["spatial"] = xy
    names = list(adata.obs_names)
    names[2] = names[1]
    adata.obs_names = names


def _float16_counts(adata: Any) -> None:
    adata.X = (adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)).astype(np.float16)


def _nan_counts(adata: Any) -> None:
    dense = adata.X.toarray() if hasattr(adata.X, "toarray") else np.array(adata.X)
    dense[::3, ::5] = np.nan
    adata.X = dense


def _cut(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def _tiff_claiming(path: Path, side: int) -> Path:
    """A 16 x 16 px one-strip uncompressed TIFF whose width and length tags say ``side`` px."""
    import struct

    Image.new("RGB", (16, 16)).save(path, compression=None)
    data = bytearray(path.read_bytes())
    ifd = struct.unpack("<I", data[4:8])[0]
    for entry in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        at = ifd + 2 + 12 * entry
        tag, kind = struct.unpack("<HH", data[at : at + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength
            data[at + 8 : at + 12] = struct.pack("<HH", side, 0) if kind == 3 else struct.pack("<I", side)
    path.write_bytes(bytes(data))
    return path


def bomb_png(path: Path, side: int = 60_000) -> Path:
    """A valid PNG header declaring side x side RGB pixels, with almost no data (under 1 KB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 10_000, 9)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def _st_entry(slide_id: str, *, counts: Path = ST_COUNTS, spots: Path = ST_SPOTS, image: Path = ST_IMAGE) -> str:
    return (
        f"- {{id: {slide_id}, technology: st, species: human, organ: breast, source: her2st, "
        f"sources: {{counts: '{counts}', spots: '{spots}', image: '{image}'}}}}"
    )


def _outs_entry(slide_id: str, outs: Path) -> str:
    return f"- {{id: {slide_id}, technology: spaceranger, reader: {{matrix: raw}}, sources: {{outs: '{outs}'}}}}"


@dataclasses.dataclass(frozen=True)
class SlideCase:
    """A crafted slide: its manifest entry, a fragment its reason must hold, and the file it must name."""

    entry: str
    fault: str
    names: str  # the file (or folder) name the reason must name; "" for checks about the slide as a whole


def crafted_slides(folder: Path) -> dict[str, SlideCase]:
    """Every crafted bad slide of the shared build, by slide id."""
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    spatial = HEART / "spatial"
    cases: dict[str, SlideCase] = {}

    def h5(slide_id: str, name: str, edit: Callable[[h5py.File], object], fault: str, *, extra: str = "") -> None:
        path = _h5(folder, name, edit)
        cases[slide_id] = SlideCase(spaceranger_entry(slide_id, matrix=path, spatial=spatial) + extra, fault, path.name)

    # --- 10x h5 ---------------------------------------------------------------------------
    h5("H5-data-short", "data-short", lambda f: _replace(f, "matrix/data", _data(f)[:-5]), "values but /matrix/indices")
    h5("H5-no-barcodes", "no-barcodes", lambda f: f.__delitem__("matrix/barcodes"), "barcodes is missing")
    h5("H5-no-feature-ids", "no-ids", lambda f: f.__delitem__("matrix/features/id"), "features/id is missing")
    h5("H5-no-indptr", "no-indptr", lambda f: f.__delitem__("matrix/indptr"), "lacks or cannot read")
    h5("H5-text-counts", "text-data", lambda f: _replace(f, "matrix/data", np.array([b"x"] * len(_data(f)))), "numbers")
    h5(
        "H5-indptr-reversed",
        "indptr",
        lambda f: _replace(f, "matrix/indptr", f["matrix/indptr"][()][::-1].copy()),
        "not the column pointer",
    )
    h5("H5-shape-3d", "shape3", lambda f: _replace(f, "matrix/shape", np.array([1, 2, 3])), "[features, barcodes]")
    h5("H5-shape-text", "shape-text", lambda f: _replace(f, "matrix/shape", np.array([b"a", b"b"])), "1-d integers")
    h5("H5-shape-small", "shape-small", lambda f: _replace(f, "matrix/shape", np.array([5, 3])), "column pointer")
    h5(
        "H5-negative-index",
        "neg-index",
        lambda f: _replace(f, "matrix/indices", -np.ones(len(_data(f)), dtype=np.int64)),
        "feature numbers outside",
    )
    h5(
        "H5-float-index",
        "float-index",
        lambda f: _replace(f, "matrix/indices", f["matrix/indices"][()] + 0.5),
        "expected 1-d integers",
    )
    h5(
        "H5-few-barcodes",
        "few-barcodes",
        lambda f: _replace(f, "matrix/barcodes", f["matrix/barcodes"][()][:-3]),
        "does not match 97 barcodes",
    )
    h5(
        "H5-latin1-names",
        "latin1",
        lambda f: _replace(f, "matrix/features/name", np.array([b"\xe9t\xe9"] * len(f["matrix/features/name"]))),
        "UnicodeDecodeError",
    )
    h5(
        "H5-matrix-dataset",
        "dataset",
        lambda f: (f.__delitem__("matrix"), f.create_dataset("matrix", data=[1])),
        "not the 10x matrix group",
    )
    h5(
        "H5-antibodies-only",
        "antibodies",
        lambda f: _replace(f, "matrix/features/feature_type", np.array([b"Antibody Capture"] * 100)),
        "no 'Gene Expression' features",
    )
    h5(
        "H5-negative-counts",
        "negative",
        lambda f: _replace(f, "matrix/data", -_data(f).astype(np.int32)),
        "negative values",
    )
    h5(
        "H5-nan-counts",
        "nan",
        lambda f: _replace(f, "matrix/data", np.where(np.arange(len(_data(f))) % 3, _data(f), np.nan)),
        "not whole non-negative",
    )
    h5(
        "H5-nan-normalized",
        "nan-norm",
        lambda f: _replace(f, "matrix/data", np.where(np.arange(len(_data(f))) % 3, _data(f), np.nan)),
        "NaN or infinite",
        extra="\n  counts: normalized",
    )
    h5("H5-inf-counts", "inf", lambda f: _replace(f, "matrix/data", np.full(len(_data(f)), np.inf)), "e.g. inf")
    h5("H5-all-zero", "zero", lambda f: _replace(f, "matrix/data", np.zeros(len(_data(f)), np.int32)), "zero counts")
    cases["H5-all-zero"] = dataclasses.replace(cases["H5-all-zero"], names="")  # the slide's check, not one file's
    for slide_id, name, data, fault in (
        ("H5-zero-bytes", "empty.h5", b"", "not a readable HDF5 file"),
        ("H5-html", "listing.h5", b"<!DOCTYPE html><html><title>Index of /</title></html>", "not a readable HDF5"),
    ):
        (folder / name).write_bytes(data)
        cases[slide_id] = SlideCase(spaceranger_entry(slide_id, matrix=folder / name, spatial=spatial), fault, name)
    cut = _cut(HEART_H5, folder / "half.h5")
    cases["H5-truncated"] = SlideCase(spaceranger_entry("H5-truncated", matrix=cut, spatial=spatial), "HDF5", cut.name)

    # --- positions and scale factors --------------------------------------------------------
    def sr(slide_id: str, name: str, edit: Callable[[Path], object], fault: str, names: str) -> None:
        folder_ = _spatial(folder, name, edit)
        cases[slide_id] = SlideCase(spaceranger_entry(slide_id, matrix=HEART_H5, spatial=folder_), fault, names)

    cases["SR-spatial-one-file"] = SlideCase(
        spaceranger_entry("SR-spatial-one-file", matrix=HEART_H5, spatial=spatial / POSITIONS),
        "must be the whole spatial folder",
        POSITIONS,
    )
    sr("POS-four-columns", "four", _positions(lambda rows: [r[:4] for r in rows]), "malformed positions row", POSITIONS)
    sr(
        "POS-header-short",
        "header",
        _positions(lambda rows: [["barcode", "in_tissue", "array_row", "array_col"], *rows]),
        "lacks column(s) pxl_row_in_fullres",
        POSITIONS,
    )
    sr("POS-all-nan", "allnan", _positions(lambda rows: [[*r[:4], "", ""] for r in rows]), "NaN or infinite", POSITIONS)
    sr(
        "POS-inf",
        "inf",
        _positions(lambda rows: [[*r[:4], "inf", "1e400"] for r in rows]),
        "NaN or infinite",
        POSITIONS,
    )
    sr("POS-text-flag", "text", _positions(lambda rows: [[r[0], "yes", *r[2:]] for r in rows]), "'yes'", POSITIONS)
    sr("POS-empty", "empty", _write(POSITIONS, b""), "empty positions file", POSITIONS)
    sr(
        "POS-latin1",
        "latin1",
        lambda s: (s / POSITIONS).write_bytes(b"\xff\xfe" + (s / POSITIONS).read_bytes()),
        "cannot be read as UTF-8",
        POSITIONS,
    )
    sr(
        "POS-nan-array",
        "nanarray",
        _positions(lambda rows: [[*r[:2], "nan", "nan", *r[4:]] for r in rows]),
        "malformed positions row",
        POSITIONS,
    )
    sr(
        "POS-huge-array",
        "huge",
        _positions(lambda rows: [[*r[:2], "1e12", "1e12", *r[4:]] for r in rows]),
        "out of bounds",
        POSITIONS,
    )
    sr(
        "POS-other-barcodes",
        "other",
        _positions(lambda rows: [["X" + r[0], *r[1:]] for r in rows]),
        "none of the 100 matrix barcodes",
        POSITIONS,
    )
    sr("POS-missing-file", "nofile", lambda s: (s / POSITIONS).unlink(), "no positions file", "spatial-nofile")
    sr("POS-parquet-null-flags", "pq", _parquet_positions(in_tissue=None), "column 'in_tissue'", PARQUET_POSITIONS)
    sr(
        "POS-parquet-text-rows",
        "pqtext",
        _parquet_positions(array_row="x"),
        "column 'array_row' is not numeric",
        PARQUET_POSITIONS,
    )
    sr("SF-list", "list", _write(SCALEFACTORS, b"[1, 2]"), "expected a JSON object", SCALEFACTORS)
    sr("SF-garbage", "garbage", _write(SCALEFACTORS, b"{not json"), "not readable JSON", SCALEFACTORS)
    sr("SF-latin1", "latin1sf", _write(SCALEFACTORS, b'{"a": "\xff"}'), "not readable JSON", SCALEFACTORS)
    sr("SF-empty", "emptysf", _write(SCALEFACTORS, b""), "not readable JSON", SCALEFACTORS)
    sr("SF-missing", "nosf", lambda s: (s / SCALEFACTORS).unlink(), "holds no scalefactors_json.json", "spatial-nosf")
    sr(
        "SF-zero-lowres",
        "zerosf",
        _scalefactors(tissue_lowres_scalef=0),
        "tissue_lowres_scalef=0 in scalefactors_json.json is not a positive number",
        "tissue_lowres_image.png",
    )
    sr(
        "SF-no-images",
        "noimg",
        _scalefactors(tissue_hires_scalef=float("nan"), tissue_lowres_scalef=None),
        "no usable image",
        "tissue_lowres_image.png",
    )

    # --- MTX (an outs/ folder) ----------------------------------------------------------------
    def mtx(slide_id: str, name: str, edit: Callable[[Path], object], fault: str, names: str) -> None:
        cases[slide_id] = SlideCase(_outs_entry(slide_id, _outs(folder, name, edit)), fault, names)

    mtx("MTX-no-banner", "banner", _text("matrix.mtx", lambda s: "garbage\n" + s), "Matrix Market", "matrix.mtx")
    mtx(
        "MTX-cut-entries",
        "entries",
        _text("matrix.mtx", lambda s: "\n".join(s.splitlines()[:-10]) + "\n"),
        "Matrix Market",
        "matrix.mtx",
    )
    mtx("MTX-extra-entry", "extra", _text("matrix.mtx", lambda s: s + "99999 1 5\n"), "Matrix Market", "matrix.mtx")
    mtx("MTX-features-gz-cut", "fgz", _gzip_cut("features.tsv"), "gzipped UTF-8", "features.tsv.gz")
    mtx("MTX-barcodes-gz-cut", "bgz", _gzip_cut("barcodes.tsv"), "gzipped UTF-8", "barcodes.tsv.gz")
    mtx("MTX-matrix-gz-cut", "mgz", _gzip_cut("matrix.mtx"), "Matrix Market", "matrix.mtx.gz")
    mtx(
        "MTX-features-latin1",
        "flatin1",
        lambda m: (m / "features.tsv").write_bytes((m / "features.tsv").read_bytes().replace(b"\t", b"\xe9\t", 1)),
        "UTF-8",
        "features.tsv",
    )
    mtx(
        "MTX-features-short",
        "fshort",
        _text("features.tsv", lambda s: "\n".join(s.splitlines()[:-3]) + "\n"),
        "features.tsv lists 47",
        "matrix.mtx",
    )
    mtx(
        "MTX-features-not-gzip",
        "fnotgz",
        lambda m: (m / "features.tsv").rename(m / "features.tsv.gz"),
        "BadGzipFile",
        "features.tsv.gz",
    )
    mtx("MTX-barcodes-empty", "bempty", _text("barcodes.tsv", lambda s: ""), "barcodes.tsv 0", "matrix.mtx")
    mtx(
        "MTX-no-matrix", "nomatrix", lambda m: (m / "matrix.mtx").unlink(), "no feature-barcode matrix", "outs-nomatrix"
    )

    # --- HEST h5ad ----------------------------------------------------------------------------
    def hest(
        slide_id: str, edit: Callable[[Any], Any], fault: str, *, counts: str = "normalized", slide: bool = False
    ) -> None:
        path = _h5ad(folder, slide_id.lower(), edit)
        # `slide`: a check of the slide as a whole (no spot left), which names no one file
        cases[slide_id] = SlideCase(hest_entry(slide_id, st=path, counts=counts), fault, "" if slide else path.name)

    hest("HEST-no-obsm", lambda a: a.obsm.pop("spatial"), "no spot coordinates")
    hest(
        "HEST-obsm-1col",
        lambda a: a.obsm.__setitem__("spatial", np.asarray(a.obsm["spatial"])[:, :1]),
        "expected (spots, 2)",
    )
    hest("HEST-obsm-3d", lambda a: a.obsm.__setitem__("spatial", np.zeros((a.n_obs, 2, 2))), "expected (spots, 2)")
    hest("HEST-obsm-text", _set_obsm_text, "is not numeric")
    hest("HEST-obsm-nan", lambda a: a.obsm.__setitem__("spatial", np.full((a.n_obs, 2), np.nan)), "NaN or infinite")
    hest("HEST-no-spots", lambda a: a[:0].copy(), "no rows", slide=True)
    hest("HEST-all-zero", lambda a: setattr(a, "X", a.X * 0), "zero counts", slide=True)
    hest("HEST-array-nan", _nan_array_rows, "obs array_row")
    hest("HEST-tissue-text", lambda a: setattr(a, "obs", a.obs.assign(in_tissue="yes")), "obs in_tissue is not numeric")
    hest("HEST-tissue-nan", lambda a: setattr(a, "obs", a.obs.assign(in_tissue=np.nan)), "obs in_tissue")
    hest(
        "HEST-pixels-text",
        _text_pixels,
        "are not numeric",
    )
    hest("HEST-nan-counts", _nan_counts, "NaN or infinite")
    hest("HEST-no-genes", lambda a: a[:, :0].copy(), "no feature (gene) columns")
    hest("HEST-no-X", lambda a: setattr(a, "X", None), "X is empty")
    hest("HEST-float16-counts", _float16_counts, "not whole non-negative", counts="raw")
    hest("HEST-no-tissue", lambda a: setattr(a, "obs", a.obs.assign(in_tissue=0)), "flagged in tissue", slide=True)
    hest("HEST-negative-raw", lambda a: setattr(a, "X", -a.X), "not whole non-negative", counts="raw")
    # A wrong manifest um/px: spots with no array coordinates cannot lie on the lattice it implies;
    # with array coordinates, nearly every tile falls outside the image and the refusal says why.
    cases["MPP-manifest-wrong"] = SlideCase(
        hest_entry("MPP-manifest-wrong", mpp=MPP / 5), "that um/px is wrong", "sample's `mpp`"
    )
    cases["MPP-tiles-outside"] = SlideCase(
        hest_entry("MPP-tiles-outside", st=_h5ad(folder, "arrays", _derived_arrays), mpp=MPP / 20),
        "a wrong um/px does that",
        "sample's `mpp`",
    )
    cut_h5ad = _cut(H5AD, folder / "half.h5ad")
    cases["HEST-truncated"] = SlideCase(hest_entry("HEST-truncated", st=cut_h5ad), "not a readable h5ad", cut_h5ad.name)
    (folder / "meta.json").write_text("{bad")
    cases["HEST-bad-metadata"] = SlideCase(
        hest_entry("HEST-bad-metadata").replace("sources: {", f"sources: {{metadata: '{folder / 'meta.json'}', "),
        "not readable JSON",
        "meta.json",
    )

    # --- images (as HEST whole-slide images) ------------------------------------------------
    def image(slide_id: str, path: Path, fault: str) -> None:
        cases[slide_id] = SlideCase(hest_entry(slide_id, wsi=path), fault, path.name)

    pixels = np.asarray(Image.open(IMAGE))
    Image.open(IMAGE).save(folder / "whole.png")
    image("IMG-png-cut", _cut(folder / "whole.png", folder / "cut.png"), "cannot be decoded")
    image("IMG-jpeg-cut", _cut(IMAGE, folder / "cut.jpg"), "cannot be decoded")
    tifffile.imwrite(folder / "tiled.tif", pixels, tile=(256, 256))
    image("IMG-tiled-tiff-cut", _cut(folder / "tiled.tif", folder / "cut-tiled.tif"), "cannot be decoded")
    tifffile.imwrite(folder / "flat.tif", pixels)
    image("IMG-flat-tiff-cut", _cut(folder / "flat.tif", folder / "cut-flat.tif"), "truncated image data")
    for name, data in (("zero.png", b""), ("zero.tif", b""), ("page.jpg", b"<html><body>login</body></html>")):
        (folder / name).write_bytes(data)
        image(f"IMG-{name.replace('.', '-')}", folder / name, "not a readable")
    image("IMG-bomb", bomb_png(folder / "bomb.png"), "--max-image-pixels")
    image("IMG-tiff-size-tags-lie", _tiff_claiming(folder / "claims.tif", 60_000), "its strip table lists 1")
    tifffile.imwrite(folder / "float.tif", pixels.astype(np.float32))
    image("IMG-float-tiff", folder / "float.tif", "unsupported image sample type float32")
    tifffile.imwrite(folder / "stack.tif", np.zeros((3, 64, 64, 3), np.uint8))
    image("IMG-tiff-stack", folder / "stack.tif", "not a 2-D RGB/grey image")
    (folder / "slide.bmp").write_bytes(b"BM")
    image("IMG-bmp", folder / "slide.bmp", "unsupported image type")
    Image.new("RGB", (1, 1), (200, 100, 150)).save(folder / "one.png")
    image("IMG-one-pixel", folder / "one.png", "single colour")
    image("IMG-missing", folder / "not-there.png", "does not exist")

    # --- STimage-1K4M ---------------------------------------------------------------------------
    stimage_files, _ = _visium_from_mouse_brain(folder / "stimage")

    def stimage(slide_id: str, which: str, edit: Callable[[bytes], bytes], fault: str) -> None:
        files = dict(stimage_files)
        files[which] = folder / f"{slide_id}-{stimage_files[which].name}"
        files[which].write_bytes(edit(stimage_files[which].read_bytes()))
        sources = ", ".join(f"{name}: '{path}'" for name, path in files.items())
        entry = f"- {{id: {slide_id}, technology: stimage, source_id: {STIMAGE_SLIDE}, sources: {{{sources}}}}}"
        cases[slide_id] = SlideCase(entry, fault, files[which].name)

    def radius(value: bytes) -> Callable[[bytes], bytes]:
        return lambda data: b"\n".join(
            [
                data.split(b"\n")[0],
                *(row.rsplit(b",", 1)[0] + b"," + value if row else row for row in data.split(b"\n")[1:]),
            ]
        )

    stimage("STI-counts-text", "counts", lambda d: d.replace(b",0", b",x", 1), "malformed counts CSV")
    stimage("STI-counts-latin1", "counts", lambda d: d.replace(b",", b"\xe9,", 3), "cannot read the header line")
    stimage("STI-counts-empty", "counts", lambda d: b"", "the file is empty")
    stimage("STI-counts-ragged", "counts", lambda d: d + b"extra,1\n", "malformed counts CSV")
    stimage("STI-coords-no-r", "coords", lambda d: d.replace(b",r\n", b",q\n", 1), "lacks r")
    stimage("STI-coords-r-zero", "coords", radius(b"0"), "spot radius r is 0.0")
    stimage("STI-coords-r-nan", "coords", radius(b"nan"), "spot radius r is nan")
    stimage("STI-coords-r-text", "coords", radius(b"big"), "malformed row")
    stimage("STI-coords-latin1", "coords", lambda d: b"\xff" + d, "cannot read")

    # --- legacy ST ----------------------------------------------------------------------------
    def st(slide_id: str, fault: str, **paths: Path) -> None:
        cases[slide_id] = SlideCase(_st_entry(slide_id, **paths), fault, next(iter(paths.values())).name)

    st("ST-counts-gz-cut", "malformed counts", counts=_cut(ST_COUNTS, folder / "cut.tsv.gz"))
    (folder / "garbage.tsv.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 10)  # a gzip magic, then no gzip
    st("ST-counts-gz-garbage", "cannot read the header line", counts=folder / "garbage.tsv.gz")
    text_counts = folder / "text-counts.tsv"
    lines = gzip.decompress(ST_COUNTS.read_bytes()).decode().splitlines()
    text_counts.write_text("\n".join([lines[0], *(line.replace("\t0", "\tmany", 1) for line in lines[1:]), ""]))
    st("ST-counts-text", "malformed counts", counts=text_counts)
    (folder / "empty.tsv").write_text("")
    st("ST-counts-empty", "empty", counts=folder / "empty.tsv")
    spots = ST_SPOTS.read_text().splitlines()
    (folder / "spots-no-pixels.tsv").write_text("x\ty\tselected\n1\t2\t1\n")
    st("ST-spots-columns", "lacks", spots=folder / "spots-no-pixels.tsv")
    (folder / "spots-latin1.tsv").write_bytes(ST_SPOTS.read_bytes().replace(b"\t", b"\xe9\t", 1))
    st("ST-spots-latin1", "cannot read the spot file", spots=folder / "spots-latin1.tsv")
    (folder / "spots-text.tsv").write_text(
        "\n".join([spots[0], *(s.replace("\t", "\tq", 1) for s in spots[1:])]) + "\n"
    )
    st("ST-spots-text", "not numeric", spots=folder / "spots-text.tsv")
    column = spots[0].split("\t").index("selected")
    unselected = [
        spots[0],
        *("\t".join([*s.split("\t")[:column], "0", *s.split("\t")[column + 1 :]]) for s in spots[1:]),
    ]
    (folder / "spots-none-selected.tsv").write_text("\n".join(unselected) + "\n")
    cases["ST-spots-none-selected"] = SlideCase(
        _st_entry("ST-spots-none-selected", spots=folder / "spots-none-selected.tsv"), "`selected` column", ""
    )
    return cases


def unusual_slides(folder: Path) -> dict[str, str]:
    """Unusual but valid inputs that must be built, not refused: a CMYK JPEG of the real H&E, and an h5ad
    with spots to drop (each slide with a distinct spot subset). (A grey image is read right, see
    below, but its tissue is rightly not found by colour.)"""
    Image.open(IMAGE).convert("CMYK").save(folder / "cmyk.jpg")
    entries = {
        "ODD-cmyk": hest_entry(
            "ODD-cmyk", st=variant_h5ad(folder, "cmyk", drop=3), wsi=folder / "cmyk.jpg", patient="Q1"
        )
    }
    import anndata

    adata = anndata.read_h5ad(variant_h5ad(folder, "drops", drop=6))
    _with_dropped_spots(adata)
    adata.write_h5ad(folder / "drops.h5ad")
    entries["ODD-drops"] = hest_entry("ODD-drops", st=folder / "drops.h5ad", patient="Q9")
    adata = anndata.read_h5ad(variant_h5ad(folder, "duplicates", drop=5))
    names = list(adata.var_names)
    st18 = names.index("St18")  # an approved MGI symbol: one gene listed twice is summed, and said
    adata.var_names = [*names[:st18], "St18", "St18", *names[st18 + 2 :]]
    ids = adata.var["gene_ids"].astype(str).tolist()
    adata.var["gene_ids"] = [*ids[: st18 + 1], ids[st18], *ids[st18 + 2 :]]
    adata.write_h5ad(folder / "duplicates.h5ad")
    entries["ODD-duplicate-gene"] = hest_entry("ODD-duplicate-gene", st=folder / "duplicates.h5ad", patient="Q8")
    return entries


@dataclasses.dataclass(frozen=True)
class CraftedBuild:
    cases: dict[str, SlideCase]
    unusual: list[str]
    out: Path
    rows: dict[str, dict[str, Any]]
    summary: BuildSummary
    printed: str


@pytest.fixture(scope="module")
def crafted_build(tmp_path_factory: pytest.TempPathFactory) -> CraftedBuild:
    """One build of every crafted bad slide beside one good slide and the unusual-but-valid ones."""
    root = tmp_path_factory.mktemp("crafted")
    cases = crafted_slides(root / "bad")
    unusual = unusual_slides(root / "bad")
    entries = [*good_slides(root / "good", 1), *unusual.values(), *(case.entry for case in cases.values())]
    path = manifest(root / "m", entries)
    out = root / "out"
    settings = BuildSettings(progress=False)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        summary = build([path], out=out, settings=settings)
    rows = {r["slide_id"]: r for r in pq.read_table(out / schema.SLIDES_FILE).to_pylist()}
    return CraftedBuild(cases, list(unusual), out, rows, summary, stdout.getvalue())


def test_the_crafted_inputs_are_many(crafted_build: CraftedBuild) -> None:
    """The acceptance's size: well over 80 crafted bad inputs over every surface (counted, not claimed)."""
    sizes = [len(crafted_build.cases), len(MANIFEST_CASES), len(FLAG_CASES), len(FETCH_CASES), len(LOADER_CASES)]
    sizes += [len(LOADER_SETTINGS_CASES), len(SAMPLE_CASES)]
    assert min(sizes[:-1]) >= 15 and sum(sizes) > 200, sizes


def test_the_good_and_the_unusual_slides_are_built(crafted_build: CraftedBuild) -> None:
    rows = crafted_build.rows
    assert rows["GOOD-0"]["status"] == "built"
    for slide_id in crafted_build.unusual:
        assert rows[slide_id]["status"] == "built", (slide_id, rows[slide_id]["reason"])
        assert rows[slide_id]["n_spots_written"] > 0
    # a gene listed twice is summed (CORPUS.md) and said: the QC report's gene mapping table counts it
    mapping = report_tables(crafted_build.out)["Gene mapping"]
    column = mapping[0].index("summed duplicates")
    assert {row[0]: row[column] for row in mapping[1:]}["ODD-duplicate-gene"] == "1"
    failed = any(row["status"] == "failed" for row in rows.values())
    assert crafted_build.summary.exit_code == (EXIT_SLIDES_FAILED if failed else 0)


def test_the_qc_report_lists_what_the_readers_noted(crafted_build: CraftedBuild) -> None:
    """Reader and build notes (fallbacks, summed features, drops) are in qc/index.html for every slide,
    as the units recorded them, not only in the work folder."""
    listed = [(row[0], row[1]) for row in report_tables(crafted_build.out)["Notes"][1:]]
    units = crafted_build.out / ".work" / "units"
    recorded = [
        (slide_id, note)
        for slide_id in sorted(crafted_build.rows)
        if (units / slide_id / "result.json").is_file()
        for note in json.loads((units / slide_id / "result.json").read_text())["slide"].get("notes") or []
    ]
    assert recorded and listed == recorded
    assert any(slide == "ODD-duplicate-gene" and "summed into a gene" in note for slide, note in listed)


def refusal_problems(
    cases: dict[str, SlideCase], rows: dict[str, dict[str, Any]], out: Path, summary: BuildSummary
) -> list[str]:
    """What is wrong with the refusal of each crafted slide of a build (empty when nothing is): not built,
    a deliberate reason code (never ``error``/``worker_lost``), no traceback, the case's fault and file
    named, the same line in the summary, listed in the QC report."""
    not_built = {r[0]: r for r in report_tables(out)["Slides not built"][1:]}
    printed = summary.lines()
    problems = []
    for slide_id, case in sorted(cases.items()):
        row = rows[slide_id]
        reason = row["reason"] or ""
        checks = {
            "not built": row["status"] in ("quarantined", "failed") and row["n_spots_written"] == 0,
            "deliberate": bool(row["reason_codes"]) and row["reason_codes"][0] not in ("error", "worker_lost"),
            "no traceback": "Traceback" not in reason,
            f"says {case.fault!r}": case.fault in reason,
            f"names {case.names!r}": case.names in reason,
            "in the summary": f"  {slide_id}: {row['status']}: {reason}" in printed,
            "in the QC report": not_built.get(slide_id, [None, None])[1] == row["status"],
        }
        problems += [f"{slide_id}: not {what}: {row['status']}: {reason}" for what, ok in checks.items() if not ok]
    return problems


def test_every_crafted_slide_is_refused_cleanly_and_visibly(crafted_build: CraftedBuild) -> None:
    """Each bad slide: not built, a deliberate refusal (a reason code, never an unexpected exception's
    ``error: <Type>``), its reason naming the fault and the file, in slides.parquet, the summary and the
    QC report. Every slide is checked and every problem listed, so one run shows them all."""
    build = crafted_build
    assert refusal_problems(build.cases, build.rows, build.out, build.summary) == []


def test_dropped_spots_are_counted_in_every_record(crafted_build: CraftedBuild) -> None:
    row = crafted_build.rows["ODD-drops"]
    assert row["status"] == "built"
    assert dict(row["spots_rejected"]) == {"duplicate_barcode": 1, "nan_coordinates": 2}
    rejected = crafted_build.summary.spots_rejected
    assert rejected["duplicate_barcode"] >= 1 and rejected["nan_coordinates"] >= 2
    not_written = {(r[0], r[4]): r[5] for r in report_tables(crafted_build.out)["Spots not written"][1:]}
    assert not_written[("ODD-drops", "nan_coordinates")] == "2"
    assert not_written[("ODD-drops", "duplicate_barcode")] == "1"


# ---------------------------------------------------------------------------------------------
# Images read directly: the bomb's memory, 16-bit grey read right
# ---------------------------------------------------------------------------------------------


def test_a_decompression_bomb_is_refused_under_1_gb_of_memory(tmp_path: Path) -> None:
    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 1000
    code = (
        "import sys\n"
        "from stcorpus.curate.errors import ImageTooLargeError\n"
        "from stcorpus.curate.imaging import open_image\n"
        "try:\n"
        f"    open_image({str(bomb)!r}).read_region(level=0, x=0, y=0, width=8, height=8)\n"
        "except ImageTooLargeError as exc:\n"
        "    print('refused:', exc)\n"
        # VmHWM, the peak RSS of this process since exec (ru_maxrss would include the forking parent's)
        "print('rss_kb', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "refused:" in done.stdout and "60,000 x 60,000" in done.stdout and "--max-image-pixels" in done.stdout
    rss_kb = int(done.stdout.split("rss_kb")[1])
    assert rss_kb < 1024 * 1024, rss_kb


def test_a_16_bit_grey_png_is_read_as_its_high_byte_not_clipped_to_white(tmp_path: Path) -> None:
    grey = np.asarray(Image.open(IMAGE).convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    with open_image(tmp_path / "grey16.png") as image:
        region = image.read_region(level=0, x=0, y=0, width=64, height=64)
    assert np.array_equal(region[..., 0], grey[:64, :64]) and np.array_equal(region[..., 2], grey[:64, :64])


# ---------------------------------------------------------------------------------------------
# Manifests: `curate validate` exits 1 and `curate plan` 2, naming the file and the fault
# ---------------------------------------------------------------------------------------------

GOOD_SAMPLE = f"""      - id: A
        counts: normalized
        sources: {{st: '{H5AD}', wsi: '{IMAGE}'}}
"""
GOOD_MANIFEST = f"""manifest: stcorpus-manifest/1
name: crafted
allow_local: true
defaults: {{source: hest, technology: hest, assay: visium, species: mouse, organ: brain, licence: CC-BY-4.0}}
studies:
  - id: study
    samples:
{GOOD_SAMPLE}"""


def _sub(old: str, new: str) -> str:
    assert old in GOOD_MANIFEST, old
    return GOOD_MANIFEST.replace(old, new, 1)


def _field(line: str) -> str:
    return _sub("counts: normalized", "counts: normalized\n        " + line)


def _stimage(option: str) -> str:
    """The manifest with its sample as an STimage slide with one reader option."""
    sources = f"sources: {{counts: '{H5AD}', coords: '{H5AD}', image: '{IMAGE}'}}"
    return _sub("technology: hest", "technology: stimage").replace(
        f"sources: {{st: '{H5AD}', wsi: '{IMAGE}'}}", f"reader: {{{option}}}\n        {sources}"
    )


ST_URL = f"st: '{H5AD}'"
MANIFEST_CASES: dict[str, tuple[str | bytes, str]] = {
    "yaml-syntax": (GOOD_MANIFEST + "  - [unclosed\n", "not valid YAML"),
    "yaml-tab": (_sub("  - id: study", "\t- id: study"), "not valid YAML"),
    "yaml-duplicate-key": (_field("counts: raw"), "duplicate key 'counts'"),
    "python-tag": ("!!python/object/apply:os.system ['echo hi']\n", "not valid YAML"),
    "deep-nesting": ("a: " + "[" * 1000 + "]" * 1000 + "\n", "nested too deeply"),
    "list": ("- a\n- b\n", "a manifest is a YAML mapping"),
    "scalar": ("hello\n", "a manifest is a YAML mapping"),
    "empty-file": ("", "a manifest is a YAML mapping"),
    "only-comment": ("# nothing\n", "a manifest is a YAML mapping"),
    "nul-bytes": (b"\x00" * 64, "not valid YAML"),
    "latin1": (GOOD_MANIFEST.encode().replace(b"brain", b"br\xe9in"), "not UTF-8 text"),
    "utf16": (GOOD_MANIFEST.encode("utf-16"), "not UTF-8 text"),
    "binary": (bytes(range(256)) * 4, "not UTF-8 text"),
    "other-format": (_sub("stcorpus-manifest/1", "stcorpus-manifest/9"), "must be 'stcorpus-manifest/1'"),
    "no-format": (GOOD_MANIFEST.replace("manifest: stcorpus-manifest/1\n", ""), "must be 'stcorpus-manifest/1'"),
    "unknown-top-key": (GOOD_MANIFEST + "colour: red\n", "colour"),
    "unknown-sample-key": (_field("colour: red"), "colour"),
    "misspelt-key": (_field("organn: brain"), "organn (did you mean 'organ'?)"),
    "duplicate-ids": (GOOD_MANIFEST + GOOD_SAMPLE, "duplicate sample id 'A'"),
    "ftp-scheme": (_sub(ST_URL, "st: 'ftp://example.org/a.h5ad'"), "unsupported URL scheme ftp://"),
    "javascript-scheme": (_sub(ST_URL, "st: 'javascript://alert'"), "unsupported URL scheme javascript://"),
    "bad-hf-url": (_sub(ST_URL, "st: 'hf://models/x'"), "not an hf:// dataset file URL"),
    "empty-url": (_sub(ST_URL, "st: ''"), "empty url"),
    "url-number": (_sub(ST_URL, "st: 5"), "sources.st must be a mapping, not 5"),
    "url-list": (_sub(ST_URL, "st: [a, b]"), "sources.st must be a mapping, not ['a', 'b']"),
    "short-sha256": (_sub(ST_URL, f"st: {{url: '{H5AD}', sha256: abc}}"), "sha256 must be 64 hexadecimal"),
    "non-hex-sha256": (_sub(ST_URL, f"st: {{url: '{H5AD}', sha256: {'z' * 64}}}"), "sha256 must be 64 hexadecimal"),
    "number-sha256": (
        _sub(ST_URL, f"st: {{url: '{H5AD}', sha256: 123}}"),
        "sources.st.sha256 must be a string, not 123",
    ),
    "negative-size": (
        _sub(ST_URL, f"st: {{url: '{H5AD}', size: -1}}"),
        "sources.st.size must be greater than or equal to 0, not -1",
    ),
    "text-size": (_sub(ST_URL, f"st: {{url: '{H5AD}', size: big}}"), "sources.st.size must be an integer, not 'big'"),
    "unknown-source-key": (_sub(ST_URL, f"st: {{url: '{H5AD}', md5: abc}}"), "md5"),
    "unknown-licence": (_sub("licence: CC-BY-4.0", "licence: CC-BY-5.0"), "licence 'CC-BY-5.0' is not an SPDX id"),
    "number-licence": (_sub("licence: CC-BY-4.0", "licence: 4"), "defaults.licence must be a string, not 4"),
    "bad-split": (_field("split: val"), "'train', 'validation' or 'test'"),
    "bad-counts": (_sub("counts: normalized", "counts: normalised"), "'raw' or 'normalized'"),
    "bad-species": (
        _sub("species: mouse", "species: mosue"),
        "defaults.species must be one of 'human', 'mouse', 'rat', 'pig', 'zebra",
    ),
    "bad-technology": (
        _sub("technology: hest", "technology: visium"),
        "defaults.technology must be one of 'spaceranger', 'hest', 'stimage', '",
    ),
    "bad-assay": (
        _sub("assay: visium", "assay: merfish"),
        "defaults.assay must be one of 'visium', 'visium-cytassist', 'visium-hd",
    ),
    "bad-id": (_sub("- id: A", "- id: 'a b/../c'"), "is not allowed"),
    "number-id": (_sub("- id: A", "- id: 12"), "id must be a string, not 12"),
    "date-id": (_sub("- id: A", "- id: 2020-01-01"), "id must be a string, not datetime.date(2020, 1, 1)"),
    "empty-id": (_sub("- id: A", "- id: ''"), "is not allowed"),
    "long-id": (_sub("- id: A", "- id: " + "A" * 5000), "at most 160"),
    "bad-study-id": (_sub("  - id: study", "  - id: 'my study'"), "study id 'my study'"),
    "negative-mpp": (_field("mpp: -0.5"), "mpp must be greater than 0, not -0.5"),
    "zero-mpp": (_field("mpp: 0"), "mpp must be greater than 0, not 0"),
    "text-mpp": (_field("mpp: fast"), "mpp must be a number, not 'fast'"),
    "nan-mpp": (_field("mpp: .nan"), "mpp must be a finite number, not nan"),
    "infinite-mpp": (_field("mpp: .inf"), "mpp must be a finite number, not inf"),
    "boolean-mpp": (_field("mpp: true"), "mpp: expected a number of um/px, not True"),
    "mpp-in-nanometres": (_field("mpp: 250.0e-6"), "is not the scale of a microscope image"),
    "huge-mpp": (_field("mpp: 1.0e+300"), "is not the scale of a microscope image"),
    "negative-reference-mpp": (_field("reference_mpp: -1"), "reference_mpp must be greater than 0, not -1"),
    "infinite-reference-mpp": (_field("reference_mpp: .inf"), "reference_mpp must be a finite number, not inf"),
    "negative-spots": (_field("spots: -5"), "spots must be greater than or equal to 0, not -5"),
    "image-size-text": (_field("image_size: big"), "image_size must be a list, not 'big'"),
    "samples-not-list": (GOOD_MANIFEST.split("    samples:\n")[0] + "    samples: 5\n", "samples"),
    "studies-null": (GOOD_MANIFEST.split("studies:\n")[0] + "studies:\n", "studies"),
    "no-sources": (_sub(f"sources: {{st: '{H5AD}', wsi: '{IMAGE}'}}", "sources: {}"), "no `sources`"),
    "sources-list": (
        _sub(f"sources: {{st: '{H5AD}', wsi: '{IMAGE}'}}", "sources: [a]"),
        "sources must be a mapping, not ['a']",
    ),
    "bad-source-name": (_sub("st: '", "St-x: '"), "source name 'St-x'"),
    "misspelt-source": (_sub("wsi: '", "wis: '"), "unknown source name(s) wis"),
    "missing-source": (_sub(f", wsi: '{IMAGE}'", ""), "needs {st, wsi}"),
    "reader-not-mapping": (_field("reader: 5"), "reader must be a mapping, not 5"),
    "reader-nested": (
        _field("reader: {spatial_key: {a: 1}}"),
        "reader.spatial_key must be a string, an integer, a number or true or f",
    ),
    "unknown-reader-option": (_field("reader: {spatial_kye: spatial}"), "spatial_kye (did you mean 'spatial_key'?)"),
    "reader-option-type": (_field("reader: {spatial_key: 5}"), "reader.spatial_key must be a string, not 5"),
    "negative-spot-diameter": (
        _stimage("spot_diameter_um: -5"),
        "reader.spot_diameter_um must be a positive number of um, not -5",
    ),
    "nan-bin-size": (_stimage("bin_size_um: .nan"), "reader.bin_size_um must be a positive number of um, not nan"),
    "local-not-allowed": (_sub("allow_local: true", "allow_local: false"), "set `allow_local: true`"),
    "number-name": (_sub("name: crafted", "name: 5"), "name must be a string, not 5"),
    "patient-list": (_field("patient: [a]"), "patient must be a string, not ['a']"),
    "number-organ": (_sub("organ: brain", "organ: 7"), "defaults.organ must be a string, not 7"),
}


@pytest.mark.parametrize("name", sorted(MANIFEST_CASES))
def test_a_bad_manifest_is_refused_by_validate_and_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    text, fault = MANIFEST_CASES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and fault in err and "Traceback" not in err, err
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and fault in err and "Traceback" not in err, err


def test_a_missing_local_source_is_reported_by_validate_and_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "missing.yaml"
    path.write_text(GOOD_MANIFEST.replace(f"st: '{H5AD}'", "st: 'not-there.h5ad'"))
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"source 'st': {tmp_path / 'not-there.h5ad'} does not exist" in err and str(path) in err
    assert main(["plan", str(path), "--holdout", "none"]) == 0  # the build fails that slide only
    assert "local sources missing (a build fails these slides): 1" in capsys.readouterr().out


def test_a_huge_file_named_as_a_manifest_is_refused_before_it_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "matrix.h5"
    with path.open("wb") as handle:  # sparse: 65 MiB on disk costs nothing
        handle.truncate(65 * 2**20)
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "65 MiB is not a manifest" in err


@pytest.mark.parametrize("command", ["validate", "plan", "build"])
def test_one_manifest_given_twice_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(GOOD_MANIFEST)
    extra = ["--out", str(tmp_path / "out"), "--no-progress"] if command == "build" else []
    assert main([command, str(path), str(tmp_path / "." / "m.yaml"), *extra]) in (1, 2)
    assert "the same manifest is given twice" in capsys.readouterr().err


def test_the_manifest_cases_start_from_a_valid_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD_MANIFEST)
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# `curate build` flags: refused before any work, naming the flag
# ---------------------------------------------------------------------------------------------

FLAG_CASES: dict[str, tuple[list[str], str]] = {
    "workers-zero": (["--workers", "0"], "--workers"),
    "workers-negative": (["--workers", "-2"], "--workers"),
    "workers-text": (["--workers", "many"], "--workers"),
    "patch-size-zero": (["--patch-size", "0"], "patch_size (--patch-size)"),
    "patch-size-negative": (["--patch-size", "-224"], "patch_size (--patch-size)"),
    "patch-size-tiny": (["--patch-size", "3"], "patch_size (--patch-size)"),
    "patch-size-float": (["--patch-size", "1e9"], "--patch-size"),
    "patch-mpp-zero": (["--patch-mpp", "0"], "(--patch-mpp)"),
    "patch-mpp-nan": (["--patch-mpp", "nan"], "(--patch-mpp)"),
    "patch-mpp-inf": (["--patch-mpp", "inf"], "(--patch-mpp)"),
    "region-size-negative": (["--region-size", "-1"], "(--region-size)"),
    "jpeg-quality-zero": (["--jpeg-quality", "0"], "(--jpeg-quality)"),
    "jpeg-quality-high": (["--jpeg-quality", "101"], "(--jpeg-quality)"),
    "max-outside-negative": (["--max-outside", "-1"], "(--max-outside)"),
    "max-outside-nan": (["--max-outside", "nan"], "(--max-outside)"),
    "min-tissue-high": (["--min-tissue", "1.5"], "(--min-tissue)"),
    "max-upsample-zero": (["--max-upsample", "0"], "(--max-upsample)"),
    "max-mpp-negative": (["--max-mpp", "-3"], "--max-mpp"),
    "max-mpp-nan": (["--max-mpp", "nan"], "--max-mpp"),
    "mpp-tolerance-negative": (["--mpp-tolerance", "-0.1"], "--mpp-tolerance"),
    "spots-outside-high": (["--max-spots-outside", "7"], "--max-spots-outside"),
    "mapped-fraction-high": (["--min-mapped-fraction", "2"], "--min-mapped-fraction"),
    "mapped-fraction-negative": (["--min-mapped-fraction", "-1"], "--min-mapped-fraction"),
    "mapped-fraction-nan": (["--min-mapped-fraction", "nan"], "--min-mapped-fraction"),
    "image-pixels-zero": (["--max-image-pixels", "0"], "--max-image-pixels"),
    "image-pixels-float": (["--max-image-pixels", "1.5"], "--max-image-pixels"),
    "image-pixels-negative": (["--max-image-pixels", "-1"], "--max-image-pixels"),
    "name-path": (["--name", "../evil"], "argument --name: expected a plain name"),
    "name-slash": (["--name", "a/b"], "argument --name: expected a plain name"),
    "samples-per-shard-zero": (["--samples-per-shard", "0"], "--samples-per-shard"),
    "shard-mb-zero": (["--max-shard-mb", "0"], "--max-shard-mb"),
    "shard-mb-nan": (["--max-shard-mb", "nan"], "--max-shard-mb"),
    "seed-text": (["--seed", "x"], "--seed"),
    "splits-over-one": (["--splits", "0.5,0.3,0.3"], "--splits"),
    "splits-four": (["--splits", "1,0,0,0"], "--splits"),
    "splits-two": (["--splits", "0.8,0.2"], "--splits"),
    "splits-text": (["--splits", "a,b,c"], "--splits"),
    "splits-nan": (["--splits", "nan,0.5,0.5"], "--splits"),
    "splits-negative": (["--splits=-0.2,0.6,0.6"], "split ratios must be >= 0"),
    "holdout-missing-file": (["--holdout", "/nonexistent/holdout.yaml"], "--holdout"),
    "holdout-not-a-list": (["--holdout", "{manifest}"], "a holdout list starts with"),
    "holdout-folder": (["--holdout", "{folder}"], "cannot read holdout list"),
    "holdout-slides-number": (["--holdout", "{holdout}"], "`slides` is a int"),
    "species-typo": (["--species", "mosue"], "--species mosue"),
    "technology-typo": (["--technology", "visum"], "--technology visum"),
    "organ-typo": (["--organ", "brian"], "--organ brian"),
    "licence-typo": (["--licence", "MIT-ish"], "--licence MIT-ish"),
    "ids-typo": (["--ids", "NOPE"], "--ids NOPE"),
    "species-empty": (["--species", ""], "--species"),
    "ids-commas": (["--ids", ","], "--ids"),
    "executor-unknown": (["--executor", "slurm"], "--executor"),
    "scheduler-without-dask": (["--executor", "local", "--scheduler", "tcp://127.0.0.1:1"], "--scheduler"),
    "dask-cluster-file-missing": (["--dask-cluster", "/nonexistent.yaml"], "--dask-cluster"),
    "order-unknown": (["--order", "random"], "--order"),
    "on-bad-sample-unknown": (["--on-bad-sample", "ignore"], "--on-bad-sample"),
    "holdout-policy-unknown": (["--holdout-policy", "train"], "--holdout-policy"),
    "work-dir-impossible": (["--work-dir", "/proc/stcorpus-nope"], "/proc/stcorpus-nope"),
    "cache-is-a-file": (["--cache", "{manifest}"], "--cache"),
}


@pytest.mark.parametrize("name", sorted(FLAG_CASES))
def test_a_bad_build_flag_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    flags, fault = FLAG_CASES[name]
    path = tmp_path / "m.yaml"
    path.write_text(GOOD_MANIFEST)
    holdout = tmp_path / "holdout.yaml"
    holdout.write_text("holdout: stcorpus-holdout/1\nslides: 5\n")
    flags = [f.format(manifest=path, folder=tmp_path, holdout=holdout) for f in flags]
    out = tmp_path / "out"
    try:
        code = main(["build", str(path), "--out", str(out), "--no-progress", *flags])
    except SystemExit as exc:  # argparse's own refusal: usage and the flag, exit 2
        code = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code == 2 and fault in err and "Traceback" not in err, err
    assert not (out / schema.SLIDES_FILE).exists() and not (out / schema.CORPUS_FILE).exists()


# ---------------------------------------------------------------------------------------------
# Fetching from a server on 127.0.0.1
# ---------------------------------------------------------------------------------------------


def _tar(members: list[tuple[str, bytes | None, bytes, str]], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:  # type: ignore[call-overload]
        for name, data, kind, link in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            if data is None:
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


LISTING = b"<!DOCTYPE html><html><head><title>Index of /spatial</title></head><body><a href='x'>x</a></body></html>"
GOOD_TAR = _tar([("spatial/a.txt", b"hello" * 2000, tarfile.REGTYPE, "")])
#: name -> (file name on the server, its bytes, source fields beyond the url, a fault, what the error says)
FETCH_CASES: dict[str, tuple[str, bytes | None, dict[str, Any], Fault | None, str]] = {
    "html-for-h5": ("m.h5", LISTING, {}, None, "answered with an HTML page"),
    "html-for-archive": ("spatial.tar.gz", LISTING, {}, None, "answered with an HTML page"),
    "html-login-page": ("pos.csv", b"<html><body>Please log in</body></html>", {}, None, "HTML page"),
    "truncated-tar-gz": ("cut.tar.gz", GOOD_TAR[: len(GOOD_TAR) // 2], {}, None, "corrupt or truncated"),
    "corrupt-zip": ("c.zip", b"PK\x03\x04" + b"\x00" * 100, {}, None, "cannot read the zip archive"),
    "text-named-zip": ("t.zip", b"just text", {}, None, "not a tar or zip archive"),
    "empty-tar-gz": ("e.tar.gz", b"", {}, None, "not a tar or zip archive"),
    "tar-dotdot": ("dd.tar.gz", _tar([("../evil.txt", b"x", tarfile.REGTYPE, "")]), {}, None, "'..' component"),
    "tar-absolute": ("ab.tar.gz", _tar([("/etc/evil", b"x", tarfile.REGTYPE, "")]), {}, None, "absolute path"),
    "tar-symlink-out": (
        "sl.tar.gz",
        _tar([("a/l", None, tarfile.SYMTYPE, "../../../etc/passwd")]),
        {},
        None,
        "outside the archive",
    ),
    "tar-symlink-absolute": (
        "sa.tar.gz",
        _tar([("a/l", None, tarfile.SYMTYPE, "/etc/passwd")]),
        {},
        None,
        "link to the absolute path",
    ),
    "tar-hardlink-out": (
        "hl.tar.gz",
        _tar([("a/h", None, tarfile.LNKTYPE, "/etc/passwd")]),
        {},
        None,
        "hard link",
    ),
    "tar-device": ("dv.tar.gz", _tar([("a/dev", None, tarfile.CHRTYPE, "")]), {}, None, "device file"),
    "zip-dotdot": ("zd.zip", _zip([("../../evil.txt", b"x")]), {}, None, "'..' component"),
    "zip-absolute": ("za.zip", _zip([("/abs/evil.txt", b"x")]), {}, None, "absolute path"),
    "sha256-mismatch": ("s.bin", b"abc", {"sha256": "0" * 64}, None, "sha256 mismatch"),
    "size-mismatch": ("sz.h5", b"x" * 100, {"size": 999}, None, "the manifest says size 999"),
    "not-found": ("missing.h5", None, {}, None, "HTTP 404"),
    "server-error": ("down.h5", b"x", {}, Fault(status=500, times=None), "HTTP 500"),
    "truncated-body": (
        "tb.h5",
        b"x" * 50_000,
        {},
        Fault(body=b"x" * 20_000, content_length=50_000, times=None),
        "20000",
    ),
}


@pytest.fixture(scope="module")
def fetch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with serve(tmp_path_factory.mktemp("www")) as running:
        yield running


@pytest.mark.parametrize("name", sorted(FETCH_CASES))
def test_a_bad_download_is_a_fetch_error_naming_the_source(
    tmp_path: Path, fetch_server: LocalServer, name: str
) -> None:
    file_name, data, fields, fault, says = FETCH_CASES[name]
    path = f"{name}/{file_name}"
    url = put(fetch_server, path, data) if data is not None else f"{fetch_server.url}/{path}"
    if fault is not None:
        fetch_server.add_fault(f"/{path}", fault)
    sample = make_sample(tmp_path, {"spatial": {"url": url, **fields}}, sample_id="CRAFTED-1")
    with Fetcher(settings(tmp_path, retries=1)) as fetcher, pytest.raises(FetchError) as info:
        fetcher.fetch(sample.sources["spatial"], sample=sample)
    message = str(info.value)
    assert "CRAFTED-1" in message and file_name in message and says in message, message
    unpacked = tmp_path / "cache" / "unpacked"
    assert not unpacked.exists() or not any(p.is_file() for p in unpacked.rglob("*"))
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()


# ---------------------------------------------------------------------------------------------
# The loader: missing, short and corrupt shards and metadata
# ---------------------------------------------------------------------------------------------


def _shard(root: Path, fmt: str) -> Path:
    return sorted((root / fmt / "train").glob("*"))[0]


def _edit_json(edit: Callable[[dict[str, Any]], object]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        data = json.loads((root / schema.CORPUS_FILE).read_text())
        edit(data)
        (root / schema.CORPUS_FILE).write_text(json.dumps(data))

    return apply


def _edit_shards(edit: Callable[[pa.Table], pa.Table]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        pq.write_table(edit(pq.read_table(root / schema.SHARDS_FILE)), root / schema.SHARDS_FILE)

    return apply


def _set_paths(table: pa.Table, path: str) -> pa.Table:
    """Every row's ``path`` replaced by ``path`` (a shards.parquet that points outside the corpus)."""
    column = table.schema.get_field_index("path")
    return table.set_column(column, "path", pa.array([path] * table.num_rows, pa.string()))


def _edit_table(name: str, edit: Callable[[pa.Table], pa.Table]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        pq.write_table(edit(pq.read_table(root / name)), root / name)

    return apply


def _text_column(table: pa.Table, name: str) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(["x"] * table.num_rows))


def _shard_to_folder(fmt: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        shard = _shard(root, fmt)
        shard.unlink()
        shard.mkdir()

    return apply


#: name -> (damage, the format read, whether on_bad_sample="warn" skips it and counts it, what the error says)
LOADER_CASES: dict[str, tuple[Callable[[Path], object], str, bool, str]] = {
    "no-corpus-json": (lambda r: (r / schema.CORPUS_FILE).unlink(), "wds", False, "corpus.json is missing"),
    "corpus-json-garbage": (_write(schema.CORPUS_FILE, b"{nope"), "wds", False, "is not JSON"),
    "corpus-json-list": (_write(schema.CORPUS_FILE, b"[]"), "wds", False, "has no 'schema'"),
    "corpus-json-latin1": (_write(schema.CORPUS_FILE, b"\xff\xfe{}"), "wds", False, "corpus.json"),
    "other-schema": (_edit_json(lambda d: d.update(schema="other-thing/1")), "wds", False, "'other-thing/1'"),
    "future-schema": (_edit_json(lambda d: d.update(schema="stcorpus/99")), "wds", False, "'stcorpus/99'"),
    "no-schema": (_edit_json(lambda d: d.pop("schema")), "wds", False, "has no 'schema'"),
    "no-shards-parquet": (lambda r: (r / schema.SHARDS_FILE).unlink(), "wds", False, "shards.parquet is missing"),
    "shards-parquet-garbage": (_write(schema.SHARDS_FILE, b"PAR1garbage"), "wds", False, "not a readable Parquet"),
    "shards-wrong-columns": (
        lambda r: pq.write_table(pa.table({"a": [1]}), r / schema.SHARDS_FILE),
        "wds",
        False,
        "lacks column(s) path",
    ),
    "shards-no-n-samples": (
        _edit_shards(lambda t: t.drop_columns(["n_samples"])),
        "parquet",
        False,
        "lacks column(s) n_samples",
    ),
    "shards-text-index": (_edit_shards(lambda t: _text_column(t, "index")), "wds", False, "index is string"),
    "shards-empty": (_edit_shards(lambda t: t.slice(0, 0)), "wds", False, "lists no wds shard"),
    "no-genes": (lambda r: (r / schema.GENES_FILE).unlink(), "wds", False, "genes.parquet is missing"),
    "genes-no-index": (
        _edit_table(schema.GENES_FILE, lambda t: t.drop_columns(["index"])),
        "wds",
        False,
        "genes.parquet lacks column(s) index",
    ),
    "n-genes-text": (_edit_json(lambda d: d.update(n_genes="many")), "wds", False, "n_genes is 'many'"),
    "splits-text": (_edit_json(lambda d: d.update(splits={"train": "lots"})), "wds", False, "splits is"),
    "genes-garbage": (_write(schema.GENES_FILE, b"x"), "wds", False, "not a readable Parquet"),
    "wds-shard-missing": (lambda r: _shard(r, "wds").unlink(), "wds", True, "missing from"),
    "wds-shard-cut": (
        lambda r: _shard(r, "wds").write_bytes(_shard(r, "wds").read_bytes()[:5000]),
        "wds",
        True,
        "truncated at byte 5000",
    ),
    "wds-shard-empty": (lambda r: _shard(r, "wds").write_bytes(b""), "wds", True, "truncated at byte 0"),
    "wds-shard-zeros": (
        lambda r: _shard(r, "wds").write_bytes(b"\0" * _shard(r, "wds").stat().st_size),
        "wds",
        True,
        "sample 0 is missing",
    ),
    "wds-shard-folder": (_shard_to_folder("wds"), "wds", True, "not a file"),
    "parquet-shard-missing": (lambda r: _shard(r, "parquet").unlink(), "parquet", True, "missing from"),
    "parquet-shard-cut": (
        lambda r: _shard(r, "parquet").write_bytes(_shard(r, "parquet").read_bytes()[:-100]),
        "parquet",
        True,
        "bytes on disk, shards.parquet says",
    ),
    "parquet-shard-garbage": (
        lambda r: _shard(r, "parquet").write_bytes(b"\1" * _shard(r, "parquet").stat().st_size),
        "parquet",
        True,
        "not a readable Parquet file",
    ),
    "parquet-shard-folder": (_shard_to_folder("parquet"), "parquet", True, "not a file"),
    "shard-path-escapes": (_edit_shards(lambda t: _set_paths(t, "../outside.tar")), "wds", False, "not a path inside"),
    "shard-path-absolute": (_edit_shards(lambda t: _set_paths(t, "/etc/passwd")), "wds", False, "not a path inside"),
    "shard-path-url": (_edit_shards(lambda t: _set_paths(t, "http://x/a.tar")), "wds", False, "not a path inside"),
    "shard-path-dots": (
        _edit_shards(lambda t: _set_paths(t, "wds/../../x.tar")),
        "parquet",
        False,
        "not a path inside",
    ),
}


#: Loader settings as a YAML/JSON config gives them: name -> (settings, what the error says)
LOADER_SETTINGS_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "batch-size-zero": ({"batch_size": 0}, "batch_size must be > 0"),
    "batch-size-text": ({"batch_size": "8"}, "batch_size must be an integer"),
    "batch-size-bool": ({"batch_size": True}, "batch_size must be an integer"),
    "batch-size-float": ({"batch_size": 2.5}, "batch_size must be an integer"),
    "misspelt-setting": ({"bacth_size": 8}, "did you mean 'batch_size'?"),
    "unknown-setting": ({"num_workers": 2}, "unknown key(s): num_workers"),
    "bad-split": ({"split": "val"}, "split must be one of"),
    "bad-policy": ({"on_bad_sample": "ignore"}, "on_bad_sample must be one of"),
    "negative-window": ({"shuffle_window": -1}, "shuffle_window must be > 0"),
    "bad-format": ({"format": "zarr"}, "format must be one of"),
    "misspelt-genes-key": ({"genes": {"transfrom": "log1p"}}, "did you mean 'transform'?"),
    "bad-transform": ({"genes": {"transform": "log2"}}, "genes.transform must be one of"),
    "genes-not-mapping": ({"genes": 5}, "genes must be a mapping"),
    "negative-retries": ({"http": {"retries": -1}}, "http.retries must be >= 0"),
    "text-seed": ({"seed": "x"}, "seed must be an integer"),
    "text-bool": ({"drop_last": "no"}, "drop_last must be true or false"),
    "filter-not-list": ({"filters": {"organ": 5}}, "filters.organ must be a list"),
    "misspelt-filter": ({"filters": {"organn": ["brain"]}}, "did you mean 'organ'?"),
}


@pytest.mark.parametrize("name", sorted(LOADER_SETTINGS_CASES))
def test_bad_loader_settings_are_refused_naming_the_setting(name: str) -> None:
    values, says = LOADER_SETTINGS_CASES[name]
    with pytest.raises(StcorpusError, match=re.escape(says)):
        LoaderSettings.from_dict(values)


@pytest.fixture(scope="module")
def pristine_corpus(tmp_path_factory: pytest.TempPathFactory) -> FixtureCorpus:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _epoch(root: Path, *, fmt: str, policy: str) -> tuple[int, dict[str, int]]:
    options = {"split": "train", "batch_size": 4, "shuffle_window": 8, "drop_last": False, "format": fmt}
    dataset = CorpusDataset(root, LoaderSettings.from_dict({**options, "on_bad_sample": policy}))
    return sum(len(batch["key"]) for batch in CorpusLoader(dataset)), dataset.skipped()


@pytest.mark.parametrize("name", sorted(LOADER_CASES))
def test_a_damaged_corpus_is_a_loader_error_naming_the_file(
    pristine_corpus: FixtureCorpus, tmp_path: Path, name: str
) -> None:
    damage, fmt, skippable, says = LOADER_CASES[name]
    root = tmp_path / "corpus"
    shutil.copytree(pristine_corpus.root, root)
    damage(root)
    with pytest.raises(StcorpusError) as info:
        _epoch(root, fmt=fmt, policy="error")
    assert says in str(info.value), str(info.value)
    if skippable:  # a bad shard is skipped and counted under `warn`; the others' samples all arrive
        n, skipped = _epoch(root, fmt=fmt, policy="warn")
        assert skipped["shards"] == 1 and skipped["samples"] > 0
        assert n + skipped["samples"] == len(pristine_corpus.keys("train"))
    else:  # a corpus whose metadata is broken is refused whatever the policy
        with pytest.raises(StcorpusError):
            _epoch(root, fmt=fmt, policy="warn")


@pytest.mark.parametrize("columns", [["status"], ["slide_id", "split"]])
def test_slides_parquet_without_its_columns_is_not_taken_for_an_empty_selection(
    pristine_corpus: FixtureCorpus, tmp_path: Path, columns: list[str]
) -> None:
    root = tmp_path / "corpus"
    shutil.copytree(pristine_corpus.root, root)
    _edit_table(schema.SLIDES_FILE, lambda t: t.drop_columns(columns))(root)
    options = {"split": "train", "batch_size": 4, "filters": {"organ": ["brain"]}}
    with pytest.raises(StcorpusError, match=r"slides.parquet lacks column\(s\) " + ", ".join(columns)):
        list(CorpusLoader(CorpusDataset(root, LoaderSettings.from_dict(options))))


def test_a_positions_file_saved_by_excel_reads_like_the_original(tmp_path: Path) -> None:
    """A UTF-8 byte-order mark and CRLF line ends (what Excel writes) are not a fault."""
    from stcorpus.curate.readers import read_slide
    from tests.test_readers_support import make_sample as reader_sample

    spatial = tmp_path / "spatial"
    shutil.copytree(HEART / "spatial", spatial)
    positions = spatial / POSITIONS
    header = b"barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\r\n"
    positions.write_bytes(b"\xef\xbb\xbf" + header + positions.read_bytes().replace(b"\n", b"\r\n"))
    files = {"matrix": HEART_H5, "spatial": spatial}
    excel, original = (
        read_slide(reader_sample(f), f) for f in (files, {"matrix": HEART_H5, "spatial": HEART / "spatial"})
    )
    assert np.array_equal(excel.spots.x_px, original.spots.x_px) and excel.dropped_spots == original.dropped_spots
    excel.image.close()
    original.image.close()


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_a_local_source_that_is_a_device_or_fifo_is_refused_not_read_forever(tmp_path: Path, special: str) -> None:
    import os

    path = Path(special) if special.startswith("/") else tmp_path / special
    if special == "fifo":
        os.mkfifo(path)
    sample = make_sample(tmp_path, {"st": str(path)}, allow_local=True, sample_id="CRAFTED-2")
    with Fetcher(settings(tmp_path)) as fetcher, pytest.raises(FetchError, match="device or special file"):
        fetcher.fetch(sample.sources["st"], sample=sample)


def _spoil_first(marker: bytes, *, skip: int, n: int) -> Callable[[Path], None]:
    """Overwrite ``n`` bytes ``skip`` bytes after the first ``marker`` of the first train wds shard (same size)."""

    def apply(root: Path) -> None:
        shard = _shard(root, "wds")
        raw = bytearray(shard.read_bytes())
        at = raw.find(marker)
        assert at >= 0, marker
        raw[at + skip : at + skip + n] = b"z" * n
        shard.write_bytes(bytes(raw))

    return apply


#: A sample whose member bytes are damaged (the shard's size and tar structure intact): skipped under `warn`.
SAMPLE_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "patch-jpeg-spoilt": (_spoil_first(b"\xff\xd8\xff", skip=0, n=200), "patch is not a decodable JPEG"),
    "expression-npz-spoilt": (_spoil_first(b"\x93NUMPY", skip=10, n=50), "malformed expr.npz member"),
    "metadata-json-spoilt": (_spoil_first(b'{"', skip=0, n=8), "malformed json member"),
}


@pytest.mark.parametrize("name", sorted(SAMPLE_CASES))
def test_a_damaged_sample_is_a_bad_sample_error_and_warn_skips_only_it(
    pristine_corpus: FixtureCorpus, tmp_path: Path, name: str
) -> None:
    damage, says = SAMPLE_CASES[name]
    root = tmp_path / "corpus"
    shutil.copytree(pristine_corpus.root, root)
    damage(root)
    with pytest.raises(StcorpusError, match=re.escape(says)):
        _epoch(root, fmt="wds", policy="error")
    n, skipped = _epoch(root, fmt="wds", policy="warn")
    assert skipped["samples"] == 1 and skipped["shards"] == 0
    assert n == len(pristine_corpus.keys("train")) - 1


def test_export_from_a_folder_that_is_not_a_corpus_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["export", str(tmp_path), "--slide", "S1", "--to", str(tmp_path / "s1.h5ad")])
    err = capsys.readouterr().err
    assert code == 2 and "not a corpus: no corpus.json" in err and "writable" not in err, err
