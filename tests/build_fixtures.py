"""Manifests and slide variants for build tests, made from the real fixtures in tests/data.

Good slides are the real squidpy sample (full-resolution H&E crop + h5ad) read as HEST samples;
variants keep a different subset of its spots so that each is a distinct slide (deduplication
would otherwise, rightly, keep only one). Bad slides are crafted from the real files.
"""

from __future__ import annotations

import hashlib
import shutil
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import FULLRES, HEART

H5AD = FULLRES / "test_data.h5ad"
IMAGE = FULLRES / "test_img.jpg"
MPP = 0.7267  # HEST-1k's pixel_size_um_estimated for this slide (TENX52)


def variant_h5ad(folder: Path, name: str, *, drop: int, integer: bool = False) -> Path:
    """The real h5ad without spots ``drop``, ``drop + 7``, ... (and with integer counts if asked)."""
    import anndata

    adata = anndata.read_h5ad(H5AD)
    keep = np.ones(adata.n_obs, dtype=bool)
    keep[drop::7] = False
    adata = adata[keep].copy()
    if integer:
        # expm1 of the stored log1p values, rounded: integer counts with the same spatial structure.
        adata.X = adata.X.expm1().rint().astype(np.int32) if hasattr(adata.X, "expm1") else np.rint(np.expm1(adata.X))
    path = folder / f"{name}.h5ad"
    adata.write_h5ad(path)
    return path


def hest_entry(
    slide_id: str,
    *,
    st: Path | str = H5AD,
    wsi: Path | str = IMAGE,
    source: str = "hest",
    licence: str = "CC-BY-4.0",
    patient: str | None = None,
    counts: str = "normalized",
    mpp: float | None = MPP,
) -> str:
    lines = [
        f"- id: {slide_id}",
        f"  source: {source}",
        f"  licence: {licence}",
        f"  counts: {counts}",
        f"  sources: {{st: '{st}', wsi: '{wsi}'}}",
    ]
    if patient:
        lines.append(f"  patient: {patient}")
    if mpp is not None:
        lines.append(f"  mpp: {mpp}")
    return "\n".join(lines)


def spaceranger_entry(slide_id: str, *, matrix: Path, spatial: Path, species: str = "human") -> str:
    return "\n".join(
        [
            f"- id: {slide_id}",
            "  technology: spaceranger",
            "  assay: visium",
            f"  species: {species}",
            f"  sources: {{matrix: '{matrix}', spatial: '{spatial}'}}",
        ]
    )


def manifest(folder: Path, entries: list[str], *, name: str = "test-corpus") -> Path:
    body = textwrap.indent("\n".join(entries), "      ")
    text = f"""manifest: stcorpus-manifest/1
name: {name}
allow_local: true
defaults: {{source: hest, technology: hest, assay: visium, species: mouse, organ: brain, licence: CC-BY-4.0}}
studies:
  - id: study
    samples:
{body}
"""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def good_slides(folder: Path, n: int, *, integer: bool = False) -> list[str]:
    """``n`` distinct real-data slides (each in its own patient group)."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        st = variant_h5ad(folder, f"good{i}", drop=i, integer=integer)
        entries.append(hest_entry(f"GOOD-{i}", st=st, patient=f"P{i}", counts="raw" if integer else "normalized"))
    return entries


def bad_slides(folder: Path) -> dict[str, tuple[str, str]]:
    """One crafted slide per quarantine kind: slide id -> (manifest entry, expected reason code)."""
    folder.mkdir(parents=True, exist_ok=True)
    # Corrupt h5: the real Space Ranger matrix cut in half.
    corrupt = folder / "corrupt.h5"
    data = (HEART / "filtered_feature_bc_matrix.h5").read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])
    # Missing scale factors: the real spatial folder without scalefactors_json.json.
    no_scalefactors = folder / "spatial-no-scalefactors"
    shutil.copytree(HEART / "spatial", no_scalefactors)
    (no_scalefactors / "scalefactors_json.json").unlink()
    # Blank image: a white image of the crop's size.
    blank = folder / "blank.png"
    Image.new("RGB", Image.open(IMAGE).size, (255, 255, 255)).save(blank)
    # Spots outside the image: the top-left 300x300 px of the real crop.
    small = folder / "small.jpg"
    Image.open(IMAGE).crop((0, 0, 300, 300)).save(small, quality=95)
    # Unmapped genes: the real h5ad with every gene renamed to a probe-like id.
    import anndata

    adata = anndata.read_h5ad(H5AD)
    adata.var_names = [f"PROBE_{hashlib.sha1(str(i).encode()).hexdigest()[:8]}" for i in range(adata.n_vars)]
    adata.var = adata.var.drop(columns=["gene_ids"])
    unmapped = folder / "unmapped.h5ad"
    adata.write_h5ad(unmapped)
    return {
        "BAD-corrupt-h5": (
            spaceranger_entry("BAD-corrupt-h5", matrix=corrupt, spatial=HEART / "spatial"),
            "corrupt_file",
        ),
        "BAD-no-scalefactors": (
            spaceranger_entry(
                "BAD-no-scalefactors", matrix=HEART / "filtered_feature_bc_matrix.h5", spatial=no_scalefactors
            ),
            "missing_file",
        ),
        "BAD-blank": (hest_entry("BAD-blank", wsi=blank), "blank_image"),
        "BAD-too-coarse": (
            spaceranger_entry(
                "BAD-too-coarse", matrix=HEART / "filtered_feature_bc_matrix.h5", spatial=HEART / "spatial"
            ),
            "image_too_coarse",
        ),
        "BAD-outside": (hest_entry("BAD-outside", wsi=small), "spots_outside_image"),
        "BAD-unmapped": (hest_entry("BAD-unmapped", st=unmapped), "unmapped_genes"),
    }
