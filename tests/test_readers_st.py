"""Legacy ST reader on HER2ST sections B4 and C2 (= HEST SPA145, SPA141), and on layouts made from them."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stcorpus.curate.errors import (
    CorruptSourceError,
    ImageTooCoarseError,
    NonIntegerCountsError,
    SpotsOutsideImageError,
)
from stcorpus.curate.geometry import LEGACY_ST
from stcorpus.curate.qc import check_slide
from stcorpus.curate.readers import check_sample, read_slide
from stcorpus.curate.slide import Slide, SpotDrop
from tests.test_readers_support import DATA, expected, files_of, make_sample

HER2ST = DATA / "her2st-legacy-st"
FACTS = expected(HER2ST)
IMAGES = {
    "B4": HER2ST / "data" / "ST-imgs" / "B" / "B4" / "BT10737_D2_HE.jpg",
    "C2": HER2ST / "data" / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg",
}


def _files(section: str) -> dict[str, Path]:
    return {
        "counts": HER2ST / "data" / "ST-cnts" / f"{section}.tsv.gz",
        "spots": HER2ST / "data" / "ST-spotfiles" / f"{section}_selection.tsv",
        "image": IMAGES[section],
    }


def _open_big(path: Path) -> Image.Image:
    """The tests' own opens of the real H&E (C2's is 92 Mpx, over Pillow's 89 Mpx warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _read(files: dict[str, Path], **kwargs: object) -> Slide:
    sample = make_sample(files, technology="st", assay="st", sample_id="SECTION", **kwargs)  # type: ignore[arg-type]
    return read_slide(sample, files_of(sample))


# --- the real sections, number by number ---------------------------------------------------------


@pytest.mark.parametrize("section", ["B4", "C2"])
def test_real_sections_match_expected_and_hest_scale(section: str) -> None:
    facts = FACTS[section]
    slide = _read(_files(section))
    assert list(slide.counts.shape) == facts["counts_shape"]
    assert int(slide.counts.sum()) == facts["total_counts"] and slide.counts.nnz == facts["nnz"]
    assert slide.counts.dtype == np.int32
    assert slide.features.names[0] == facts["first_gene"] and slide.features.ids[0] == ""
    assert (slide.image.width, slide.image.height) == (facts["image"]["width"], facts["image"]["height"])
    assert (slide.lattice, slide.pitch_um, slide.geometry.spot_diameter_um) == ("square", 200.0, 100.0)
    # um/px from the spot lattice, within 2% of HEST's pixel_size_um_estimated; never from the JPEG's 72 dpi
    hest = FACTS["geometry"]["hest_mpp"][section]
    assert slide.mpp_source == "lattice"
    assert slide.mpp == pytest.approx(hest, rel=0.02)
    with _open_big(IMAGES[section]) as image:
        assert image.info.get("dpi") == (72, 72) and abs(slide.mpp - 25_400 / 72) > 300
    # every count row has a spot; B4's selected spot 18x20 has no count row, and is counted
    missing = facts["selected_missing_from_counts"]
    assert slide.dropped_spots == ({SpotDrop.NOT_IN_MATRIX: len(missing)} if missing else {})
    assert set(missing).isdisjoint(slide.spots.barcode.tolist())
    assert slide.qc[0].name == "barcodes_with_position" and slide.qc[0].value == 0
    # array coordinates from the keys: x the column, y the row; centres in full-resolution pixels
    first = slide.spots.barcode[0]
    x, y = (int(v) for v in first.split("x"))
    assert (slide.spots.array_col[0], slide.spots.array_row[0]) == (x, y)
    spot_file = np.loadtxt(_files(section)["spots"], skiprows=1)
    row = spot_file[(spot_file[:, 0] == x) & (spot_file[:, 1] == y)][0]
    assert (slide.spots.x_px[0], slide.spots.y_px[0]) == (row[4], row[5])


