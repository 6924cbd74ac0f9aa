"""STimage-1K4M reader: slides written at test time in STimage's CSV layout from real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from PIL import Image

from stcorpus.curate.errors import BarcodeMismatchError, CorruptSourceError, ImageTooCoarseError, UnsupportedAssayError
from stcorpus.curate.qc import check_slide
from stcorpus.curate.readers import read_slide
from stcorpus.curate.readers._tenx import read_mtx, read_positions
from stcorpus.curate.slide import Slide, SpotDrop
from tests.test_readers_support import MOUSE_BRAIN, files_of, make_sample

OUTS = MOUSE_BRAIN / "outs"
SLIDE = "GSE000000_GSM0000001"


def _write_stimage(
    folder: Path,
    *,
    slide: str,
    ids: list[str],
    genes: list[str],
    counts: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    r: float,
    image: np.ndarray,
    float_counts: bool = False,
) -> dict[str, Path]:
    """``<slide>_count.csv``, ``<slide>_coord.csv`` and ``<slide>.png`` as STimage publishes them."""
    folder.mkdir(parents=True, exist_ok=True)
    counts_path = folder / f"{slide}_count.csv"
    with counts_path.open("w") as handle:
        handle.write("," + ",".join(genes) + "\n")
        for spot, row in zip(ids, counts, strict=True):
            values = (f"{v:.1f}" for v in row) if float_counts else (str(int(v)) for v in row)
            handle.write(f"{slide}_{spot}," + ",".join(values) + "\n")
    coords_path = folder / f"{slide}_coord.csv"
    # coords in another order than counts, as nothing promises the same order
    order = np.argsort([f"{i}" for i in ids])[::-1]
    with coords_path.open("w") as handle:
        handle.write(",yaxis,xaxis,r\n")
        for i in order:
            handle.write(f"{slide}_{ids[i]},{y[i]},{x[i]},{r}\n")
    image_path = folder / f"{slide}.png"
    Image.fromarray(image).save(image_path)
    return {"counts": counts_path, "coords": coords_path, "image": image_path}


def _visium_from_mouse_brain(tmp_path: Path, *, r: float | None = None) -> tuple[dict[str, Path], float]:
    """The VisiumIO mouse-brain MTX and positions at the lowres image's scale, as an STimage Visium slide."""
    matrix = read_mtx(OUTS / "raw_feature_bc_matrix")
    positions = read_positions(OUTS / "spatial" / "tissue_positions_list.csv")
    factors = json.loads((OUTS / "spatial" / "scalefactors_json.json").read_text())
    scalef = factors["tissue_lowres_scalef"]
    lookup = {b: i for i, b in enumerate(positions.barcode.tolist())}
    rows = [lookup[b] for b in matrix.barcodes.tolist()]
    mpp = 65.0 / factors["spot_diameter_fullres"] / scalef
    radius = r if r is not None else 55.0 / (2 * mpp)
    files = _write_stimage(
        tmp_path,
        slide=SLIDE,
        ids=matrix.barcodes.tolist(),
        genes=matrix.names.tolist(),
        counts=matrix.counts.toarray(),
        x=positions.pxl_col[rows] * scalef,
        y=positions.pxl_row[rows] * scalef,
        r=radius,
        image=np.asarray(Image.open(OUTS / "spatial" / "tissue_lowres_image.png").convert("RGB")),
    )
    return files, mpp


def _read(files: dict[str, Path], *, assay: str = "visium", **kwargs: object) -> Slide:
    sample = make_sample(files, technology="stimage", assay=assay, species="mouse", **kwargs)  # type: ignore[arg-type]
    return read_slide(sample, files_of(sample))


