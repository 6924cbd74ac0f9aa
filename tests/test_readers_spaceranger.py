"""Space Ranger reader on the real fixtures, and on Space Ranger layouts derived from them."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from stcorpus.curate.errors import (
    BarcodeMismatchError,
    CorruptSourceError,
    NonIntegerCountsError,
    SourceMissingError,
)
from stcorpus.curate.readers import read_slide
from stcorpus.curate.readers._tenx import read_h5, read_mtx, read_positions
from stcorpus.curate.readers.spaceranger import SPOT_DIAMETER_FULLRES_UM
from stcorpus.curate.slide import SpotDrop
from tests.test_readers_support import HEART, MOUSE_BRAIN, expected, files_of, make_sample, write_repeated_pyramid

HEART_H5 = HEART / "filtered_feature_bc_matrix.h5"
BRAIN_OUTS = MOUSE_BRAIN / "outs"
BRAIN_H5 = BRAIN_OUTS / "raw_feature_bc_matrix.h5"
BRAIN_MTX = BRAIN_OUTS / "raw_feature_bc_matrix"


def _positions_table(path: Path) -> dict[str, tuple[int, int, int, float, float]]:
    table = {}
    for line in path.read_text().splitlines():
        barcode, in_tissue, row, col, pxl_row, pxl_col = line.split(",")
        table[barcode] = (int(in_tissue), int(row), int(col), float(pxl_row), float(pxl_col))
    return table


# --- the real fixtures, number by number ------------------------------------------------------


def test_heart_sr1_h5_and_positions_match_expected() -> None:
    facts = expected(HEART)
    sample = make_sample({"matrix": HEART_H5, "spatial": HEART / "spatial"})
    slide = read_slide(sample, files_of(sample))
    matrix_facts = facts["matrices"]["filtered_feature_bc_matrix.h5"]

    assert slide.counts.shape == (matrix_facts["n_barcodes"], matrix_facts["n_features"])
    assert slide.counts.nnz == matrix_facts["nnz"]
    # float64 on disk, whole numbers: cast losslessly to int32
    assert slide.counts.dtype == np.int32
    assert slide.counts.max() == matrix_facts["max_value"]
    assert slide.features.ids[:3].tolist() == matrix_facts["first_ids"]
    assert slide.features.names[:3].tolist() == matrix_facts["first_names"]
    assert slide.spots.barcode[:3].tolist() == matrix_facts["first_barcodes"]
    assert int(slide.spots.in_tissue.sum()) == matrix_facts["spatial_check"]["matrix_barcodes_in_tissue"]
    assert slide.dropped_features == 0

    positions = read_positions(HEART / "spatial" / "tissue_positions_list.csv")
    assert positions.barcode.shape[0] == facts["positions"]["n_rows"]
    assert int(positions.in_tissue.sum()) == facts["positions"]["n_in_tissue"]
    assert [positions.pxl_row.min(), positions.pxl_row.max()] == facts["positions"]["pxl_row_range"]
    assert [positions.pxl_col.min(), positions.pxl_col.max()] == facts["positions"]["pxl_col_range"]
    assert [int(positions.array_col.min()), int(positions.array_col.max())] == facts["positions"]["array_col_range"]

    # The hires PNG is a blank placeholder: the reader must skip it for the lowres one.
    lowres = facts["images"]["tissue_lowres_image.png"]
    assert facts["images"]["tissue_hires_image.png"]["blank_single_colour"]
    assert (slide.image.width, slide.image.height) == (lowres["width"], lowres["height"])
    assert any("tissue_hires_image.png skipped" in note for note in slide.notes)
    scalef = facts["scalefactors"]["tissue_lowres_scalef"]
    diameter = facts["scalefactors"]["spot_diameter_fullres"]
    assert slide.mpp == pytest.approx(SPOT_DIAMETER_FULLRES_UM / diameter / scalef)
    assert slide.mpp_source == "scalefactors"
    # coordinates are scaled with the image: x from pxl_col, y from pxl_row
    table = _positions_table(HEART / "spatial" / "tissue_positions_list.csv")
    first = table[slide.spots.barcode[0]]
    assert slide.spots.x_px[0] == pytest.approx(first[4] * scalef)
    assert slide.spots.y_px[0] == pytest.approx(first[3] * scalef)
    assert (slide.spots.array_row[0], slide.spots.array_col[0]) == (first[1], first[2])
    # the scale Space Ranger gives is the 65 um convention: spot diameter in lowres px matches EXPECTED
    spot_px = matrix_facts["spatial_check"]["tissue_lowres_image.png:spot_diameter_px"]
    assert diameter * scalef == pytest.approx(spot_px, abs=0.001)


def test_mouse_brain_raw_h5_on_its_own() -> None:
    facts = expected(MOUSE_BRAIN)["matrices"]["raw_feature_bc_matrix.h5"]
    sample = make_sample({"matrix": BRAIN_H5, "spatial": BRAIN_OUTS / "spatial"}, species="mouse")
    slide = read_slide(sample, files_of(sample))
    assert slide.counts.shape == (facts["n_barcodes"], facts["n_features"])
    assert slide.counts.nnz == facts["nnz"]
    assert slide.counts.dtype == np.int32
    assert slide.counts.max() == facts["max_value"]
    assert slide.features.ids[:3].tolist() == facts["first_ids"]
    assert slide.features.names[:3].tolist() == facts["first_names"]
    assert int(slide.spots.in_tissue.sum()) == facts["spatial_check"]["matrix_barcodes_in_tissue"]
    assert int((~slide.spots.in_tissue).sum()) == facts["spatial_check"]["matrix_barcodes_out_of_tissue"]
    assert slide.qc[0].name == "barcodes_with_position" and slide.qc[0].value == 0


def test_mouse_brain_mtx_on_its_own() -> None:
    all_facts = expected(MOUSE_BRAIN)
    facts = all_facts["matrices"]["raw_feature_bc_matrix"]
    sample = make_sample({"matrix": BRAIN_MTX, "spatial": BRAIN_OUTS / "spatial"}, species="mouse")
    slide = read_slide(sample, files_of(sample))
    assert slide.counts.shape == (facts["n_barcodes"], facts["n_features"])
    assert slide.counts.nnz == facts["nnz"]
    assert slide.counts.max() == facts["max_value"]
    assert slide.spots.barcode[:3].tolist() == facts["first_barcodes"]
    first = [
        f"{i}\t{n}\tGene Expression" for i, n in zip(slide.features.ids[:3], slide.features.names[:3], strict=True)
    ]
    assert first == facts["first_features"]
    assert int(slide.spots.in_tissue.sum()) == facts["spatial_check"]["matrix_barcodes_in_tissue"]
    image = all_facts["images"]["tissue_lowres_image.png"]
    assert (slide.image.width, slide.image.height) == (image["width"], image["height"])  # 576 x 600: not square
    scale = all_facts["scalefactors"]
    assert slide.mpp == pytest.approx(65.0 / scale["spot_diameter_fullres"] / scale["tissue_lowres_scalef"])
    inside = (slide.spots.x_px < image["width"]) & (slide.spots.y_px < image["height"])
    assert int(inside.sum()) == facts["spatial_check"]["tissue_lowres_image.png:spot_centres_inside_image"]


def test_outs_folder_falls_back_to_raw_and_prefers_h5() -> None:
    sample = make_sample({"outs": BRAIN_OUTS}, species="mouse")
    slide = read_slide(sample, files_of(sample))
    assert slide.counts.shape == (50, 49)  # the h5, not the 50-gene MTX beside it
    assert any("fell back to the raw matrix" in note for note in slide.notes)
    assert any("MTX copy" in note for note in slide.notes)
    # an archive that unpacks to <sample>/outs/ is found the same way
    sample = make_sample({"outs": MOUSE_BRAIN}, species="mouse", reader={"matrix": "raw"})
    assert read_slide(sample, files_of(sample)).counts.shape == (50, 49)


# --- layouts derived from the real files ------------------------------------------------------


def _copy_spatial(tmp_path: Path, source: Path = HEART / "spatial") -> Path:
    spatial = tmp_path / "spatial"
    shutil.copytree(source, spatial)
    return spatial


def test_sr2_header_positions_and_sr3_parquet_give_the_same_spots(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    reference = read_slide(s := make_sample({"matrix": HEART_H5, "spatial": HEART / "spatial"}), files_of(s))
    spatial = _copy_spatial(tmp_path)
    legacy = spatial / "tissue_positions_list.csv"
    lines = legacy.read_text().splitlines()
    legacy.unlink()
    # Space Ranger 2.x: a header; 3.x writes float pixels
    rows = [line.split(",") for line in lines]
    text = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n" + "".join(
        f"{b},{t},{r},{c},{float(y) + 0.25},{float(x) + 0.25}\n" for b, t, r, c, y, x in rows
    )
    (spatial / "tissue_positions.csv").write_text(text)
    slide = read_slide(s := make_sample({"matrix": HEART_H5, "spatial": spatial}), files_of(s))
    scalef = expected(HEART)["scalefactors"]["tissue_lowres_scalef"]
    np.testing.assert_allclose(slide.spots.x_px, reference.spots.x_px + 0.25 * scalef)
    np.testing.assert_array_equal(slide.spots.array_col, reference.spots.array_col)

    (spatial / "tissue_positions.csv").unlink()
    table = pa.table(
        {
            "barcode": [r[0] for r in rows],
            "in_tissue": [int(r[1]) for r in rows],
            "array_row": [int(r[2]) for r in rows],
            "array_col": [int(r[3]) for r in rows],
            "pxl_row_in_fullres": [float(r[4]) for r in rows],
            "pxl_col_in_fullres": [float(r[5]) for r in rows],
        }
    )
    pq.write_table(table, spatial / "tissue_positions.parquet")
    slide = read_slide(s := make_sample({"matrix": HEART_H5, "spatial": spatial}), files_of(s))
    np.testing.assert_allclose(slide.spots.y_px, reference.spots.y_px)
    np.testing.assert_array_equal(slide.spots.in_tissue, reference.spots.in_tissue)


def test_gzipped_mtx_with_cellranger2_genes_tsv(tmp_path: Path) -> None:
    reference = read_mtx(BRAIN_MTX)
    folder = tmp_path / "filtered_feature_bc_matrix"
    folder.mkdir()
    for name in ("matrix.mtx", "barcodes.tsv"):
        (folder / f"{name}.gz").write_bytes(gzip.compress((BRAIN_MTX / name).read_bytes()))
    # Cell Ranger 2 style: genes.tsv with two columns, no feature type
    genes = ["\t".join(line.split("\t")[:2]) for line in (BRAIN_MTX / "features.tsv").read_text().splitlines()]
    (folder / "genes.tsv").write_text("\n".join(genes) + "\n")
    matrix = read_mtx(folder)
    assert (matrix.counts != reference.counts).nnz == 0
    assert matrix.types.tolist() == ["Gene Expression"] * 50
    assert matrix.names.tolist() == reference.names.tolist()
    # and found by the reader inside a folder that holds it
    sample = make_sample({"matrix": tmp_path, "spatial": BRAIN_OUTS / "spatial"}, species="mouse")
    assert read_slide(sample, files_of(sample)).counts.shape == (50, 50)


def _write_v3(
    path: Path, counts: sp.csr_matrix, barcodes: list[str], ids: list[str], names: list[str], types: list[str]
) -> None:
    csc = counts.T.tocsc()  # features x barcodes, stored CSC like Cell Ranger
    with h5py.File(path, "w") as f:
        group = f.create_group("matrix")
        group["barcodes"] = np.array(barcodes, dtype="S")
        group["data"] = csc.data
        group["indices"] = csc.indices
        group["indptr"] = csc.indptr
        group["shape"] = np.array(csc.shape, dtype=np.int32)
        features = group.create_group("features")
        features["id"] = np.array(ids, dtype="S")
        features["name"] = np.array(names, dtype="S")
        features["feature_type"] = np.array(types, dtype="S")
        features["genome"] = np.array(["GRCh38"] * len(ids), dtype="S")


def test_h5_v2_layout_reads_like_v3(tmp_path: Path) -> None:
    reference = read_h5(HEART_H5)
    csc = reference.counts.T.tocsc()
    path = tmp_path / "filtered_gene_bc_matrices_h5.h5"
    with h5py.File(path, "w") as f:
        group = f.create_group("GRCh38")
        group["barcodes"] = reference.barcodes.astype("S")
        group["genes"] = reference.ids.astype("S")
        group["gene_names"] = reference.names.astype("S")
        group["data"] = csc.data
        group["indices"] = csc.indices
        group["indptr"] = csc.indptr
        group["shape"] = np.array(csc.shape, dtype=np.int32)
    matrix = read_h5(path)
    assert matrix.layout == "10x h5 v2"
    assert (matrix.counts != reference.counts).nnz == 0
    assert matrix.ids.tolist() == reference.ids.tolist()
    assert matrix.barcodes.tolist() == reference.barcodes.tolist()


def test_h5_with_genes_instead_of_features(tmp_path: Path) -> None:
    path = tmp_path / "m.h5"
    shutil.copy(BRAIN_H5, path)
    with h5py.File(path, "a") as f:
        names = f["matrix/features/name"][()]
        del f["matrix/features"]
        f["matrix/gene_names"] = names
    matrix = read_h5(path)
    reference = read_h5(BRAIN_H5)
    assert matrix.ids.tolist() == reference.ids.tolist()
    assert matrix.names.tolist() == reference.names.tolist()
    assert (matrix.counts != reference.counts).nnz == 0


def test_only_gene_expression_is_kept_and_the_rest_counted(tmp_path: Path) -> None:
    reference = read_h5(HEART_H5)
    n = reference.counts.shape[0]
    antibodies = sp.csr_matrix(np.arange(n * 3, dtype=np.float64).reshape(n, 3))
    counts = sp.hstack([reference.counts, antibodies], format="csr")
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    _write_v3(
        path,
        counts,
        reference.barcodes.tolist(),
        [*reference.ids.tolist(), "CD3", "CD4", "CD8"],
        [*reference.names.tolist(), "CD3_TotalSeqB", "CD4_TotalSeqB", "CD8_TotalSeqB"],
        ["Gene Expression"] * 100 + ["Antibody Capture"] * 3,
    )
    sample = make_sample({"matrix": path, "spatial": HEART / "spatial"})
    slide = read_slide(sample, files_of(sample))
    assert slide.dropped_features == 3
    assert slide.counts.shape == (100, 100)
    assert (slide.counts != reference.counts).nnz == 0
    assert any("3 non 'Gene Expression' features dropped (3 Antibody Capture)" in note for note in slide.notes)


def test_non_integer_counts_raise_unless_declared_normalized(tmp_path: Path) -> None:
    reference = read_h5(HEART_H5)
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    counts = reference.counts.astype(np.float64) * 0.5
    _write_v3(
        path,
        counts,
        reference.barcodes.tolist(),
        reference.ids.tolist(),
        reference.names.tolist(),
        ["Gene Expression"] * 100,
    )
    sample = make_sample({"matrix": path, "spatial": HEART / "spatial"})
    with pytest.raises(NonIntegerCountsError, match=r"not whole non-negative numbers .* declare `counts: normalized`"):
        read_slide(sample, files_of(sample))
    sample = make_sample({"matrix": path, "spatial": HEART / "spatial"}, counts="normalized")
    slide = read_slide(sample, files_of(sample))
    assert slide.counts.dtype == np.float32
    assert slide.counts.sum() == pytest.approx(counts.sum())


def test_barcodes_missing_from_positions_are_counted_and_dropped(tmp_path: Path) -> None:
    spatial = _copy_spatial(tmp_path)
    positions = spatial / "tissue_positions_list.csv"
    first_two = read_h5(HEART_H5).barcodes[:2].tolist()
    kept = [line for line in positions.read_text().splitlines() if line.split(",")[0] not in first_two]
    positions.write_text("\n".join(kept) + "\n")
    sample = make_sample({"matrix": HEART_H5, "spatial": spatial})
    slide = read_slide(sample, files_of(sample))
    assert len(slide.spots) == 98
    check = next(c for c in slide.qc if c.name == "barcodes_with_position")
    assert check.value == 2
    assert "2 of 100 matrix barcodes have no row in tissue_positions_list.csv: dropped" in check.reason
    assert slide.dropped_spots[SpotDrop.NOT_IN_POSITIONS] == 2


def test_every_dropped_spot_is_counted_by_reason(tmp_path: Path) -> None:
    """Missing from the positions, NaN/inf centres, repeated barcodes, in-tissue spots without counts."""
    spatial = _copy_spatial(tmp_path)
    positions = spatial / "tissue_positions_list.csv"
    reference = read_h5(HEART_H5)
    barcodes = reference.barcodes.tolist()
    lines = positions.read_text().splitlines()
    table = {line.split(",")[0]: line for line in lines}
    out = []
    for line in lines:
        fields = line.split(",")
        if fields[0] in barcodes[:2]:
            continue  # two matrix barcodes without a position
        if fields[0] == barcodes[2]:
            fields[4] = "NA"  # as R writes a missing number
        if fields[0] == barcodes[3]:
            fields[5] = "inf"
        out.append(",".join(fields))
    duplicate = table[barcodes[4]].split(",")
    duplicate[4] = "1.0"  # listed twice, the second time elsewhere: the first row wins
    out.append(",".join(duplicate))
    positions.write_text("\n".join(out) + "\n")
    matrix = tmp_path / "m.h5"  # and one barcode repeated in the matrix
    counts = sp.vstack([reference.counts, reference.counts[5]]).tocsr()
    _write_v3(
        matrix,
        counts,
        [*barcodes, barcodes[5]],
        reference.ids.tolist(),
        reference.names.tolist(),
        reference.types.tolist(),
    )
    sample = make_sample({"matrix": matrix, "spatial": spatial})
    slide = read_slide(sample, files_of(sample))

    in_tissue_without_counts = sum(
        1 for barcode, line in table.items() if line.split(",")[1] == "1" and barcode not in barcodes
    )
    assert in_tissue_without_counts > 4000  # the fixture is a 100-spot subset of a 4,992-spot slide
    assert slide.dropped_spots == {
        SpotDrop.DUPLICATE_BARCODE: 2,
        SpotDrop.NOT_IN_POSITIONS: 2,
        SpotDrop.NOT_IN_MATRIX: in_tissue_without_counts,
        SpotDrop.NAN_COORDINATES: 2,
    }
    assert len(slide.spots) == 100 - 2 - 2
    assert np.isfinite(slide.spots.x_px).all() and np.isfinite(slide.spots.y_px).all()
    assert len(set(slide.spots.barcode.tolist())) == len(slide.spots)
    kept = slide.spots.barcode.tolist().index(barcodes[4])
    assert slide.spots.y_px[kept] != pytest.approx(1.0 * 0.045004502)  # the first row of the repeated one
    assert sum(slide.dropped_spots.values()) == 2 + 2 + 2 + in_tissue_without_counts
    for text in ("repeat a spot id", "have no spot in tissue_positions_list.csv", "NaN or infinite centre"):
        assert any(text in note for note in slide.notes), text

    # the same files without any fault drop nothing but the subset's missing spots
    sample = make_sample({"matrix": HEART_H5, "spatial": HEART / "spatial"})
    assert read_slide(sample, files_of(sample)).dropped_spots == {SpotDrop.NOT_IN_MATRIX: in_tissue_without_counts}


def test_no_barcode_in_common_is_a_barcode_mismatch(tmp_path: Path) -> None:
    spatial = _copy_spatial(tmp_path)
    positions = spatial / "tissue_positions_list.csv"
    lines = [line.split(",", 1) for line in positions.read_text().splitlines()]
    # same spots, another library's barcodes: '-2' does not join '-1'
    positions.write_text("".join(f"{b[:-2]}-2,{rest}\n" for b, rest in lines))
    sample = make_sample({"matrix": HEART_H5, "spatial": spatial})
    with pytest.raises(
        BarcodeMismatchError, match=r"none of the 100 matrix barcodes has a row in tissue_positions_list"
    ):
        read_slide(sample, files_of(sample))


def test_barcodes_without_the_gem_suffix_still_join(tmp_path: Path) -> None:
    spatial = _copy_spatial(tmp_path)
    positions = spatial / "tissue_positions_list.csv"
    positions.write_text(positions.read_text().replace("-1,", ","))
    sample = make_sample({"matrix": HEART_H5, "spatial": spatial})
    slide = read_slide(sample, files_of(sample))
    assert len(slide.spots) == 100
    assert "GEM-group suffix" in slide.qc[0].reason


# --- images -------------------------------------------------------------------------------------


def test_image_fallback_false_without_image_is_an_error() -> None:
    sample = make_sample({"matrix": HEART_H5, "spatial": HEART / "spatial"}, reader={"image_fallback": False})
    with pytest.raises(SourceMissingError, match=r"no full-resolution image: name it as the `image` source"):
        read_slide(sample, files_of(sample))


def test_no_usable_image_names_what_was_tried(tmp_path: Path) -> None:
    spatial = _copy_spatial(tmp_path)
    (spatial / "tissue_lowres_image.png").unlink()
    sample = make_sample({"matrix": HEART_H5, "spatial": spatial})
    with pytest.raises(
        SourceMissingError, match=r"tissue_hires_image.png: a single colour .*tissue_lowres_image.png: absent"
    ):
        read_slide(sample, files_of(sample))


def test_full_resolution_image_keeps_full_resolution_coordinates(tmp_path: Path) -> None:
    # A full-resolution pyramidal TIFF the size of the mouse-brain capture area (positions reach ~9,990 px).
    tile = np.full((512, 512, 3), (200, 150, 190), dtype=np.uint8)
    tile[::7] = (120, 60, 140)
    image = tmp_path / "V1_Adult_Mouse_Brain_Coronal_Section_1_image.tif"
    write_repeated_pyramid(image, width=10240, height=10752, tile_pixels=tile)
    sample = make_sample({"matrix": BRAIN_MTX, "spatial": BRAIN_OUTS / "spatial", "image": image}, species="mouse")
    slide = read_slide(sample, files_of(sample))
    facts = expected(MOUSE_BRAIN)
    assert (slide.image.width, slide.image.height) == (10240, 10752)
    assert slide.mpp == pytest.approx(65.0 / facts["scalefactors"]["spot_diameter_fullres"])
    table = _positions_table(BRAIN_OUTS / "spatial" / "tissue_positions_list.csv")
    assert slide.spots.x_px.tolist() == [table[b][4] for b in slide.spots.barcode.tolist()]
    assert not any("fell back" in note for note in slide.notes)


def test_cytassist_image_is_never_the_he(tmp_path: Path) -> None:
    fake = tmp_path / "cytassist_image.tiff"
    import tifffile

    tifffile.imwrite(fake, np.zeros((64, 64, 3), dtype=np.uint8))
    sample = make_sample({"matrix": HEART_H5, "spatial": HEART / "spatial", "image": fake})
    with pytest.raises(CorruptSourceError, match=r"CytAssist instrument image .* not the H&E"):
        read_slide(sample, files_of(sample))


def test_scalefactors_without_spot_diameter_fall_back_to_the_lattice(tmp_path: Path) -> None:
    spatial = _copy_spatial(tmp_path)
    factors = json.loads((spatial / "scalefactors_json.json").read_text())
    diameter = factors.pop("spot_diameter_fullres")
    (spatial / "scalefactors_json.json").write_text(json.dumps(factors))
    sample = make_sample({"matrix": HEART_H5, "spatial": spatial})
    slide = read_slide(sample, files_of(sample))
    assert slide.mpp_source == "lattice"
    # the lattice agrees with Space Ranger's 65 um convention to well under 1%
    assert slide.mpp == pytest.approx(65.0 / diameter / factors["tissue_lowres_scalef"], rel=0.01)


def test_manifest_mpp_wins_and_is_scaled_with_a_fallback_image() -> None:
    sample = make_sample({"matrix": HEART_H5, "spatial": HEART / "spatial"}, mpp=0.5)
    slide = read_slide(sample, files_of(sample))
    assert slide.mpp_source == "manifest"
    assert slide.mpp == pytest.approx(0.5 / expected(HEART)["scalefactors"]["tissue_lowres_scalef"])


def test_mtx_matrix_market_roundtrip_is_exact(tmp_path: Path) -> None:
    # guard against a transposed read: a non-square matrix written by scipy reads back as barcodes x features
    counts = sp.random(7, 5, density=0.5, format="coo", random_state=1, dtype=np.float64)
    counts.data = np.ceil(counts.data * 10)
    folder = tmp_path / "mtx"
    folder.mkdir()
    scipy.io.mmwrite(folder / "matrix.mtx", counts.T.astype(np.int64))
    (folder / "features.tsv").write_text("".join(f"ENSG{i:011d}\tG{i}\tGene Expression\n" for i in range(5)))
    (folder / "barcodes.tsv").write_text("".join(f"B{i}-1\n" for i in range(7)))
    matrix = read_mtx(folder)
    assert matrix.counts.shape == (7, 5)
    np.testing.assert_array_equal(matrix.counts.toarray(), counts.toarray())


def test_visium_hd_bins_use_stated_microns_per_pixel_and_a_square_lattice(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stcorpus.curate.qc import check_slide

    # A 12 x 10 patch of 16 um bins at 0.5 um/px (32 px apart), laid out as SR 3.x binned_outputs/square_016um/.
    mpp, bin_um = 0.5, 16.0
    rows, cols = np.divmod(np.arange(120), 12)
    barcodes = [f"s_016um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]
    spatial = tmp_path / "square_016um" / "spatial"
    spatial.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "barcode": barcodes,
                "in_tissue": [1] * 120,
                "array_row": rows,
                "array_col": cols,
                "pxl_row_in_fullres": 40.0 + rows * bin_um / mpp,
                "pxl_col_in_fullres": 40.0 + cols * bin_um / mpp,
            }
        ),
        spatial / "tissue_positions.parquet",
    )
    factors = {
        "spot_diameter_fullres": 32.0,
        "bin_size_um": bin_um,
        "microns_per_pixel": mpp,
        "tissue_hires_scalef": 1.0,
    }
    (spatial / "scalefactors_json.json").write_text(json.dumps(factors))
    counts = sp.csr_matrix(np.random.default_rng(4).poisson(1.5, size=(120, 8)) + 1)
    _write_v3(
        tmp_path / "square_016um" / "filtered_feature_bc_matrix.h5",
        counts,
        barcodes,
        [f"ENSG{i:011d}" for i in range(8)],
        [f"G{i}" for i in range(8)],
        ["Gene Expression"] * 8,
    )
    pixels = np.full((420, 470, 3), 230, dtype=np.uint8)
    pixels[::4] = (170, 90, 160)
    image = tmp_path / "he.png"
    from PIL import Image

    Image.fromarray(pixels).save(image)
    sample = make_sample({"outs": tmp_path / "square_016um", "image": image}, assay="visium-hd")
    slide = check_slide(read_slide(sample, files_of(sample)))
    assert (slide.mpp, slide.mpp_source) == (mpp, "scalefactors")
    assert (slide.lattice, slide.pitch_um) == ("square", bin_um)
    assert slide.flags == []
    agreement = next(c for c in slide.qc if c.name == "mpp_lattice_agreement")
    assert isinstance(agreement.value, float) and agreement.value < 1e-6
