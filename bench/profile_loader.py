"""Where the loader's worker time goes per sample (issue 16), at 3,000 genes.

Builds bench/format.py's 3,000-gene corpus (same generator, same writer) and runs in-process
epochs of the loader for Parquet and tar, with and without niche, sparse output, log1p:

- ``--mode sections`` (default): CPU microseconds per sample in each stage of the worker,
  timed around the functions that do the work (the best of ``--repeat`` epochs by total; the
  rest of the total is the plan, the tar cursor and the stages' loops);
- ``--mode cprofile``: cProfile of one epoch, by internal time;
- ``--mode leaves``: pyarrow's read of the Parquet columns the loader reads (each expression
  column alone, then the loader's column sets), us per sample and ns per value, beside the
  overhead the targets of issue 16 leave over the JPEG decode limit of the same rounds (the
  median of ``--repeat`` interleaved rounds).

    .venv/bin/python -m bench.profile_loader --samples 384
    .venv/bin/python -m bench.profile_loader --samples 384 --mode cprofile --top 25
    .venv/bin/python -m bench.profile_loader --samples 768 --mode leaves --repeat 9
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench import format as fmt
from stcorpus.loaders.read import PARQUET_READ_BATCH

RUNS = (("parquet", False), ("parquet", True), ("wds", False), ("wds", True))
#: The columns the loader reads from a Parquet shard (``loaders/read.py`` ``Columns.parquet``).
SPOT_COLUMNS = ("__key__", "pos", "patch", "region", "genes", "counts")
NICHE_COLUMNS = (*SPOT_COLUMNS, "niche_genes", "niche_counts", "n_neighbors")
#: issue 16's targets: the loader's rate over the decode limit, without and with niche.
TARGETS = {"spot": 0.90, "+ niche": 0.85}


@contextmanager
def timed_sections(spent: defaultdict[str, float]) -> Iterator[None]:
    """Time the loader's working functions into ``spent`` (CPU seconds by section) while inside."""

    from stcorpus.loaders import dataset, parquet_fast, read

    targets: list[tuple[Any, str, str]] = [
        (read, "_read_row_group", "Parquet row-group read (pyarrow)"),
        (parquet_fast, "read_lists", "Parquet expression lists (parquet_fast)"),
        (parquet_fast, "read_binary", "Parquet JPEG leaves located (parquet_fast)"),
        (read, "raw_from_table", "Arrow -> raw samples (raw_from_table)"),
        (read, "raw_from_members", "tar members -> raw samples (json, npz)"),
        (dataset.CheckExpression, "check", "check expression"),
        (dataset.DecodeImages, "decode", "JPEG decode, both views"),
        (dataset, "_sparse", "batch sparse arrays (_sparse)"),
        (dataset.Collate, "collate", "collate (incl. _sparse)"),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]

    def wrap(function: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                spent[label] += time.process_time() - start

        return timed

    for (owner, name, label), (_, _, original) in zip(targets, originals, strict=True):
        setattr(owner, name, wrap(original, label))
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--mode", choices=["sections", "cprofile", "leaves"], default="sections")
    parser.add_argument("--repeat", type=int, default=5, help="epochs per run (sections: the least total is kept)")
    parser.add_argument("--top", type=int, default=25, help="cprofile: rows to print")
    parser.add_argument("--work", type=Path, default=fmt.OUT / "profile-work")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    symbols, c2_counts, _ = fmt.read_c2(fmt.C2_DEFAULT)
    vocab, columns = fmt.vocabulary(symbols)
    frequency = fmt.c2_frequencies(c2_counts, columns, len(vocab))
    values = c2_counts[c2_counts > 0]
    spots = fmt.synthetic_profile(3000, args.samples, frequency=frequency, values=values, seed=0)
    samples = fmt.samples_of(spots, fmt.Crops(), n=args.samples)
    root = fmt.write_corpus(args.work / "3000-after", samples, vocab, variant="after")
    pairs = [(s.patch, s.region) for s in samples]
    if args.mode == "leaves":
        leaves(root, pairs, batch=args.batch, repeat=args.repeat)
        return
    table: dict[str, dict[str, float]] = {}
    for form, niche in RUNS:
        name = f"{form}{' + niche' if niche else ''}"
        run = fmt.loader_run(root, form, batch=args.batch, genes={"transform": "log1p", "niche": niche})
        run()
        if args.mode == "cprofile":
            profile = cProfile.Profile()
            profile.enable()
            count = run()
            profile.disable()
            print(f"\n## {name}: {count} samples", flush=True)
            pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(args.top)
            continue
        best: tuple[float, defaultdict[str, float], float, int] | None = None
        for _ in range(args.repeat):
            spent: defaultdict[str, float] = defaultdict(float)
            limit_start = time.process_time()
            fmt.decode_limit(pairs, args.batch)
            limit = time.process_time() - limit_start
            with timed_sections(spent):
                start = time.process_time()
                count = run()
                total = time.process_time() - start
            if best is None or total < best[0]:
                best = (total, spent, limit, count)
        assert best is not None
        total, spent, limit, count = best
        column = {label: 1e6 * s / count for label, s in spent.items()}
        column["whole epoch"] = 1e6 * total / count
        column["JPEG decode limit (same round)"] = 1e6 * limit / len(pairs)
        table[name] = column
    if table:
        labels = list(dict.fromkeys(label for column in table.values() for label in column))
        print("| us per sample | " + " | ".join(table) + " |")
        print("|---|" + "---:|" * len(table))
        for label in labels:
            print(f"| {label} | " + " | ".join(f"{c[label]:.0f}" if label in c else "" for c in table.values()) + " |")


def leaves(root: Path, pairs: list[tuple[bytes, bytes]], *, batch: int, repeat: int) -> None:
    """pyarrow's read of the loader's Parquet columns against the overhead the targets allow."""
    import pyarrow.parquet as pq

    path = next((root / "parquet" / "train").glob("*.parquet"))
    # As the loader opens a local shard (loaders/read.py _parquet_rows).
    parquet = pq.ParquetFile(path, pre_buffer=False, memory_map=True)
    groups = range(parquet.metadata.num_row_groups)
    n = parquet.metadata.num_rows
    first = parquet.read_row_group(0, columns=["genes", "counts", "niche_genes", "niche_counts"])
    values = {c: len(first.column(c).chunk(0).values) / first.num_rows for c in first.column_names}
    reads: dict[str, tuple[str, ...]] = {c: (c,) for c in values}
    reads["loader's columns, spot"] = SPOT_COLUMNS
    reads["loader's columns, + niche"] = NICHE_COLUMNS
    for name in list(reads):
        reads[f"{name}, in batches"] = reads[name]

    def read(columns: tuple[str, ...], *, batches: bool) -> None:
        for g in groups:
            if batches:  # as the loader reads (loaders/read.py _read_row_group)
                list(parquet.iter_batches(PARQUET_READ_BATCH, [g], list(columns), use_threads=False))
            else:
                parquet.read_row_group(g, columns=list(columns), use_threads=False)

    rounds: dict[str, list[float]] = {name: [] for name in reads}
    limits: list[float] = []
    for _ in range(repeat):
        start = time.process_time()
        fmt.decode_limit(pairs, batch)
        limits.append(1e6 * (time.process_time() - start) / len(pairs))
        for name, columns in reads.items():
            start = time.process_time()
            read(columns, batches=name.endswith(", in batches"))
            rounds[name].append(1e6 * (time.process_time() - start) / n)
    limit = float(np.median(limits))
    print(f"JPEG decode limit: {limit:.0f} us per sample (median of {repeat} rounds)")
    for form, target in TARGETS.items():
        print(f"overhead beyond the decode that {target:.2f} of it allows ({form}): {limit * (1 / target - 1):.0f} us")
    print(f"\n(in batches: record batches of {PARQUET_READ_BATCH} rows, as the loader reads; else whole row groups)")
    print("\n| pyarrow read | us per sample | values per sample | ns per value |")
    print("|---|---:|---:|---:|")
    for name, times in rounds.items():
        us = float(np.median(times))
        count = sum(values[c] for c in reads[name] if c in values)
        print(f"| {name} | {us:.1f} | {count:,.0f} | {1e3 * us / count:.2f} |")


if __name__ == "__main__":
    main()
