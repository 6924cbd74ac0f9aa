"""``curate export``: one slide of a built corpus as an AnnData ``.h5ad`` file or a SpatialData ``.zarr`` store.

The samples are read from the corpus' Parquet shards (``shards.parquet`` names the shards that
hold the slide, so no other shard is opened), expanded from the compact ``genes``/``counts``
lists into a sparse spot x gene matrix over the corpus's measured genes (``genes.parquet``), and
written with:

- ``X``: the counts as stored (raw counts; ``uns['stcorpus']['count_kind']`` says otherwise);
- ``var``: the genes the corpus measured (``genes.parquet`` ``measured``, not the references' whole
  vocabulary): ``ensembl_id`` (the index), ``symbol`` and ``index`` (the gene's vocabulary index);
- ``obs``: the sample key (index), barcode, ``array_row``/``array_col`` (null for cell-level
  data), ``total_counts``, ``n_genes``, ``n_neighbors``;
- ``obsm['spatial']``: centres in full-resolution pixels (``µm / mpp``, the scanpy/squidpy
  convention), ``obsm['spatial_um']``: the same in micrometres;
- ``uns['stcorpus']``: ``mpp`` (µm per pixel), the corpus schema and the slide's
  ``slides.parquet`` row; ``uns['spatial'][slide_id]['scalefactors']`` as scanpy reads them;
- with ``with_patches`` (``--with-patches``): ``obsm['patch']``, every sample's H&E patch decoded
  to ``uint8`` (n x H x W x 3, rows in ``obs`` order), and ``uns['stcorpus']['patch_mpp']``, the
  patch's µm per pixel (the corpus' ``patch`` view in ``corpus.json``).

``--to FILE.zarr`` writes the same AnnData as the table of a SpatialData store (extra
``stcorpus[spatialdata]``), annotating a shapes element ``<slide_id>_sites``: a circle per
sample at its centre in micrometres, radius half the assay's spot diameter (Visium 55 um,
legacy ST 100 um), or half the patch field for sites without one (bins, cells). Coordinate
systems: ``global`` in micrometres (identity) and ``fullres`` in full-resolution pixels (a
scale of 1 / mpp), so spatialdata, squidpy and napari-spatialdata place it as the source did.
With ``--with-patches`` the table's ``obsm['patch']`` holds the patches (the store has no image
element: the tiles are per sample, not one slide image).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from stcorpus import schema
from stcorpus.curate.errors import ExportError

if TYPE_CHECKING:
    import anndata as ad

#: Target formats by file suffix.
EXPORT_SUFFIXES = (".h5ad", ".zarr")
#: Coordinate systems of an exported SpatialData store: micrometres, and full-resolution pixels.
MICRONS_SYSTEM = "global"
PIXELS_SYSTEM = "fullres"
#: The table's region and instance columns in an exported store.
REGION_COLUMN = "region"
INSTANCE_COLUMN = "instance_id"


def _slide_row(root: Path, slide_id: str) -> dict[str, Any]:
    import pyarrow.parquet as pq

    path = root / schema.SLIDES_FILE
    if not path.is_file():
        raise ExportError(f"{root}: no {schema.SLIDES_FILE}; is this a built corpus (curate build)?")
    rows = [r for r in pq.read_table(path).to_pylist() if r["slide_id"] == slide_id]
    if not rows:
        raise ExportError(f"{path}: no slide {slide_id!r}; the slide ids are its slide_id column (status built)")
    row: dict[str, Any] = rows[0]
    if row.get("status") != "built":
        raise ExportError(f"{path}: slide {slide_id!r} has status {row.get('status')!r}, no samples to export")
    return row


def _slide_samples(root: Path, slide_id: str, *, with_patches: bool = False) -> list[dict[str, Any]]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    shards = pq.read_table(root / schema.SHARDS_FILE).to_pylist()
    paths = [s["path"] for s in shards if s["format"] == "parquet" and slide_id in (s["slide_ids"] or [])]
    if not paths:
        raise ExportError(
            f"{root / schema.SHARDS_FILE}: no Parquet shard holds slide {slide_id!r}; export reads the Parquet "
            "shards: rebuild the corpus with `curate build` (with --formats, one that names parquet)"
        )
    # The image columns hold most of a shard's bytes: read the patch only when it is asked for.
    skipped = (schema.REGION_COLUMN,) if with_patches else (schema.PATCH_COLUMN, schema.REGION_COLUMN)
    columns = [c for c in schema.SAMPLE_COLUMNS if c not in skipped]
    rows: list[dict[str, Any]] = []
    for rel in paths:
        table = pq.read_table(root / rel, columns=columns)
        rows.extend(table.filter(pc.equal(table[schema.SLIDE_ID], slide_id)).to_pylist())
    rows.sort(key=lambda r: r[schema.KEY_COLUMN])
    return rows


def _decode_patches(samples: list[dict[str, Any]], *, slide_id: str, size_px: int) -> npt.NDArray[np.uint8]:
    """The samples' encoded patches (JPEG or PNG bytes) as one n x H x W x 3 uint8 array, in order."""
    import io

    from PIL import Image

    out = np.empty((len(samples), size_px, size_px, 3), dtype=np.uint8)
    for i, s in enumerate(samples):
        image = s[schema.PATCH_COLUMN]
        data = image.get("bytes") if isinstance(image, dict) else None
        if not data:
            raise ExportError(f"slide {slide_id!r}: sample {s[schema.KEY_COLUMN]!r} has no patch bytes in its shard")
        with Image.open(io.BytesIO(data)) as opened:
            pixels = np.asarray(opened.convert("RGB"))
        if pixels.shape != out.shape[1:]:
            raise ExportError(
                f"slide {slide_id!r}: patch of {s[schema.KEY_COLUMN]!r} is {pixels.shape[1]}x{pixels.shape[0]} px, "
                f"but corpus.json's patch view says {size_px} px; the corpus is inconsistent: rebuild it"
            )
        out[i] = pixels
    return out


