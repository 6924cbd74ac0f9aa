"""``curate build`` against a throttled link: wall time, peak disk and bytes fetched (issue 17, "What it must show").

A 127.0.0.1 server throttled to ``--rate`` MB/s (one link shared by every connection) serves
``--slides`` HEST-like slides, cycling through four kinds, as HEST-1k's are:

- pyramidal BigTIFFs of real H&E texture (``bench/synth.py``: the squidpy crop of ``tests/data``),
  256 px tiles, levels 2x apart, JPEG (YCbCr 4:2:0, q80) or LZW (RGB), at 0.25 or 0.5 um/px;
- an h5ad per slide as HEST writes it (``bench/build_throughput.synthetic_h5ad``): a Visium hex
  lattice over the slide less ``--border-um``, raw counts of real depth (about 8,000 UMIs and
  3,000 of 20,000 genes per spot).

Every slide is a distinct file (one base TIFF per kind, served with a per-slide tail of bytes
after the TIFF data, which readers ignore; sha256 pinned in the manifest, as a lock file pins it).

Three builds with ``--workers`` local workers, each into a fresh cache and corpus:

1. ``compute``: the link unthrottled (range reads on): the compute time of the build;
2. ``whole``: throttled, ``--no-range-reads``: every TIFF downloaded whole;
3. ``ranges``: throttled, range reads on.

For each: wall time against ``max(bytes / rate, compute time)``, the bytes served per slide kind,
and the peak disk of the cache + work folder + corpus, sampled every 0.2 s, against
``--disk-budget`` (the build has no admission limit of its own yet: the budget is only compared).
Sources are released once a slide's unit is committed (the default). Then a projection,
marked as one, for HEST-1k + STimage-1K4M on one 16-core node.

    .venv/bin/python -m bench.build_scale --quick        # 32 small slides, < 5 min on 2 cores
    .venv/bin/python -m bench.build_scale --slides 40 --slide-um 4000 --rate 100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
#: HEST-1k's metadata table (slide sizes, um/px, spots), for the projection (``--reference``).
REFERENCE = HERE.parent.parent / "shared" / "reference" / "HEST_v1_1_0.csv"

#: Slides appended to the ``ranges`` corpus afterwards (issue 17: "appending 5 slides").
APPENDED = 5
#: (name, compression, um/px) of the four slide kinds.
KINDS = (("jpeg-0.25", "jpeg", 0.25), ("lzw-0.25", "lzw", 0.25), ("jpeg-0.5", "jpeg", 0.5), ("lzw-0.5", "lzw", 0.5))
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
_MB = 1e6


# ---------------------------------------------------------------------------------------------
# The throttled server
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """One URL: the bytes of ``base`` followed by ``tail``."""

    base: Path
    tail: bytes
    kind: str
    sha256: str

    @property
    def size(self) -> int:
        return self.base.stat().st_size + len(self.tail)

    def read(self, start: int, stop: int) -> bytes:
        base = self.base.stat().st_size
        out = b""
        if start < base:
            with self.base.open("rb") as handle:
                handle.seek(start)
                out = handle.read(min(stop, base) - start)
        if stop > base:
            out += self.tail[max(0, start - base) : stop - base]
        return out


class Link:
    """One link of ``rate`` bytes/s shared by every connection (``None``: unthrottled)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._next = time.monotonic()
        self._lock = threading.Lock()
        self.sent: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()

    def send(self, write: Any, data: bytes, *, kind: str) -> None:
        for i in range(0, len(data), 1 << 16):
            piece = data[i : i + (1 << 16)]
            if self.rate is not None:
                with self._lock:
                    start = max(time.monotonic(), self._next)
                    self._next = start + len(piece) / self.rate
                    due = self._next
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            write(piece)
            with self._lock:
                self.sent[kind] += len(piece)


