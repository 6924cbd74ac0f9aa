"""The visium-hd reader on Space Ranger 3.x binned outputs generated as 10x lays them out."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stcorpus.curate.errors import SourceMissingError
from stcorpus.curate.readers import check_sample, read_slide
from stcorpus.curate.slide import Slide
from stcorpus.curate.tiles import TileSettings, cut_tiles
from tests.spatial_fixtures import VisiumHD, marker_offset, write_visium_hd
from tests.test_readers_support import files_of, make_sample
from tests.test_tiles import centroid, decode

PITCH, DIAMETER = 100.0, 55.0


def hex_sites(width_um: float, height_um: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every Visium lattice site (row, col with row + col even) over the area, and its centre in um."""
    rows, cols = np.mgrid[0 : math.ceil(height_um / (PITCH * math.sqrt(3) / 2)) + 2, 0 : math.ceil(width_um / 50) + 2]
    keep = (rows + cols) % 2 == 0
    rows, cols = rows[keep], cols[keep]
    return rows, cols, cols * PITCH / 2, rows * PITCH * math.sqrt(3) / 2


def expected_hex(hd: VisiumHD) -> dict[tuple[int, int], np.ndarray]:
    """Site (row, col) -> summed counts, assigning each in-tissue bin by brute force over every site."""
    tissue = np.flatnonzero(hd.in_tissue)
    x = (hd.cols[tissue] + 0.5) * hd.bin_um
    y = (hd.rows[tissue] + 0.5) * hd.bin_um
    rows, cols, sx, sy = hex_sites(float(x.max()) + 60, float(y.max()) + 60)
    distance = np.hypot(x[:, None] - sx[None, :], y[:, None] - sy[None, :])
    nearest = distance.argmin(axis=1)
    inside = distance[np.arange(x.size), nearest] <= DIAMETER / 2
    dense = hd.counts.toarray()
    sums: dict[tuple[int, int], np.ndarray] = {}
    for b in np.flatnonzero(inside):
        key = (int(rows[nearest[b]]), int(cols[nearest[b]]))
        sums[key] = sums.get(key, 0) + dense[b]
    return sums


def read_hd(hd: VisiumHD, **reader: object) -> Slide:
    sample = make_sample({"outs": hd.outs, "image": hd.image}, technology="visium-hd", assay="visium-hd", reader=reader)
    assert check_sample(sample) == []
    return read_slide(sample, files_of(sample))


@pytest.fixture(scope="module")
def hd(tmp_path_factory: pytest.TempPathFactory) -> VisiumHD:
    _, _, sx, sy = hex_sites(44 * 8, 40 * 8)
    return write_visium_hd(tmp_path_factory.mktemp("hd"), bin_um=8, markers_um=(sx, sy))


def test_hex_spots_are_the_sums_of_their_bins(hd: VisiumHD) -> None:
    slide = read_hd(hd)
    expected = expected_hex(hd)
    got = {
        (int(r), int(c)): i for i, (r, c) in enumerate(zip(slide.spots.array_row, slide.spots.array_col, strict=True))
    }
    assert set(got) == set(expected)
    dense = slide.counts.toarray()
    for key, total in expected.items():
        np.testing.assert_array_equal(dense[got[key]], total)
    assert slide.features.ids.tolist() == hd.ids
    assert slide.mpp == hd.mpp and slide.mpp_source == "scalefactors"
    assert (slide.lattice, slide.pitch_um, slide.geometry.spot_diameter_um) == ("hex", PITCH, DIAMETER)
    assert all((r + c) % 2 == 0 for r, c in got)
    # Centres: the generated affine of each site's lattice position, to a small fraction of a pixel.
    truth = hd.pixels_of(slide.spots.array_col * PITCH / 2, slide.spots.array_row * PITCH * math.sqrt(3) / 2)
    np.testing.assert_allclose(np.column_stack([slide.spots.x_px, slide.spots.y_px]), truth, atol=1e-6)


def test_hex_tiles_are_centred_within_a_pixel(hd: VisiumHD) -> None:
    slide = read_hd(hd)
    settings = TileSettings(min_tissue_fraction=0, regions=False)  # markers on white: no tissue test
    inner = np.flatnonzero(
        (slide.spots.x_px > 120)
        & (slide.spots.y_px > 120)
        & (slide.spots.x_px < slide.image.width - 120)
        & (slide.spots.y_px < slide.image.height - 120)
    )
    assert inner.size >= 5
    results = list(cut_tiles(slide, indices=inner, settings=settings))
    assert len(results) == inner.size and all(r.accepted for r in results)
    for result in results:
        patch = decode(result.patch)[72:152, 72:152]  # the marker disc of this site only
        cx, cy = centroid(patch)
        assert abs(cx + 72 - 111.5) < 1 and abs(cy + 72 - 111.5) < 1, (result.key, cx, cy)