def slide_anndata(root: Path, slide_id: str, *, with_patches: bool = False) -> ad.AnnData:
    """The samples of ``slide_id`` in the corpus at ``root`` as an AnnData (see the module doc).

    ``with_patches`` adds the decoded H&E patches as ``obsm['patch']`` and their µm/px as
    ``uns['stcorpus']['patch_mpp']``.
    """
    import anndata as ad
    import pandas as pd  # type: ignore[import-untyped]
    import scipy.sparse as sp

    root = Path(root)
    if not (root / schema.CORPUS_FILE).is_file():
        raise ExportError(f"{root}: not a corpus: no {schema.CORPUS_FILE}; give the --out folder of a `curate build`")
    info = json.loads((root / schema.CORPUS_FILE).read_text())
    slide = _slide_row(root, slide_id)
    samples = _slide_samples(root, slide_id, with_patches=with_patches)
    genes = _measured_genes(root)
    column = np.full(max((g["index"] for g in genes), default=-1) + 1, -1, dtype=np.int32)
    column[[g["index"] for g in genes]] = np.arange(len(genes), dtype=np.int32)
    indptr = np.zeros(len(samples) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(s[schema.Expr.GENES.value]) for s in samples])
    dtype = np.float32 if info.get(schema.CorpusKey.COUNTS_DTYPE.value) == "float32" else np.int32
    indices = np.concatenate([np.zeros(0, np.int32)] + [np.asarray(s["genes"], np.int32) for s in samples])
    if indices.size and (int(indices.max()) >= column.size or bool((column[indices] < 0).any())):
        raise ExportError(
            f"{root / schema.GENES_FILE}: slide {slide_id!r} has counts on genes its `measured` column says no slide "
            "measured; rebuild the corpus"
        )
    indices = column[indices] if indices.size else indices
    data = np.concatenate([np.zeros(0, dtype)] + [np.asarray(s["counts"], dtype) for s in samples])
    matrix = sp.csr_matrix((data, indices, indptr), shape=(len(samples), len(genes)))
    mpp = slide.get("mpp")
    if mpp is None or not mpp > 0:
        raise ExportError(
            f"{root / schema.SLIDES_FILE}: slide {slide_id!r} records no mpp; cannot give pixel positions"
        )
    um = np.array([[s["x_um"], s["y_um"]] for s in samples], dtype=np.float64).reshape(-1, 2)
    obs = pd.DataFrame(
        {
            "barcode": [s["barcode"] for s in samples],
            "array_row": pd.array([s["array_row"] for s in samples], dtype="Int32"),
            "array_col": pd.array([s["array_col"] for s in samples], dtype="Int32"),
            "total_counts": [s["total_counts"] for s in samples],
            "n_genes": [s["n_genes"] for s in samples],
            schema.N_NEIGHBORS: pd.array([s[schema.N_NEIGHBORS] for s in samples], dtype="Int32"),
        },
        index=pd.Index([s[schema.KEY_COLUMN] for s in samples], name="key"),
    )
    var = pd.DataFrame(
        {"symbol": [g["symbol"] or "" for g in genes], "index": np.asarray([g["index"] for g in genes], np.int32)},
        index=pd.Index([g["ensembl_id"] for g in genes], name="ensembl_id"),
    )
    meta = {k: v for k, v in slide.items() if isinstance(v, str | int | float) and not isinstance(v, bool)}
    ours: dict[str, Any] = {"mpp": float(mpp), "schema": str(info.get(schema.CorpusKey.SCHEMA.value)), "slide": meta}
    obsm: dict[str, npt.NDArray[Any]] = {"spatial": um / mpp, "spatial_um": um}
    if with_patches:
        view = schema.corpus_views(info)[schema.PATCH_COLUMN]
        obsm[schema.PATCH_COLUMN] = _decode_patches(samples, slide_id=slide_id, size_px=view.size_px)
        ours["patch_mpp"] = float(view.mpp)
    uns = {
        "stcorpus": ours,
        "spatial": {slide_id: {"scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 0.0}}},
    }
    return ad.AnnData(X=matrix, obs=obs, var=var, obsm=obsm, uns=uns)


def _measured_genes(root: Path) -> list[dict[str, Any]]:
    """Rows (index, ensembl_id, symbol) of the vocabulary genes the corpus measured, in index order.

    ``genes.parquet`` ``measured``; a corpus written before it has none and measured every gene.
    """
    import pyarrow.parquet as pq

    names = pq.read_schema(root / schema.GENES_FILE).names
    columns = ["index", "ensembl_id", "symbol"] + (["measured"] if "measured" in names else [])
    genes = [g for g in pq.read_table(root / schema.GENES_FILE, columns=columns).to_pylist() if g.get("measured", True)]
    genes.sort(key=lambda g: g["index"])
    return genes


def _site_radius_um(root: Path, slide: dict[str, Any]) -> float:
    from stcorpus.curate.geometry import GEOMETRIES

    geometry = GEOMETRIES.get(str(slide.get("assay")))
    if geometry is not None and geometry.spot_diameter_um is not None:
        return geometry.spot_diameter_um / 2.0
    info = json.loads((Path(root) / schema.CORPUS_FILE).read_text())
    return schema.corpus_views(info)[schema.PATCH_COLUMN].field_um / 2.0


def slide_spatialdata(root: Path, slide_id: str, *, with_patches: bool = False) -> Any:
    """The samples of ``slide_id`` as a SpatialData object: the AnnData table over one circle per sample.

    ``with_patches``: the table carries the patches as :func:`slide_anndata` gives them.
    """
    try:
        from spatialdata import SpatialData
        from spatialdata.models import ShapesModel, TableModel
        from spatialdata.transformations import Identity, Scale
    except ImportError as exc:
        raise ExportError(
            "--to FILE.zarr needs the spatialdata package: pip install 'stcorpus[spatialdata]' (or export .h5ad)"
        ) from exc
    import pandas as pd

    adata = slide_anndata(root, slide_id, with_patches=with_patches)
    mpp = float(adata.uns["stcorpus"]["mpp"])
    region = f"{slide_id}_sites"
    radius = _site_radius_um(root, adata.uns["stcorpus"]["slide"])
    adata.obs[REGION_COLUMN] = pd.Categorical([region] * adata.n_obs)
    adata.obs[INSTANCE_COLUMN] = np.arange(adata.n_obs, dtype=np.int64)
    circles = ShapesModel.parse(
        np.asarray(adata.obsm["spatial_um"], dtype=np.float64),
        geometry=0,
        radius=np.full(adata.n_obs, radius),
        index=pd.Index(adata.obs[INSTANCE_COLUMN].to_numpy(), name=INSTANCE_COLUMN),
        transformations={MICRONS_SYSTEM: Identity(), PIXELS_SYSTEM: Scale([1.0 / mpp, 1.0 / mpp], axes=("x", "y"))},
    )
    table = TableModel.parse(adata, region=region, region_key=REGION_COLUMN, instance_key=INSTANCE_COLUMN)
    return SpatialData(shapes={region: circles}, tables={"table": table})


def export_slide(root: Path, slide_id: str, target: Path, *, with_patches: bool = False) -> ad.AnnData:
    """Write slide ``slide_id`` of the corpus at ``root`` to ``target`` (``.h5ad`` or ``.zarr``).

    ``with_patches`` includes the decoded H&E patches (``obsm['patch']``, see the module doc).

    Returns the AnnData written (for ``.zarr``, the store's table).
    """
    import shutil

    target = Path(target)
    if target.suffix not in EXPORT_SUFFIXES:
        raise ExportError(f"{target}: unknown export format {target.suffix!r}; use one of {EXPORT_SUFFIXES}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    if target.suffix == ".zarr":
        sdata = slide_spatialdata(root, slide_id, with_patches=with_patches)
        if tmp.exists():
            shutil.rmtree(tmp)
        sdata.write(tmp)
        if target.exists():
            if not (target / "zarr.json").is_file() and not (target / ".zgroup").is_file():
                shutil.rmtree(tmp)
                raise ExportError(f"{target} exists and is not a zarr store: choose another --to path")
            shutil.rmtree(target)
        tmp.rename(target)
        written: ad.AnnData = sdata.tables["table"]
        return written
    adata = slide_anndata(root, slide_id, with_patches=with_patches)
    adata.write_h5ad(tmp)
    tmp.replace(target)
    return adata
