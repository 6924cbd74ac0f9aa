"""``curate export CORPUS --slide ID --to FILE.h5ad|.zarr [--with-patches]``: a built slide as AnnData, SpatialData."""

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
    parser.add_argument(
        "--with-patches",
        action="store_true",
        help="also store each sample's H&E patch, decoded to uint8, as obsm['patch'] (n x H x W x 3) "
        "with its um/px in uns['stcorpus']['patch_mpp'] (about 150 kB a sample at 224 px)",
    )


def run(args: argparse.Namespace) -> int:
    """Write the slide and print what was written."""
    from stcorpus.curate.export import export_slide

    adata = export_slide(args.corpus, args.slide, args.to, with_patches=args.with_patches)
    patches = f", patches {'x'.join(map(str, adata.obsm['patch'].shape[1:3]))} px" if args.with_patches else ""
    print(f"{args.to}: {adata.n_obs:,} samples x {adata.n_vars:,} genes of slide {args.slide}{patches}")
    return 0
