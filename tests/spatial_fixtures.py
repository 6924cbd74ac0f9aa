"""Visium HD and Xenium outputs generated at test time, laid out as 10x documents them (no tests here).

No real Visium HD output with counts, nor a Xenium bundle with H&E, is small enough to ship, so
these write the files the readers read, with 10x's names, columns and HDF5 layout (Space Ranger
3.x "Binned outputs" and Xenium Onboard Analysis "Output files"; the same names spatialdata-io's
``visium_hd`` and ``xenium`` readers read). Counts are seeded Poisson draws; genes are the first
rows of the real GRCh38-2020-A feature list in tests/data. The H&E is white with a dark marker
disc where each expected site centre is, so tile centring can be measured.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

DATA = Path(__file__).parent / "data"
FEATURES = DATA / "feature-lists" / "GRCh38-2020-A_features.tsv.gz"


def real_genes(n: int) -> tuple[list[str], list[str]]:
    """The first ``n`` (Ensembl id, symbol) of the real GRCh38-2020-A feature list."""
    ids, names = [], []
    with gzip.open(FEATURES, "rt") as handle:
        for line in handle:
            gene_id, name, _ = line.rstrip("\n").split("\t")
            ids.append(gene_id)
            names.append(name)
            if len(ids) == n:
                break
    return ids, names


def write_10x_h5(
    path: Path, counts: sp.csr_matrix, barcodes: list[str], ids: list[str], names: list[str], *, types: list[str]
) -> None:
    """A Cell Ranger / Space Ranger / Xenium v3 feature-barcode matrix (features x barcodes, CSC)."""
    csc = sp.csc_matrix(counts.T.astype(np.int32))  # features x barcodes: its CSC is barcodes-major
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["library_ids"] = np.array([b"library"])
        f.attrs["chemistry_description"] = b"generated"
        f.attrs["software_version"] = b"generated-by-stcorpus-tests"
        g = f.create_group("matrix")
        g["barcodes"] = np.array([b.encode() for b in barcodes])
        g["data"] = csc.data.astype(np.int32)
        g["indices"] = csc.indices.astype(np.int64)
        g["indptr"] = csc.indptr.astype(np.int64)
        g["shape"] = np.array([len(ids), len(barcodes)], dtype=np.int32)
        feats = g.create_group("features")
        feats["_all_tag_keys"] = np.array([b"genome"])
        feats["id"] = np.array([i.encode() for i in ids])
        feats["name"] = np.array([n.encode() for n in names])
        feats["feature_type"] = np.array([t.encode() for t in types])
        feats["genome"] = np.array([b"GRCh38"] * len(ids))


def marker_png(path: Path, width: int, height: int, xs: npt.NDArray[np.float64], ys: npt.NDArray[np.float64]) -> None:
    """A white RGB PNG with an antialiased dark disc (radius 6 px) centred on pixel (x, y) of each marker."""
    from PIL import Image

    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    radius = 6.0
    for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
        x0, x1 = max(int(x - radius - 2), 0), min(int(x + radius + 3), width)
        y0, y1 = max(int(y - radius - 2), 0), min(int(y + radius + 3), height)
        if x0 >= x1 or y0 >= y1:  # off the image
            continue
        jj, ii = np.mgrid[y0:y1, x0:x1]
        coverage = np.clip(radius - np.hypot(ii - x, jj - y) + 0.5, 0, 1)
        dark = (255 - 235 * coverage)[..., None].astype(np.uint8)
        pixels[y0:y1, x0:x1] = np.minimum(pixels[y0:y1, x0:x1], dark)
    Image.fromarray(pixels).save(path)


# ---------------------------------------------------------------------------------------------
# Visium HD
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisiumHD:
    """A generated Space Ranger 3.x ``outs/`` with one bin size, and what was put in it."""

    outs: Path
    image: Path
    bin_um: int
    mpp: float
    rows: npt.NDArray[np.int64]  # every bin's array_row (positions file order)
    cols: npt.NDArray[np.int64]
    in_tissue: npt.NDArray[np.bool_]
    counts: sp.csr_matrix  # in-tissue bins x genes, in the order of `barcodes`
    barcodes: list[str]
    ids: list[str]
    to_pixels: npt.NDArray[np.float64]  # 2x3: (bin-frame um x, y, 1) -> full-resolution px

    def pixels_of(self, x_um: npt.ArrayLike, y_um: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Full-resolution pixel centres of points in the bins' frame (um from the grid's corner)."""
        xs, ys = np.asarray(x_um, dtype=np.float64), np.asarray(y_um, dtype=np.float64)
        pixels: npt.NDArray[np.float64] = np.column_stack([xs, ys, np.ones_like(xs)]) @ self.to_pixels.T
        return pixels


