"""Benchmark: the corpus loader against plain webdataset, datasets streaming and the JPEG-decode limit.

One run, one corpus, the same shards for everyone: the loader test fixture
(``tests/corpus_fixture.py``: real counts, real H&E crops at JPEG quality 90, 224x224 patch and
region) written ``--repeats`` times over, the ``train`` split in Parquet and tar shards of
``--shard`` samples (row groups of ``--row-group``). Every contender yields, per sample, both
views decoded to uint8 arrays and the expression as arrays:

- ``decode limit``: decoding the two JPEGs of every sample from bytes already in memory
  (simplejpeg, i.e. libjpeg-turbo, the decoder every "same decode" contender uses; and Pillow);
- ``stcorpus``: ``loaders.CorpusDataset`` (shuffled, batches of ``--batch``, log1p expression),
  Parquet and tar, in-process (``num_workers=0``) and with ``--workers`` DataLoader workers;
- ``webdataset``: ``wds.WebDataset(shards).map(decode)`` with the same decode;
- ``datasets``: ``load_dataset(..., streaming=True)`` of the Parquet shards and of the tar shards,
  with its own Pillow decode and with ``Image(decode=False)`` + the same decode.

Single-process contenders are timed in CPU seconds of this process (``time.process_time``:
per core, robust to other work on a shared machine), best of ``--repeat``; worker runs and the
time to the first batch in wall seconds. Requests per shard are counted by a local HTTP server
(``tests/httpserver.py``) for one epoch of each streaming reader.

Usage::

    .venv/bin/python -m bench.loader                 # writes bench/out/loader.json, prints a table
    .venv/bin/python -m bench.loader --repeats 32 --workers 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.timing import best_of

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"


def _best(repeat: int, run: Callable[[], int]) -> dict[str, float]:
    """Best (least CPU) of ``repeat`` runs of ``run``, which returns how many samples it made."""
    t = best_of(repeat, run)
    return {
        "samples": t.count,
        "cpu_s": t.cpu_s,
        "wall_s": t.wall_s,
        "per_cpu_s": t.count / t.cpu_s,
        "per_wall_s": t.count / t.wall_s,
    }


def _wall(repeat: int, run: Callable[[], int]) -> dict[str, float]:
    """Best (least wall time) of ``repeat`` runs (for runs that use other processes)."""
    best: tuple[float, int] | None = None
    for _ in range(repeat):
        wall0 = time.perf_counter()
        count = run()
        wall = time.perf_counter() - wall0
        if best is None or wall < best[0]:
            best = (wall, count)
    assert best is not None
    return {"samples": best[1], "wall_s": best[0], "per_wall_s": best[1] / best[0]}


def _first(make: Callable[[], Iterator[Any]]) -> float:
    """Seconds from nothing to the first item of ``make()``."""
    start = time.perf_counter()
    iterator = make()
    next(iterator)
    elapsed = time.perf_counter() - start
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
    return elapsed


# ---------------------------------------------------------------------------------------------
# The same decode for every contender
# ---------------------------------------------------------------------------------------------


def jpeg(data: bytes) -> np.ndarray:
    import simplejpeg

    return simplejpeg.decode_jpeg(data, colorspace="RGB")  # type: ignore[no-any-return]


def npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def batched(samples: Iterator[dict[str, Any]], size: int) -> Iterator[dict[str, Any]]:
    """Stack the two views of ``size`` samples (as every loader here yields batches)."""
    chunk: list[dict[str, Any]] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield {"patch": np.stack([s["patch"] for s in chunk]), "region": np.stack([s["region"] for s in chunk])}
            chunk = []
    if chunk:
        yield {"patch": np.stack([s["patch"] for s in chunk]), "region": np.stack([s["region"] for s in chunk])}


def count(batches: Iterator[dict[str, Any]]) -> int:
    return sum(len(b["patch"]) for b in batches)


# ---------------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------------


def decode_limit(images: list[tuple[bytes, bytes]], decoder: str, batch: int | None = None) -> int:
    out = np.empty((224, 224, 3), dtype=np.uint8)
    if batch is not None:
        # Into batch buffers, as a loader must: every image lands in its own slot of a batch.
        import simplejpeg

        patches = np.empty((batch, 224, 224, 3), dtype=np.uint8)
        regions = np.empty((batch, 224, 224, 3), dtype=np.uint8)
        for i, (patch, region) in enumerate(images):
            simplejpeg.decode_jpeg(patch, colorspace="RGB", buffer=patches[i % batch])
            simplejpeg.decode_jpeg(region, colorspace="RGB", buffer=regions[i % batch])
        return len(images)
    if decoder == "simplejpeg":
        import simplejpeg

        for patch, region in images:
            simplejpeg.decode_jpeg(patch, colorspace="RGB", buffer=out)
            simplejpeg.decode_jpeg(region, colorspace="RGB", buffer=out)
    else:
        from PIL import Image

        for patch, region in images:
            out[...] = np.asarray(Image.open(io.BytesIO(patch)).convert("RGB"))
            out[...] = np.asarray(Image.open(io.BytesIO(region)).convert("RGB"))
    return len(images)


def ours(location: Any, fmt: str, workers: int, batch: int, **options: Any) -> Iterator[dict[str, Any]]:
    from stcorpus.loaders import CorpusDataset, CorpusLoader, LoaderSettings

    settings = LoaderSettings.from_dict(
        {
            "split": "train",
            "format": fmt,
            "batch_size": batch,
            "drop_last": False,
            "shuffle_window": 8 * batch,
            "genes": {"transform": "log1p"},
            **options,
        }
    )
    return iter(CorpusLoader(CorpusDataset(location, settings), num_workers=workers))


def plain_webdataset(urls: list[str], batch: int) -> Iterator[dict[str, Any]]:
    import webdataset as wds

    def decode(sample: dict[str, Any]) -> dict[str, Any]:
        return {
            "patch": jpeg(sample["patch.jpg"]),
            "region": jpeg(sample["region.jpg"]),
            "expr": npz(sample["expr.npz"]),
            "meta": json.loads(sample["json"]),
        }

    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(decode)
    return batched(iter(dataset), batch)


def hf_parquet(files: list[str], batch: int, *, own_decode: bool) -> Iterator[dict[str, Any]]:
    import datasets

    ds = datasets.load_dataset("parquet", data_files={"train": files}, split="train", streaming=True)
    if own_decode:
        ds = ds.cast_column("patch", datasets.Image(decode=False)).cast_column("region", datasets.Image(decode=False))

    def rows() -> Iterator[dict[str, Any]]:
        for row in ds:
            if own_decode:
                patch, region = jpeg(row["patch"]["bytes"]), jpeg(row["region"]["bytes"])
            else:
                patch, region = np.asarray(row["patch"].convert("RGB")), np.asarray(row["region"].convert("RGB"))
            yield {"patch": patch, "region": region, "genes": np.asarray(row["genes"]), "counts": row["counts"]}

    return batched(rows(), batch)


def hf_webdataset(files: list[str], batch: int, *, own_decode: bool) -> Iterator[dict[str, Any]]:
    import datasets

    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True)
    if own_decode:
        ds = ds.cast_column("patch.jpg", datasets.Image(decode=False)).cast_column(
            "region.jpg", datasets.Image(decode=False)
        )

    def rows() -> Iterator[dict[str, Any]]:
        for row in ds:
            if own_decode:
                patch, region = jpeg(row["patch.jpg"]["bytes"]), jpeg(row["region.jpg"]["bytes"])
            else:
                patch = np.asarray(row["patch.jpg"].convert("RGB"))
                region = np.asarray(row["region.jpg"].convert("RGB"))
            yield {"patch": patch, "region": region, "expr": row["expr.npz"], "meta": row["json"]}

    return batched(rows(), batch)


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------


def _quiet_disconnects(server: Any) -> None:
    """Keep the local server from printing a traceback when a client stops reading early (the
    first-batch runs close their stream after one batch): expected here, not an error."""
    httpd = server._httpd
    report = httpd.handle_error

    def handle_error(request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            report(request, client_address)

    httpd.handle_error = handle_error


def make_corpus(root: Path, *, repeats: int, shard: int, row_group: int) -> Any:
    from tests.corpus_fixture import write_corpus

    return write_corpus(root, samples_per_shard=shard, row_group_size=row_group, repeats=repeats)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=32, help="fixture copies (94 train samples each)")
    parser.add_argument("--shard", type=int, default=300, help="samples per shard")
    parser.add_argument("--row-group", type=int, default=100, help="Parquet rows per row group")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (best is kept)")
    parser.add_argument("--corpus", type=Path, default=OUT / "loader-corpus")
    parser.add_argument("--skip-datasets-pil", action="store_true", help="leave out datasets' own Pillow decode")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # tests.corpus_fixture and tests.httpserver
    import torch

    torch.set_num_threads(1)
    from tests.httpserver import serve

    root: Path = args.corpus
    if not (root / "corpus.json").exists():
        print(f"writing the corpus to {root} ...", flush=True)
        make_corpus(root, repeats=args.repeats, shard=args.shard, row_group=args.row_group)
    import pyarrow.parquet as pq

    index = pq.read_table(root / "shards.parquet").to_pylist()
    wds_files = [str(root / r["path"]) for r in index if r["format"] == "wds" and r["split"] == "train"]
    pq_files = [str(root / r["path"]) for r in index if r["format"] == "parquet" and r["split"] == "train"]
    n = sum(r["n_samples"] for r in index if r["format"] == "wds" and r["split"] == "train")
    images = []
    import tarfile

    for path in wds_files:
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
        keys = sorted({name.split(".")[0] for name in members})
        images += [(members[f"{k}.patch.jpg"], members[f"{k}.region.jpg"]) for k in keys]
    jpeg_bytes = sum(len(p) + len(r) for p, r in images) / len(images)
    print(f"{n} train samples in {len(wds_files)} shards per format; mean JPEG bytes per sample {jpeg_bytes:.0f}")

    results: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
        },
        "corpus": {"samples": n, "shards": len(wds_files), "shard": args.shard, "row_group": args.row_group},
        "batch": args.batch,
        "workers": args.workers,
    }
    b, r = args.batch, args.repeat
    single: dict[str, Callable[[], int]] = {
        "decode limit (simplejpeg)": lambda: decode_limit(images, "simplejpeg"),
        "decode limit (simplejpeg, into batches)": lambda: decode_limit(images, "simplejpeg", b),
        "decode limit (Pillow)": lambda: decode_limit(images, "pil"),
        "stcorpus parquet, in-process": lambda: count(ours(root, "parquet", 0, b)),
        "stcorpus wds, in-process": lambda: count(ours(root, "wds", 0, b)),
        "webdataset, same decode": lambda: count(plain_webdataset(wds_files, b)),
        "datasets parquet, same decode": lambda: count(hf_parquet(pq_files, b, own_decode=True)),
        "datasets webdataset, same decode": lambda: count(hf_webdataset(wds_files, b, own_decode=True)),
    }
    if not args.skip_datasets_pil:
        single["datasets parquet, Pillow decode"] = lambda: count(hf_parquet(pq_files, b, own_decode=False))
        single["datasets webdataset, Pillow decode"] = lambda: count(hf_webdataset(wds_files, b, own_decode=False))
    # Rounds of every contender in turn, best of the rounds for each: all of them see the same
    # spells of load on a shared machine.
    rounds = [{name: _best(1, run) for name, run in single.items()} for _ in range(r)]
    results["single_process"] = {}
    for name in single:
        results["single_process"][name] = m = max((x[name] for x in rounds), key=lambda x: x["per_cpu_s"])
        print(f"{name:40s} {m['per_cpu_s']:8.0f} samples/CPU-s  ({m['per_wall_s']:.0f}/wall-s)", flush=True)
    w = args.workers
    results["workers"] = {}
    for name, run in {
        f"stcorpus parquet, {w} workers": lambda: count(ours(root, "parquet", w, b)),
        f"stcorpus wds, {w} workers": lambda: count(ours(root, "wds", w, b)),
    }.items():
        results["workers"][name] = m = _wall(r, run)
        print(f"{name:40s} {m['per_wall_s']:8.0f} samples/wall-s", flush=True)
    results["first_batch_s"] = {}
    for name, make in {
        "stcorpus parquet, in-process": lambda: ours(root, "parquet", 0, b),
        f"stcorpus parquet, {w} workers": lambda: ours(root, "parquet", w, b),
        "stcorpus wds, in-process": lambda: ours(root, "wds", 0, b),
        "webdataset": lambda: plain_webdataset(wds_files, b),
        "datasets parquet": lambda: hf_parquet(pq_files, b, own_decode=True),
        "datasets webdataset": lambda: hf_webdataset(wds_files, b, own_decode=True),
    }.items():
        results["first_batch_s"][name] = t = min(_first(make) for _ in range(r))
        print(f"first batch: {name:40s} {t:6.3f} s", flush=True)
    results["http"] = {}
    with serve(root) as server:
        _quiet_disconnects(server)

        def per_shard(fmt: str) -> float:
            paths = [f"/{x['path']}" for x in index if x["format"] == fmt and x["split"] == "train"]
            return sum(server.count(p) for p in paths) / len(paths)

        def urls(files: list[str]) -> list[str]:
            return [f"{server.url}/{Path(f).relative_to(root)}" for f in files]

        for name, fmt, make in (
            ("stcorpus parquet", "parquet", lambda: ours(server.url, "parquet", 0, b)),
            ("stcorpus wds", "wds", lambda: ours(server.url, "wds", 0, b)),
            ("webdataset", "wds", lambda: plain_webdataset(urls(wds_files), b)),
            ("datasets parquet", "parquet", lambda: hf_parquet(urls(pq_files), b, own_decode=True)),
            ("datasets webdataset", "wds", lambda: hf_webdataset(urls(wds_files), b, own_decode=True)),
            ("datasets parquet, Pillow decode", "parquet", lambda: hf_parquet(urls(pq_files), b, own_decode=False)),
            ("datasets webdataset, Pillow decode", "wds", lambda: hf_webdataset(urls(wds_files), b, own_decode=False)),
        ):
            first = _first(make)
            server.requests.clear()
            m = _best(1, lambda make=make: count(make()))  # type: ignore[misc]
            results["http"][name] = {"requests_per_shard": per_shard(fmt), "first_batch_s": first, **m}
            print(
                f"http: {name:30s} {per_shard(fmt):5.1f} requests/shard  {m['per_wall_s']:6.0f} samples/wall-s  "
                f"first batch {first:.3f} s"
            )
    limit = results["single_process"]["decode limit (simplejpeg)"]["per_cpu_s"]
    into = results["single_process"]["decode limit (simplejpeg, into batches)"]["per_cpu_s"]
    ratios = {
        name: m["per_cpu_s"] / limit for name, m in results["single_process"].items() if "decode limit" not in name
    }
    results["ratio_to_decode_limit"] = ratios
    results["ratio_to_decode_into_batches"] = {
        name: m["per_cpu_s"] / into for name, m in results["single_process"].items() if "decode limit" not in name
    }
    ours_pq = results["single_process"]["stcorpus parquet, in-process"]["per_cpu_s"]
    results["speedup_over"] = {
        name: ours_pq / m["per_cpu_s"] for name, m in results["single_process"].items() if name.startswith("datasets")
    }
    # Over HTTP, each stcorpus format against datasets streaming the same format (wall time).
    http = results["http"]
    results["http_speedup_over"] = {
        name: http[f"stcorpus {'parquet' if 'parquet' in name else 'wds'}"]["per_wall_s"] / m["per_wall_s"]
        for name, m in http.items()
        if name.startswith("datasets")
    }
    summary = ("ratio_to_decode_limit", "ratio_to_decode_into_batches", "speedup_over", "http_speedup_over")
    print(json.dumps({k: results[k] for k in summary}, indent=1))
    OUT.mkdir(exist_ok=True)
    (OUT / "loader.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
