"""Time HEST-1k's own patcher (hestcore 1.0.4) on a slide; runs under bench/.venv-hest.

Called by bench/tiles.py as ``bench/.venv-hest/bin/python bench/hest_patcher.py SPEC.json``;
prints one JSON object. It calls hestcore the way ``hest.HESTData.dump_patches`` does:

    patch_size_src = target_patch_size * (dst_pixel_size / src_pixel_size)
    coords_topleft = (coords_center - patch_size_src // 2).astype(int)
    patcher = wsi.create_patcher(target_patch_size, src_pixel_size, dst_pixel_size,
                                 mask=None, custom_coords=coords_topleft)
    patcher.to_h5(path, extra_assets={"barcode": barcodes})

with the WSI opened as HEST opens a path without cuCIM (``OpenSlideWSI(openslide.OpenSlide(path))``),
and no tissue mask (HEST's default mask adds shapely intersections: leaving it out only makes
hestcore faster). This file imports nothing from the project, on purpose.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    """Run the measurements described by the JSON spec named on the command line."""
    import numpy as np
    import openslide
    from hestcore.wsi import OpenSlideWSI

    spec = json.loads(Path(sys.argv[1]).read_text())
    if spec.get("cpu") is not None:
        os.sched_setaffinity(0, {spec["cpu"]})
    centres = np.asarray(spec["centres"], dtype=np.float64)  # (n, 2) x, y in level-0 pixels
    src, dst, size = spec["src_pixel_size"], spec["dst_pixel_size"], spec["patch_size"]
    patch_size_src = size * (dst / src)
    results: dict[str, object] = {"n": len(centres)}

    def patcher_for(coords: np.ndarray) -> object:
        wsi = OpenSlideWSI(openslide.OpenSlide(spec["path"]))
        topleft = np.asarray(coords - patch_size_src // 2).astype(int)
        return wsi.create_patcher(size, src, dst, mask=None, custom_coords=topleft)

    orders = {"given": np.arange(len(centres)), "sorted": np.lexsort((centres[:, 0], centres[:, 1]))}
    for name, order in orders.items():
        best: tuple[float, float] | None = None
        for _ in range(spec["repeat"]):
            patcher = patcher_for(centres[order])
            cpu0, wall0 = time.process_time(), time.perf_counter()
            count = 0
            for _tile, _x, _y in patcher:  # type: ignore[attr-defined]
                count += 1
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            assert count == len(centres)
            if best is None or cpu < best[0]:
                best = (cpu, wall)
        assert best is not None
        results[f"iterate_{name}"] = {
            "n": len(centres),
            "cpu_s": round(best[0], 4),
            "wall_s": round(best[1], 4),
            "per_cpu_s": round(len(centres) / best[0], 1),
        }
        if name == "given":
            level = patcher.level  # type: ignore[attr-defined]
            results["level"] = int(level)
            results["patch_size_level"] = int(patcher.patch_size_level)  # type: ignore[attr-defined]
    n_h5 = min(spec["h5_spots"], len(centres))
    with tempfile.TemporaryDirectory() as tmp:
        patcher = patcher_for(centres[:n_h5])
        barcodes = np.asarray([f"spot{i:06d}" for i in range(n_h5)])
        cpu0, wall0 = time.process_time(), time.perf_counter()
        patcher.to_h5(str(Path(tmp) / "patches.h5"), extra_assets={"barcode": barcodes})  # type: ignore[attr-defined]
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    results["to_h5"] = {"n": n_h5, "cpu_s": round(cpu, 4), "wall_s": round(wall, 4), "per_cpu_s": round(n_h5 / cpu, 1)}
    import hestcore

    results["versions"] = {
        "hestcore": _version("hestcore"),
        "openslide": openslide.__library_version__,
        "openslide-python": openslide.__version__,
        "opencv": _version("opencv-python-headless"),
        "hestcore_path": str(Path(hestcore.__file__).parent),
    }
    print(json.dumps(results))


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