def test_real_section_passes_qc_with_spots_on_tissue() -> None:
    slide = check_slide(_read(_files("C2")))
    assert slide.flags == []
    assert next(c for c in slide.qc if c.name == "spots_outside_image").value == 0
    # H&E is purple where the spots are; the glass around the section is not
    tissue = [
        slide.image.read_region(level=0, x=int(x) - 20, y=int(y) - 20, width=40, height=40).astype(np.int64)
        for x, y in zip(slide.spots.x_px[:20], slide.spots.y_px[:20], strict=True)
    ]
    chroma = [float((t.max(axis=2) - t.min(axis=2)).mean()) for t in tissue]
    corner = slide.image.read_region(level=0, x=0, y=0, width=200, height=200).astype(np.int64)
    assert min(chroma) > 20 > float((corner.max(axis=2) - corner.min(axis=2)).mean())


def test_the_reader_is_registered_with_its_sources() -> None:
    sample = make_sample(_files("B4"), technology="st", assay="st")
    assert check_sample(sample) == []
    partial = make_sample({"counts": _files("B4")["counts"]}, technology="st", assay="st")
    assert any("needs {counts, image, spots}" in problem for problem in check_sample(partial))


# --- layouts of other studies, made from the real files ----------------------------------------


def _spot_rows(section: str = "C2") -> tuple[str, list[list[str]]]:
    header, *rows = _files(section)["spots"].read_text().splitlines()
    return header, [row.split("\t") for row in rows]


def _count_rows(section: str = "C2") -> tuple[list[str], list[list[str]]]:
    with gzip.open(_files(section)["counts"], "rt") as handle:
        header, *rows = handle.read().splitlines()
    return header.split("\t"), [row.split("\t") for row in rows]


def _write(path: Path, lines: list[str]) -> Path:
    text = "\n".join(lines) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def test_off_tissue_spots_missing_rows_and_versioned_ensembl_ids(tmp_path: Path) -> None:
    header, counts = _count_rows()
    spot_header, spots = _spot_rows()
    keys = [row[0] for row in counts]
    # 1. the first five spots are off tissue (selected = 0) and the table holds them: kept, off tissue
    off = set(keys[:5])
    # 2. a selected spot without a count row, and an off-tissue one (not a drop: nothing is under tissue)
    spots.append(["40", "40", "40.0", "40.0", "100.0", "100.0", "1"])
    spots.append(["41", "40", "41.0", "40.0", "390.0", "100.0", "0"])
    # 3. two count rows without a spot record, one key written twice
    counts.append(["50x50", *counts[0][1:]])
    counts.append(["51x50", *counts[1][1:]])
    counts.append(counts[7])
    # 4. versioned mouse Ensembl ids, and HTSeq's summary columns
    header = [header[0], "ENSMUSG00000051951.5", "ENSMUSG00000025900.1", *header[3:], "__no_feature", "__ambiguous"]
    counts = [[*row, "3", "1"] for row in counts]
    # 5. a spot whose centre was lost
    nan_key = keys[9]
    for row in spots:
        if f"{row[0]}x{row[1]}" in off:
            row[6] = "0"
        if f"{row[0]}x{row[1]}" == nan_key:
            row[4] = "NaN"
    files = {
        "counts": _write(tmp_path / "C2.tsv", ["\t".join(header), *("\t".join(r) for r in counts)]),
        "spots": _write(tmp_path / "C2_selection.tsv", [spot_header, *("\t".join(r) for r in spots)]),
        "image": IMAGES["C2"],
    }
    slide = _read(files)
    assert slide.dropped_spots == {
        SpotDrop.DUPLICATE_BARCODE: 1,
        SpotDrop.NOT_IN_POSITIONS: 2,
        SpotDrop.NOT_IN_MATRIX: 1,
        SpotDrop.NAN_COORDINATES: 1,
    }
    assert len(slide.spots) == 187 - 1
    barcodes = slide.spots.barcode.tolist()
    assert {"50x50", "51x50", "40x40", nan_key}.isdisjoint(barcodes)
    assert {b for b, inside in zip(barcodes, slide.spots.in_tissue, strict=True) if not inside} == off
    assert slide.features.ids[:2].tolist() == ["ENSMUSG00000051951.5", "ENSMUSG00000025900.1"]
    assert slide.features.names[:2].tolist() == ["", ""] and slide.features.names[2] == header[3]
    assert slide.dropped_features == 2 and slide.counts.shape[1] == 15706
    assert any("off tissue" in note for note in slide.notes)
    # the scale still comes from every spot record
    assert slide.mpp == pytest.approx(FACTS["geometry"]["hest_mpp"]["C2"], rel=0.02)


