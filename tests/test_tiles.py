"""Spot tiles at a true physical scale: centring, region geometry, edges, rejections, determinism."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import tifffile
from PIL import Image

from bench.synth import write_pyramid_tiff
from stcorpus.curate.errors import ImageTooCoarseError, SettingsError
from stcorpus.curate.imaging import open_image
from stcorpus.curate.manifest import Sample
from stcorpus.curate.slide import Features, Slide, Spots
from stcorpus.curate.tiles import (
    REJECT_BACKGROUND,
    REJECT_OUTSIDE,
    Encoder,
    Tiler,
    TileSettings,
    cut_tiles,
    encode_jpeg,
    plan_scale,
    region_pos,
    tissue_fraction,
)
from tests.conftest import FULLRES, HEART, expected

HE = FULLRES / "test_img.jpg"
#: um/px of the real crop: Visium spots are 55 um, 89.44 px in this image (EXPECTED.json).
FULLRES_MPP = 55 / expected(FULLRES)["h5ad"]["scalefactors"]["spot_diameter_fullres"]


def make_slide(
    image: Path,
    *,
    mpp: float,
    x_px: Any,
    y_px: Any,
    barcodes: Any = None,
    in_tissue: Any = None,
    slide_id: str = "TEST1",
) -> Slide:
    """A Slide around an image and spot positions (the readers are not needed to test tiles)."""
    x = np.asarray(x_px, dtype=np.float64)
    n = x.size
    sample = Sample(
        id=slide_id,
        study_id="tests",
        source="test",
        source_id=slide_id,
        technology="hest",
        assay="visium",
        species="mouse",
        licence="CC-BY-4.0",
        counts="raw",
        sources={},
        manifest="tests",
        manifest_path=Path("tests.yaml"),
        allow_local=True,
    )
    spots = Spots(
        barcode=np.asarray(barcodes if barcodes is not None else [f"SPOT{i}-1" for i in range(n)]),
        in_tissue=np.ones(n, dtype=bool) if in_tissue is None else np.asarray(in_tissue, dtype=bool),
        array_row=np.zeros(n, dtype=np.int32),
        array_col=np.arange(n, dtype=np.int32) * 2,
        x_px=x,
        y_px=np.asarray(y_px, dtype=np.float64),
    )
    return Slide(
        sample=sample,
        counts=sp.csr_matrix((n, 1), dtype=np.int32),
        features=Features(ids=np.asarray(["ENSMUSG00000000001"]), names=np.asarray(["Gnai3"])),
        spots=spots,
        image=open_image(image),
        mpp=mpp,
        mpp_source="scalefactors",
    )


def fullres_spots() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Spot centres (x, y px of test_img.jpg) and barcodes of the real h5ad fixture."""
    with h5py.File(FULLRES / "test_data.h5ad", "r") as f:
        xy = f["obsm/spatial"][:]
        barcodes = [b.decode() for b in f["obs/_index"][:]]
    return xy[:, 0].astype(float), xy[:, 1].astype(float), barcodes


def decode(data: bytes | None) -> np.ndarray:
    assert data is not None
    pixels: np.ndarray = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return pixels


# ---------------------------------------------------------------------------------------------
# Centring: markers drawn at known spot positions land in the middle of the patch
# ---------------------------------------------------------------------------------------------

#: Spot centres in um, far enough apart that no view holds two markers.
MARKER_SPOTS_UM = ((350.3, 352.7), (1050.6, 380.2), (380.9, 1050.1), (1061.4, 1071.8))
MARKER_RADIUS_UM = 15.0
SLIDE_UM = 1420.0


