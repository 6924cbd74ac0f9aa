"""10x Genomics file formats: feature-barcode matrices (HDF5 v2/v3, MTX) and spot positions.

The HDF5 layouts follow what scanpy's ``read_10x_h5`` accepts:

* v3 (Cell Ranger >= 3, every Space Ranger): a ``matrix`` group with ``barcodes``, ``data``,
  ``indices``, ``indptr``, ``shape`` and ``features/{id,name,feature_type,genome}``. Files
  written by R (``HDF5Array::writeTENxMatrix``, DropletUtils) carry no root attributes, use
  unsigned index types and may hold ``matrix/genes`` (ids) and ``matrix/gene_names`` beside
  or instead of ``features``.
* v2 (Cell Ranger 2): one group per genome (e.g. ``GRCh38``) with ``genes``, ``gene_names``,
  ``barcodes`` and the same CSC arrays; several genomes (barnyard references) are joined.

The CSC arrays are features x barcodes, which is exactly barcodes x features in CSR.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from stcorpus.curate.errors import CorruptSourceError, SourceMissingError
from stcorpus.curate.readers._common import TEXT_ERRORS, as_str_array, coordinate, open_text, whole_numbers

if TYPE_CHECKING:
    import scipy.sparse as sp

GENE_EXPRESSION: Final = "Gene Expression"

#: Columns of a Space Ranger positions table, in the order of the header-less 1.x file.
POSITION_COLUMNS: Final = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")

MTX_NAMES: Final = ("matrix.mtx.gz", "matrix.mtx")
FEATURE_NAMES: Final = ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
BARCODE_NAMES: Final = ("barcodes.tsv.gz", "barcodes.tsv")


@dataclass(frozen=True)
class FeatureMatrix:
    """A feature-barcode matrix as stored: barcodes x features, all feature types."""

    counts: sp.csr_matrix
    barcodes: npt.NDArray[np.str_]
    ids: npt.NDArray[np.str_]
    names: npt.NDArray[np.str_]
    types: npt.NDArray[np.str_]
    layout: str  # "10x h5 v3", "10x h5 v2", "mtx"


@dataclass(frozen=True)
class Positions:
    """A spot positions table (Space Ranger ``tissue_positions*``)."""

    barcode: npt.NDArray[np.str_]
    in_tissue: npt.NDArray[np.bool_]
    array_row: npt.NDArray[np.int32]
    array_col: npt.NDArray[np.int32]
    pxl_row: npt.NDArray[np.float64]  # full-resolution pixels, y
    pxl_col: npt.NDArray[np.float64]  # full-resolution pixels, x
    layout: str


# ---------------------------------------------------------------------------------------------
# HDF5
# ---------------------------------------------------------------------------------------------


#: What a damaged or hand-written 10x h5 can say to its reader: a dataset missing (KeyError), of
#: the wrong type or shape (TypeError, ValueError), text that is not UTF-8 (a ValueError).
_H5_FAULTS: Final = (KeyError, TypeError, ValueError, OSError)


def _strings(group: Any, name: str, *, path: Path) -> npt.NDArray[np.str_]:
    try:
        values = as_str_array(group[name][()])
    except _H5_FAULTS as exc:
        raise CorruptSourceError(
            f"{path}: dataset {group.name.rstrip('/')}/{name} is missing or not text ({type(exc).__name__}: {exc}); "
            "the file is not a complete 10x feature-barcode matrix: fetch it again from its source"
        ) from exc
    if values.ndim != 1:
        raise CorruptSourceError(
            f"{path}: dataset {group.name.rstrip('/')}/{name} has shape {values.shape}, expected 1-d"
        )
    return values


def _integers(group: Any, name: str, *, path: Path) -> npt.NDArray[np.int64]:
    values = np.asarray(group[name][()])
    if values.ndim != 1 or values.dtype.kind not in "iu":
        raise CorruptSourceError(
            f"{path}: dataset {group.name.rstrip('/')}/{name} is {values.dtype} of shape {values.shape}, expected "
            "1-d integers; the file is not a valid 10x feature-barcode matrix"
        )
    return values.astype(np.int64)


def _csc_as_csr(group: Any, path: Path) -> sp.csr_matrix:
    import scipy.sparse as sp

    try:
        shape = _integers(group, "shape", path=path)
        data = np.asarray(group["data"][()])
        indices = _integers(group, "indices", path=path)
        indptr = _integers(group, "indptr", path=path)
    except _H5_FAULTS as exc:
        raise CorruptSourceError(f"{path}: 10x matrix group {group.name!r} lacks or cannot read {exc}") from exc
    if shape.shape != (2,) or (shape < 0).any():
        raise CorruptSourceError(f"{path}: {group.name}/shape is {shape.tolist()}, expected [features, barcodes]")
    n_features, n_barcodes = (int(v) for v in shape)
    if data.ndim != 1 or data.dtype.kind not in "biuf":
        raise CorruptSourceError(
            f"{path}: {group.name}/data is {data.dtype} of shape {data.shape}, expected 1-d numbers (the counts)"
        )
    if data.shape[0] != indices.shape[0]:
        raise CorruptSourceError(
            f"{path}: {group.name}/data has {data.shape[0]:,} values but {group.name}/indices {indices.shape[0]:,}; "
            "the file is truncated or damaged: fetch it again from its source"
        )
    if (
        indptr.shape[0] != n_barcodes + 1
        or (indptr.size and (indptr[0] != 0 or indptr[-1] != data.shape[0]))
        or (indptr.size > 1 and bool((np.diff(indptr) < 0).any()))
    ):
        raise CorruptSourceError(
            f"{path}: {group.name}/indptr ({indptr.shape[0]:,} entries) is not the column pointer of "
            f"{n_barcodes:,} barcodes over {data.shape[0]:,} values (it must start at 0, never decrease and end at "
            "the number of values); the file is damaged: fetch it again from its source"
        )
    if indices.size and (int(indices.max()) >= n_features or int(indices.min()) < 0):
        raise CorruptSourceError(
            f"{path}: {group.name}/indices hold feature numbers outside 0..{n_features - 1} "
            f"(min {int(indices.min())}, max {int(indices.max())}); the file is damaged: fetch it again"
        )
    return sp.csr_matrix((data, indices, indptr), shape=(n_barcodes, n_features))


def read_h5(path: Path) -> FeatureMatrix:
    """Read a 10x feature-barcode matrix HDF5 file (v2 or v3 layout)."""
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise CorruptSourceError(f"{path}: not a readable HDF5 file: {exc}") from exc
    try:
        return _read_h5(handle, path)
    except _H5_FAULTS as exc:  # a layout no check below foresaw: still this file's fault, said as such
        raise CorruptSourceError(
            f"{path}: not a valid 10x feature-barcode matrix ({type(exc).__name__}: {exc}); fetch it again from its "
            "source, or name the matrix as an MTX folder"
        ) from exc


def _read_h5(handle: Any, path: Path) -> FeatureMatrix:
    import h5py

    with handle as f:
        if "matrix" in f:
            group = f["matrix"]
            if not isinstance(group, h5py.Group):
                raise CorruptSourceError(f"{path}: 'matrix' is a {type(group).__name__}, not the 10x matrix group")
            counts = _csc_as_csr(group, path)
            barcodes = _strings(group, "barcodes", path=path)
            if "features" in group:
                features = group["features"]
                ids = _strings(features, "id", path=path)
                names = _strings(features, "name", path=path) if "name" in features else ids.copy()
                if "feature_type" in features:
                    types = _strings(features, "feature_type", path=path)
                else:
                    types = np.full(ids.shape, GENE_EXPRESSION)  # dtype=np.str_ would keep one character: "G"
            elif "genes" in group:
                ids = _strings(group, "genes", path=path)
                names = _strings(group, "gene_names", path=path) if "gene_names" in group else ids.copy()
                types = np.full(ids.shape, GENE_EXPRESSION)  # dtype=np.str_ would keep one character: "G"
            else:
                raise CorruptSourceError(f"{path}: 10x h5 'matrix' group has neither 'features' nor 'genes'")
            layout = "10x h5 v3"
        else:
            genomes = sorted(name for name in f if isinstance(f[name], h5py.Group) and "genes" in f[name])
            if not genomes:
                raise CorruptSourceError(
                    f"{path}: not a 10x feature-barcode matrix (no 'matrix' group and no genome group with 'genes')"
                )
            blocks, id_parts, name_parts = [], [], []
            barcodes = _strings(f[genomes[0]], "barcodes", path=path)
            for genome in genomes:
                group = f[genome]
                if not np.array_equal(_strings(group, "barcodes", path=path), barcodes):
                    raise CorruptSourceError(f"{path}: genome groups {genomes} list different barcodes")
                blocks.append(_csc_as_csr(group, path))
                id_parts.append(_strings(group, "genes", path=path))
                name_parts.append(_strings(group, "gene_names", path=path) if "gene_names" in group else id_parts[-1])
            import scipy.sparse as sp

            counts = sp.hstack(blocks, format="csr") if len(blocks) > 1 else blocks[0]
            ids = np.concatenate(id_parts)
            names = np.concatenate(name_parts)
            types = np.full(ids.shape, GENE_EXPRESSION)  # dtype=np.str_ would keep one character: "G"
            layout = "10x h5 v2" + (f" ({len(genomes)} genomes joined)" if len(genomes) > 1 else "")
    if counts.shape != (barcodes.shape[0], ids.shape[0]) or names.shape != ids.shape or types.shape != ids.shape:
        raise CorruptSourceError(
            f"{path}: matrix shape {counts.shape} does not match {barcodes.shape[0]} barcodes and "
            f"{ids.shape[0]} features"
        )
    return FeatureMatrix(counts=counts, barcodes=barcodes, ids=ids, names=names, types=types, layout=layout)


# ---------------------------------------------------------------------------------------------
# MTX
# ---------------------------------------------------------------------------------------------


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def is_mtx_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a 10x MTX matrix (matrix.mtx[.gz])."""
    return folder.is_dir() and _first_existing(folder, MTX_NAMES) is not None