def test_transposed_table_decimal_keys_and_a_header_without_the_empty_cell(tmp_path: Path) -> None:
    reference = _read(_files("B4"))
    header, counts = _count_rows("B4")
    spot_header, spots = _spot_rows("B4")
    corrected = {f"{r[0]}x{r[1]}": f"{float(r[2]):.3f}x{float(r[3]):.3f}" for r in spots}
    # genes x spots, the spot keys the corrected coordinates, no empty cell above the gene names
    genes = header[1:]
    columns = [corrected[row[0]] for row in counts]
    lines = ["\t".join(columns)]
    lines += ["\t".join([gene, *(row[1 + j] for row in counts)]) for j, gene in enumerate(genes[:300])]
    files = {
        "counts": _write(tmp_path / "B4.tsv.gz", lines),
        "spots": _write(tmp_path / "B4_selection.tsv", [spot_header, *("\t".join(r) for r in spots)]),
        "image": IMAGES["B4"],
    }
    slide = _read(files)
    assert any("read transposed" in note for note in slide.notes)
    assert any("by corrected coordinates (283 of 283 matched)" in note for note in slide.notes)
    assert slide.spots.barcode.tolist() == columns  # the keys as the table writes them
    np.testing.assert_array_equal(slide.spots.array_col, reference.spots.array_col)
    assert (slide.counts != reference.counts[:, :300]).nnz == 0
    assert slide.features.names.tolist() == genes[:300]


def test_a_downscaled_image_is_refused(tmp_path: Path) -> None:
    with _open_big(IMAGES["B4"]) as image:
        small = image.reduce(8)
    small.save(tmp_path / "small.jpg", quality=85)
    # the full-resolution spot file against an eighth-size image: the spots fall outside it
    files = {**_files("B4"), "image": tmp_path / "small.jpg"}
    with pytest.raises(SpotsOutsideImageError, match=r"lie outside image small\.jpg"):
        check_slide(_read(files))
    # a spot file made on the small image: the lattice says 5.5 um/px, too coarse for tiles
    spot_header, spots = _spot_rows("B4")
    for row in spots:
        row[4], row[5] = f"{float(row[4]) / 8:.2f}", f"{float(row[5]) / 8:.2f}"
    files["spots"] = _write(tmp_path / "B4_selection.tsv", [spot_header, *("\t".join(r) for r in spots)])
    slide = _read(files)
    assert slide.mpp == pytest.approx(8 * FACTS["geometry"]["hest_mpp"]["B4"], rel=0.02)
    with pytest.raises(ImageTooCoarseError, match=r"small\.jpg is 5\.\d+ um/px \(lattice\), coarser than"):
        check_slide(slide)