def _handler(files: dict[str, Served], link: Link) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, *, body: bool) -> None:
            served = files.get(self.path.lstrip("/"))
            if served is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            size = served.size
            start, stop, status = 0, size, 200
            match = _RANGE.match(self.headers.get("Range", "").strip())
            if match is not None:
                start = int(match.group(1))
                stop = min(size, int(match.group(2)) + 1) if match.group(2) else size
                status = 206
            self.send_response(status)
            self.send_header("ETag", f'"{served.sha256}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(stop - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
            self.end_headers()
            if body:
                with link._lock:
                    link.requests[served.kind] += 1
                for offset in range(start, stop, 1 << 22):
                    link.send(self.wfile.write, served.read(offset, min(stop, offset + (1 << 22))), kind=served.kind)

    return Handler


@contextmanager
def serving(files: dict[str, Served], link: Link, *, port: int = 0) -> Iterator[str]:
    """Serve ``files`` on 127.0.0.1 (``port``, 0 for any free one); yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(files, link))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------
# Slides and manifest
# ---------------------------------------------------------------------------------------------


def prepare(data: Path, *, slides: int, slide_um: float, border_um: float) -> tuple[dict[str, Served], dict[str, Any]]:
    """Base TIFFs, h5ads and the served files; returns them and a description per kind."""
    from bench.build_throughput import synthetic_h5ad
    from bench.synth import write_pyramid_tiff

    data.mkdir(parents=True, exist_ok=True)
    files: dict[str, Served] = {}
    kinds: dict[str, Any] = {}
    for name, compression, mpp in KINDS:
        size = round(slide_um / mpp)
        base = data / f"{name}-{size}.tif"
        if not base.exists():
            write_pyramid_tiff(base, width=size, height=size, mpp=mpp, compression=compression)
        digest = hashlib.sha256(base.read_bytes())
        kinds[name] = {"compression": compression, "mpp": mpp, "px": size, "tiff_bytes": base.stat().st_size}
        for i in range(slides):
            if KINDS[i % len(KINDS)][0] != name:
                continue
            tail = f"slide-{i:03d}".encode()
            tiff = digest.copy()
            tiff.update(tail)
            files[f"wsis/S{i:03d}.tif"] = Served(base=base, tail=tail, kind=name, sha256=tiff.hexdigest())
            st = data / f"S{i:03d}-{name}-{size}.h5ad"  # the spots depend on the slide size
            if not st.exists():
                synthetic_h5ad(st, size=size, seed=i, mpp=mpp, border_um=border_um)
            raw = st.read_bytes()
            files[f"st/S{i:03d}.h5ad"] = Served(base=st, tail=b"", kind="h5ad", sha256=hashlib.sha256(raw).hexdigest())
    return files, kinds


def write_manifest(path: Path, files: dict[str, Served], *, url: str, slides: int) -> None:
    """A manifest of HEST samples over HTTP, every source pinned by sha256."""
    lines = [
        "manifest: stcorpus-manifest/1",
        "name: build-scale",
        "defaults: {source: hest, technology: hest, assay: visium, species: mouse, organ: brain, licence: CC-BY-4.0}",
        "studies:",
        "  - id: bench",
        "    samples:",
    ]
    for i in range(slides):
        wsi, st = files[f"wsis/S{i:03d}.tif"], files[f"st/S{i:03d}.h5ad"]
        mpp = next(m for name, _, m in KINDS if name == wsi.kind)
        lines += [
            f"      - id: S{i:03d}",
            f"        patient: P{i}",
            "        counts: raw",
            f"        mpp: {mpp}",
            "        sources:",
            f"          st: {{url: '{url}/st/S{i:03d}.h5ad', sha256: {st.sha256}}}",
            f"          wsi: {{url: '{url}/wsis/S{i:03d}.tif', sha256: {wsi.sha256}}}",
        ]
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# One build
# ---------------------------------------------------------------------------------------------


def disk_usage(root: Path) -> int:
    """Bytes allocated under ``root`` (sparse files count what they hold)."""
    total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                total += (Path(folder) / name).lstat().st_blocks * 512
            except FileNotFoundError:
                continue  # deleted while walking
    return total


class DiskSampler:
    """Samples :func:`disk_usage` of a folder every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, root: Path, interval: float = 0.2) -> None:
        self.root, self.interval, self.peak = root, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, disk_usage(self.root))
            self._stop.wait(self.interval)

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, disk_usage(self.root))