def _text_rows(path: Path) -> list[list[str]]:
    """The non-empty tab-separated rows of a 10x text file, gzipped or not."""
    try:
        with open_text(path) as handle:
            return [r for r in csv.reader(handle, delimiter="\t") if r]
    except TEXT_ERRORS as exc:  # BadGzipFile is an OSError, a bad stream a zlib.error
        raise CorruptSourceError(
            f"{path}: cannot be read as {'gzipped ' if path.name.endswith('.gz') else ''}UTF-8 text "
            f"({type(exc).__name__}: {exc}); the file is truncated or damaged: fetch it again from its source"
        ) from exc


def read_mtx(folder: Path) -> FeatureMatrix:
    """Read a 10x MTX folder: ``matrix.mtx[.gz]``, ``features.tsv[.gz]`` or ``genes.tsv``, ``barcodes.tsv[.gz]``."""
    import scipy.io
    import scipy.sparse as sp

    matrix_path = _first_existing(folder, MTX_NAMES)
    features_path = _first_existing(folder, FEATURE_NAMES)
    barcodes_path = _first_existing(folder, BARCODE_NAMES)
    missing = [
        what
        for what, p in (("matrix.mtx[.gz]", matrix_path), ("features.tsv[.gz]/genes.tsv", features_path))
        if p is None
    ] + (["barcodes.tsv[.gz]"] if barcodes_path is None else [])
    if matrix_path is None or features_path is None or barcodes_path is None:
        raise SourceMissingError(f"{folder}: MTX folder lacks {', '.join(missing)}")
    try:
        coo = scipy.io.mmread(str(matrix_path))
    except (ValueError, OSError, EOFError) as exc:
        raise CorruptSourceError(f"{matrix_path}: not a readable Matrix Market file: {exc}") from exc
    counts = sp.csr_matrix(sp.coo_matrix(coo).T)
    rows = _text_rows(features_path)
    barcodes = np.array([r[0].strip() for r in _text_rows(barcodes_path) if r[0].strip()], dtype=np.str_)
    if any(len(r) < 1 for r in rows):
        raise CorruptSourceError(f"{features_path}: empty feature line")
    ids = np.array([r[0] for r in rows], dtype=np.str_)
    names = np.array([r[1] if len(r) > 1 else r[0] for r in rows], dtype=np.str_)
    types = np.array([r[2] if len(r) > 2 else GENE_EXPRESSION for r in rows], dtype=np.str_)
    if counts.shape != (barcodes.shape[0], ids.shape[0]):
        raise CorruptSourceError(
            f"{matrix_path}: matrix is {counts.shape[1]} features x {counts.shape[0]} barcodes but "
            f"{features_path.name} lists {ids.shape[0]} and {barcodes_path.name} {barcodes.shape[0]}"
        )
    return FeatureMatrix(counts=counts, barcodes=barcodes, ids=ids, names=names, types=types, layout="mtx")