def test_visium_slide_reads_to_the_same_counts(tmp_path: Path) -> None:
    files, mpp = _visium_from_mouse_brain(tmp_path)
    slide = _read(files)
    matrix = read_mtx(OUTS / "raw_feature_bc_matrix")
    assert slide.spots.barcode.tolist() == matrix.barcodes.tolist()  # the slide prefix is stripped
    assert slide.counts.dtype == np.int32
    assert (slide.counts != sp.csr_matrix(matrix.counts)).nnz == 0
    assert slide.features.names.tolist() == matrix.names.tolist()
    assert slide.mpp == pytest.approx(mpp)
    assert slide.mpp_source == "spot_radius"
    assert slide.spots.in_tissue.all()
    assert (slide.lattice, slide.pitch_um) == ("hex", 100.0)
    # Visium STimage slides carry no array coordinates: derived, and they agree with Space Ranger's
    positions = read_positions(OUTS / "spatial" / "tissue_positions_list.csv")
    lookup = {b: i for i, b in enumerate(positions.barcode.tolist())}
    true_rows = positions.array_row[[lookup[b] for b in slide.spots.barcode.tolist()]]
    true_cols = positions.array_col[[lookup[b] for b in slide.spots.barcode.tolist()]]
    derived = np.column_stack([slide.spots.array_row, slide.spots.array_col]).astype(int)
    true = np.column_stack([true_rows, true_cols]).astype(int)
    # the same lattice sites up to a translation and a flip of either axis (symmetries of the hex grid)
    assert any(
        np.array_equal((derived - derived[0]) * flip, true - true[0])
        for flip in (np.array([1, 1]), np.array([1, -1]), np.array([-1, 1]), np.array([-1, -1]))
    )
    # and QC sees a scale consistent with the 100 um lattice
    with pytest.raises(ImageTooCoarseError, match="coarser than the 1 um/px"):
        check_slide(slide)  # the lowres image is ~14 um/px: blocked as too coarse for tiles
    agreement = next(c for c in slide.qc if c.name == "mpp_lattice_agreement")
    assert agreement.passed


def test_spot_diameter_option_for_radius_from_space_ranger(tmp_path: Path) -> None:
    # If a study's r is half of Space Ranger's spot_diameter_fullres (a 65 um spot), the option fixes the scale.
    factors = json.loads((OUTS / "spatial" / "scalefactors_json.json").read_text())
    r = factors["spot_diameter_fullres"] * factors["tissue_lowres_scalef"] / 2
    files, mpp = _visium_from_mouse_brain(tmp_path, r=r)
    assert _read(files).mpp == pytest.approx(mpp * 55 / 65)
    assert _read(files, reader={"spot_diameter_um": 65.0}).mpp == pytest.approx(mpp)


def _st_slide(tmp_path: Path, *, float_counts: bool = False) -> tuple[dict[str, Path], dict[str, object]]:
    """A legacy-ST slide: 6 x 5 spots, ids '<x>x<y>', 200 um apart at 0.909 um/px, jittered a few px."""
    rng = np.random.default_rng(7)
    mpp = 200.0 / 220.0
    grid = [(x, y) for y in range(3, 8) for x in range(10, 16)]
    ids = [f"{x}x{y}" for x, y in grid]
    px = np.array([x * 220.0 for x, _ in grid]) + rng.normal(0, 3, len(grid))
    py = np.array([y * 220.0 for _, y in grid]) + rng.normal(0, 3, len(grid))
    counts = rng.poisson(3.0, size=(len(grid), 12))
    image = np.full((2000, 3700, 3), 235, dtype=np.uint8)
    image[500:1800, 2000:3600] = (190, 120, 180)
    files = _write_stimage(
        tmp_path,
        slide="Human_Breast_Test_ST_A1",
        ids=ids,
        genes=[f"GENE{i}" for i in range(11)] + ["GENE0"],  # a repeated symbol, as in real files
        counts=counts,
        x=px,
        y=py,
        r=100.0 / (2 * mpp),
        image=image,
        float_counts=float_counts,
    )
    return files, {"mpp": mpp, "grid": grid, "counts": counts}