def test_square_grid_sums_whole_squares(hd: VisiumHD) -> None:
    slide = read_hd(hd, grid="square", pitch_um=32.0)  # 4 x 4 bins of 8 um
    tissue = np.flatnonzero(hd.in_tissue)
    dense = hd.counts.toarray()
    expected: dict[tuple[int, int], np.ndarray] = {}
    for b, bin_index in enumerate(tissue):
        key = (int(hd.rows[bin_index]) // 4, int(hd.cols[bin_index]) // 4)
        expected[key] = expected.get(key, 0) + dense[b]
    got = {
        (int(r), int(c)): i for i, (r, c) in enumerate(zip(slide.spots.array_row, slide.spots.array_col, strict=True))
    }
    assert set(got) == set(expected)
    for key, total in expected.items():
        np.testing.assert_array_equal(slide.counts[got[key]].toarray().ravel(), total)
    assert int(slide.counts.sum()) == int(hd.counts.sum())  # every in-tissue bin is in one square
    truth = hd.pixels_of((slide.spots.array_col + 0.5) * 32.0, (slide.spots.array_row + 0.5) * 32.0)
    np.testing.assert_allclose(np.column_stack([slide.spots.x_px, slide.spots.y_px]), truth, atol=1e-6)
    assert (slide.lattice, slide.pitch_um) == ("square", 32.0)


def test_reader_options_are_checked(hd: VisiumHD) -> None:
    with pytest.raises(SourceMissingError, match=r"no square_016um/.*square_008um.*bin_um"):
        read_hd(hd, bin_um=16)
    with pytest.raises(SourceMissingError, match="needs the reader option pitch_um"):
        read_hd(hd, grid="square")
    with pytest.raises(SourceMissingError, match="not a whole multiple of the 8 um bins"):
        read_hd(hd, grid="square", pitch_um=30.0)
    # a value no grid has: validate names it, and the reader refuses it too when called without validate
    sample = make_sample(
        {"outs": hd.outs, "image": hd.image}, technology="visium-hd", assay="visium-hd", reader={"grid": "round"}
    )
    assert any("reader.grid='round' is not one of 'hex', 'square'" in p for p in check_sample(sample))
    with pytest.raises(SourceMissingError, match="grid='round'"):
        read_slide(sample, files_of(sample))


def test_hex_spots_build_into_a_corpus(hd: VisiumHD, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from stcorpus import schema
    from stcorpus.curate.cli import main
    from tests.build_fixtures import manifest

    entry = "\n".join(
        [
            "- id: HD-1",
            "  technology: visium-hd",
            "  assay: visium-hd",
            "  species: human",
            f"  sources: {{outs: '{hd.outs}', image: '{hd.image}'}}",
        ]
    )
    out = tmp_path / "corpus"
    argv = ["build", str(manifest(tmp_path, [entry])), "--out", str(out), "--no-progress", "--holdout", "none"]
    assert (
        main([*argv, "--no-regions", "--min-tissue", "0", "--max-outside", "1"]) == 0
    )  # markers on white; edge sites overhang the small image
    slide = pq.read_table(out / schema.SLIDES_FILE).to_pylist()[0]
    assert slide["status"] == "built" and slide["mpp"] == hd.mpp
    genes = {g["index"]: g["ensembl_id"] for g in pq.read_table(out / schema.GENES_FILE).to_pylist()}
    column = {gene_id: j for j, gene_id in enumerate(hd.ids)}
    rows = []
    for shard in pq.read_table(out / schema.SHARDS_FILE).to_pylist():
        if shard["format"] == "parquet":
            rows += pq.read_table(
                out / shard["path"], columns=["array_row", "array_col", "genes", "counts", "x_um", "y_um", "patch"]
            ).to_pylist()
    expected = {key: total for key, total in expected_hex(hd).items() if total.sum() > 0}
    assert {(r["array_row"], r["array_col"]) for r in rows} == set(expected)
    for r in rows:
        got = np.zeros(len(hd.ids), dtype=np.int64)
        got[[column[genes[g]] for g in r["genes"]]] = r["counts"]
        np.testing.assert_array_equal(got, expected[(r["array_row"], r["array_col"])])
    # The built tiles (224 px at 0.5 um/px, the H&E's own scale) are centred on their sites: the site's
    # marker disc, in the central 40 um of the patch, has its centroid within 1 px of the patch centre.
    # Sites whose 40 um window runs off the small image (edge overhang) are left out.
    width, height = Image.open(hd.image).size
    half = 40  # patch px = image px here

    margin = half + 8  # the window and a marker's radius
    inner = [
        r
        for r in rows
        if margin <= r["x_um"] / hd.mpp <= width - margin and margin <= r["y_um"] / hd.mpp <= height - margin
    ]
    assert len(inner) >= 10
    offsets = np.array([marker_offset(r["patch"]["bytes"], half_window_px=half) for r in inner])
    assert np.abs(offsets).max() < 1.0, offsets
    # The measure sees a 2 px shift: the same patch moved by 2 px reads as off centre.
    shifted = io.BytesIO()
    Image.fromarray(np.roll(decode(inner[0]["patch"]["bytes"]), 2, axis=1)).save(shifted, format="PNG")
    assert abs(marker_offset(shifted.getvalue(), half_window_px=half)[0] - offsets[0, 0] - 2) < 0.1
