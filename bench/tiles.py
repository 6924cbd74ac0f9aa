"""Benchmark: spot tiles per second per core, against HEST's own patcher and the JPEG-encode limit.

One run, one synthetic slide, the same spots for everyone:

- the slide: a pyramidal BigTIFF of real H&E texture (``bench/synth.py``), JPEG tiles (YCbCr
  4:2:0, quality 80), 0.25 um/px at level 0 like a 40x scan, levels 2x apart (``--step 4``:
  4x apart like Aperio SVS, so no level sits at 0.5 um/px);
- the spots: a full Visium capture area (6.5 mm, hex lattice, 100 um pitch) in its middle,
  handed over in a random order as barcodes sort (``stcorpus`` sorts them itself);
- ``stcorpus``: ``stcorpus.curate.tiles`` cutting the 224 px / 0.5 um/px patch (+ tissue test + JPEG
  encode), then patch + 1.5 um/px region; ``cut only`` leaves the encode out;
- the encode limit: encoding already-cut patches (and regions) with the same encoder;
- ``hestcore``: hestcore 1.0.4's ``OpenSlideWSIPatcher`` called as HEST's ``dump_patches``
  calls it (``bench/hest_patcher.py``, in ``bench/.venv-hest``, made by
  ``bench/setup_hest_venv.sh``): iterating the patcher (OpenSlide ``read_region`` +
  ``cv2.resize``, no encoding at all), and ``to_h5`` (what HEST writes) on a subset.

Every process is pinned to one CPU and timed in CPU seconds (``time.process_time``), so the
numbers are per core and robust to other work on the machine; each measurement is the best
of ``--repeat`` runs, each from a freshly opened image (cold tile cache).

Usage::

    bash bench/setup_hest_venv.sh            # once
    .venv/bin/python -m bench.tiles          # writes bench/out/tiles.json and prints a table
    .venv/bin/python -m bench.tiles --step 4 --size 30000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.synth import visium_spots, write_pyramid_tiff
from bench.timing import best_of

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
HEST_PYTHON = HERE / ".venv-hest" / "bin" / "python"


def _best(repeat: int, run: Callable[[], int]) -> dict[str, Any]:
    """Best of ``repeat`` runs of ``run`` (which returns how many items it made)."""
    t = best_of(repeat, run)
    return {
        "n": t.count,
        "cpu_s": round(t.cpu_s, 4),
        "wall_s": round(t.wall_s, 4),
        "per_cpu_s": round(t.count / t.cpu_s, 1),
    }


def measure_stcorpus(
    path: Path, *, mpp: float, xs: np.ndarray, ys: np.ndarray, repeat: int, encode_sample: int
) -> dict[str, Any]:
    """Throughput of curate.tiles on the slide, and of encoding alone."""
    from stcorpus.curate.imaging import open_image
    from stcorpus.curate.tiles import Encoder, Tiler, TileSettings, encode_jpeg

    keys = [f"BENCH__spot{i:06d}" for i in range(xs.size)]
    results: dict[str, Any] = {}

    def tiles(settings: TileSettings) -> Callable[[], int]:
        def run() -> int:
            with open_image(path) as image:
                tiler = Tiler(image, mpp=mpp, settings=settings)
                tile_run = tiler.cut_many(xs, ys, keys)
                done = sum(1 for _ in tile_run)
                results.setdefault("stats", {})["patch_region" if settings.regions else "patch"] = (
                    tile_run.stats.as_dict()
                )
                return done

        return run

    def cut_only() -> int:
        with open_image(path) as image:
            tiler = Tiler(image, mpp=mpp, settings=TileSettings(regions=False))
            for spot in tiler.order(xs, ys):
                tiler.patch_pixels(float(xs[spot]), float(ys[spot]))
        return int(xs.size)

    results["patch"] = _best(repeat, tiles(TileSettings(regions=False)))
    results["patch_region"] = _best(repeat, tiles(TileSettings(regions=True)))
    results["patch_cut_only"] = _best(repeat, cut_only)

    # The encode limit: the same encoder on already-cut arrays (a sample: they are held in RAM).
    with open_image(path) as image:
        tiler = Tiler(image, mpp=mpp, settings=TileSettings())
        order = tiler.order(xs, ys)[:encode_sample]
        patches = [tiler.patch_pixels(float(xs[i]), float(ys[i])) for i in order]
        regions = [tiler.region_pixels(float(xs[i]), float(ys[i]), int(i) % 9) for i in order]

    def encode(encoder: Encoder, *, with_regions: bool = False) -> Callable[[], int]:
        def run() -> int:
            for patch in patches:
                encode_jpeg(patch, encoder=encoder)
            for region in regions if with_regions else ():
                encode_jpeg(region, encoder=encoder)
            return len(patches)

        return run

    results["encode_patch_simplejpeg"] = _best(repeat, encode("simplejpeg"))
    results["encode_patch_pil"] = _best(repeat, encode("pil"))
    results["encode_patch_region"] = _best(repeat, encode("simplejpeg", with_regions=True))
    return results


def measure_hest(
    path: Path, *, mpp: float, xs: np.ndarray, ys: np.ndarray, repeat: int, h5_spots: int, cpu: int | None
) -> dict[str, Any]:
    """Run bench/hest_patcher.py under the hestcore venv and return what it measured."""
    if not HEST_PYTHON.exists():
        return {"error": f"{HEST_PYTHON} not found: run bash bench/setup_hest_venv.sh first"}
    spec = {
        "path": str(path),
        "centres": np.stack([xs, ys], axis=1).tolist(),
        "src_pixel_size": mpp,
        "dst_pixel_size": 0.5,
        "patch_size": 224,
        "repeat": repeat,
        "h5_spots": h5_spots,
        "cpu": cpu,
    }
    spec_path = OUT / "hest_spec.json"
    spec_path.write_text(json.dumps(spec))
    done = subprocess.run(
        [str(HEST_PYTHON), str(HERE / "hest_patcher.py"), str(spec_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    """Make (or reuse) the slide, run every measurement, print a table, write bench/out/tiles.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=40000, help="level-0 width and height in px (default 40000)")
    parser.add_argument("--step", type=int, default=2, choices=(2, 4), help="pyramid step between levels")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is kept")
    parser.add_argument("--encode-sample", type=int, default=1000, help="patches held in RAM for the encode limit")
    parser.add_argument("--h5-spots", type=int, default=1000, help="spots for hestcore's to_h5")
    parser.add_argument("--no-hest", action="store_true", help="skip hestcore")
    parser.add_argument("--out", type=Path, default=OUT / "tiles.json")
    args = parser.parse_args(argv)

    OUT.mkdir(parents=True, exist_ok=True)
    mpp = 0.25
    slide_path = OUT / f"bench-{args.size}-step{args.step}.tif"
    if not slide_path.exists():
        start = time.perf_counter()
        write_pyramid_tiff(slide_path, width=args.size, height=args.size, mpp=mpp, step=args.step)
        print(f"wrote {slide_path} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    # A 6.5 mm Visium capture area in the middle of the slide (less on a small test slide).
    area = min(round(6500 / mpp), args.size - round(1000 / mpp))
    origin = ((args.size - area) / 2, (args.size - area) / 2)
    xs, ys, _, _ = visium_spots(width=area, height=area, mpp=mpp, margin_um=50, origin=origin)
    shuffle = np.random.default_rng(0).permutation(xs.size)  # barcode order is spatially random
    xs, ys = xs[shuffle], ys[shuffle]

    cpu = sorted(os.sched_getaffinity(0))[0]
    os.sched_setaffinity(0, {cpu})
    ours = measure_stcorpus(slide_path, mpp=mpp, xs=xs, ys=ys, repeat=args.repeat, encode_sample=args.encode_sample)
    hest = (
        {"skipped": True}
        if args.no_hest
        else measure_hest(slide_path, mpp=mpp, xs=xs, ys=ys, repeat=args.repeat, h5_spots=args.h5_spots, cpu=cpu)
    )
    report = {
        "slide": {
            "path": str(slide_path.relative_to(HERE.parent)),
            "size": args.size,
            "mpp": mpp,
            "step": args.step,
            "bytes": slide_path.stat().st_size,
            "spots": int(xs.size),
        },
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
        },
        "stcorpus": ours,
        "hestcore": hest,
    }
    report["ratios"] = _ratios(ours, hest)
    args.out.write_text(json.dumps(report, indent=1))
    print(_table(report))
    return 0