# ---------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------


def _rows(path: Path) -> list[list[str]]:
    try:
        with open_text(path) as handle:
            return [[c.strip() for c in row] for row in csv.reader(handle) if row]
    except TEXT_ERRORS as exc:
        raise CorruptSourceError(
            f"{path}: cannot be read as UTF-8 CSV ({type(exc).__name__}: {exc}); the positions file is damaged: "
            "fetch it again from its source"
        ) from exc


def read_positions(path: Path) -> Positions:
    """Read ``tissue_positions_list.csv`` (no header), ``tissue_positions.csv`` (header) or ``.parquet``.

    Whether a CSV has a header is read from its first line, not from its name: both names are
    met with both forms in re-published data.
    """
    if path.name.lower().endswith(".parquet"):
        return _read_positions_parquet(path)
    rows = _rows(path)
    if not rows:
        raise CorruptSourceError(f"{path}: empty positions file")
    header = rows[0][0].lower() == "barcode"
    if header:
        columns = [c.lower() for c in rows[0]]
        missing = [c for c in POSITION_COLUMNS if c not in columns]
        if missing:
            raise CorruptSourceError(f"{path}: header lacks column(s) {', '.join(missing)} (has {', '.join(rows[0])})")
        order = [columns.index(c) for c in POSITION_COLUMNS]
        body = rows[1:]
        layout = "tissue_positions (header)"
    else:
        order = list(range(len(POSITION_COLUMNS)))
        body = rows
        layout = "tissue_positions_list (no header)"
    try:
        table = [[row[i] for i in order] for row in body]
        barcode = np.array([r[0] for r in table], dtype=np.str_)
        in_tissue = np.array([int(float(r[1])) for r in table], dtype=np.int64) != 0
        array_row = np.array([round(float(r[2])) for r in table], dtype=np.int32)
        array_col = np.array([round(float(r[3])) for r in table], dtype=np.int32)
        pxl_row = np.array([coordinate(r[4]) for r in table], dtype=np.float64)
        pxl_col = np.array([coordinate(r[5]) for r in table], dtype=np.float64)
    except (IndexError, ValueError, OverflowError) as exc:
        raise CorruptSourceError(
            f"{path}: malformed positions row ({exc}); expected {', '.join(POSITION_COLUMNS)}"
        ) from exc
    return Positions(barcode, in_tissue, array_row, array_col, pxl_row, pxl_col, layout)


