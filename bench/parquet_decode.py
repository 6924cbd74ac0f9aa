"""Benchmark (issue 16): where pyarrow's read of the expression leaves spends its time, per value.

The four expression leaves of ``bench/format.py``'s 3,000-gene profile (``genes``, ``counts``,
``niche_genes``, ``niche_counts``: ``list<int32>``, lists and values not null, 768 samples by
default) are written one Parquet file per layout variant, alone (no JPEG columns: their bytes are
read plain and would only add noise), and each leaf is read back as the loader reads a local
shard (``ParquetFile(pre_buffer=False, memory_map=True)``, ``iter_batches`` of 32 rows per row
group, ``use_threads=False``). Every figure is CPU time of the process (``time.process_time``) per
value, the median of ``--repeat`` interleaved rounds (each reader once per round). Not the
thread's: once anything has started Arrow's CPU pool (one ``read_row_group`` with its default
``use_threads=True`` does), ``iter_batches(use_threads=False)`` decodes in the pool's threads,
and this thread's clock then shows 3 of the 91 ms a read of the four leaves takes.

- ``--mode parts``: the cost of each layer of one leaf's read, by difference: zstd (the same
  encoding with and without it), the encoding (against PLAIN), the list levels and offsets (a
  list column against a flat ``int32`` column of the same values), and outside the decode:
  Arrow -> numpy, the record-batch size (16 rows .. the whole row group, ``read_row_group``), the
  reader's options (``pre_buffer``, ``buffer_size``, ``memory_map``), and the fixed cost
  of a batch (a 1-value column read at the same batch size).
- ``--mode fast``: ns per value of each leaf in the writer's layout, and us per sample of the
  four, read by pyarrow (as above, with Arrow -> numpy) and by ``stcorpus.loaders.parquet_fast``
  (numba; offsets to a list as the loader takes them), in the same interleaved rounds.
- ``--mode layouts``: size (column chunk bytes per sample) and read ns per value of each
  layout variant of the four leaves (encodings, compression and level, page size, row-group
  size, dictionary, statistics, page index), the leaves as the writer would write them.

Usage::

    PYTHONPATH=. .venv/bin/python -m bench.parquet_decode --mode parts
    PYTHONPATH=. .venv/bin/python -m bench.parquet_decode --mode layouts --repeat 7
    PYTHONPATH=. .venv/bin/python -m bench.parquet_decode --mode fast --repeat 9
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench import format as fmt

LEAVES = ("genes", "counts", "niche_genes", "niche_counts")
GENE_LEAVES = ("genes", "niche_genes")
READ_BATCH = 32


def leaf_arrays(n: int, depth: int = 3000) -> dict[str, list[npt.NDArray[np.int32]]]:
    """The four leaves of ``n`` spots of bench/format.py's ``depth``-gene profile (C2's frequencies)."""
    symbols, c2_counts, _ = fmt.read_c2(fmt.C2_DEFAULT)
    vocab, columns = fmt.vocabulary(symbols)
    frequency = fmt.c2_frequencies(c2_counts, columns, len(vocab))
    values = c2_counts[c2_counts > 0]
    spots = fmt.synthetic_profile(depth, n, frequency=frequency, values=values, seed=0)
    out: dict[str, list[npt.NDArray[np.int32]]] = {leaf: [] for leaf in LEAVES}
    for i in range(n):
        ng, nc = fmt.niche(spots, i)
        out["genes"].append(spots.genes[i])
        out["counts"].append(spots.counts[i])
        out["niche_genes"].append(ng)
        out["niche_counts"].append(nc)
    return out


def table_of(arrays: dict[str, list[npt.NDArray[np.int32]]], *, flat: bool = False, nullable: bool = False) -> Any:
    """The leaves as an Arrow table of not-null ``list<int32>`` columns (``flat``: plain int32 columns)."""
    import pyarrow as pa

    from stcorpus import schema
    from stcorpus.curate.shards import _list_array

    if flat:
        # Same values, no lists: one row per value, padded to the longest leaf (a table needs one
        # length); only the leaf's own values are counted.
        longest = max(sum(len(a) for a in v) for v in arrays.values())
        cols = {}
        for name, v in arrays.items():
            values = np.concatenate(v)
            cols[name] = pa.array(np.resize(values, longest), type=pa.int32())
        fields = [pa.field(name, pa.int32(), nullable=nullable) for name in cols]
        return pa.Table.from_arrays(list(cols.values()), schema=pa.schema(fields))
    sample = schema.sample_arrow_schema("int32")
    fields = [sample.field(name) for name in arrays]
    return pa.Table.from_arrays([_list_array(arrays[f.name], f.type) for f in fields], schema=pa.schema(fields))


@dataclass(frozen=True)
class Layout:
    """Writer options of the four leaves (``None``: pyarrow's default)."""

    name: str
    genes: str = "DELTA_BINARY_PACKED"
    counts: str = "BYTE_STREAM_SPLIT"
    niche_genes: str | None = None  # None: as ``genes``
    niche_counts: str | None = None  # None: as ``counts``
    compression: dict[str, str] = field(default_factory=lambda: dict.fromkeys(LEAVES, "zstd"))
    level: int | None = None
    data_page_size: int | None = None
    row_group_size: int = 256
    statistics: bool = False
    page_index: bool = False
    page_version: str = "1.0"

    def encoding(self, leaf: str) -> str:
        own = {"niche_genes": self.niche_genes, "niche_counts": self.niche_counts}.get(leaf)
        if own is not None:
            return own
        return self.genes if leaf in GENE_LEAVES else self.counts

    def write(self, table: Any, path: Path) -> Path:
        import pyarrow.parquet as pq

        leaves = [f"{name}.list.element" for name in table.column_names]
        encodings = {f"{n}.list.element": self.encoding(n) for n in table.column_names}
        column_encoding = {k: v for k, v in encodings.items() if v != "RLE_DICTIONARY"}
        dictionary = [k for k, v in encodings.items() if v == "RLE_DICTIONARY"]
        options: dict[str, Any] = {
            "compression": {f"{n}.list.element": self.compression[n] for n in table.column_names},
            "use_dictionary": dictionary,
            "column_encoding": column_encoding,
            "write_statistics": leaves if self.statistics else False,
            "write_page_index": self.page_index,
            "data_page_version": self.page_version,
            "row_group_size": self.row_group_size,
        }
        if self.level is not None:
            options["compression_level"] = dict.fromkeys(leaves, self.level)
        if self.data_page_size is not None:
            options["data_page_size"] = self.data_page_size
        pq.write_table(table, path, **options)
        return path


def chunk_bytes(path: Path, n: int) -> dict[str, float]:
    """Column chunk bytes per sample of each leaf."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    out: dict[str, float] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            chunk = meta.row_group(g).column(c)
            name = chunk.path_in_schema.split(".")[0]
            out[name] = out.get(name, 0.0) + chunk.total_compressed_size / n
    return out


def reader(
    path: Path,
    columns: list[str],
    *,
    batch: int | None = READ_BATCH,
    to_numpy: bool = False,
    options: dict[str, Any] | None = None,
    threads: bool = False,
) -> Callable[[], None]:
    """One pass over every row group of ``path`` as the loader reads it (``batch=None``: ``read_row_group``)."""
    import pyarrow.parquet as pq

    opened = pq.ParquetFile(path, **(options or {"pre_buffer": False, "memory_map": True}))
    groups = range(opened.metadata.num_row_groups)

    def run() -> None:
        for g in groups:
            if batch is None:
                parts = [opened.read_row_group(g, columns=columns, use_threads=threads)]
            else:
                parts = list(opened.iter_batches(batch, [g], columns, use_threads=threads))
            if to_numpy:
                for part in parts:
                    for name in columns:
                        column = part.column(name)
                        array = column.chunk(0) if hasattr(column, "chunk") else column
                        array.offsets.to_numpy().tolist()
                        array.values.to_numpy(zero_copy_only=False)

    return run


def rounds(runs: dict[str, Callable[[], None]], repeat: int) -> dict[str, float]:
    """Median thread CPU seconds of each run over ``repeat`` interleaved rounds (one untimed first)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            start = time.process_time()
            run()
            times[name].append(time.process_time() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def parts(arrays: dict[str, list[npt.NDArray[np.int32]]], work: Path, *, repeat: int) -> dict[str, Any]:
    """The layers of each leaf's read, by difference, in ns per value."""
    n = len(arrays["genes"])
    values = {leaf: sum(len(a) for a in arrays[leaf]) for leaf in LEAVES}
    table = table_of(arrays)
    longest = max(values.values())
    plain_none = dict.fromkeys(LEAVES, "none")
    files = {
        "current": Layout("current").write(table, work / "current.parquet"),
        "encoded, none": Layout("none", compression=plain_none).write(table, work / "enc-none.parquet"),
        "plain, zstd": Layout("plain zstd", genes="PLAIN", counts="PLAIN").write(table, work / "plain-zstd.parquet"),
        "plain, none": Layout("plain", genes="PLAIN", counts="PLAIN", compression=plain_none).write(
            table, work / "plain-none.parquet"
        ),
    }
    import pyarrow.parquet as pq

    for nullable in (False, True):
        pq.write_table(
            table_of(arrays, flat=True, nullable=nullable),
            work / f"flat-{nullable}.parquet",
            compression="none",
            use_dictionary=False,
            row_group_size=256 * 3000,
        )
    runs: dict[str, Callable[[], None]] = {}
    for leaf in LEAVES:
        for name, path in files.items():
            runs[f"{leaf} | {name}"] = reader(path, [leaf])
        # Padded to the longest leaf: read the padded column once, counted per value of it.
        if values[leaf] == longest:
            runs[f"{leaf} | flat int32 required, plain, none"] = reader(
                work / "flat-False.parquet", [leaf], batch=1 << 16
            )
            runs[f"{leaf} | flat int32 nullable, plain, none"] = reader(
                work / "flat-True.parquet", [leaf], batch=1 << 16
            )
        runs[f"{leaf} | current + to numpy"] = reader(files["current"], [leaf], to_numpy=True)
        for batch in (16, 64, 128, None):
            runs[f"{leaf} | current, batch {batch or 'row group'}"] = reader(files["current"], [leaf], batch=batch)
        runs[f"{leaf} | current, pre_buffer"] = reader(
            files["current"], [leaf], options={"pre_buffer": True, "memory_map": True}
        )
        runs[f"{leaf} | current, no memory map, buffer_size 1 MB"] = reader(
            files["current"], [leaf], options={"pre_buffer": False, "memory_map": False, "buffer_size": 1 << 20}
        )
        runs[f"{leaf} | current, no memory map"] = reader(
            files["current"], [leaf], options={"pre_buffer": False, "memory_map": False}
        )
    runs["all four | current"] = reader(files["current"], list(LEAVES))
    runs["all four | current, batch row group"] = reader(files["current"], list(LEAVES), batch=None)
    times = rounds(runs, repeat)
    out: dict[str, Any] = {"values_per_sample": {k: v / n for k, v in values.items()}, "ns_per_value": {}}
    for name, seconds in times.items():
        leaf = name.split(" | ")[0]
        count = sum(values.values()) if leaf == "all four" else values[leaf]
        out["ns_per_value"][name] = 1e9 * seconds / count
    # The fixed cost of a record batch: a leaf of one value per row read at the same batch sizes.
    tiny = table_of({"genes": [a[:1] for a in arrays["genes"]]})
    Layout("tiny").write(tiny, work / "tiny.parquet")
    fixed = rounds(
        {str(b or "row group"): reader(work / "tiny.parquet", ["genes"], batch=b) for b in (16, 32, 64, 128, None)},
        repeat,
    )
    out["us_per_sample_fixed"] = {k: 1e6 * v / n for k, v in fixed.items()}
    return out


def layouts() -> list[Layout]:
    """The variants: each differs from the first (schema 2 as first written, zstd on every leaf) in one way, or two."""
    z = dict.fromkeys(LEAVES, "zstd")
    genes_none = {**z, "genes": "none", "niche_genes": "none"}
    out = [
        Layout("genes delta, counts BSS, all zstd (the writer before 2026-12-03)"),
        Layout("genes delta uncompressed", compression=genes_none),
        Layout("spot genes delta uncompressed (the writer's default)", compression={**z, "genes": "none"}),
        Layout("niche genes delta uncompressed", compression={**z, "niche_genes": "none"}),
        Layout("counts RLE_DICTIONARY", counts="RLE_DICTIONARY"),
        Layout("counts RLE_DICTIONARY, genes uncompressed", counts="RLE_DICTIONARY", compression=genes_none),
        Layout(
            "counts RLE_DICTIONARY uncompressed",
            counts="RLE_DICTIONARY",
            compression={**z, "counts": "none", "niche_counts": "none"},
        ),
        Layout("counts DELTA", counts="DELTA_BINARY_PACKED"),
        Layout("counts PLAIN", counts="PLAIN"),
        Layout("niche counts RLE_DICTIONARY", niche_counts="RLE_DICTIONARY"),
        Layout("spot counts RLE_DICTIONARY", counts="RLE_DICTIONARY", niche_counts="BYTE_STREAM_SPLIT"),
        Layout("zstd level 1", level=1),
        Layout("zstd level 9", level=9),
        Layout("zstd level 19", level=19),
        Layout("lz4_raw everywhere", compression=dict.fromkeys(LEAVES, "lz4")),
        Layout("data pages 64 kB", data_page_size=64 << 10),
        Layout("data pages 256 kB", data_page_size=256 << 10),
        Layout("data pages 4 MB", data_page_size=4 << 20),
        Layout("data pages v2", page_version="2.0"),
        Layout("row groups 64", row_group_size=64),
        Layout("row groups 768", row_group_size=768),
        Layout("statistics on list leaves", statistics=True),
        Layout("page index", page_index=True),
    ]
    return out


def measure_layouts(arrays: dict[str, list[npt.NDArray[np.int32]]], work: Path, *, repeat: int) -> dict[str, Any]:
    """Bytes per sample and read ns per value of each layout, leaf by leaf and all four together."""
    n = len(arrays["genes"])
    values = {leaf: sum(len(a) for a in arrays[leaf]) for leaf in LEAVES}
    table = table_of(arrays)
    paths = {lay.name: lay.write(table, work / f"layout-{i}.parquet") for i, lay in enumerate(layouts())}
    runs: dict[str, Callable[[], None]] = {}
    for name, path in paths.items():
        for leaf in LEAVES:
            runs[f"{name} | {leaf}"] = reader(path, [leaf])
        runs[f"{name} | spot pair"] = reader(path, ["genes", "counts"])
        runs[f"{name} | all four"] = reader(path, list(LEAVES))
    times = rounds(runs, repeat)
    out: dict[str, Any] = {}
    for name, path in paths.items():
        size = chunk_bytes(path, n)
        entry: dict[str, Any] = {
            "bytes": size,
            "spot_kb": (size["genes"] + size["counts"]) / 1e3,
            "niche_kb": (size["niche_genes"] + size["niche_counts"]) / 1e3,
        }
        entry["expression_plus_niche_kb"] = entry["spot_kb"] + entry["niche_kb"]
        entry["ns_per_value"] = {leaf: 1e9 * times[f"{name} | {leaf}"] / values[leaf] for leaf in LEAVES}
        entry["us_per_sample"] = {
            "spot pair": 1e6 * times[f"{name} | spot pair"] / n,
            "all four": 1e6 * times[f"{name} | all four"] / n,
        }
        out[name] = entry
    return out


def fast_reader(path: Path, columns: list[str]) -> Callable[[], None]:
    """One pass over every row group of ``path`` with ``parquet_fast``, offsets to lists as the loader does."""
    import mmap

    import pyarrow.parquet as pq

    from stcorpus.loaders import parquet_fast

    metadata = pq.ParquetFile(path).metadata
    with path.open("rb") as handle:
        buffer = np.frombuffer(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)

    def run() -> None:
        for g in range(metadata.num_row_groups):
            decoded, refused = parquet_fast.read_lists(buffer, 0, metadata, g, columns)
            assert not refused, refused
            for offsets, _ in decoded.values():
                offsets.tolist()

    return run


def measure_fast(arrays: dict[str, list[npt.NDArray[np.int32]]], work: Path, *, repeat: int) -> dict[str, Any]:
    """ns per value of each leaf, us per sample of all four, in the writer's layout: pyarrow and parquet_fast."""
    n = len(arrays["genes"])
    values = {leaf: sum(len(a) for a in arrays[leaf]) for leaf in LEAVES}
    compression = dict.fromkeys(LEAVES, "zstd") | {"genes": "none"}
    path = Layout("writer", compression=compression).write(table_of(arrays), work / "writer.parquet")
    runs: dict[str, Callable[[], None]] = {}
    for leaf in (*LEAVES, "all four"):
        columns = list(LEAVES) if leaf == "all four" else [leaf]
        runs[f"pyarrow | {leaf}"] = reader(path, columns, to_numpy=True)
        runs[f"numba | {leaf}"] = fast_reader(path, columns)
    times = rounds(runs, repeat)
    out: dict[str, Any] = {}
    for name in ("pyarrow", "numba"):
        out[name] = {leaf: 1e9 * times[f"{name} | {leaf}"] / values[leaf] for leaf in LEAVES}
        out[name]["all four us"] = 1e6 * times[f"{name} | all four"] / n
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["parts", "layouts", "fast"], default="layouts")
    parser.add_argument("--samples", type=int, default=768)
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds (median kept)")
    parser.add_argument("--work", type=Path, default=fmt.OUT / "parquet-decode-work")
    args = parser.parse_args(argv)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    arrays = leaf_arrays(args.samples)
    result: dict[str, Any] = {"load_avg_before": os.getloadavg(), "samples": args.samples, "mode": args.mode}
    if args.mode == "parts":
        result["parts"] = parts(arrays, work, repeat=args.repeat)
        for name, ns in result["parts"]["ns_per_value"].items():
            print(f"| {name} | {ns:.2f} |")
        print(json.dumps({k: v for k, v in result["parts"].items() if k != "ns_per_value"}, indent=1))
    elif args.mode == "fast":
        result["fast"] = measure_fast(arrays, work, repeat=args.repeat)
        print("| decoder | " + " | ".join(LEAVES) + " | all four us/sample |")
        print("|---|" + "---:|" * 5)
        for name, e in result["fast"].items():
            print(f"| {name} | " + " | ".join(f"{e[leaf]:.2f}" for leaf in LEAVES) + f" | {e['all four us']:.1f} |")
    else:
        result["layouts"] = measure_layouts(arrays, work, repeat=args.repeat)
        header = ["layout", "spot kB", "niche kB", "total kB", *LEAVES, "spot us", "all us"]
        print("| " + " | ".join(header) + " |")
        print("|---|" + "---:|" * 9)
        for name, e in result["layouts"].items():
            ns = e["ns_per_value"]
            print(
                f"| {name} | {e['spot_kb']:.2f} | {e['niche_kb']:.2f} | {e['expression_plus_niche_kb']:.2f} | "
                + " | ".join(f"{ns[leaf]:.2f}" for leaf in LEAVES)
                + f" | {e['us_per_sample']['spot pair']:.1f} | {e['us_per_sample']['all four']:.1f} |"
            )
    result["load_avg_after"] = os.getloadavg()
    fmt.OUT.mkdir(exist_ok=True)
    (fmt.OUT / f"parquet_decode_{args.mode}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