def _ratios(ours: dict[str, Any], hest: dict[str, Any]) -> dict[str, float]:
    patch = ours["patch"]["per_cpu_s"]
    ratios = {
        "patch_vs_encode_limit": round(patch / ours["encode_patch_simplejpeg"]["per_cpu_s"], 3),
        "patch_region_vs_encode_limit": round(
            ours["patch_region"]["per_cpu_s"] / ours["encode_patch_region"]["per_cpu_s"], 3
        ),
    }
    if "iterate_given" in hest:
        ratios["patch_vs_hest_iterate"] = round(patch / hest["iterate_given"]["per_cpu_s"], 2)
        ratios["patch_vs_hest_iterate_sorted"] = round(patch / hest["iterate_sorted"]["per_cpu_s"], 2)
        ratios["patch_vs_hest_to_h5"] = round(patch / hest["to_h5"]["per_cpu_s"], 2)
        ratios["patch_region_vs_hest_iterate"] = round(
            ours["patch_region"]["per_cpu_s"] / hest["iterate_given"]["per_cpu_s"], 2
        )
    return ratios


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _table(report: dict[str, Any]) -> str:
    ours, hest = report["stcorpus"], report["hestcore"]
    rows = [
        ("stcorpus patch (cut + tissue test + JPEG)", ours["patch"]),
        ("stcorpus patch + region", ours["patch_region"]),
        ("stcorpus patch cut only (no encode)", ours["patch_cut_only"]),
        ("encode limit: patch JPEG (simplejpeg)", ours["encode_patch_simplejpeg"]),
        ("encode limit: patch JPEG (Pillow)", ours["encode_patch_pil"]),
        ("encode limit: patch + region JPEG", ours["encode_patch_region"]),
    ]
    for name, label in (
        ("iterate_given", "hestcore patcher, spots in barcode order"),
        ("iterate_sorted", "hestcore patcher, spots sorted by (y, x)"),
        ("to_h5", "hestcore patcher.to_h5 (HEST's output)"),
    ):
        if name in hest:
            rows.append((label, hest[name]))
    slide = report["slide"]
    lines = [
        f"slide {slide['size']}x{slide['size']} px at {slide['mpp']} um/px, pyramid step {slide['step']}, "
        f"{slide['spots']} spots; one core ({report['machine']['cpu_model']})",
        "",
        "| what | tiles / CPU s | CPU s | wall s | n |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {label} | {m['per_cpu_s']:.0f} | {m['cpu_s']:.2f} | {m['wall_s']:.2f} | {m['n']} |" for label, m in rows
    ]
    if "error" in hest:
        lines.append(f"\nhestcore failed: {hest['error']}")
    lines.append("")
    lines += [f"- {name}: {value}" for name, value in report["ratios"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
