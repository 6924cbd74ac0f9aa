"""``curate export CORPUS --slide ID --to FILE.h5ad|FILE.zarr``: a built slide as AnnData or SpatialData."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``curate export``."""
    parser.add_argument("corpus", type=Path, metavar="CORPUS", help="a built corpus folder")
    parser.add_argument("--slide", required=True, metavar="ID", help="slide id (slides.parquet slide_id)")
    parser.add_argument(
        "--to",
        required=True,
        type=Path,
        metavar="FILE",
        help="output file: .h5ad (AnnData) or .zarr (SpatialData, extra stcorpus[spatialdata])",
    )


def run(args: argparse.Namespace) -> int:
    """Write the slide and print what was written."""
    from stcorpus.curate.export import export_slide

    adata = export_slide(args.corpus, args.slide, args.to)
    print(f"{args.to}: {adata.n_obs:,} samples x {adata.n_vars:,} genes of slide {args.slide}")
    return 0
