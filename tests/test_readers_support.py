"""Helpers shared by the reader and QC tests (no tests here): samples, files, synthetic images."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from stcorpus.curate.manifest import Sample, Source

DATA = Path(__file__).parent / "data"
HEART = DATA / "human-heart-sr1.0"
MOUSE_BRAIN = DATA / "mouse-brain-sr1.1"
FULLRES = DATA / "mouse-brain-fullres-h5ad"

#: HEST-1k's pixel_size_um_estimated of TENX52 (10x "Mouse Brain Section (Coronal)",
#: V1_Adult_Mouse_Brain, the slide squidpy's crop comes from), from HEST_v1_1_0.csv.
HEST_TENX52_MPP = 0.7267441860465117


def expected(folder: Path) -> dict[str, Any]:
    """The measured facts of a real fixture (its EXPECTED.json)."""
    result: dict[str, Any] = json.loads((folder / "EXPECTED.json").read_text())
    return result


def make_sample(
    sources: Mapping[str, Path],
    *,
    technology: str = "spaceranger",
    assay: str = "visium",
    sample_id: str = "slide1",
    counts: str = "raw",
    mpp: float | None = None,
    reader: Mapping[str, Any] | None = None,
    species: str = "human",
) -> Sample:
    """A resolved manifest sample whose sources are local paths."""
    return Sample(
        id=sample_id,
        study_id="study1",
        source="test",
        source_id=sample_id,
        technology=technology,
        assay=assay,
        species=species,
        licence="CC-BY-4.0",
        counts=counts,
        sources={name: Source(url=str(path)) for name, path in sources.items()},
        manifest="test",
        manifest_path=Path("/nonexistent/manifest.yaml"),
        allow_local=True,
        mpp=mpp,
        reader=dict(reader or {}),
    )


def files_of(sample: Sample) -> dict[str, Path]:
    """The sample's sources as the fetch layer hands them to readers."""
    return {name: Path(source.url) for name, source in sample.sources.items()}


def encoded_tile(pixels: npt.NDArray[np.uint8], tmp: Path, *, quality: int = 90) -> tuple[bytes, dict[str, Any]]:
    """One JPEG-compressed TIFF tile as stored by tifffile, and the write options that produced it.

    Written once with tifffile and read back raw, so repeating the bytes yields a valid
    tiled JPEG TIFF of any size without encoding every tile.
    """
    import tifffile

    options: dict[str, Any] = {
        "tile": pixels.shape[:2],
        "compression": "jpeg",
        "compressionargs": {"level": quality},
        "photometric": "rgb",
    }
    probe = tmp / "probe-tile.tif"
    tifffile.imwrite(probe, pixels, **options)
    with tifffile.TiffFile(probe) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[0], page.databytecounts[0]
        with probe.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(count)
        jpegtables = page.jpegtables
    probe.unlink()
    if jpegtables is not None:
        options["jpegtables"] = jpegtables
    return data, options


def write_repeated_pyramid(
    path: Path,
    *,
    width: int,
    height: int,
    tile_pixels: npt.NDArray[np.uint8],
    min_size: int = 512,
    resolution_um: float | None = None,
    quality: int = 90,
) -> list[tuple[int, int]]:
    """A pyramidal (SubIFD) JPEG TIFF whose every tile is ``tile_pixels``: fast at any size.

    ``resolution_um``, if given, is written to the resolution tags (pixels per cm), to make
    files whose tags disagree with the truth. Returns the (width, height) of each level.
    """
    import tifffile

    data, options = encoded_tile(tile_pixels, path.parent, quality=quality)
    th, tw = tile_pixels.shape[:2]
    sizes = [(width, height)]
    while max(sizes[-1]) // 2 >= min_size:
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))

    def tiles(w: int, h: int) -> Iterator[bytes]:
        for _ in range(-(-h // th) * -(-w // tw)):
            yield data

    extra: dict[str, Any] = {}
    if resolution_um is not None:
        extra = {"resolution": (1e4 / resolution_um, 1e4 / resolution_um), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        w, h = sizes[0]
        tif.write(tiles(w, h), shape=(h, w, 3), dtype=np.uint8, subifds=len(sizes) - 1, **options, **extra)
        for w, h in sizes[1:]:
            tif.write(tiles(w, h), shape=(h, w, 3), dtype=np.uint8, subfiletype=1, **options)
    return sizes


def write_pyramid(path: Path, pixels: npt.NDArray[np.uint8], *, resolution_um: float, tile: int = 256) -> None:
    """A real pyramidal JPEG TIFF of ``pixels`` (levels halve down to ~256 px), with the given resolution tags."""
    import tifffile
    from PIL import Image

    levels = [pixels]
    while max(levels[-1].shape[:2]) // 2 >= tile:
        h, w = levels[-1].shape[:2]
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize((w // 2, h // 2), Image.Resampling.BOX)))
    options: dict[str, Any] = {"tile": (tile, tile), "compression": "jpeg", "photometric": "rgb"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            levels[0],
            subifds=len(levels) - 1,
            resolution=(1e4 / resolution_um, 1e4 / resolution_um),
            resolutionunit="CENTIMETER",
            **options,
        )
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **options)
