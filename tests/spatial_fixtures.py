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


def marker_offset(patch: bytes, *, half_window_px: int) -> tuple[float, float]:
    """Offset (dx, dy) in patch px of the marker's centroid from the centre of an encoded square patch.

    Only the central ``2 * half_window_px`` square is measured, so that the marker of a
    neighbouring site at the edge of the patch does not pull the centroid.
    """
    from tests.test_tiles import centroid, decode

    pixels = decode(patch)
    size = pixels.shape[0]
    lo = size // 2 - half_window_px
    cx, cy = centroid(pixels[lo : lo + 2 * half_window_px, lo : lo + 2 * half_window_px])
    middle = (size - 1) / 2  # pixel i is centred on i: the patch centre is between the middle two
    return cx + lo - middle, cy + lo - middle


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


# ---------------------------------------------------------------------------------------------
# Xenium
# ---------------------------------------------------------------------------------------------

#: Control features of a Xenium panel, by the feature_type Xenium's matrix gives them.
XENIUM_CONTROLS = (
    ("NegControlProbe_00001", "Negative Control Probe"),
    ("NegControlProbe_00002", "Negative Control Probe"),
    ("NegControlCodeword_0500", "Negative Control Codeword"),
    ("UnassignedCodeword_0001", "Unassigned Codeword"),
)
PIXEL_SIZE_UM = 0.2125  # um per morphology-image pixel (Xenium's experiment.xenium)


@dataclass(frozen=True)
class Xenium:
    """A generated Xenium output bundle, its H&E and alignment, and what was put in them."""

    outs: Path
    image: Path
    alignment: Path
    he_mpp: float
    cell_ids: list[str]
    cell_px: npt.NDArray[np.float64]  # (n, 2) H&E pixel centre of each cell
    cell_um: npt.NDArray[np.float64]  # (n, 2) centroid in um
    gene_counts: sp.csr_matrix  # cells x genes: transcripts with qv >= 20 of gene features
    ids: list[str]
    names: list[str]
    transcripts_um: npt.NDArray[np.float64]  # (m, 2)
    transcript_feature: list[str]
    transcript_qv: npt.NDArray[np.float64]