def test_malformed_inputs_name_the_file_and_the_fault(tmp_path: Path) -> None:
    spot_header, spots = _spot_rows("C2")
    bad_header = _write(tmp_path / "a_selection.tsv", ["x\ty\tnew_x\tnew_y", *("\t".join(r[:4]) for r in spots)])
    with pytest.raises(CorruptSourceError, match=r"a_selection\.tsv: header .* lacks pixel_x, pixel_y"):
        _read({**_files("C2"), "spots": bad_header})
    header, counts = _count_rows("C2")
    rows = ("\t".join([f"spot{i}", *r[1:]]) for i, r in enumerate(counts))
    unkeyed = _write(tmp_path / "b.tsv", ["\t".join(header), *rows])
    with pytest.raises(CorruptSourceError, match=r"b\.tsv: rows are keyed 'spot0', .* not '<x>x<y>'"):
        _read({**_files("C2"), "counts": unkeyed})
    truncated = tmp_path / "c.tsv.gz"
    truncated.write_bytes(_files("C2")["counts"].read_bytes()[:5000])
    with pytest.raises(CorruptSourceError, match=r"c\.tsv\.gz: "):
        _read({**_files("C2"), "counts": truncated})
    one_line = _write(tmp_path / "d_selection.tsv", [spot_header, *("\t".join(r) for r in spots if r[1] == "21")])
    with pytest.raises(CorruptSourceError, match=r"cannot fix the scale .* set the sample's `mpp`"):
        _read({**_files("C2"), "spots": one_line})
    assert _read({**_files("C2"), "spots": one_line}, mpp=0.69).mpp_source == "manifest"
    assert LEGACY_ST.pitch_um == 200.0


def test_format_quirks_of_other_studies_read_alike(tmp_path: Path) -> None:
    reference = _read(_files("C2"))
    header, counts = _count_rows("C2")
    spot_header, spots = _spot_rows("C2")
    # a tab at the end of every line, Windows line ends; a comma-separated spot file without `selected`
    trailing = tmp_path / "C2.tsv"
    trailing.write_bytes("".join("\t".join(row) + "\t\r\n" for row in [header, *counts]).encode())
    no_selected = [",".join(row[:6]) for row in [spot_header.split("\t"), *spots]]
    files = {**_files("C2"), "counts": trailing, "spots": _write(tmp_path / "C2_selection.csv", no_selected)}
    slide = _read(files)
    assert slide.counts.shape == reference.counts.shape and (slide.counts != reference.counts).nnz == 0
    assert slide.spots.in_tissue.all() and any("no selected column" in note for note in slide.notes)
    # and the faults are named
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(CorruptSourceError, match=r"empty\.tsv: the file is empty"):
        _read({**_files("C2"), "counts": tmp_path / "empty.tsv"})
    negative = _write(tmp_path / "neg.tsv", ["\t".join(header), "\t".join([counts[0][0], "-3", *counts[0][2:]])])
    with pytest.raises(NonIntegerCountsError, match=r"neg\.tsv: 1 of [\d,]+ stored values .* \(e\.g\. -3; min -3"):
        _read({**_files("C2"), "counts": negative})


def test_a_stray_row_does_not_turn_the_table_around(tmp_path: Path) -> None:
    header, counts = _count_rows("C2")
    stray = ["total", *counts[0][1:]]  # a summary row some scripts append
    files = {**_files("C2"), "counts": _write(tmp_path / "C2.tsv", ["\t".join(r) for r in [header, *counts, stray]])}
    slide = _read(files)
    assert len(slide.spots) == 187 and not any("transposed" in note for note in slide.notes)
    assert slide.dropped_spots == {SpotDrop.NOT_IN_POSITIONS: 1}


def test_a_real_92_mpx_jpeg_is_read_without_pillows_warning_or_a_changed_global() -> None:
    """Pillow warns over 89 Mpx (C2's H&E is 92 Mpx) and refuses over 179 Mpx; our own budget
    replaces that check while we open an image, and Pillow's process-wide limit is left as the
    embedding program set it."""
    before = Image.MAX_IMAGE_PIXELS
    assert before is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        slide = _read(_files("C2"))
        assert slide.image.width * slide.image.height > before
        window = slide.image.read_region(level=0, x=0, y=0, width=64, height=64)
    slide.image.close()
    assert window.shape[:2] == (64, 64)
    assert before == Image.MAX_IMAGE_PIXELS