def shard_digests(corpus: Path) -> dict[str, str]:
    """sha256 of every shard file of ``corpus`` (Parquet and tar), by path relative to it."""
    return {
        str(path.relative_to(corpus)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(corpus.rglob("*"))
        if path.is_file() and path.suffix in (".parquet", ".tar") and path.parent != corpus
    }


def run_build(
    files: dict[str, Served],
    scratch: Path,
    *,
    rate: float | None,
    range_reads: bool,
    workers: int,
    slides: int,
    cache_budget: int | None = None,
    append: bool = False,
    port: int = 0,
) -> dict[str, Any]:
    """One build into a fresh folder under ``scratch`` (or, with ``append``, onto the corpus already there).

    Returns wall time, bytes, requests and peak disk.
    """
    from stcorpus.curate.build.pipeline import BuildSettings, build
    from stcorpus.curate.fetch import FetchSettings

    if not append:
        shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True, exist_ok=True)
    link = Link(rate)
    with serving(files, link, port=port) as url:
        manifest = scratch / "build-scale.yaml"
        write_manifest(manifest, files, url=url, slides=slides)
        settings = BuildSettings(workers=workers, progress=False, name="build-scale", holdout="none", append=append)
        fetch = FetchSettings(
            cache_dir=scratch / "cache", keep_sources=False, range_reads=range_reads, cache_budget=cache_budget
        )
        cpu = time.process_time()
        with DiskSampler(scratch) as disk:
            start = time.perf_counter()
            summary = build([manifest], out=scratch / "corpus", settings=settings, fetch=fetch)
            wall = time.perf_counter() - start
    corpus_bytes = disk_usage(scratch / "corpus")
    shutil.rmtree(scratch / "cache", ignore_errors=True)
    return {
        "url": url,
        "wall_s": wall,
        "client_cpu_s": time.process_time() - cpu,
        "statuses": dict(summary.slides),
        "samples": sum(summary.samples.values()),
        "bytes": dict(link.sent),
        "requests": dict(link.requests),
        "total_bytes": sum(link.sent.values()),
        "peak_disk": disk.peak,
        "corpus_bytes": corpus_bytes,
    }


# ---------------------------------------------------------------------------------------------
# The projection
# ---------------------------------------------------------------------------------------------

#: Stated inputs of the projection (not measured here).
STIMAGE_SLIDES = 1_149  # STimage-1K4M (PNG images: fetched whole, no range reads)
STIMAGE_SPOTS = 4_293_195
TOTAL_DOWNLOAD_TB = 2.5  # HEST-1k + STimage-1K4M, issue 17
NODE_CORES = 16
NODE_DISK = 500e9


def projection(report: dict[str, Any], *, reference: Path = REFERENCE) -> dict[str, Any]:
    """HEST-1k + STimage-1K4M on one 16-core node at 1 and 10 Gbit/s, from the measured rates."""
    import csv

    runs, kinds = report["runs"], report["kinds"]
    slides = report["slides"]
    compute = runs["compute"]
    # CPU seconds per spot written, from the compute run (every worker busy).
    cpu_per_sample = compute["wall_s"] * report["workers"] / max(1, compute["samples"])
    # Bytes a range-read build fetches of a whole TIFF, per kind (measured).
    fraction = {k: runs["ranges"]["bytes"].get(k, 0) / max(1, runs["whole"]["bytes"].get(k, 0)) for k in kinds}
    bytes_per_px = {
        k: v["tiff_bytes"] / (v["px"] ** 2 * 4 / 3) for k, v in kinds.items()
    }  # the pyramid holds 4/3 of level 0
    hest_whole = hest_ranged = largest = 0.0
    hest_spots = hest_slides = 0
    with reference.open(newline="", encoding="utf-8-sig") as handle:
        for row in csv.DictReader(handle):
            try:
                width, height = float(row["fullres_px_width"]), float(row["fullres_px_height"])
                mpp = float(row["pixel_size_um_estimated"])
            except ValueError:
                continue
            kind = "jpeg-0.25" if mpp <= 0.375 else "jpeg-0.5"
            whole = width * height * 4 / 3 * bytes_per_px[kind]
            hest_whole += whole
            largest = max(largest, whole)
            hest_ranged += whole * fraction[kind]
            hest_spots += int(float(row["spots_under_tissue"] or 0))
            hest_slides += 1
    stimage_bytes = max(0.0, TOTAL_DOWNLOAD_TB * 1e12 - hest_whole)
    samples = hest_spots + STIMAGE_SPOTS
    cpu_s = samples * cpu_per_sample
    sample_bytes = compute["corpus_bytes"] / max(1, compute["samples"])
    # Worst case of sources on disk at once: every worker holding the largest HEST slide (released per slide).
    in_flight = NODE_CORES * largest
    rows = []
    for gbit in (1, 10):
        rate = gbit * 1e9 / 8
        for mode, fetched in (("whole", hest_whole + stimage_bytes), ("ranges", hest_ranged + stimage_bytes)):
            download_h = fetched / rate / 3600
            compute_h = cpu_s / NODE_CORES / 3600
            rows.append(
                {
                    "gbit_s": gbit,
                    "mode": mode,
                    "download_tb": fetched / 1e12,
                    "download_h": download_h,
                    "compute_h": compute_h,
                    "wall_h_overlapped": max(download_h, compute_h),
                    "wall_h_as_measured": max(download_h, compute_h) * runs[mode]["wall_s"] / report["bound_s"][mode],
                }
            )
    return {
        "inputs": {
            "hest_slides": hest_slides,
            "hest_spots": hest_spots,
            "hest_whole_tb": hest_whole / 1e12,
            "hest_ranged_tb": hest_ranged / 1e12,
            "stimage_slides": STIMAGE_SLIDES,
            "stimage_spots": STIMAGE_SPOTS,
            "stimage_tb": stimage_bytes / 1e12,
            "cpu_s_per_sample": cpu_per_sample,
            "fraction_fetched": fraction,
            "bytes_per_px": bytes_per_px,
            "slides_measured": slides,
        },
        "rows": rows,
        "peak_disk": {
            "corpus_gb": samples * sample_bytes / 1e9,
            "in_flight_gb": in_flight / 1e9,
            "budget_gb": NODE_DISK / 1e9,
        },
    }


