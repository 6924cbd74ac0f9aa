"""Reading (and QC-ing) a slide never decodes its whole-slide image.

A 40,000 x 40,000 RGB pyramidal TIFF (4.8 GB decoded, ~40 MB on disk: one pre-compressed JPEG
tile repeated) is read as a HEST sample and QC'd in a fresh process whose peak resident memory
is measured (VmHWM). The limit asserted is 512 MiB, about a tenth of the decoded size.
Measured here: 184 MiB peak, of which 152 MiB is the interpreter with numpy, scipy, anndata,
zarr and tifffile imported and nothing read: reading and QC add about 30 MiB.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import scipy.sparse as sp

from tests.test_readers_support import write_repeated_pyramid

SIDE = 40_000
DECODED_BYTES = SIDE * SIDE * 3
LIMIT_BYTES = 512 * 2**20

PROBE = """
import json, resource, sys
from pathlib import Path
from stcorpus.curate.qc import check_slide
from stcorpus.curate.readers import read_slide
from tests.test_readers_support import make_sample
sources = {k: Path(v) for k, v in json.loads(sys.argv[1]).items()}
sample = make_sample(sources, technology="hest", assay="visium", species="human")
slide = check_slide(read_slide(sample, dict(sources)))
# VmHWM is this process's own high-water mark: ru_maxrss would carry the parent's over fork+exec
status = Path("/proc/self/status")
hwm = [line for line in status.read_text().splitlines() if line.startswith("VmHWM:")] if status.exists() else []
peak = int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak": peak, "spots": len(slide.spots), "flags": slide.flags, "mpp": slide.mpp,
                  "levels": len(slide.image.levels), "qc": [c.name for c in slide.qc if c.passed]}))
"""


def _hest_on_big_image(tmp_path: Path) -> dict[str, str]:
    yy, xx = np.mgrid[0:1024, 0:1024]
    tile = np.stack(
        [200 + 20 * np.sin(xx / 160.7), 150 + 30 * np.cos(yy / 133.1), 190 + 15 * np.sin((xx + yy) / 250.3)], axis=-1
    ).astype(np.uint8)
    wsi = tmp_path / "BIG1.tif"
    write_repeated_pyramid(wsi, width=SIDE, height=SIDE, tile_pixels=tile, resolution_um=0.025, quality=50)

    mpp = 0.25  # 100 um pitch = 400 px
    pitch = 100.0 / mpp
    grid = [(r, c) for r in range(40) for c in range(180) if (r + c) % 2 == 0]
    rows = np.array([r for r, _ in grid])
    cols = np.array([c for _, c in grid])
    x = 2000 + cols * pitch / 2
    y = 2000 + rows * pitch * math.sqrt(3) / 2
    n = len(grid)
    counts = sp.random(n, 200, density=0.1, format="csr", random_state=0, dtype=np.float64)
    counts.data = np.ceil(counts.data * 20).astype(np.float32)
    adata = anndata.AnnData(X=counts.astype(np.float32))
    adata.obs_names = [f"B{i:05d}-1" for i in range(n)]
    adata.var_names = [f"GENE{i}" for i in range(200)]
    columns = {"in_tissue": np.ones(n, dtype=np.int64), "array_row": rows, "array_col": cols}
    for name, values in {**columns, "pxl_col_in_fullres": x, "pxl_row_in_fullres": y}.items():
        adata.obs[name] = values
    adata.obsm["spatial"] = np.column_stack([x, y])
    st = tmp_path / "BIG1.h5ad"
    adata.write_h5ad(st)
    metadata = tmp_path / "BIG1.json"
    metadata.write_text(
        json.dumps({"pixel_size_um_estimated": mpp, "fullres_px_width": SIDE, "fullres_px_height": SIDE})
    )
    return {"st": str(st), "wsi": str(wsi), "metadata": str(metadata)}


def test_reading_a_40k_slide_stays_far_below_its_decoded_size(tmp_path: Path) -> None:
    sources = _hest_on_big_image(tmp_path)
    assert Path(sources["wsi"]).stat().st_size < 100 * 2**20
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(sources)], capture_output=True, text=True, cwd=root, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["spots"] == 3600
    assert report["levels"] >= 6
    assert report["flags"] == []
    assert "image_not_blank" in report["qc"] and "mpp_lattice_agreement" in report["qc"]
    assert report["peak"] < LIMIT_BYTES, f"peak RSS {report['peak'] / 2**20:.0f} MiB"
    assert report["peak"] < DECODED_BYTES / 9
