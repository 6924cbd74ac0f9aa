"""Where the loader's worker time goes per sample (issue 16): cProfile of one epoch at 3,000 genes.

Builds bench/format.py's 3,000-gene corpus (same generator, same writer) and profiles one in-process
epoch of the loader for Parquet and tar, with and without niche, sparse output, log1p.

    .venv/bin/python -m bench.profile_loader --samples 512
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import numpy as np

from bench import format as fmt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--work", type=Path, default=fmt.OUT / "profile-work")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    symbols, c2_counts, _ = fmt.read_c2(fmt.C2_DEFAULT)
    vocab, columns = fmt.vocabulary(symbols)
    detected = (c2_counts > 0).mean(axis=0)
    frequency = np.full(len(vocab), 1e-3)
    mapped = columns >= 0
    frequency[columns[mapped]] = np.maximum(detected[mapped], 1e-3)
    values = c2_counts[c2_counts > 0]
    spots = fmt.synthetic_profile(3000, args.samples, frequency=frequency, values=values, seed=0)
    samples = fmt.samples_of(spots, fmt.Crops(), n=args.samples)
    root = fmt.write_corpus(args.work / "3000-after", samples, vocab, variant="after")
    for form in ("parquet", "wds"):
        for niche in (False, True):
            run = fmt.loader_run(root, form, batch=args.batch, genes={"transform": "log1p", "niche": niche})
            run()
            profile = cProfile.Profile()
            profile.enable()
            count = run()
            profile.disable()
            print(f"\n## {form}{' + niche' if niche else ''}: {count} samples", flush=True)
            pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