def table(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    runs, rate = report["runs"], report["rate"]
    lines = [
        f"{report['slides']} slides ({', '.join(report['kinds'])}), {report['slide_um']:.0f} um square, "
        f"--workers {report['workers']}, link {rate / _MB:.0f} MB/s; disk budget {report['disk_budget'] / _MB:,.0f} MB",
        "",
        "| build | wall s | MB fetched | MB / rate (s) | bound s | wall / bound | peak disk MB | <= budget |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for mode, run in runs.items():
        download = run["total_bytes"] / rate if mode != "compute" else 0.0
        bound = report["bound_s"].get(mode, max(download, run["wall_s"]))
        lines.append(
            f"| {mode} | {run['wall_s']:.1f} | {run['total_bytes'] / _MB:,.1f} | {download:.1f} | {bound:.1f} | "
            f"{run['wall_s'] / bound:.2f} | {run['peak_disk'] / _MB:,.1f} | "
            f"{'yes' if run['peak_disk'] <= report['disk_budget'] else 'NO'} |"
        )
    lines += [
        "",
        "| slide kind | TIFF MB | MB fetched, whole | MB fetched, ranges | fraction | range requests / slide |",
    ]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for kind, info in report["kinds"].items():
        whole, ranged = runs["whole"]["bytes"].get(kind, 0), runs["ranges"]["bytes"].get(kind, 0)
        n = max(1, info["slides"])
        lines.append(
            f"| {kind} | {info['tiff_bytes'] / _MB:,.1f} | {whole / _MB:,.1f} | {ranged / _MB:,.1f} | "
            f"{ranged / max(1, whole):.3f} | {runs['ranges']['requests'].get(kind, 0) / n:.0f} |"
        )
    a = report["append"]
    lines += [
        "",
        f"Append: {a['slides']} slides onto the `ranges` corpus: {a['shards_before']} shard files before, "
        f"{a['shards_after']} after; earlier shards whose sha256 changed: {len(a['changed'])} "
        f"({'none' if not a['changed'] else ', '.join(a['changed'][:5])}). Cache budget of the throttled builds "
        f"{report['cache_budget'] / _MB:,.0f} MB.",
    ]
    p = report["projection"]
    i = p["inputs"]
    lines += [
        "",
        f"**Projection (not measured)**: HEST-1k ({i['hest_slides']:,} slides, {i['hest_spots']:,} spots, "
        f"{i['hest_whole_tb']:.2f} TB whole at the measured JPEG bytes/px, {i['hest_ranged_tb']:.2f} TB by range) + "
        f"STimage-1K4M ({i['stimage_slides']:,} slides, {i['stimage_spots']:,} spots, {i['stimage_tb']:.2f} TB: "
        f"{TOTAL_DOWNLOAD_TB} TB less HEST), {i['cpu_s_per_sample'] * 1000:.1f} CPU ms per sample, on one "
        f"{NODE_CORES}-core node:",
        "",
        "| link | reads | TB fetched | download h | compute h | wall h, overlapped | wall h, at the measured overlap |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in p["rows"]:
        lines.append(
            f"| {row['gbit_s']} Gbit/s | {row['mode']} | {row['download_tb']:.2f} | {row['download_h']:.1f} | "
            f"{row['compute_h']:.1f} | {row['wall_h_overlapped']:.1f} | {row['wall_h_as_measured']:.1f} |"
        )
    d = p["peak_disk"]
    lines += [
        "",
        f"Peak disk (projected): the corpus {d['corpus_gb']:,.0f} GB at the measured bytes per sample, plus at most "
        f"{d['in_flight_gb']:,.0f} GB of sources in flight ({NODE_CORES} workers each holding the largest HEST slide "
        f"whole; released per slide), against a {d['budget_gb']:.0f} GB disk.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Prepare the slides, run the three builds, print a table, write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="32 slides of 1.2 mm over a 10 MB/s link (minutes on 2 idle cores)"
    )
    parser.add_argument("--slides", type=int, default=40, help="slides (at least 30; cycling the 4 kinds)")
    parser.add_argument("--slide-um", type=float, default=3000.0, help="slide side in um (default 3000)")
    parser.add_argument("--border-um", type=float, default=100.0, help="no spots this close to the edge")
    parser.add_argument("--rate", type=float, default=100.0, help="link rate in MB/s (default 100)")
    parser.add_argument("--workers", type=int, default=2, help="build workers (default 2)")
    parser.add_argument("--disk-budget", type=float, default=2000.0, help="disk budget in MB (compared, default 2000)")
    parser.add_argument(
        "--cache-budget",
        type=float,
        default=0.0,
        help="--cache-budget of the throttled builds in MB (default: "
        "room for every worker's slide and one prefetched slide)",
    )
    parser.add_argument("--reference", type=Path, default=REFERENCE, help="HEST-1k metadata CSV (HEST_v1_1_0.csv)")
    parser.add_argument("--out", type=Path, default=OUT / "build_scale.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.slides, args.slide_um, args.rate, args.disk_budget = 32, 1200.0, 10.0, 1000.0
    if args.slides < 30:
        parser.error("--slides must be at least 30 (issue 17 asks for 30)")
    if not args.reference.is_file():
        parser.error(f"--reference {args.reference}: no such file; give HEST-1k's HEST_v1_1_0.csv")
    rate = args.rate * _MB

    scratch = OUT / "build-scale"
    total = args.slides + APPENDED
    files, kinds = prepare(scratch / "data", slides=total, slide_um=args.slide_um, border_um=args.border_um)
    for name in kinds:
        kinds[name]["slides"] = sum(1 for i in range(args.slides) if KINDS[i % len(KINDS)][0] == name)
    largest = max(f.base.stat().st_size + len(f.tail) for f in files.values() if f.kind != "h5ad")
    largest += max(f.base.stat().st_size for f in files.values() if f.kind == "h5ad")
    # room for every worker's slide and one prefetched slide, unless given
    budget = round(args.cache_budget * _MB) if args.cache_budget else (args.workers + 1) * largest
    report: dict[str, Any] = {
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
        "slides": args.slides,
        "slide_um": args.slide_um,
        "rate": rate,
        "workers": args.workers,
        "disk_budget": args.disk_budget * _MB,
        "cache_budget": budget,
        "kinds": kinds,
        "runs": {},
    }
    for mode, throttle, ranges in (("compute", None, True), ("whole", rate, False), ("ranges", rate, True)):
        print(f"build: {mode}", file=sys.stderr)
        report["runs"][mode] = run_build(
            files,
            scratch / mode,
            rate=throttle,
            range_reads=ranges,
            workers=args.workers,
            slides=args.slides,
            cache_budget=budget if throttle else None,
        )
    # Growth: APPENDED more slides onto the `ranges` corpus; every earlier shard must keep its bytes.
    corpus = scratch / "ranges" / "corpus"
    before = shard_digests(corpus)
    print(f"build: append {APPENDED}", file=sys.stderr)
    report["runs"]["append"] = run_build(
        files,
        scratch / "ranges",
        rate=rate,
        range_reads=True,
        workers=args.workers,
        slides=total,
        cache_budget=budget,
        append=True,
        port=int(report["runs"]["ranges"]["url"].rsplit(":", 1)[1]),  # the same URLs: the same manifest entries
    )
    after = shard_digests(corpus)
    report["append"] = {
        "slides": APPENDED,
        "shards_before": len(before),
        "shards_after": len(after),
        "changed": sorted(p for p, d in before.items() if after.get(p) != d),
    }
    compute_s = report["runs"]["compute"]["wall_s"]
    report["bound_s"] = {
        mode: max(report["runs"][mode]["total_bytes"] / rate, compute_s) for mode in ("whole", "ranges")
    }
    report["projection"] = projection(report, reference=args.reference)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
