"""Benchmark: the loader's local shard cache over a throttled 127.0.0.1 server, epoch 1 against epoch 2.

One run, one corpus: the loader test fixture (``tests/corpus_fixture.py``: real counts, real H&E
crops at JPEG quality 90, 224x224 patch and region) written ``--repeats`` times over, served by
the test HTTP server (``tests/httpserver.py``) throttled to ``--mbps`` MB/s per connection, like
a remote store's link. Per epoch of the ``train`` split (Parquet and tar), side by side:

- ``no cache``: every epoch streams every shard (what the loader did before the cache);
- ``cache, epoch 1``: a fresh cache folder, a budget larger than the corpus: shards are kept as
  they are streamed (verified against ``shards.parquet``'s size and sha256);
- ``cache, epoch 2``: the next epoch (another shard order): read from the cache folder;
- ``new run``: a new dataset on the same folder (a resumed or later job on the node);
- ``half budget, epoch 2``: a budget of half the split's shards: what LRU keeps for a shuffled
  second pass;
- ``local folder``: the same epoch read from the corpus folder itself, the ceiling of a cache.

Each row: network bytes (body bytes the server sent, over the bytes of the split's shards),
wall seconds and samples per wall second, ``--workers`` DataLoader workers.

Usage::

    .venv/bin/python -m bench.shard_cache                   # writes bench/out/shard_cache.json
    .venv/bin/python -m bench.shard_cache --repeats 16 --mbps 20 --workers 2
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"


def _epoch(location: str, settings: dict[str, Any], *, epoch: int, workers: int) -> tuple[int, float]:
    from stcorpus.loaders import CorpusDataset, CorpusLoader, LoaderSettings

    dataset = CorpusDataset(location, LoaderSettings.from_dict(settings))
    loader = CorpusLoader(dataset, num_workers=workers)
    loader.set_epoch(epoch)
    start = time.perf_counter()
    samples = sum(len(batch["key"]) for batch in loader)
    return samples, time.perf_counter() - start


def run(*, repeats: int, mbps: float, workers: int, fmt: str, work: Path) -> list[dict[str, Any]]:
    """The rows of one format."""
    sys.path.insert(0, str(ROOT))
    from tests.corpus_fixture import write_corpus
    from tests.httpserver import serve

    corpus = write_corpus(work / "corpus", repeats=repeats, samples_per_shard=256, row_group_size=64)
    shards = corpus.shard_paths(fmt, "train")
    split_bytes = sum(p.stat().st_size for p in shards)
    base: dict[str, Any] = {
        "split": "train",
        "format": fmt,
        "batch_size": 64,
        "shuffle_window": 512,
        "genes": {"transform": "log1p"},
    }
    rows: list[dict[str, Any]] = []
    with serve(corpus.root) as server:
        server.rate = mbps * 1e6

        def measure(name: str, settings: dict[str, Any], epoch: int, *, location: str | None = None) -> None:
            before = server.bytes_sent
            samples, wall = _epoch(location or server.url, settings, epoch=epoch, workers=workers)
            sent = server.bytes_sent - before
            rows.append(
                {
                    "format": fmt,
                    "what": name,
                    "samples": samples,
                    "wall_s": round(wall, 3),
                    "samples_per_s": round(samples / wall, 1),
                    "network_bytes": sent,
                    "network_of_split": round(sent / split_bytes, 4),
                }
            )

        measure("no cache, epoch 1", base, 0)
        measure("no cache, epoch 2", base, 1)
        cache = {"folder": str(work / f"cache-{fmt}"), "max_gb": 4 * split_bytes / (1 << 30)}
        measure("cache, epoch 1", {**base, "cache": cache}, 0)
        measure("cache, epoch 2", {**base, "cache": cache}, 1)
        measure("cache, new run (epoch 3)", {**base, "cache": cache}, 2)
        half = {"folder": str(work / f"half-{fmt}"), "max_gb": 0.5 * split_bytes / (1 << 30)}
        measure("half budget, epoch 1", {**base, "cache": half}, 0)
        measure("half budget, epoch 2", {**base, "cache": half}, 1)
        measure("local folder (reference)", base, 1, location=str(corpus.root))
    for row in rows:
        row["split_bytes"] = split_bytes
        row["shards"] = len(shards)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows, with samples/s relative to the no-cache first epoch of the format."""
    lines = [
        "| format | what | network bytes (of the split) | wall s | samples/s | vs no cache |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        first = next(r for r in rows if r["format"] == row["format"] and r["what"] == "no cache, epoch 1")
        lines.append(
            f"| {row['format']} | {row['what']} | {row['network_bytes']:,} ({row['network_of_split']:.2f}) | "
            f"{row['wall_s']:.2f} | {row['samples_per_s']:,.0f} | "
            f"{row['samples_per_s'] / first['samples_per_s']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write ``bench/out/shard_cache.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=16, help="times the fixture is written (default 16)")
    parser.add_argument("--mbps", type=float, default=20.0, help="server MB/s per connection (default 20)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0: in-process)")
    parser.add_argument("--formats", default="parquet,wds", help="comma-separated formats (default both)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="stcorpus-shard-cache-"))
    try:
        rows: list[dict[str, Any]] = []
        for fmt in args.formats.split(","):
            rows += run(repeats=args.repeats, mbps=args.mbps, workers=args.workers, fmt=fmt, work=work / fmt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "shard_cache",
        "settings": vars(args),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "rows": rows,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "shard_cache.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