def marker_image(mpp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """White image with an antialiased dark disc at every spot; returns pixels, x_px, y_px."""
    size = round(SLIDE_UM / mpp)
    pixels = np.full((size, size, 3), 255, dtype=np.uint8)
    xs = np.asarray([x for x, _ in MARKER_SPOTS_UM]) / mpp
    ys = np.asarray([y for _, y in MARKER_SPOTS_UM]) / mpp
    radius = MARKER_RADIUS_UM / mpp
    for x, y in zip(xs, ys, strict=True):
        # Spot (x, y) is the centre of pixel (x, y): pixel (i, j) has its centre at (i, j) too.
        x0, x1 = int(x - radius - 2), int(x + radius + 3)
        y0, y1 = int(y - radius - 2), int(y + radius + 3)
        jj, ii = np.mgrid[y0:y1, x0:x1]
        coverage = np.clip(radius - np.hypot(ii - x, jj - y) + 0.5, 0, 1)
        pixels[y0:y1, x0:x1] = (255 - 235 * coverage)[..., None].astype(np.uint8)
    return pixels, xs, ys


def centroid(pixels: np.ndarray) -> tuple[float, float]:
    """Centroid (x, y) of the darkness of a view, in its pixel index coordinates."""
    darkness = np.clip(255.0 - pixels.astype(float).mean(axis=2) - 12, 0, None)  # ignore JPEG ripple on white
    jj, ii = np.mgrid[0 : pixels.shape[0], 0 : pixels.shape[1]]
    total = darkness.sum()
    assert total > 0, "no marker in the view"
    return float((darkness * ii).sum() / total), float((darkness * jj).sum() / total)


def halve(pixels: np.ndarray) -> np.ndarray:
    h, w = pixels.shape[0] // 2 * 2, pixels.shape[1] // 2 * 2
    halved: np.ndarray = pixels[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    return halved


def write_marker_slide(tmp_path: Path, kind: str, mpp: float) -> Path:
    pixels, _, _ = marker_image(mpp)
    if kind == "png":
        path = tmp_path / "markers.png"
        Image.fromarray(pixels).save(path)
        return path
    path = tmp_path / "markers.tif"
    levels = [pixels]
    if kind == "jpeg-pyramid":
        while max(levels[-1].shape) > 1024:
            levels.append(halve(levels[-1]))
    options: dict[str, Any] = {"tile": (256, 256), "photometric": "rgb"}
    options["compression"] = "lzw" if kind == "lzw" else "jpeg"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index, level in enumerate(levels):
            tif.write(level, subfiletype=1 if index else 0, metadata=None, **options)
    return path


#: (image kind, um/px, how the patch is made, how the region is made)
CENTRING_CASES = {
    "png-0.615-enlarged": ("png", 0.615, "resample", "resample"),
    "png-0.3-reduced": ("png", 0.3, "area", "area"),  # 5/3 and 5
    "png-0.46-reduced": ("png", 0.46, "resample", "resample"),  # HEST's median um/px
    "png-0.5-cropped": ("png", 0.5, "crop", "area"),
    "jpeg-pyramid-0.25": ("jpeg-pyramid", 0.25, "crop", "area"),  # region: 1.5x from level 2
    "jpeg-dct-scaled-0.25": ("jpeg-single", 0.25, "crop", "area"),
    "lzw-0.25-block-means": ("lzw", 0.25, "area", "area"),
}


@pytest.mark.parametrize("case", CENTRING_CASES)
def test_marker_lands_in_the_centre_of_patch_and_cell(tmp_path: Path, case: str) -> None:
    kind, mpp, patch_method, region_method = CENTRING_CASES[case]
    path = write_marker_slide(tmp_path, kind, mpp)
    _, xs, ys = marker_image(mpp)
    slide = make_slide(path, mpp=mpp, x_px=xs, y_px=ys)
    settings = TileSettings(min_tissue_fraction=0)  # markers on white: no tissue test
    tiler = Tiler(slide.image, mpp=mpp, settings=settings)
    assert (tiler.patch_plan.method, tiler.region_plan.method if tiler.region_plan else None) == (
        patch_method,
        region_method,
    )
    results = list(cut_tiles(slide, settings=settings))
    assert len(results) == 4 and all(r.accepted for r in results)
    cell = 224 / 3
    for result in results:
        x, y = xs[result.index], ys[result.index]
        # The arrays, and the JPEGs the build writes, both have the marker in their middle:
        # between pixels 111 and 112 of 224.
        for patch in (tiler.patch_pixels(x, y), decode(result.patch)):
            cx, cy = centroid(patch)
            assert abs(cx - 111.5) < 1 and abs(cy - 111.5) < 1, (case, cx, cy)
        row, col = divmod(result.pos, 3)
        for region in (tiler.region_pixels(x, y, result.pos), decode(result.region)):
            cx, cy = centroid(region)  # region pixels are 3x larger: 1 px here is 3 patch px
            assert abs(cx - ((col + 0.5) * cell - 0.5)) < 1 and abs(cy - ((row + 0.5) * cell - 0.5)) < 1


def test_real_patch_is_centred_within_half_a_pixel_of_a_direct_crop_and_resize() -> None:
    """On the real H&E crop (0.615 um/px), compare each patch with direct bicubic resizes of the
    112 um window around the spot shifted by a quarter of an output pixel at a time: the best
    match is at most half a pixel from the spot, and much better than one a pixel further."""
    xs, ys, _ = fullres_spots()
    full = Image.open(HE).convert("RGB")
    with open_image(HE) as image:
        tiler = Tiler(image, mpp=FULLRES_MPP)
        half = 112 / FULLRES_MPP / 2
        inside = [i for i in range(xs.size) if half + 5 < xs[i] < 945 - half and half + 5 < ys[i] < 1712 - half]
        assert len(inside) >= 6
        shifts = np.arange(-1.5, 1.51, 0.25)  # output pixels
        for i in inside[:6]:
            ours = tiler.patch_pixels(xs[i], ys[i]).astype(float)
            errors = np.empty((shifts.size, shifts.size))
            for row, dy in enumerate(shifts):
                for col, dx in enumerate(shifts):
                    cx = xs[i] + 0.5 + dx * 0.5 / FULLRES_MPP
                    cy = ys[i] + 0.5 + dy * 0.5 / FULLRES_MPP
                    box = (cx - half, cy - half, cx + half, cy + half)
                    reference = full.resize((224, 224), Image.Resampling.BICUBIC, box=box)
                    errors[row, col] = np.abs(ours - np.asarray(reference, dtype=float)).mean()
            best_y, best_x = np.unravel_index(np.argmin(errors), errors.shape)
            a, b = int(best_y), int(best_x)
            assert abs(shifts[a]) <= 0.5 and abs(shifts[b]) <= 0.5, (i, shifts[a], shifts[b])
            assert errors[a, b] < 1.5, errors[a, b]  # the same pixels, not merely similar ones
            far = [errors[a, min(b + 4, shifts.size - 1)], errors[a, max(b - 4, 0)]]
            assert min(far) > 3 * errors[a, b] + 2, (errors[a, b], far)


# ---------------------------------------------------------------------------------------------
# Region geometry: the patch, 3x smaller, is cell `pos` of the region
# ---------------------------------------------------------------------------------------------


def keys_for_every_pos(slide_id: str = "S1") -> dict[int, str]:
    found: dict[int, str] = {}
    i = 0
    while len(found) < 9:
        key = f"{slide_id}__BARCODE{i}-1"
        found.setdefault(region_pos(key), key)
        i += 1
    return found


def test_patch_downscaled_3x_is_the_region_cell_at_pos(tmp_path: Path) -> None:
    """The patch (0.5 um/px, a crop of level 1) averaged over 3x3 blocks matches the region
    (1.5 um/px, made from level 2) in cell ``pos`` and nowhere else, for all nine cells."""
    slide = write_pyramid_tiff(tmp_path / "he.tif", width=6000, height=6000, quality=95)
    with open_image(slide.path) as image:
        tiler = Tiler(image, mpp=0.25)
        assert tiler.patch_plan.level == 1 and tiler.region_plan is not None and tiler.region_plan.level == 2
        x, y = 3000.4, 2950.7
        cx, cy = x + 0.5, y + 0.5  # level-0 coordinates of the spot
        # Both views are crops of grids anchored at the slide's corner: the patch of level 1
        # (2 level-0 px per pixel), the region of the 1.5 um/px grid (6 level-0 px per pixel).
        px0, py0 = np.floor(cx / 2 - 112 + 0.5), np.floor(cy / 2 - 112 + 0.5)
        patch = tiler.patch_pixels(x, y).astype(float)
        for pos, key in keys_for_every_pos().items():
            assert tiler.cut(x, y, key=key).pos == pos
            region = tiler.region_pixels(x, y, pos).astype(float)
            row, col = divmod(pos, 3)
            rx0 = np.floor((cx + (1 - col) * 448) / 6 - 112 + 0.5)
            ry0 = np.floor((cy + (1 - row) * 448) / 6 - 112 + 0.5)
            # Region pixel i covers patch pixels [3 (rx0 + i) - px0, +3): keep those inside the patch.
            first_x = int(-((3 * rx0 - px0) // 3))  # smallest i with 3 (rx0 + i) - px0 >= 0
            first_y = int(-((3 * ry0 - py0) // 3))
            ox, oy = int(3 * (rx0 + first_x) - px0), int(3 * (ry0 + first_y) - py0)
            n = min((224 - ox) // 3, (224 - oy) // 3)
            blocks = patch[oy : oy + 3 * n, ox : ox + 3 * n].reshape(n, 3, n, 3, 3).mean(axis=(1, 3))
            errors = {}
            for cell in range(9):  # the patch compared with the same place in every cell
                r, c = divmod(cell, 3)
                dy, dx = round((r - row) * 224 / 3), round((c - col) * 224 / 3)
                window = region[first_y + dy : first_y + dy + n, first_x + dx : first_x + dx + n]
                errors[cell] = np.abs(window - blocks).mean() if window.shape[:2] == (n, n) else np.inf
            assert n >= 73 and errors[pos] < 3.0, (pos, n, errors)
            assert min(e for cell, e in errors.items() if cell != pos) > 3 * errors[pos], (pos, errors)


def test_pos_is_a_stable_hash_of_the_key() -> None:
    assert region_pos("TENX95__AAACAAGTATCTCCCA-1") == 4  # fixed forever: changing it reshuffles corpora
    draws = [region_pos(f"S__B{i}") for i in range(9000)]
    counts = np.bincount(draws, minlength=9)
    assert counts.min() > 850 and counts.max() < 1150  # uniform over the 9 cells
    assert [region_pos(f"S__B{i}", seed=1) for i in range(20)] != draws[:20]


# ---------------------------------------------------------------------------------------------
# Determinism across processes
# ---------------------------------------------------------------------------------------------

DIGEST_SCRIPT = """
import hashlib, sys
sys.path.insert(0, {root!r})
from tests.test_tiles import make_slide, fullres_spots, FULLRES_MPP, HE
from stcorpus.curate.tiles import TileSettings, cut_tiles
xs, ys, barcodes = fullres_spots()
digest = hashlib.sha256()
for encoder in ("simplejpeg", "pil"):
    slide = make_slide(HE, mpp=FULLRES_MPP, x_px=xs, y_px=ys, barcodes=barcodes)
    for r in cut_tiles(slide, settings=TileSettings(encoder=encoder)):
        digest.update(f"{{r.index}} {{r.key}} {{r.pos}} {{r.outside_fraction}} {{r.rejected}}".encode())
        digest.update(r.patch or b"")
        digest.update(r.region or b"")
print(digest.hexdigest())
"""


def test_same_slide_and_settings_give_byte_identical_tiles_in_separate_processes() -> None:
    root = str(Path(__file__).resolve().parent.parent)
    script = DIGEST_SCRIPT.format(root=root)
    digests = []
    for seed in ("1", "2"):  # different str hashes: nothing may depend on hash()
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
        digests.append(done.stdout.strip())
    assert len(digests[0]) == 64 and digests[0] == digests[1]


def test_jpeg_has_no_metadata_and_both_encoders_agree() -> None:
    pixels = np.asarray(Image.open(HE).convert("RGB"))[500:724, 300:524]
    encoders: tuple[Encoder, ...] = ("simplejpeg", "pil")
    for encoder in encoders:
        data = encode_jpeg(pixels, quality=90, encoder=encoder)
        assert data[:2] == b"\xff\xd8" and b"Exif" not in data and b"\xff\xfe" not in data  # no EXIF, no comment
        assert np.abs(decode(data).astype(float) - pixels).mean() < 3
        assert encode_jpeg(pixels, quality=90, encoder=encoder) == data
    assert len(encode_jpeg(pixels, quality=60)) < len(encode_jpeg(pixels, quality=95))
    assert len(encode_jpeg(pixels, subsampling="444")) > len(encode_jpeg(pixels, subsampling="420"))


# ---------------------------------------------------------------------------------------------
# Edges, rejections, order
# ---------------------------------------------------------------------------------------------


def test_edge_padding_and_rejection_counts() -> None:
    half = 112 / FULLRES_MPP / 2  # 91 px
    spots = {
        "tissue": (600.0, 900.0),
        "right-edge": (949.0, 900.0),  # half the patch outside: kept, padded white
        "corner": (0.0, 0.0),  # three quarters outside
        "far-away": (-5000.0, 100.0),
        "no-position": (float("nan"), 100.0),
        "background": (40.0, 800.0),  # the slide's grey glass left of the tissue
    }
    xs, ys = zip(*spots.values(), strict=True)
    slide = make_slide(HE, mpp=FULLRES_MPP, x_px=xs, y_px=ys, barcodes=[f"{name}-1" for name in spots])
    run = cut_tiles(slide)
    results = {slide.spots.barcode[r.index][:-2]: r for r in run}
    assert results["tissue"].accepted and results["tissue"].outside_fraction == 0
    edge = results["right-edge"]
    assert edge.accepted and edge.outside_fraction == pytest.approx((half - 0.5) / (2 * half), abs=1e-6)
    edge_pixels = Tiler(slide.image, mpp=FULLRES_MPP).patch_pixels(949.0, 900.0)
    assert (edge_pixels[:, -105:] == 255).all() and (edge_pixels[:, :100] != 255).any()
    assert results["corner"].rejected == REJECT_OUTSIDE and results["corner"].patch is None
    assert results["corner"].outside_fraction == pytest.approx(1 - ((half + 0.5) / (2 * half)) ** 2)
    assert results["far-away"].rejected == REJECT_OUTSIDE and results["far-away"].outside_fraction == 1.0
    assert results["no-position"].rejected == REJECT_OUTSIDE
    background = results["background"]
    assert background.rejected == REJECT_BACKGROUND and background.tissue_fraction is not None
    assert background.tissue_fraction < 0.1 and background.patch is None and background.region is None
    assert run.stats.n_done == 6 and run.stats.n_accepted == 2
    assert run.stats.rejected == {REJECT_OUTSIDE: 3, REJECT_BACKGROUND: 1}
    assert run.stats.as_dict()["rejected"] == {"outside_image": 3, "background": 1}
    # Thresholds are settings: accept everything inside the image, whatever it shows.
    lenient = TileSettings(max_outside_fraction=0.8, min_tissue_fraction=0)
    assert sum(r.accepted for r in cut_tiles(slide, settings=lenient)) == 4


def test_tissue_fraction_tells_stain_from_glass() -> None:
    pixels = np.asarray(Image.open(HE).convert("RGB"))
    assert tissue_fraction(pixels[900:1124, 400:624]) > 0.9  # cortex
    assert tissue_fraction(pixels[600:824, 0:100]) < 0.05  # dark grey glass, not tissue
    assert tissue_fraction(np.full((224, 224, 3), 255, np.uint8)) == 0.0


def test_results_come_in_reading_order_for_the_spots_asked() -> None:
    xs, ys, barcodes = fullres_spots()
    in_tissue = np.ones(xs.size, dtype=bool)
    in_tissue[::7] = False
    slide = make_slide(HE, mpp=FULLRES_MPP, x_px=xs, y_px=ys, barcodes=barcodes, in_tissue=in_tissue)
    results = list(cut_tiles(slide))
    assert sorted(r.index for r in results) == list(np.flatnonzero(in_tissue))  # default: in-tissue spots
    band = 112 / FULLRES_MPP
    order = [(int((ys[r.index] + 0.5) // band), xs[r.index]) for r in results]
    assert order == sorted(order)
    assert [r.key for r in results] == [f"TEST1__{barcodes[r.index]}" for r in results]
    again = list(cut_tiles(slide, indices=[5, 3, 1]))
    assert sorted(r.index for r in again) == [1, 3, 5]
    assert [r.patch for r in results if r.index in (1, 3, 5)] == [r.patch for r in again]
    with pytest.raises(IndexError):
        cut_tiles(slide, indices=[49])


def test_run_releases_the_tile_cache_when_done(tmp_path: Path) -> None:
    slide_file = write_pyramid_tiff(tmp_path / "he.tif", width=4000, height=4000)
    xs, ys = np.meshgrid(np.arange(600, 3400, 400.0), np.arange(600, 3400, 400.0))
    slide = make_slide(slide_file.path, mpp=0.25, x_px=xs.ravel(), y_px=ys.ravel())
    run = cut_tiles(slide, settings=TileSettings(cache_bytes=3 * 2**20))
    assert all(r.accepted for r in run)
    assert 0 < run.stats.cache_peak_bytes <= 3 * 2**20 and run.stats.tiles_decoded > 0
    assert len(slide.image.cache) == 0 and slide.image.cache.max_bytes == 256 * 2**20


# ---------------------------------------------------------------------------------------------
# Scales: which level is read, too-coarse images, settings
# ---------------------------------------------------------------------------------------------


def test_plan_reads_the_coarsest_source_that_is_fine_enough(tmp_path: Path) -> None:
    two = write_pyramid_tiff(tmp_path / "step2.tif", width=5000, height=5000, step=2)
    four = write_pyramid_tiff(tmp_path / "step4.tif", width=5000, height=5000, step=4)
    with open_image(two.path) as image:
        patch = plan_scale(image, image_mpp=0.25, mpp=0.5, size=224)
        assert (patch.level, patch.reduce, patch.method) == (1, 1, "crop")  # level 1 is 0.5 um/px
        region = plan_scale(image, image_mpp=0.25, mpp=1.5, size=224)
        assert (region.level, region.reduce, region.method) == (2, 1, "area")
        assert region.factor == pytest.approx(1.5) and (region.block, region.zoom) == (3, 2)
        # At 0.26 um/px, level 1 and level 0 at 1/2 JPEG scale are 0.52 um/px, coarser than
        # asked: level 0 is read and resampled.
        odd = plan_scale(image, image_mpp=0.26, mpp=0.5, size=224)
        assert (odd.level, odd.reduce, odd.method) == (0, 1, "resample")
        # Within half an output pixel over the view counts as the same scale: a crop.
        near = plan_scale(image, image_mpp=0.2502, mpp=0.5, size=224)
        assert (near.level, near.method) == (1, "crop")
    with open_image(four.path) as image:  # SVS-like: 1, 4, 16: no 0.5 um/px level
        patch = plan_scale(image, image_mpp=0.25, mpp=0.5, size=224)
        assert (patch.level, patch.reduce, patch.method) == (0, 2, "crop")  # JPEG decoded at 1/2
        # Level 1 (4x, 1 um/px) and level 0 at 1/4 JPEG scale tie: the real level wins.
        region = plan_scale(image, image_mpp=0.25, mpp=1.5, size=224)
        assert (region.level, region.reduce, region.source_mpp) == (1, 1, 1.0)


def test_too_coarse_images_raise_per_slide_before_any_read(tmp_path: Path) -> None:
    # The real Space Ranger lowres image: 55 um spots are 89.43 px at full resolution.
    scalefactors = expected(HEART)["scalefactors"]
    lowres_mpp = 55 / scalefactors["spot_diameter_fullres"] / scalefactors["tissue_lowres_scalef"]
    slide = make_slide(HEART / "spatial" / "tissue_lowres_image.png", mpp=lowres_mpp, x_px=[300.0], y_px=[300.0])
    with pytest.raises(ImageTooCoarseError, match="max_upsample") as caught:
        cut_tiles(slide)
    assert caught.value.code == "image_too_coarse" and caught.value.reason.startswith("image_too_coarse: ")
    assert "13.67 um/px" in str(caught.value)
    # A 1 um/px image gives 0.5 um/px patches (2x), a 1.2 um/px one does not unless allowed.
    assert all(r.accepted for r in cut_tiles(make_slide(HE, mpp=1.0, x_px=[600.0], y_px=[900.0])))
    coarse = make_slide(HE, mpp=1.2, x_px=[600.0], y_px=[900.0])
    with pytest.raises(ImageTooCoarseError):
        cut_tiles(coarse)
    assert all(r.accepted for r in cut_tiles(coarse, settings=TileSettings(max_upsample=2.5)))


def test_settings_are_checked_and_can_change_size_and_scale() -> None:
    with pytest.raises(SettingsError, match=r"tile settings: unknown key\(s\): patch_px \(did you mean"):
        TileSettings.from_dict({"patch_px": 256})
    with pytest.raises(SettingsError, match="jpeg_quality"):
        TileSettings(jpeg_quality=0)
    with pytest.raises(SettingsError, match=r"region_mpp=2.*must be 3"):
        TileSettings(patch_size=256, patch_mpp=1.0, region_size=256, region_mpp=2.0)
    settings = TileSettings.from_dict({"patch_size": 256, "patch_mpp": 1.0, "region_size": 256})
    assert settings.region_um_per_px == 3.0 and settings.to_dict()["region_mpp"] == 3.0
    xs, ys, barcodes = fullres_spots()
    slide = make_slide(HE, mpp=FULLRES_MPP, x_px=xs[:3], y_px=ys[:3], barcodes=barcodes[:3])
    for result in cut_tiles(slide, settings=settings):
        assert decode(result.patch).shape == decode(result.region).shape == (256, 256, 3)
    patches_only = list(cut_tiles(slide, settings=TileSettings(regions=False)))
    assert all(r.patch is not None and r.region is None for r in patches_only)
