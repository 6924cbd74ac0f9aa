"""The xenium reader on Xenium output bundles generated as 10x lays them out, with an H&E aligned by affine."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from stcorpus.curate.errors import CorruptSourceError, SourceMissingError
from stcorpus.curate.geometry import spot_neighbors
from stcorpus.curate.readers import check_sample, read_slide
from stcorpus.curate.slide import Slide
from stcorpus.curate.tiles import TileSettings, cut_tiles
from tests.spatial_fixtures import Xenium, marker_offset, write_xenium
from tests.test_readers_support import files_of, make_sample
from tests.test_tiles import centroid, decode


@pytest.fixture(scope="module")
def xen(tmp_path_factory: pytest.TempPathFactory) -> Xenium:
    return write_xenium(tmp_path_factory.mktemp("xenium"))


def read_xenium(xen: Xenium, *, alignment: bool = True, **reader: object) -> Slide:
    sources = {"outs": xen.outs, "image": xen.image} | ({"alignment": xen.alignment} if alignment else {})
    sample = make_sample(sources, technology="xenium", assay="xenium", reader=reader)
    assert check_sample(sample) == []
    return read_slide(sample, files_of(sample))


def test_cells_keep_gene_counts_and_land_on_their_he_pixels(xen: Xenium) -> None:
    slide = read_xenium(xen)
    assert slide.spots.barcode.tolist() == xen.cell_ids
    np.testing.assert_array_equal(slide.counts.toarray(), xen.gene_counts.toarray())
    assert slide.features.ids.tolist() == xen.ids and slide.dropped_features == 4  # the control features
    np.testing.assert_allclose(np.column_stack([slide.spots.x_px, slide.spots.y_px]), xen.cell_px, atol=1e-6)
    np.testing.assert_allclose(slide.mpp, xen.he_mpp, rtol=1e-9)
    assert slide.lattice == "cells" and slide.pitch_um is None
    # Neighbours: the 6 nearest cells within 50 um, by brute force.
    nbrs = spot_neighbors(slide.spots, geometry=slide.geometry, mpp=slide.mpp)
    d = np.hypot(*(xen.cell_um[:, None, :] - xen.cell_um[None, :, :]).transpose(2, 0, 1))
    for i in range(len(xen.cell_ids)):
        order = [j for j in np.argsort(d[i], kind="stable") if j != i and d[i, j] <= 50.0][:6]
        assert sorted(nbrs.of(i).tolist()) == sorted(order)


def test_cell_scale_tiles_are_centred_within_a_pixel(xen: Xenium) -> None:
    slide = read_xenium(xen)
    settings = TileSettings(patch_size=128, patch_mpp=0.5, regions=False, min_tissue_fraction=0)  # 64 um tiles
    results = list(cut_tiles(slide, settings=settings))
    assert len(results) == len(xen.cell_ids) and all(r.accepted for r in results)
    for result in results:
        patch = decode(result.patch)[44:84, 44:84]  # 20 um around the centre: this cell's marker only
        cx, cy = centroid(patch)
        assert abs(cx + 44 - 63.5) < 1 and abs(cy + 44 - 63.5) < 1, (result.key, cx, cy)


def test_without_alignment_the_he_is_in_morphology_pixels(xen: Xenium) -> None:
    slide = read_xenium(xen, alignment=False)
    np.testing.assert_allclose(slide.spots.x_px, xen.cell_um[:, 0] / 0.2125)
    assert slide.mpp == pytest.approx(0.2125)


def test_pseudo_spots_pool_good_gene_transcripts(xen: Xenium) -> None:
    slide = read_xenium(xen, samples="pseudo-spots")
    genes = {name: i for i, name in enumerate(xen.names)}
    keep = np.array([f in genes and q >= 20 for f, q in zip(xen.transcript_feature, xen.transcript_qv, strict=True)])
    xy = xen.transcripts_um[keep]
    feature = np.array([genes[f] for f, k in zip(xen.transcript_feature, keep, strict=True) if k])
    # Brute force over every Visium site (row + col even) near the transcripts: nearest within 27.5 um.
    rows, cols = np.mgrid[-2 : math.ceil(xy[:, 1].max() / 86.6) + 3, -2 : math.ceil(xy[:, 0].max() / 50) + 3]
    even = (rows + cols) % 2 == 0
    rows, cols = rows[even], cols[even]
    sx, sy = cols * 50.0, rows * 100.0 * math.sqrt(3) / 2
    d = np.hypot(xy[:, :1] - sx[None, :], xy[:, 1:] - sy[None, :])
    nearest = d.argmin(axis=1)
    inside = d[np.arange(len(xy)), nearest] <= 27.5
    expected: dict[tuple[int, int], np.ndarray] = {}
    for t in np.flatnonzero(inside):
        key = (int(rows[nearest[t]]), int(cols[nearest[t]]))
        expected.setdefault(key, np.zeros(len(genes), dtype=np.int64))[feature[t]] += 1
    got = {
        (int(r), int(c)): i for i, (r, c) in enumerate(zip(slide.spots.array_row, slide.spots.array_col, strict=True))
    }
    assert set(got) == set(expected)
    dense = slide.counts.toarray()
    for key, total in expected.items():
        np.testing.assert_array_equal(dense[got[key]], total)
    assert slide.lattice == "hex" and slide.pitch_um == 100.0
    assert any("control features" in note and "qv < 20" in note for note in slide.notes)


def test_bad_inputs_name_the_fault(xen: Xenium, tmp_path: Path) -> None:
    nuclei = make_sample(
        {"outs": xen.outs, "image": xen.image}, technology="xenium", assay="xenium", reader={"samples": "nuclei"}
    )
    assert any("reader.samples='nuclei' is not one of 'cells', 'pseudo-spots'" in p for p in check_sample(nuclei))
    with pytest.raises(SourceMissingError, match="samples='nuclei'"):  # the reader refuses it too
        read_slide(nuclei, files_of(nuclei))
    bad = tmp_path / "alignment.csv"
    bad.write_text("1,0\n0,1\n")
    sample = make_sample({"outs": xen.outs, "image": xen.image, "alignment": bad}, technology="xenium", assay="xenium")
    with pytest.raises(CorruptSourceError, match="3x3"):
        read_slide(sample, files_of(sample))
    sample = make_sample({"outs": tmp_path, "image": xen.image}, technology="xenium", assay="xenium")
    with pytest.raises(SourceMissingError, match=r"no experiment\.xenium"):
        read_slide(sample, files_of(sample))


def test_cells_build_into_a_corpus_and_export_back(xen: Xenium, tmp_path: Path) -> None:
    import anndata as ad
    import pyarrow.parquet as pq

    from stcorpus import schema
    from stcorpus.curate.cli import main
    from tests.build_fixtures import manifest

    entry = "\n".join(
        [
            "- id: XEN-1",
            "  technology: xenium",
            "  assay: xenium",
            "  species: human",
            "  organ: breast",
            f"  sources: {{outs: '{xen.outs}', image: '{xen.image}', alignment: '{xen.alignment}'}}",
        ]
    )
    out = tmp_path / "corpus"
    # cell-scale tiles: 128 px at 0.5 um/px (64 um); markers on white, so no tissue test
    argv = ["build", str(manifest(tmp_path, [entry])), "--out", str(out), "--no-progress", "--holdout", "none"]
    assert main([*argv, "--patch-size", "128", "--patch-mpp", "0.5", "--min-tissue", "0"]) == 0
    genes = {g["index"]: g["ensembl_id"] for g in pq.read_table(out / schema.GENES_FILE).to_pylist()}
    rows = []
    for shard in pq.read_table(out / schema.SHARDS_FILE).to_pylist():
        if shard["format"] == "parquet":
            rows += pq.read_table(
                out / shard["path"],
                columns=[
                    "barcode",
                    "genes",
                    "counts",
                    "niche_genes",
                    "niche_counts",
                    "neighbors",
                    "array_row",
                    "patch",
                ],
            ).to_pylist()
    by_cell = {r["barcode"]: r for r in rows}
    assert sorted(by_cell) == sorted(xen.cell_ids)  # every cell has counts and a tile
    dense = xen.gene_counts.toarray()
    column = {gene_id: j for j, gene_id in enumerate(xen.ids)}
    key_of = {schema.sample_key("XEN-1", c): i for i, c in enumerate(xen.cell_ids)}
    for i, cell in enumerate(xen.cell_ids):
        r = by_cell[cell]
        got = np.zeros(len(xen.ids), dtype=np.int64)
        got[[column[genes[g]] for g in r["genes"]]] = r["counts"]
        np.testing.assert_array_equal(got, dense[i])
        niche = np.zeros(len(xen.ids), dtype=np.int64)
        niche[[column[genes[g]] for g in r["niche_genes"]]] = r["niche_counts"]
        np.testing.assert_array_equal(niche, dense[[key_of[k] for k in r["neighbors"]]].sum(axis=0))
        assert r["array_row"] is None and 1 <= len(r["neighbors"]) <= 6
    # The built tiles (128 px at 0.5 um/px) are centred on their cells: each cell's marker disc, in the
    # central 20 um of the patch, has its centroid within 1 px of the patch centre.
    offsets = np.array([marker_offset(r["patch"]["bytes"], half_window_px=20) for r in rows])
    assert np.abs(offsets).max() < 1.0, offsets
    # Exported back, a cell sits at its H&E pixel times the H&E's um/px (the corpus's slide micrometres).
    assert main(["export", str(out), "--slide", "XEN-1", "--to", str(tmp_path / "x.h5ad")]) == 0
    back = ad.read_h5ad(tmp_path / "x.h5ad")
    order = [xen.cell_ids.index(b) for b in back.obs["barcode"]]
    np.testing.assert_allclose(back.obsm["spatial_um"], xen.cell_px[order] * xen.he_mpp, atol=1e-6)
    assert back.obs["array_row"].isna().all()