def write_xenium(
    root: Path, *, n_side: int = 7, spacing_um: float = 40.0, he_mpp: float = 0.5, n_genes: int = 10, seed: int = 1
) -> Xenium:
    """Write ``root/outs/`` (experiment.xenium, cell_feature_matrix.h5, cells.parquet, transcripts.parquet),
    an H&E PNG and ``he_imagealignment.csv``.

    Cells sit on a jittered grid ``spacing_um`` apart, placed first in H&E pixels; the alignment
    (scale, 4 degree rotation, shift) takes H&E px to morphology px, so the reader must invert
    it. Transcripts lie within 4 um of their cell; some are control features, some unassigned,
    and their qv spans 5..40. The matrix counts each cell's transcripts with qv >= 20, controls
    in their own columns, as Xenium's does.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(n_side), np.arange(n_side)), axis=-1).reshape(-1, 2).astype(float)
    margin_px = 60.0
    cell_px = margin_px + (grid * spacing_um + rng.uniform(-4, 4, size=grid.shape)) / he_mpp
    angle = math.radians(4.0)
    scale = he_mpp / PIXEL_SIZE_UM  # morphology px per H&E px
    alignment = np.array(
        [
            [scale * math.cos(angle), -scale * math.sin(angle), 35.0],
            [scale * math.sin(angle), scale * math.cos(angle), -12.0],
            [0.0, 0.0, 1.0],
        ]
    )
    morphology = np.column_stack([cell_px, np.ones(len(cell_px))]) @ alignment.T
    cell_um = morphology[:, :2] * PIXEL_SIZE_UM
    n_cells = len(cell_um)
    cell_ids = [f"{''.join(chr(97 + (i // 26**k) % 26) for k in range(8))}-1" for i in range(n_cells)]

    ids, names = real_genes(n_genes)
    features = [(n, "Gene Expression") for n in names] + list(XENIUM_CONTROLS)
    feature_names = [f for f, _ in features]
    rows: list[dict[str, Any]] = []
    for cell in range(-1, n_cells):  # -1: transcripts assigned to no cell
        n = int(rng.integers(10, 40))
        centre = cell_um[cell] if cell >= 0 else cell_um.mean(axis=0)
        spread = 4.0 if cell >= 0 else 60.0
        for _ in range(n):
            f = (
                int(rng.integers(0, len(features)))
                if rng.random() < 0.85
                else int(rng.integers(n_genes, len(features)))
            )
            r, theta = spread * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
            rows.append(
                {
                    "cell": cell,
                    "feature": f,
                    "x": float(centre[0] + r * math.cos(theta)),
                    "y": float(centre[1] + r * math.sin(theta)),
                    "qv": float(rng.uniform(5, 40)),
                }
            )
    matrix = np.zeros((n_cells, len(features)), dtype=np.int32)
    for row in rows:
        if row["cell"] >= 0 and row["qv"] >= 20:
            matrix[row["cell"], row["feature"]] += 1

    outs = root / "outs"
    outs.mkdir(parents=True)
    specs = {
        "major_version": 5,
        "minor_version": 0,
        "run_name": "generated",
        "region_name": "region",
        "analysis_sw_version": "xenium-2.0.0.10",
        "pixel_size": PIXEL_SIZE_UM,
    }
    (outs / "experiment.xenium").write_text(json.dumps(specs))
    write_10x_h5(
        outs / "cell_feature_matrix.h5",
        sp.csr_matrix(matrix),
        cell_ids,
        ids + feature_names[n_genes:],
        feature_names,
        types=[t for _, t in features],
    )
    gene_cols = matrix[:, :n_genes]
    cells = pa.table(
        {
            "cell_id": cell_ids,
            "x_centroid": cell_um[:, 0],
            "y_centroid": cell_um[:, 1],
            "transcript_counts": gene_cols.sum(axis=1).astype(np.uint32),
            "control_probe_counts": matrix[:, n_genes : n_genes + 2].sum(axis=1).astype(np.uint32),
            "control_codeword_counts": matrix[:, n_genes + 2].astype(np.uint32),
            "unassigned_codeword_counts": matrix[:, n_genes + 3].astype(np.uint32),
            "deprecated_codeword_counts": np.zeros(n_cells, dtype=np.uint32),
            "total_counts": matrix.sum(axis=1).astype(np.uint32),
            "cell_area": np.full(n_cells, 80.0),
            "nucleus_area": np.full(n_cells, 30.0),
        }
    )
    pq.write_table(cells, outs / "cells.parquet")
    transcripts = pa.table(
        {
            "transcript_id": np.arange(len(rows), dtype=np.uint64),
            "cell_id": [cell_ids[r["cell"]] if r["cell"] >= 0 else "UNASSIGNED" for r in rows],
            "overlaps_nucleus": np.zeros(len(rows), dtype=np.uint8),
            "feature_name": [feature_names[r["feature"]] for r in rows],
            "x_location": np.array([r["x"] for r in rows], dtype=np.float32),
            "y_location": np.array([r["y"] for r in rows], dtype=np.float32),
            "z_location": np.full(len(rows), 10.0, dtype=np.float32),
            "qv": np.array([r["qv"] for r in rows], dtype=np.float32),
            "fov_name": ["A1"] * len(rows),
            "nucleus_distance": np.zeros(len(rows), dtype=np.float32),
        }
    )
    pq.write_table(transcripts, outs / "transcripts.parquet")
    alignment_path = root / "he_imagealignment.csv"
    np.savetxt(alignment_path, alignment, delimiter=",")
    image = root / "he_image.png"
    size = int(cell_px.max() + margin_px)
    marker_png(image, size, size, cell_px[:, 0], cell_px[:, 1])
    return Xenium(
        outs=outs,
        image=image,
        alignment=alignment_path,
        he_mpp=he_mpp,
        cell_ids=cell_ids,
        cell_px=cell_px,
        cell_um=cell_um,
        gene_counts=sp.csr_matrix(gene_cols),
        ids=ids,
        names=names,
        transcripts_um=np.array([[r["x"], r["y"]] for r in rows], dtype=np.float32).astype(np.float64),
        transcript_feature=[feature_names[r["feature"]] for r in rows],
        transcript_qv=np.array([r["qv"] for r in rows], dtype=np.float32).astype(np.float64),
    )