def test_st_slide_array_coordinates_come_from_spot_ids(tmp_path: Path) -> None:
    files, truth = _st_slide(tmp_path, float_counts=True)
    slide = check_slide(_read(files, assay="st"))
    grid = truth["grid"]
    assert isinstance(grid, list)
    assert slide.spots.barcode.tolist() == [f"{x}x{y}" for x, y in grid]
    assert slide.spots.array_col.tolist() == [x for x, _ in grid]
    assert slide.spots.array_row.tolist() == [y for _, y in grid]
    assert (slide.lattice, slide.pitch_um) == ("square", 200.0)
    assert slide.mpp == pytest.approx(truth["mpp"])
    assert slide.counts.dtype == np.int32  # "3.0" in the CSV: whole numbers
    np.testing.assert_array_equal(slide.counts.toarray(), truth["counts"])
    assert slide.features.names.tolist()[-1] == "GENE0"
    assert slide.flags == []
    agreement = next(c for c in slide.qc if c.name == "mpp_lattice_agreement")
    assert isinstance(agreement.value, float) and agreement.value < 0.02


def test_spots_missing_from_coords_are_dropped_and_none_is_a_mismatch(tmp_path: Path) -> None:
    files, _ = _st_slide(tmp_path)
    coords = files["coords"]
    lines = coords.read_text().splitlines()
    coords.write_text("\n".join(lines[:-3]) + "\n")
    slide = _read(files, assay="st")
    assert len(slide.spots) == 27
    assert slide.qc[0].value == 3
    coords.write_text(lines[0] + "\n" + "\n".join(line.replace("x", "y", 1) for line in lines[1:]) + "\n")
    with pytest.raises(BarcodeMismatchError, match="none of the 30 matrix barcodes has a row in"):
        _read(files, assay="st")


def test_malformed_coord_header_and_unknown_assay(tmp_path: Path) -> None:
    files, _ = _st_slide(tmp_path)
    text = files["coords"].read_text()
    files["coords"].write_text(text.replace(",yaxis,xaxis,r", ",row,col,radius", 1))
    with pytest.raises(CorruptSourceError, match=r"lacks xaxis, yaxis, r; expected ',yaxis,xaxis,r'"):
        _read(files, assay="st")
    files["coords"].write_text(text)
    with pytest.raises(UnsupportedAssayError, match=r"assay 'xenium' is cell-level sites.*check the sample's `assay`"):
        _read(files, assay="xenium")
    with pytest.raises(UnsupportedAssayError, match=r"assay 'slide-seq' has no spot geometry on record \(known: st, "):
        _read(files, assay="slide-seq")
    with pytest.raises(UnsupportedAssayError, match=r"square bins .* set the reader option `bin_size_um`"):
        _read(files, assay="visium-hd")


def test_every_dropped_spot_is_counted_by_reason(tmp_path: Path) -> None:
    files, _ = _st_slide(tmp_path)
    coords, counts = files["coords"], files["counts"]
    header, *rows = coords.read_text().splitlines()
    prefix = "Human_Breast_Test_ST_A1_"
    by_id = {row.split(",")[0][len(prefix) :]: row for row in rows}
    kept = [row for row in rows if row.split(",")[0][len(prefix) :] not in ("10x3", "11x3", "12x3")]
    nan_rows = [f"{prefix}13x3,NA,{by_id['13x3'].split(',')[2]},45.0", f"{prefix}14x3,100.0,inf,45.0"]
    kept = [row for row in kept if row.split(",")[0][len(prefix) :] not in ("13x3", "14x3")] + nan_rows
    kept += [by_id["15x3"], f"{prefix}40x40,10.0,10.0,45.0", f"{prefix}41x40,20.0,10.0,45.0"]
    coords.write_text(header + "\n" + "\n".join(kept) + "\n")
    count_lines = counts.read_text().splitlines()
    counts.write_text("\n".join([*count_lines, count_lines[5]]) + "\n")  # one spot's row twice

    slide = _read(files, assay="st")
    assert slide.dropped_spots == {
        SpotDrop.DUPLICATE_BARCODE: 2,  # the repeated count row and the repeated coord row
        SpotDrop.NOT_IN_POSITIONS: 3,  # count rows of 10x3, 11x3, 12x3: no coord row
        SpotDrop.NOT_IN_MATRIX: 2,  # coord rows 40x40 and 41x40: no count row
        SpotDrop.NAN_COORDINATES: 2,  # 13x3 and 14x3
    }
    assert len(slide.spots) == 30 - 3 - 2
    assert not {"10x3", "13x3", "14x3", "40x40"} & set(slide.spots.barcode.tolist())
    assert slide.qc[0].value == 3
