"""Benchmark: training samples/s fed by the streaming corpus loader vs in-memory synthetic tensors.

The same model, optimiser and batch run twice through ``stcorpus.training.pretrain.train``:

- ``corpus``: ``data.source=corpus``, the torch corpus loader reading a built corpus (folder,
  ``http(s)://`` URL or ``hf://`` repository) with the config's workers, decode and gene transform;
- ``synthetic``: ``data.source=synthetic`` with ``on_device=true``: batches gathered from tensors
  already on the training device, of the corpus's shapes (tile size, G, token length). Nothing
  is read, decoded or copied: the upper bound the loader is held to.

Each run trains ``--warmup + --steps`` steps and stops (no evaluation, one checkpoint at the
end, outside the timed intervals); samples/s and the data-wait fraction (time blocked on the
next batch / wall time) are taken over the ``--steps`` after the warm-up, from the run's own log
records; each source runs ``--repeat`` times, interleaved, and its best run is kept. The goal
is corpus >= 95% of synthetic **on a GPU** (``--config corpus-gpu``), where the model is slow
enough that workers on other cores keep up; on a small CPU the tiny CPU model competes with
JPEG decoding for the same cores, so the CPU ratio says little about the GPU one.

Usage::

    .venv/bin/python -m bench.train_throughput                      # corpus-cpu on a fixture corpus
    .venv/bin/python -m bench.train_throughput --corpus demo-corpus --steps 60
    torchrun --nproc_per_node 1 -m bench.train_throughput --config corpus-gpu --corpus hf://datasets/org/name

Without ``--corpus`` a corpus is written to ``bench/out/train-corpus`` from the loader's test
fixture (``tests/corpus_fixture.py``: real counts and real H&E crops, ``--repeats`` copies).
Writes ``bench/out/train_throughput.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def make_corpus(root: Path, *, repeats: int) -> Path:
    """The loader's fixture corpus, ``repeats`` copies (94 training samples each), unless already there."""
    if (root / "corpus.json").is_file():
        return root
    from tests.corpus_fixture import write_corpus

    write_corpus(root, samples_per_shard=256, row_group_size=64, repeats=repeats)
    return root


def measured(records: list[dict[str, Any]], *, warmup: int) -> dict[str, float]:
    """samples/s, data-wait fraction and seconds per step over the log intervals after ``warmup`` steps."""
    timed = [r for r in records if r["kind"] == "train" and r["step"] - r["interval_steps"] >= warmup]
    if not timed:
        raise SystemExit(f"no log interval after the {warmup} warm-up steps: raise --steps")
    seconds = sum(r["interval_s"] for r in timed)
    samples = sum(r["interval_samples"] for r in timed)
    waited = sum(r["data_wait_frac"] * r["interval_s"] for r in timed)
    steps = sum(r["interval_steps"] for r in timed)
    return {
        "samples_per_s": samples / seconds,
        "data_wait_frac": waited / seconds,
        "s_per_step": seconds / steps,
        "steps": float(steps),
        "samples": float(samples),
    }


def run(overrides: list[str], *, config: str, out: Path, warmup: int, steps: int, interval: int) -> dict[str, float]:
    """Train ``warmup + steps`` steps with ``overrides`` and measure the steps after the warm-up."""
    from stcorpus.training.config import load_config
    from stcorpus.training.pretrain import train

    total = warmup + steps
    cfg = load_config(
        config,
        overrides=[
            f"run.out_dir={out}",
            f"run.log_every={interval}",
            "run.ckpt_every=0",
            "eval.every=0",
            f"optim.max_steps={total + 1}",  # stop_at below: no final evaluation
            f"optim.warmup_steps={min(warmup, total)}",
            *overrides,
        ],
    )
    train(cfg, stop_at=total)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return measured(records, warmup=warmup)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="corpus-cpu", help="a corpus config (corpus-cpu, corpus-gpu, a file)")
    parser.add_argument("--corpus", default=None, help="corpus folder / URL / hf:// (default: a fixture corpus)")
    parser.add_argument("--repeats", type=int, default=8, help="fixture copies when --corpus is not given")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the measurement")
    parser.add_argument("--steps", type=int, default=40, help="steps measured")
    parser.add_argument("--interval", type=int, default=10, help="log interval (steps); divides --warmup")
    parser.add_argument("--repeat", type=int, default=3, help="runs per source, interleaved; the best is kept")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=OUT / "train_throughput.json")
    args = parser.parse_args(argv)
    if args.warmup % args.interval:
        parser.error("--interval must divide --warmup (the warm-up is dropped by whole log intervals)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from stcorpus.training.config import load_config
    from stcorpus.training.data import build_run_data

    corpus = args.corpus or str(make_corpus(OUT / "train-corpus", repeats=args.repeats))
    base = [f"data.corpus={corpus}", *args.overrides]
    # The corpus's shapes, so that the synthetic bank matches them exactly.
    cfg = load_config(args.config, overrides=["data.source=corpus", *base])
    data = build_run_data(cfg, rank=0, world_size=1)
    batch = cfg.data.batch_size
    synthetic = [
        "data.source=synthetic",
        "data.synthetic.on_device=true",
        f"data.synthetic.image_size={data.image_size}",
        f"data.synthetic.n_genes={data.n_genes}",
        f"data.synthetic.max_tokens={data.max_tokens}",
        "data.synthetic.n_slides=3",
        "data.synthetic.val_slides=1",
        f"data.synthetic.spots_per_slide={2 * batch}",  # 2 slides x 2 batches: batches cycle in memory
    ]
    del data
    runs: dict[str, list[dict[str, float]]] = {"corpus": [], "synthetic": []}
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        for attempt in range(args.repeat):  # interleaved, so that a busy spell hits both alike
            for name, extra in (("corpus", ["data.source=corpus"]), ("synthetic", synthetic)):
                out = Path(tmp) / f"{name}-{attempt}"
                measure = run(
                    [*base, *extra],
                    config=args.config,
                    out=out,
                    warmup=args.warmup,
                    steps=args.steps,
                    interval=args.interval,
                )
                runs[name].append(measure)
    results = {name: max(found, key=lambda r: r["samples_per_s"]) for name, found in runs.items()}
    ratio = results["corpus"]["samples_per_s"] / results["synthetic"]["samples_per_s"]
    device = torch.cuda.get_device_name() if cfg.run.device != "cpu" and torch.cuda.is_available() else "cpu"
    report = {
        "config": args.config,
        "corpus": corpus,
        "batch_size": batch,
        "workers": cfg.data.num_workers,
        "image": cfg.model.image.name,
        "device": device,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "torch": str(torch.__version__),
        "warmup_steps": args.warmup,
        "overrides": args.overrides,
        "results": results,
        "runs": runs,
        "ratio": ratio,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.config} on {device}, batch {batch}, {cfg.data.num_workers} workers, corpus {corpus}\n")
    print("| source | samples/s | data wait | s/step | steps |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['samples_per_s']:.1f} | {100 * r['data_wait_frac']:.1f}% | {r['s_per_step']:.3f} | "
            f"{int(r['steps'])} |"
        )
    print(f"\ncorpus / synthetic: {100 * ratio:.1f}% (goal on a GPU: >= 95%)")
    return report


if __name__ == "__main__":
    main()
