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
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import anndata
import numpy as np
import pyarrow.parquet as pq
import pytest
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


# --- decompression bombs: refused from the header, before anything is decoded -------------------

BOMB_SIDE = 60_000
#: The probe's address space is capped, so that code which did decode a bomb fails fast with a
#: MemoryError instead of taking the machine's memory: 10.8 GB decoded would not fit.
ADDRESS_LIMIT = 4 * 2**30
BOMB_LIMIT_BYTES = 2**30

BOMB_PROBE = """
import json, resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
from stcorpus.curate.errors import SlideError
from stcorpus.curate.qc import check_slide
from stcorpus.curate.readers import read_slide
from tests.test_readers_support import make_sample
outcomes = {}
for name, sources in json.loads(sys.argv[1]).items():
    sample = make_sample({k: Path(v) for k, v in sources.items()}, technology="stimage", assay="visium")
    try:
        check_slide(read_slide(sample, {k: Path(v) for k, v in sources.items()}))
        outcomes[name] = "read"
    except (SlideError, MemoryError) as exc:
        outcomes[name] = f"{type(exc).__name__}: {exc}"
hwm = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:")]
print(json.dumps({"peak": int(hwm[0].split()[1]) * 1024, "outcomes": outcomes}))
"""


def _png_bomb(path: Path, side: int) -> Path:
    """A valid PNG header declaring ``side`` x ``side`` RGB pixels, with a few hundred bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    data = zlib.compress(b"\x00" + b"\xf0" * 3 * 2000, 9)  # the first rows of white, then nothing
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def _flat_tiff_bomb(path: Path, side: int) -> Path:
    """A one-strip deflate TIFF whose tags declare ``side`` x ``side`` px: written small, tags patched."""
    import tifffile

    tifffile.imwrite(path, np.full((16, 16, 3), 240, dtype=np.uint8), compression="zlib", rowsperstrip=16)
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages.first.tags
        offsets = [tags[name].valueoffset for name in ("ImageWidth", "ImageLength", "RowsPerStrip")]
        types = [tags[name].dtype for name in ("ImageWidth", "ImageLength", "RowsPerStrip")]
    data = bytearray(path.read_bytes())
    for offset, kind in zip(offsets, types, strict=True):
        fmt = "<H" if int(kind) == 3 else "<I"
        data[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, side)
    path.write_bytes(bytes(data))
    return path


def _stimage_files(folder: Path, image: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"S{i}" for i in range(6)]
    (folder / "s_count.csv").write_text(",G1,G2\n" + "".join(f"{i},{n + 1},2\n" for n, i in enumerate(ids)))
    # radius 45 px as a 55 um spot: 0.611 um/px; the spots one 100 um Visium pitch (164 px) apart
    (folder / "s_coord.csv").write_text(
        ",yaxis,xaxis,r\n" + "".join(f"{i},{100 + 164 * n},{100},45\n" for n, i in enumerate(ids))
    )
    return {"counts": str(folder / "s_count.csv"), "coords": str(folder / "s_coord.csv"), "image": str(image)}


def test_decompression_bombs_are_refused_before_decoding(tmp_path: Path) -> None:
    png = _png_bomb(tmp_path / "bomb.png", BOMB_SIDE)
    tiff = _flat_tiff_bomb(tmp_path / "bomb.tif", BOMB_SIDE)
    assert png.stat().st_size < 1000 and tiff.stat().st_size < 2000
    slides = {"png": _stimage_files(tmp_path / "a", png), "tiff": _stimage_files(tmp_path / "b", tiff)}
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", BOMB_PROBE, json.dumps(slides), str(ADDRESS_LIMIT)],
        capture_output=True,
        text=True,
        cwd=root,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    png_outcome, tiff_outcome = report["outcomes"]["png"], report["outcomes"]["tiff"]
    assert png_outcome.startswith("ImageTooLargeError: ") and "bomb.png: the PNG is 60,000 x 60,000 px" in png_outcome
    assert (
        tiff_outcome.startswith("ImageTooLargeError: ") and "bomb.tif: one strip of level 0 is 60,000" in tiff_outcome
    )
    for outcome in (png_outcome, tiff_outcome):
        assert "--max-image-pixels" in outcome and "tiled pyramidal TIFF" in outcome
    assert report["peak"] < BOMB_LIMIT_BYTES, f"peak RSS {report['peak'] / 2**20:.0f} MiB"


def test_the_budget_is_a_build_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stcorpus.curate.cli import main
    from tests.build_fixtures import good_slides, manifest

    path = manifest(tmp_path / "m", good_slides(tmp_path / "data", 1))
    # the fixture's 950 x 1,717 px JPEG is over a budget of 1,000 px: quarantined, with the reason
    main(["build", str(path), "--out", str(tmp_path / "out"), "--no-progress", "--max-image-pixels", "1000"])
    printed = capsys.readouterr()
    assert "GOOD-0 quarantined: image_too_large: " in printed.out + printed.err
    assert "test_img.jpg: the JPG is 950 x 1,717 px" in printed.out + printed.err
    assert "over the budget of 1,000 px (--max-image-pixels" in printed.out + printed.err
    # and the default admits it
    assert main(["build", str(path), "--out", str(tmp_path / "out2"), "--no-progress"]) == 0
    assert [s["status"] for s in pq.read_table(tmp_path / "out2" / "slides.parquet").to_pylist()] == ["built"]