def _read_positions_parquet(path: Path) -> Positions:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise CorruptSourceError(f"{path}: not a readable Parquet file: {exc}") from exc
    missing = [c for c in POSITION_COLUMNS if c not in table.column_names]
    if missing:
        raise CorruptSourceError(f"{path}: lacks column(s) {', '.join(missing)} (has {', '.join(table.column_names)})")

    def column(name: str) -> npt.NDArray[Any]:
        return np.asarray(table.column(name).to_numpy(zero_copy_only=False))

    def pixels(name: str) -> npt.NDArray[np.float64]:
        try:
            return column(name).astype(np.float64)  # nulls become NaN: dropped spots, counted by the join
        except (TypeError, ValueError) as exc:
            raise CorruptSourceError(f"{path}: column {name!r} is not numeric ({exc})") from exc

    return Positions(
        barcode=as_str_array(column("barcode")),
        in_tissue=whole_numbers(column("in_tissue"), what=f"{path}: column 'in_tissue'") != 0,
        array_row=whole_numbers(column("array_row"), what=f"{path}: column 'array_row'").astype(np.int32),
        array_col=whole_numbers(column("array_col"), what=f"{path}: column 'array_col'").astype(np.int32),
        pxl_row=pixels("pxl_row_in_fullres"),
        pxl_col=pixels("pxl_col_in_fullres"),
        layout="tissue_positions.parquet",
    )
