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
and the disk of the build's folder, sampled every 0.2 s and split into its parts: the scratch the
budgets bound (inputs in the download cache, samples waiting in the work folder, shards being
written) against ``--cache-budget`` + ``--work-budget`` + the shards the writer can hold open, and
what the build is for (the finished corpus, the units' small records). Sources are released once a
slide's unit is committed (the default); the builds run with ``--release-units``.

Then a projection, marked as one, for HEST-1k + STimage-1K4M on one 16-core node at 1 and
10 Gbit/s with a 500 GB disk (``projection``): wall time and peak disk, from the bytes per pixel
of real H&E coded as HEST and STimage store it (``bench/he_bytes.py``, HER2ST full-resolution
sections), HEST-1k's and STimage-1K4M's own slide tables, HEST's stated 1.85 TB, and the per-sample
CPU, shard, work-unit and pack rates of ``--compute-only`` (larger slides, its own report) when
that has been run, else of this run's compute build. Each input is listed as measured, stated
or assumed. ``--reproject`` recomputes it from a saved report.

    .venv/bin/python -m bench.build_scale --compute-only --slides 8 --slide-um 6000  # rates, ~6 min
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
import resource
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

from stcorpus import schema

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
#: HEST-1k's metadata table (slide sizes, um/px, spots), for the projection (``--reference``).
REFERENCE = HERE.parent.parent / "shared" / "reference" / "HEST_v1_1_0.csv"

#: Per-sample rates measured by ``--compute-only`` on larger slides; the projection prefers them.
COMPUTE_REPORT = OUT / "build_scale_compute.json"
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
        #: monotonic times of the first and the last byte sent, and the seconds the link stood idle between
        self.first: float | None = None
        self.last: float | None = None
        self.idle = 0.0

    def send(self, write: Any, data: bytes, *, kind: str) -> None:
        for i in range(0, len(data), 1 << 16):
            piece = data[i : i + (1 << 16)]
            if self.rate is not None:
                with self._lock:
                    now = time.monotonic()
                    if self.first is None:
                        self.first = now
                    elif now > self._next:
                        self.idle += now - self._next  # nothing asked for while the link was free
                    start = max(now, self._next)
                    self._next = start + len(piece) / self.rate
                    due = self._next
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            write(piece)
            with self._lock:
                self.sent[kind] += len(piece)
                self.last = time.monotonic()


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


#: What a build's folder holds, by part. ``scratch`` is what the budgets bound: the inputs in the
#: download cache, the samples waiting in the work folder and the shards being written; the
#: finished corpus (shards, QC, tables) and the units' small records (result.json, QC plots,
#: stats) are what the build is for and stay.
DISK_PARTS = ("inputs", "work_samples", "open_shards", "unit_records", "corpus")
SCRATCH_PARTS = ("inputs", "work_samples", "open_shards")


def _disk_part(rel: Path, name: str) -> str:
    from stcorpus.curate.build.workdir import SAMPLES_FILE

    top = rel.parts[0] if rel.parts else ""
    if top == "cache":
        return "inputs"
    if name.endswith((".partial", ".partial.old")):
        return "open_shards"
    if ".work" in rel.parts:
        # a unit being written lives in units/.<id>.<pid>.tmp/ until renamed into place
        if name == SAMPLES_FILE or any(part.endswith(".tmp") for part in rel.parts):
            return "work_samples"
        return "unit_records"
    return "corpus"


def disk_parts(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes allocated under ``root`` by part (:data:`DISK_PARTS`), and each unit samples file's bytes."""
    from stcorpus.curate.build.workdir import SAMPLES_FILE

    parts = dict.fromkeys(DISK_PARTS, 0)
    units: dict[str, int] = {}
    for folder, _, names in os.walk(root):
        rel = Path(folder).relative_to(root)
        for name in names:
            try:
                size = (Path(folder) / name).lstat().st_blocks * 512
            except FileNotFoundError:
                continue  # deleted while walking
            parts[_disk_part(rel, name)] += size
            if name == SAMPLES_FILE:  # units/<slide>/ or, while written, units/.<slide>.<pid>.tmp/
                unit = Path(folder).name
                unit = unit[1:].rsplit(".", 2)[0] if unit.endswith(".tmp") else unit
                units[unit] = max(size, units.get(unit, 0))
    return parts, units


class DiskSampler:
    """Samples :func:`disk_parts` of a folder every ``interval`` seconds in a thread.

    Keeps the peak of the whole folder, of its scratch (:data:`SCRATCH_PARTS`) and of each part,
    and the size of every unit samples file seen (``--release-units`` deletes them as they are packed).
    """

    def __init__(self, root: Path, interval: float = 0.2) -> None:
        self.root, self.interval = root, interval
        self.peak = self.peak_scratch = 0
        self.units: dict[str, int] = {}
        self.peaks = dict.fromkeys(DISK_PARTS, 0)
        self.at_peak: dict[str, int] = dict.fromkeys(DISK_PARTS, 0)  # the parts when the whole folder peaked
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        parts, units = disk_parts(self.root)
        total = sum(parts.values())
        if total > self.peak:
            self.peak, self.at_peak = total, parts
        self.peak_scratch = max(self.peak_scratch, sum(parts[p] for p in SCRATCH_PARTS))
        self.peaks = {p: max(self.peaks[p], parts[p]) for p in DISK_PARTS}
        for unit, size in units.items():
            self.units[unit] = max(size, self.units.get(unit, 0))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def shard_digests(corpus: Path) -> dict[str, str]:
    """sha256 of every shard file of ``corpus`` (Parquet and tar), by path relative to it."""
    return {
        str(path.relative_to(corpus)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(corpus.rglob("*"))
        if path.is_file() and path.suffix in (".parquet", ".tar") and path.parent != corpus
    }


@contextmanager
def timed_pack(into: dict[str, float]) -> Iterator[None]:
    """Record the wall and CPU seconds the build spends packing (``StreamPack.add`` and ``finish``) in ``into``.

    The pack streams: it runs in the build process while the workers compute, a slide at a time.
    """
    from unittest import mock

    from stcorpus.curate.build.pack import StreamPack

    def timing(original: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            cpu, start = time.thread_time(), time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                into["pack_cpu_s"] = into.get("pack_cpu_s", 0.0) + time.thread_time() - cpu
                into["pack_wall_s"] = into.get("pack_wall_s", 0.0) + time.perf_counter() - start

        return timed

    with (
        mock.patch.object(StreamPack, "add", timing(StreamPack.add)),
        mock.patch.object(StreamPack, "finish", timing(StreamPack.finish)),
    ):
        yield


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
    window: int = 64,
    release: bool = True,
    work_budget: int | None = None,
    samples_per_shard: int | None = None,
    formats: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """One build into a fresh folder under ``scratch`` (or, with ``append``, onto the corpus already there).

    Returns wall time, bytes, requests and peak disk.
    """
    from stcorpus.curate.build.pack import PackSettings
    from stcorpus.curate.build.pipeline import BuildSettings, build
    from stcorpus.curate.fetch import FetchSettings

    if not append:
        shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True, exist_ok=True)
    link = Link(rate)
    with serving(files, link, port=port) as url:
        manifest = scratch / "build-scale.yaml"
        write_manifest(manifest, files, url=url, slides=slides)
        settings = BuildSettings(
            workers=workers,
            progress=False,
            name="build-scale",
            holdout="none",
            append=append,
            pack=PackSettings(
                window=window,
                samples_per_shard=samples_per_shard or PackSettings.samples_per_shard,
                formats=formats or schema.FORMATS,
            ),
            release_units=release,
            work_budget=work_budget if release else None,
        )
        fetch = FetchSettings(
            cache_dir=scratch / "cache", keep_sources=False, range_reads=range_reads, cache_budget=cache_budget
        )
        cpu = time.process_time()
        # The worker processes are reaped by the end of the build: their CPU time is the children's.
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        packed: dict[str, float] = {}
        with DiskSampler(scratch) as disk, timed_pack(packed):
            start, started = time.perf_counter(), time.monotonic()
            summary = build([manifest], out=scratch / "corpus", settings=settings, fetch=fetch)
            wall = time.perf_counter() - start
            finished = time.monotonic()
            ended = time.time()
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    corpus_bytes = disk_usage(scratch / "corpus")
    work = scratch / "corpus" / ".work"
    # What the writer can hold open at once: one shard per format and split, none larger than the largest written.
    open_shards = 0
    for fmt in schema.FORMATS:
        splits = [p for p in (scratch / "corpus" / fmt).glob("*") if p.is_dir()]
        sizes = [f.stat().st_size for split in splits for f in split.iterdir() if f.is_file()]
        open_shards += len(splits) * max(sizes, default=0)
    committed = [p.stat().st_mtime for p in (work / "units").glob("*/result.json")]
    shutil.rmtree(scratch / "cache", ignore_errors=True)
    return {
        "url": url,
        "wall_s": wall,
        "client_cpu_s": time.process_time() - cpu,
        "workers_cpu_s": (reaped.ru_utime + reaped.ru_stime) - (children.ru_utime + children.ru_stime),
        # From the last unit committed to the end of the build: the pack and what follows it.
        "after_units_s": ended - max(committed) if committed else 0.0,
        "work_bytes": disk_usage(work),
        "wds_bytes": disk_usage(scratch / "corpus" / schema.WDS_DIR),
        "parquet_bytes": disk_usage(scratch / "corpus" / schema.PARQUET_DIR),
        # The pack alone (the build thread's time in StreamPack; in client_cpu_s too).
        "pack_wall_s": packed.get("pack_wall_s", 0.0),
        "pack_cpu_s": packed.get("pack_cpu_s", 0.0),
        "statuses": dict(summary.slides),
        "samples": sum(summary.samples.values()),
        "bytes": dict(link.sent),
        "requests": dict(link.requests),
        "total_bytes": sum(link.sent.values()),
        # Where a throttled build's wall time goes beyond bytes / rate: before the first byte, the link
        # idle between bytes, and after the last byte (the last slides' compute and the pack's end).
        "link": {
            "before_first_s": (link.first - started) if link.first is not None else None,
            "idle_s": link.idle,
            "after_last_s": (finished - link.last) if link.last is not None else None,
        },
        "peak_disk": disk.peak,
        "peak_scratch": disk.peak_scratch,
        "peak_by_part": disk.peaks,
        "at_peak": disk.at_peak,
        "largest_unit_bytes": max(disk.units.values(), default=0),
        # every unit's samples as they were on disk before the pack released them (units seen: their number)
        "unit_samples_bytes": sum(disk.units.values()),
        "units_seen": len(disk.units),
        "open_shards_bound": open_shards,
        "cache_budget": cache_budget,
        "work_budget": work_budget if release else None,
        "corpus_bytes": corpus_bytes,
    }


# ---------------------------------------------------------------------------------------------
# The projection
# ---------------------------------------------------------------------------------------------


def sample_rates(run: dict[str, Any], *, workers: int) -> dict[str, Any]:
    """Per-sample rates of one unthrottled build: CPU (this process and its workers), bytes, pack time."""
    samples = max(1, run["samples"])
    return {
        "samples": run["samples"],
        # CPU time, not wall x workers: it holds on a machine shared with other work. Units (with this
        # process's serving and prefetch), then the pack (with its worker processes), separately.
        "cpu_ms_per_sample": (run["client_cpu_s"] + run["workers_cpu_s"] - run["pack_cpu_s"]) * 1000 / samples,
        "pack_cpu_ms_per_sample": run["pack_cpu_s"] * 1000 / samples,
        "pack_wall_ms_per_sample": run["pack_wall_s"] * 1000 / samples,
        "wall_core_ms_per_sample": run["wall_s"] * workers * 1000 / samples,
        "shard_bytes_per_sample": (run["corpus_bytes"] - run["work_bytes"]) / samples,
        # what the work folder holds per sample: every unit's samples (kept without --release-units) ...
        "work_bytes_per_sample": run.get("unit_samples_bytes", run["work_bytes"]) / samples,
        # ... and what stays of a unit once released (result.json, QC plots, stats)
        "unit_records_bytes_per_sample": run["work_bytes"] / samples,
        "wds_bytes_per_sample": run.get("wds_bytes", 0) / samples,
        "parquet_bytes_per_sample": run.get("parquet_bytes", 0) / samples,
        "after_units_ms_per_sample": run["after_units_s"] * 1000 / samples,
        "workers": workers,
    }


#: Inputs of the projection that are stated (by the files named, or by others), not measured here.
#: HEST-1k on the Hub, everything included (its patches h5, transcripts, segmentations): README.
HEST_TOTAL_TB = 1.85
#: HEST's patches/<id>.h5 hold one 224 x 224 RGB patch per spot (its layout); assumed stored uncompressed.
HEST_PATCH_BYTES = 224 * 224 * 3
#: Issue 17's figure for HEST-1k + STimage-1K4M downloads; compared with, not used.
ISSUE_TOTAL_TB = 2.5
#: STimage-1K4M's slide table (slide, tech, spot_num, gene_num): 1,149 slides.
STIMAGE_TABLE = REFERENCE.parent / "stimage1k4m" / "meta_all_gene02122025.csv"
#: STimage-1K4M technology -> HEST-1k's st_technology, whose median slide size stands in for its PNG's (assumed).
STIMAGE_TECH = {"ST": "Spatial Transcriptomics", "Visium": "Visium", "VisiumHD": "Visium HD"}
NODE_CORES = 16
NODE_DISK = 500e9
#: ``curate build --prefetch`` default: slides downloading beyond the running ones.
PREFETCH = 2
#: ``curate build --shuffle-window`` default: slides whose units each split's window holds.
WINDOW_SLIDES = 64
#: Where the real H&E bytes per pixel are cached (``bench/he_bytes.py``; keyed by the images' sha256).
HE_CACHE = OUT / "he_bytes.json"


def _rates(report: dict[str, Any]) -> dict[str, Any]:
    """Per-sample rates: the ``--compute-only`` run on larger slides when there is one, else this run's compute."""
    if COMPUTE_REPORT.is_file():
        saved = json.loads(COMPUTE_REPORT.read_text())
        rates: dict[str, Any] = dict(saved["rates"])
        rates["h5ad_bytes_per_sample"] = saved["compute"]["bytes"].get("h5ad", 0) / max(1, saved["compute"]["samples"])
        rates["source"] = (
            f"{COMPUTE_REPORT.name}: {saved['slides']} slides of {saved['slide_um']:.0f} um, "
            f"{saved['compute']['samples']:,} samples, --workers {saved['workers']}"
        )
        return rates
    compute = report["runs"]["compute"]
    rates = sample_rates(compute, workers=report["workers"]) if "workers_cpu_s" in compute else {}
    if not rates:  # a report written before the CPU of the workers was counted: wall x workers
        samples = max(1, compute["samples"])
        rates = {
            "cpu_ms_per_sample": compute["wall_s"] * report["workers"] * 1000 / samples,
            "shard_bytes_per_sample": compute["corpus_bytes"] / samples,
            "work_bytes_per_sample": 0.0,
            "after_units_ms_per_sample": 0.0,
            "workers": report["workers"],
        }
    rates["h5ad_bytes_per_sample"] = compute["bytes"].get("h5ad", 0) / max(1, compute["samples"])
    rates["source"] = f"this run's compute build: {report['slides']} slides of {report['slide_um']:.0f} um"
    return rates


def _stimage(table: Path) -> list[dict[str, Any]]:
    import csv

    with table.open(newline="", encoding="utf-8") as handle:
        return [
            {"tech": row["tech"], "spots": int(row["spot_num"]), "genes": int(row["gene_num"])}
            for row in csv.DictReader(handle)
        ]


def projection(report: dict[str, Any], *, reference: Path = REFERENCE) -> dict[str, Any]:
    """HEST-1k + STimage-1K4M on one 16-core node at 1 and 10 Gbit/s with a 500 GB disk: a projection.

    Every input is labelled measured (here, by this bench), stated (by a file or by others) or
    assumed; ``inputs`` lists them. See bench/README.md for what each one is worth.
    """
    import csv
    import statistics

    from bench.he_bytes import measure

    runs = report["runs"]
    he = report.get("he_bytes") or measure(cache=HE_CACHE)
    bpp = he["bytes_per_px"]
    rates = _rates(report)
    # Bytes a range-read build fetches of a whole TIFF, per kind (measured on the synthetic slides).
    fraction = {
        k: runs["ranges"]["bytes"].get(k, 0) / max(1, runs["whole"]["bytes"].get(k, 0)) for k in report["kinds"]
    }

    # HEST-1k, slide by slide (HEST_v1_1_0.csv: stated).
    hest: list[dict[str, Any]] = []
    with reference.open(newline="", encoding="utf-8-sig") as handle:
        for row in csv.DictReader(handle):
            try:
                width, height = float(row["fullres_px_width"]), float(row["fullres_px_height"])
                mpp = float(row["pixel_size_um_estimated"])
            except ValueError:
                continue
            spots = int(float(row["spots_under_tissue"] or 0))
            hest.append({"px": width * height, "mpp": mpp, "tech": row["st_technology"], "spots": spots})
    hest_px = sum(s["px"] for s in hest)
    pyramid_px = hest_px * 4 / 3  # levels 2x apart hold 4/3 of level 0
    hest_spots = sum(s["spots"] for s in hest)
    patches = hest_spots * HEST_PATCH_BYTES
    hest_st = hest_spots * rates["h5ad_bytes_per_sample"]
    # Calibration: what HEST's 1.85 TB leaves for its WSIs once the patches and counts are taken out. Its
    # transcripts and segmentations stay in, so this is an upper bound on the WSIs, and a build fetches less.
    hest_wsi = HEST_TOTAL_TB * 1e12 - patches - hest_st
    implied_bpp = hest_wsi / pyramid_px

    def kind(mpp: float) -> str:
        # The calibrated bytes/px lie between LZW's whole-slide and tissue figures: HEST's WSIs store like LZW tiles.
        return "lzw-0.25" if mpp <= 0.375 else "lzw-0.5"

    slide_whole = [s["px"] * 4 / 3 * implied_bpp + s["spots"] * rates["h5ad_bytes_per_sample"] for s in hest]
    slide_ranged = [
        s["px"] * 4 / 3 * implied_bpp * fraction[kind(s["mpp"])] + s["spots"] * rates["h5ad_bytes_per_sample"]
        for s in hest
    ]
    hest_ranged_wsi = sum(slide_ranged) - hest_st

    # STimage-1K4M (its slide table: stated), PNG images fetched whole, dense count CSVs.
    stimage = _stimage(STIMAGE_TABLE)
    median_px = {
        tech: statistics.median(s["px"] for s in hest if s["tech"] == tech) for tech in set(STIMAGE_TECH.values())
    }
    cell_bytes = he["count_table_bytes_per_cell"] or 2.0
    st_images = sum(median_px[STIMAGE_TECH[s["tech"]]] * bpp["png"] for s in stimage)
    st_counts = sum(s["spots"] * s["genes"] * cell_bytes for s in stimage)
    stimage_bytes = st_images + st_counts
    stimage_spots = sum(s["spots"] for s in stimage)
    stimage_slide = [
        median_px[STIMAGE_TECH[s["tech"]]] * bpp["png"] + s["spots"] * s["genes"] * cell_bytes for s in stimage
    ]

    samples = hest_spots + stimage_spots
    slides = len(hest) + len(stimage)
    unit_core_h = samples * rates["cpu_ms_per_sample"] / 1000 / 3600
    # The pack runs in one thread of the build process (StreamPack, fed as units finish): its wall time per
    # sample, measured, is a floor under the build's wall time however many cores the node has; the
    # units get the other cores. Reports without it: the CPU, else the time after the last unit.
    pack_ms = rates.get(
        "pack_wall_ms_per_sample", rates.get("pack_cpu_ms_per_sample", rates["after_units_ms_per_sample"])
    )
    pack_core_h = samples * pack_ms / 1000 / 3600
    compute_h = unit_core_h / (NODE_CORES - 1)
    # Wall x workers of the measuring run instead of CPU: an upper bound (that VM was shared, and waits on disk count).
    wall_ms = rates.get("wall_core_ms_per_sample", rates["cpu_ms_per_sample"])
    compute_h_wall = samples * wall_ms / 1000 / 3600 / NODE_CORES
    pack_h = pack_core_h
    first_slide = statistics.median(slide_whole + stimage_slide)
    rows = []
    for gbit in (1, 10):
        rate = gbit * 1e9 / 8
        for mode, hest_bytes in (("whole", hest_wsi + hest_st), ("ranges", hest_ranged_wsi + hest_st)):
            fetched = hest_bytes + stimage_bytes
            download_h = fetched / rate / 3600
            start_h = first_slide / rate / 3600  # the first slide's inputs arrive before any compute
            bound = max(download_h, compute_h, pack_h)
            measured = runs[mode]["wall_s"] / report["bound_s"][mode]
            rows.append(
                {
                    "gbit_s": gbit,
                    "mode": mode,
                    "download_tb": fetched / 1e12,
                    "download_h": download_h,
                    "compute_h": compute_h,
                    "pack_h": pack_h,
                    # The streaming pack packs while units run, on a core of its own: the slowest of the three.
                    "wall_h_streaming": bound + start_h,
                    "wall_h_at_measured_overlap": bound * measured,
                    "bound_by": max(
                        (("download", download_h), ("compute", compute_h), ("pack", pack_h)), key=lambda kv: kv[1]
                    )[0],
                    "measured_wall_over_bound": measured,
                }
            )
    largest_whole, largest_ranged = max(slide_whole + stimage_slide), max(slide_ranged + stimage_slide)
    mean_whole = statistics.mean(slide_whole + stimage_slide)
    mean_ranged = statistics.mean(slide_ranged + stimage_slide)
    corpus = samples * rates["shard_bytes_per_sample"]
    work_all = samples * rates["work_bytes_per_sample"]
    # every split's window full, of slides of the mean size (--release-units; without it every unit stays)
    # plus what stays of every released unit (result.json, QC plots, stats)
    window = 3 * WINDOW_SLIDES * samples / slides * rates["work_bytes_per_sample"] + samples * rates.get(
        "unit_records_bytes_per_sample", 0.0
    )
    parquet = samples * rates.get("parquet_bytes_per_sample", 0.0)
    disk = {}
    for mode, mean, largest in (("whole", mean_whole, largest_whole), ("ranges", mean_ranged, largest_ranged)):
        # Running and prefetched slides of mean size; the worst case, all of them the largest, beside it.
        in_flight = (NODE_CORES + PREFETCH) * mean
        disk[mode] = {
            "in_flight_gb": in_flight / 1e9,
            "in_flight_worst_gb": (NODE_CORES + PREFETCH) * largest / 1e9,
            "peak_gb_today": (in_flight + work_all + corpus) / 1e9,
            "peak_gb_streaming": (in_flight + window + corpus) / 1e9,
            "peak_gb_parquet": (in_flight + window + parquet) / 1e9,
        }
    inputs = [
        (
            "HEST-1k slides, level-0 px, um/px, spots",
            f"{len(hest):,} slides, {hest_px / 1e9:,.0f} Gpx, {hest_spots:,} spots",
            "stated",
            reference.name,
        ),
        ("HEST-1k in all, patches h5 included", f"{HEST_TOTAL_TB} TB", "stated", "README.md, issue 17's brief"),
        ("HEST patches h5", f"{patches / 1e12:.2f} TB", "assumed", "224 x 224 RGB per spot, uncompressed"),
        (
            "HEST st h5ad",
            f"{hest_st / 1e12:.3f} TB",
            "measured",
            f"{rates['h5ad_bytes_per_sample'] / 1e3:.1f} kB per spot (bench h5ad, real depth)",
        ),
        (
            "HEST WSIs (calibrated: all less patches and h5ad)",
            f"{hest_wsi / 1e12:.2f} TB, {implied_bpp:.2f} B/px",
            "stated - assumed",
            "upper bound: transcripts, segmentations stay in",
        ),
        (
            "real H&E, JPEG q80 256 px tiles",
            f"{bpp['jpeg_q80']:.3f} B/px ({bpp['jpeg_q80_tissue']:.3f} on tissue)",
            "measured",
            he["source"],
        ),
        (
            "real H&E, LZW 256 px tiles",
            f"{bpp['lzw']:.2f} B/px ({bpp['lzw_tissue']:.2f} on tissue)",
            "measured",
            f"tissue {bpp['tissue_fraction']:.0%} of the tiles",
        ),
        (
            "the bench's synthetic slides (all tissue)",
            ", ".join(f"{k} {v['tiff_bytes'] / (v['px'] ** 2 * 4 / 3):.2f} B/px" for k, v in report["kinds"].items()),
            "measured",
            "bench/synth.py texture, for comparison",
        ),
        (
            "HEST WSIs if all JPEG q80 / all LZW",
            f"{pyramid_px * bpp['jpeg_q80'] / 1e12:.2f} / {pyramid_px * bpp['lzw'] / 1e12:.2f} TB",
            "measured x stated",
            "at HER2ST's tissue fraction",
        ),
        (
            "range reads: bytes fetched / whole TIFF",
            ", ".join(f"{k} {v:.2f}" for k, v in fraction.items()),
            "measured",
            "synthetic slides, spots over all but the border: an upper bound",
        ),
        (
            "STimage-1K4M slides, spots",
            f"{len(stimage):,} slides, {stimage_spots:,} spots",
            "stated",
            STIMAGE_TABLE.name,
        ),
        (
            "STimage PNG px per slide",
            ", ".join(f"{t} {median_px[h] / 1e6:.0f} Mpx" for t, h in STIMAGE_TECH.items()),
            "assumed",
            "HEST's median slide of the same technology",
        ),
        ("real H&E as PNG", f"{bpp['png']:.2f} B/px", "measured", he["source"]),
        (
            "dense count table as text",
            f"{cell_bytes:.2f} B per spot x gene",
            "measured" if he["count_table_bytes_per_cell"] else "assumed",
            "HER2ST count TSVs",
        ),
        (
            "STimage downloads",
            f"{stimage_bytes / 1e12:.2f} TB (images {st_images / 1e12:.2f}, counts {st_counts / 1e12:.2f})",
            "measured x stated x assumed",
            f"issue 17: {ISSUE_TOTAL_TB} TB with HEST",
        ),
        (
            "CPU per sample",
            f"{rates['cpu_ms_per_sample']:.2f} ms",
            "measured",
            rates["source"] + "; STimage's PNGs assumed to cost the same",
        ),
        (
            "shards (WebDataset + Parquet) per sample",
            f"{rates['shard_bytes_per_sample'] / 1e3:.1f} kB",
            "measured",
            rates["source"],
        ),
        ("work units per sample", f"{rates['work_bytes_per_sample'] / 1e3:.1f} kB", "measured", rates["source"]),
        (
            "pack wall per sample",
            f"{pack_ms:.2f} ms",
            "measured",
            rates["source"] + "; one thread of the build process, whatever the node",
        ),
        (
            "node",
            f"{NODE_CORES} cores, {NODE_DISK / 1e9:.0f} GB disk, links at line rate",
            "assumed",
            f"--prefetch {PREFETCH}",
        ),
        (
            "streaming pack window",
            f"{WINDOW_SLIDES} slides of units per split (3 splits)",
            "assumed",
            "--shuffle-window default; slides of the mean size",
        ),
    ]
    return {
        "marked": "PROJECTION, not a measurement",
        "inputs": [{"what": a, "value": b, "status": c, "from": d} for a, b, c, d in inputs],
        "figures": {
            "hest_slides": len(hest),
            "hest_spots": hest_spots,
            "hest_wsi_tb": hest_wsi / 1e12,
            "hest_wsi_ranged_tb": hest_ranged_wsi / 1e12,
            "hest_st_tb": hest_st / 1e12,
            "hest_patches_tb": patches / 1e12,
            "implied_bytes_per_px": implied_bpp,
            "stimage_slides": len(stimage),
            "stimage_spots": stimage_spots,
            "stimage_tb": stimage_bytes / 1e12,
            "samples": samples,
            "unit_core_h": unit_core_h,
            "compute_h_from_wall": compute_h_wall,
            "wall_core_ms_per_sample": wall_ms,
            "pack_core_h": pack_core_h,
            "fraction_fetched": fraction,
            "he_bytes_per_px": bpp,
            "rates": rates,
        },
        "rows": rows,
        "peak_disk": {
            "corpus_gb": corpus / 1e9,
            "corpus_wds_gb": samples * rates.get("wds_bytes_per_sample", 0.0) / 1e9,
            "corpus_parquet_gb": samples * rates.get("parquet_bytes_per_sample", 0.0) / 1e9,
            "work_all_gb": work_all / 1e9,
            "work_window_gb": window / 1e9,
            "largest_slide_gb": {"whole": largest_whole / 1e9, "ranges": largest_ranged / 1e9},
            "mean_slide_gb": {"whole": mean_whole / 1e9, "ranges": mean_ranged / 1e9},
            "by_reads": disk,
            "disk_gb": NODE_DISK / 1e9,
        },
    }


def projection_table(p: dict[str, Any]) -> list[str]:
    """The projection as Markdown, marked as one."""
    f, d = p["figures"], p["peak_disk"]
    lines = [
        "",
        f"**PROJECTION (not measured)**: HEST-1k ({f['hest_slides']:,} slides, {f['hest_spots']:,} spots) + "
        f"STimage-1K4M ({f['stimage_slides']:,} slides, {f['stimage_spots']:,} spots) on one {NODE_CORES}-core node, "
        f"{NODE_DISK / 1e9:.0f} GB disk. Inputs:",
        "",
        "| input | value | status | from |",
        "|---|---|---|---|",
        *(f"| {i['what']} | {i['value']} | {i['status']} | {i['from']} |" for i in p["inputs"]),
        "",
        "| link | reads | TB fetched | download h | compute h | pack h (one core) | wall h | bound by | "
        "wall h, at the measured overlap |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in p["rows"]:
        lines.append(
            f"| {row['gbit_s']} Gbit/s | {row['mode']} | {row['download_tb']:.2f} | {row['download_h']:.1f} | "
            f"{row['compute_h']:.1f} | {row['pack_h']:.1f} | {row['wall_h_streaming']:.1f} | {row['bound_by']} | "
            f"{row['wall_h_at_measured_overlap']:.1f} |"
        )
    lines += [
        "",
        f"| peak disk, projected (GB) | inputs in flight | work folder | corpus | peak | fits {d['disk_gb']:.0f} GB |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for mode, by in d["by_reads"].items():
        for label, work, corpus, peak in (
            ("every unit kept (the default)", d["work_all_gb"], d["corpus_gb"], by["peak_gb_today"]),
            (
                f"--release-units ({WINDOW_SLIDES} slides' units per split)",
                d["work_window_gb"],
                d["corpus_gb"],
                by["peak_gb_streaming"],
            ),
            ("--release-units --formats parquet", d["work_window_gb"], d["corpus_parquet_gb"], by["peak_gb_parquet"]),
        ):
            lines.append(
                f"| {mode} reads, {label} | {by['in_flight_gb']:,.0f} | {work:,.0f} | {corpus:,.0f} | "
                f"{peak:,.0f} | {'yes' if peak <= d['disk_gb'] else 'NO'} |"
            )
    lines += [
        "",
        f"Inputs in flight: {NODE_CORES} running + {PREFETCH} prefetched slides of the mean size "
        f"({d['mean_slide_gb']['whole']:.2f} GB whole, {d['mean_slide_gb']['ranges']:.2f} GB by range); all of "
        f"them the largest ({d['largest_slide_gb']['whole']:.1f} GB whole, {d['largest_slide_gb']['ranges']:.1f} GB "
        f"by range) would hold {d['by_reads']['whole']['in_flight_worst_gb']:,.0f} / "
        f"{d['by_reads']['ranges']['in_flight_worst_gb']:,.0f} GB, which --cache-budget caps (the slides then wait). "
        f"Wall h = max(download, the units' CPU over {NODE_CORES - 1} cores, the pack on the build process's core) "
        "+ the first slide's download. "
        f"Compute h from CPU time; from the measuring run's wall x workers ({f['wall_core_ms_per_sample']:.1f} ms "
        f"per sample, an upper bound) it would be {f['compute_h_from_wall']:.1f} h.",
    ]
    if d["corpus_wds_gb"]:
        lines.append(
            f"Of the corpus: WebDataset {d['corpus_wds_gb']:,.0f} GB, Parquet {d['corpus_parquet_gb']:,.0f} GB "
            "(the same samples twice)."
        )
    return lines


def scratch_budget(run: dict[str, Any]) -> int | None:
    """What a build's scratch may hold: --cache-budget + --work-budget + the shards it can have open."""
    if run.get("cache_budget") is None or run.get("work_budget") is None:
        return None
    return int(run["cache_budget"] + run["work_budget"] + run["open_shards_bound"])


def table(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    runs, rate = report["runs"], report["rate"]
    lines = [
        f"{report['slides']} slides ({', '.join(report['kinds'])}), {report['slide_um']:.0f} um square, "
        f"--workers {report['workers']}, link {rate / _MB:.0f} MB/s, --shuffle-window {report['shuffle_window']}, "
        f"--samples-per-shard {report.get('samples_per_shard') or 10_000}, "
        f"--formats {','.join(report.get('formats', schema.FORMATS))}; "
        f"throttled builds: --cache-budget {report['cache_budget'] / _MB:,.0f} MB, "
        f"--work-budget {report.get('work_budget', 0) / _MB:,.0f} MB",
        "",
        "| build | wall s | MB fetched | MB / rate (s) | bound s | wall / bound | peak disk MB | of it corpus MB | "
        "peak scratch MB (inputs / work samples / open shards) | scratch budget MB | <= budget |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for mode, run in runs.items():
        download = run["total_bytes"] / rate if mode != "compute" else 0.0
        bound = report["bound_s"].get(mode, max(download, run["wall_s"]))
        at, peaks = run.get("at_peak", {}), run.get("peak_by_part", {})
        kept = at.get("corpus", 0) + at.get("unit_records", 0)
        budget = scratch_budget(run)
        parts = " / ".join(f"{peaks.get(p, 0) / _MB:,.0f}" for p in SCRATCH_PARTS)
        lines.append(
            f"| {mode} | {run['wall_s']:.1f} | {run['total_bytes'] / _MB:,.1f} | {download:.1f} | {bound:.1f} | "
            f"{run['wall_s'] / bound:.2f} | {run['peak_disk'] / _MB:,.0f} | {kept / _MB:,.0f} | "
            f"{run.get('peak_scratch', 0) / _MB:,.0f} ({parts}) | "
            f"{'-' if budget is None else f'{budget / _MB:,.0f}'} | "
            f"{'-' if budget is None else ('yes' if run['peak_scratch'] <= budget else 'NO')} |"
        )
    lines += [
        "",
        "| throttled build | s before the first byte | s the link stood idle between bytes | s after the last byte |",
        "|---|---:|---:|---:|",
    ]
    for mode in ("whole", "ranges"):
        link = runs[mode].get("link")
        if link and link["before_first_s"] is not None:
            lines.append(
                f"| {mode} | {link['before_first_s']:.1f} | {link['idle_s']:.1f} | {link['after_last_s']:.1f} |"
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
    lines += projection_table(report["projection"])
    return "\n".join(lines)


def compute_only(args: argparse.Namespace) -> int:
    """The ``compute`` build alone on ``args.slides`` slides: per-sample CPU, disk and pack rates."""
    scratch = OUT / "build-scale-compute"
    files, kinds = prepare(scratch / "data", slides=args.slides, slide_um=args.slide_um, border_um=args.border_um)
    print(f"build: compute only, {args.slides} slides of {args.slide_um:.0f} um", file=sys.stderr)
    formats = tuple(f.strip() for f in args.formats.split(",")) if args.formats else None
    run = run_build(
        files,
        scratch / "compute",
        rate=None,
        range_reads=True,
        workers=args.workers,
        slides=args.slides,
        formats=formats,
    )
    report = {
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
        "command": " ".join(sys.argv),
        "slides": args.slides,
        "slide_um": args.slide_um,
        "workers": args.workers,
        "formats": list(formats or schema.FORMATS),
        "kinds": kinds,
        "compute": run,
        "rates": sample_rates(run, workers=args.workers),
    }
    # The projection reads the both-format rates; a run of other --formats keeps its own report beside them.
    path = (
        COMPUTE_REPORT if formats is None else COMPUTE_REPORT.with_name(f"build_scale_compute-{'-'.join(formats)}.json")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(scratch / "compute", ignore_errors=True)
    r = report["rates"]
    print(
        f"{args.slides} slides of {args.slide_um:.0f} um, {run['samples']:,} samples, --workers {args.workers}: "
        f"wall {run['wall_s']:.1f} s, {r['cpu_ms_per_sample']:.2f} CPU ms per sample, shards "
        f"{r['shard_bytes_per_sample'] / 1e3:.1f} kB and work units {r['work_bytes_per_sample'] / 1e3:.1f} kB per "
        f"sample, {r['after_units_ms_per_sample']:.2f} ms per sample after the last unit (the pack); "
        f"written to {path}"
    )
    return 0


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
    parser.add_argument(
        "--cache-budget",
        type=float,
        default=0.0,
        help="--cache-budget of the throttled builds in MB (default: "
        "room for every worker's slide and one prefetched slide)",
    )
    parser.add_argument(
        "--work-budget",
        type=float,
        default=0.0,
        help="--work-budget of the throttled builds in MB (default: room for every split's shuffle window and "
        "every worker's unit, at the largest unit samples file of the compute build)",
    )
    parser.add_argument(
        "--shuffle-window",
        type=int,
        default=None,
        help="the builds' --shuffle-window (default 64; --quick: 4, the same share of its 32 slides as 64 of "
        "HEST's ~1,000 per split would be too small to stream at all)",
    )
    parser.add_argument(
        "--samples-per-shard",
        type=int,
        default=None,
        help="the builds' --samples-per-shard (default 10,000, shards of up to 768 MB; --quick: 256, so that its "
        "small corpus is cut into many shards as HEST-1k's is, and slides are released as shards commit)",
    )
    parser.add_argument(
        "--formats",
        default=None,
        help="the builds' --formats (default: both, parquet,wds); e.g. parquet: the corpus on disk once",
    )
    parser.add_argument(
        "--keep-units", action="store_true", help="build without --release-units (the units stay until the end)"
    )
    parser.add_argument("--reference", type=Path, default=REFERENCE, help="HEST-1k metadata CSV (HEST_v1_1_0.csv)")
    parser.add_argument("--out", type=Path, default=OUT / "build_scale.json")
    parser.add_argument(
        "--compute-only",
        action="store_true",
        help=f"only the unthrottled build, any number of slides: the per-sample rates the projection uses "
        f"(writes {COMPUTE_REPORT.relative_to(HERE.parent)}), e.g. --compute-only --slides 8 --slide-um 6000",
    )
    parser.add_argument(
        "--reproject", action="store_true", help="recompute the projection of the report in --out; no builds"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.slides, args.slide_um, args.rate = 32, 1200.0, 10.0
        if args.shuffle_window is None:
            args.shuffle_window = 4
        if args.samples_per_shard is None:
            args.samples_per_shard = 256
    if args.shuffle_window is None:
        args.shuffle_window = 64
    if not args.reference.is_file():
        parser.error(f"--reference {args.reference}: no such file; give HEST-1k's HEST_v1_1_0.csv")
    if args.reproject:
        saved: dict[str, Any] = json.loads(args.out.read_text())
        saved["projection"] = projection(saved, reference=args.reference)
        args.out.write_text(json.dumps(saved, indent=1) + "\n")
        print(table(saved))
        return 0
    if args.compute_only:
        return compute_only(args)
    if args.slides < 30:
        parser.error("--slides must be at least 30 (issue 17 asks for 30)")
    rate = args.rate * _MB
    formats = tuple(f.strip() for f in args.formats.split(",")) if args.formats else None

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
        "shuffle_window": args.shuffle_window,
        "samples_per_shard": args.samples_per_shard,
        "formats": list(formats or schema.FORMATS),
        "release_units": not args.keep_units,
        "cache_budget": budget,
        "kinds": kinds,
        "runs": {},
    }
    for mode, throttle, ranges in (("compute", None, True), ("whole", rate, False), ("ranges", rate, True)):
        if mode != "compute" and "work_budget" not in report:
            largest_unit = report["runs"]["compute"]["largest_unit_bytes"]
            # the default: every split's window full and every worker's unit running, at the largest unit
            room = len(schema.SPLITS) * args.shuffle_window + args.workers
            report["work_budget"] = round(args.work_budget * _MB) if args.work_budget else room * largest_unit
        print(f"build: {mode}", file=sys.stderr)
        report["runs"][mode] = run_build(
            files,
            scratch / mode,
            rate=throttle,
            range_reads=ranges,
            workers=args.workers,
            slides=args.slides,
            cache_budget=budget if throttle else None,
            window=args.shuffle_window,
            release=not args.keep_units,
            work_budget=report.get("work_budget"),
            samples_per_shard=args.samples_per_shard,
            formats=formats,
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
        window=args.shuffle_window,
        release=not args.keep_units,
        work_budget=report["work_budget"],
        samples_per_shard=args.samples_per_shard,
        formats=formats,
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
    from bench.he_bytes import measure

    report["he_bytes"] = measure(cache=HE_CACHE)
    print(f"real H&E bytes per pixel from {report['he_bytes']['source']}", file=sys.stderr)
    report["projection"] = projection(report, reference=args.reference)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