def write_visium_hd(
    root: Path,
    *,
    bin_um: int = 8,
    n_rows: int = 40,
    n_cols: int = 44,
    mpp: float = 0.5,
    angle_deg: float = 2.0,
    n_genes: int = 12,
    seed: int = 0,
    markers_um: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None,
) -> VisiumHD:
    """Write ``root/outs/binned_outputs/square_<bin>um/`` and a full-resolution H&E.

    Bins sit on a grid rotated by ``angle_deg`` on the image (as a tissue placed askew); the
    tissue is a disc covering most of the grid (bins outside are in the positions file with
    ``in_tissue`` 0 and not in the filtered matrix). ``markers_um`` (points in the bins' frame)
    are drawn on the image.
    """
    rng = np.random.default_rng(seed)
    rows, cols = (a.ravel() for a in np.mgrid[0:n_rows, 0:n_cols])
    x_um, y_um = (cols + 0.5) * bin_um, (rows + 0.5) * bin_um
    centre = np.array([n_cols, n_rows]) * bin_um / 2
    in_tissue = np.hypot(x_um - centre[0], y_um - centre[1]) <= 0.48 * min(n_rows, n_cols) * bin_um
    angle = math.radians(angle_deg)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) / mpp
    offset = np.array([40.0, 60.0])
    to_pixels = np.column_stack([rotation, offset])
    pixels = np.column_stack([x_um, y_um, np.ones_like(x_um)]) @ to_pixels.T
    names_all = [f"s_{bin_um:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]
    ids, names = real_genes(n_genes)
    tissue = np.flatnonzero(in_tissue)
    counts = sp.csr_matrix(rng.poisson(0.8, size=(tissue.size, n_genes)).astype(np.int32))
    barcodes = [names_all[i] for i in tissue]

    folder = root / "outs" / "binned_outputs" / f"square_{bin_um:03d}um"
    spatial = folder / "spatial"
    spatial.mkdir(parents=True)
    write_10x_h5(
        folder / "filtered_feature_bc_matrix.h5", counts, barcodes, ids, names, types=["Gene Expression"] * n_genes
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Space Ranger's column order (spatialdata-io's visium_hd reader asserts it).
    table = pa.table(
        {
            "barcode": names_all,
            "in_tissue": in_tissue.astype(np.int32),
            "array_row": rows.astype(np.int32),
            "array_col": cols.astype(np.int32),
            "pxl_row_in_fullres": pixels[:, 1],
            "pxl_col_in_fullres": pixels[:, 0],
        }
    )
    pq.write_table(table, spatial / "tissue_positions.parquet")
    scalefactors: dict[str, Any] = {
        "spot_diameter_fullres": bin_um / mpp,
        "bin_size_um": float(bin_um),
        "microns_per_pixel": mpp,
        "regist_target_img_scalef": 0.2,
        "tissue_lowres_scalef": 0.02,
        "fiducial_diameter_fullres": 300.0,
        "tissue_hires_scalef": 0.2,
    }
    (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    width = int(pixels[:, 0].max() + 80)
    height = int(pixels[:, 1].max() + 80)
    image = root / "tissue_image.png"
    mx = my = np.zeros(0)
    if markers_um is not None:
        marked = np.column_stack([markers_um[0], markers_um[1], np.ones_like(markers_um[0])]) @ to_pixels.T
        mx, my = marked[:, 0], marked[:, 1]
    marker_png(image, width, height, mx, my)
    return VisiumHD(
        outs=root / "outs",
        image=image,
        bin_um=bin_um,
        mpp=mpp,
        rows=rows,
        cols=cols,
        in_tissue=in_tissue,
        counts=counts,
        barcodes=barcodes,
        ids=ids,
        to_pixels=to_pixels,
    )
