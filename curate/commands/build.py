"""``curate build MANIFEST... --out DIR``: regenerate a corpus from manifests."""

from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path
from typing import Any


def _csv(value: str) -> frozenset[str]:
    items = frozenset(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _ratios(value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.9,0.05,0.05, not {value!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected train,validation,test ratios, not {value!r}")
    return parts[0], parts[1], parts[2]


def _size(value: str) -> int:
    from stcorpus.curate.errors import SettingsError
    from stcorpus.curate.fetch.budget import parse_size

    try:
        return parse_size(value)
    except SettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _whole(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, not {value!r}")
    return int(value)


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {value!r}")
    return int(value)


#: The build flag behind each tile, QC and gene setting, so a refused value names what the user typed.
_FLAG_OF: dict[str, str] = {
    "patch_size": "--patch-size",
    "patch_mpp": "--patch-mpp",
    "region_size": "--region-size",
    "jpeg_quality": "--jpeg-quality",
    "max_outside_fraction": "--max-outside",  # the tile setting; QC's names --max-spots-outside itself
    "min_tissue_fraction": "--min-tissue",
    "max_upsample": "--max-upsample",
    "max_mpp": "--max-mpp",
    "mpp_tolerance": "--mpp-tolerance",
    "min_mapped_fraction": "--min-mapped-fraction",
}


def _name_flags(message: str) -> str:
    """``message`` with each setting name followed by its flag, e.g. ``patch_size (--patch-size)``."""
    if " --" in message:  # the setting's own message names its flag already
        return message
    for name, flag in _FLAG_OF.items():
        message = re.sub(rf"\b{name}\b(?! \()", f"{name} ({flag})", message)
    return message


def _corpus_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value):
        raise argparse.ArgumentTypeError(
            "expected a plain name (letters, digits, '.', '_', '-'; up to 100, not starting with '.' or '-'), "
            f"not {value!r}"
        )
    return value


def _mirror(value: str) -> tuple[str, Path]:
    prefix, sep, folder = value.rpartition("=")
    if not sep or not prefix or not folder:
        raise argparse.ArgumentTypeError(
            f"expected PREFIX=PATH (e.g. hf://datasets/MahmoodLab/hest/=/data/hest/), not {value!r}"
        )
    return prefix, Path(folder)


class _Removed(argparse.Action):
    """A flag that is gone, with what to do instead."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        parser.error("--release-sources is gone: releasing downloads is the default now (--keep-sources keeps them)")


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """Filters shared by ``build`` and ``plan``."""
    group = parser.add_argument_group("which slides")
    group.add_argument("--technology", type=_csv, help="only these technologies (e.g. spaceranger,hest)")
    group.add_argument("--species", type=_csv, help="only these species (e.g. human)")
    group.add_argument("--organ", type=_csv, help="only these organs (case-insensitive)")
    group.add_argument("--ids", type=_csv, help="only these slide ids")
    group.add_argument(
        "--licence",
        "--license",
        dest="licence",
        type=_csv,
        help="licence allow-list (SPDX ids, e.g. CC-BY-4.0,CC0-1.0): other slides are excluded and counted",
    )
    group.add_argument(
        "--holdout",
        default="default",
        metavar="default|FILE|none",
        help="benchmark slides kept out of train: 'default' (the list shipped with stcorpus: HEST-Benchmark, "
        "DLPFC, HER2ST and their copies), a holdout file, or 'none' (the only way to use none)",
    )
    group.add_argument("--allow-local", action="store_true", help="allow local paths in manifests that do not")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``curate build``."""
    from stcorpus.curate.build.pack import PackSettings
    from stcorpus.curate.build.splits import SplitSettings
    from stcorpus.curate.imaging import DEFAULT_MAX_PIXELS
    from stcorpus.curate.tiles import TileSettings

    tiles, pack, splits = TileSettings(), PackSettings(), SplitSettings()
    parser.add_argument("manifests", nargs="+", metavar="MANIFEST", help="manifest YAML files")
    parser.add_argument("--out", required=True, type=Path, help="the corpus folder to write")
    parser.add_argument(
        "--name",
        type=_corpus_name,
        help="the corpus's name: letters, digits, '.', '_', '-' (default: the --out folder's name)",
    )
    parser.add_argument("--workers", type=int, default=1, help="slides processed in parallel (default 1)")
    parser.add_argument(
        "--on-bad-sample",
        choices=("error", "warn", "skip"),
        default="skip",
        help="a slide that cannot be built: stop the build (error), or quarantine it and go on, logging a "
        "warning (warn) or an info line (skip, the default); quarantined slides are always reported",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a corpus of other manifests that --out holds (without it the build refuses; a corpus of "
        "the same manifests is resumed either way)",
    )
    growth = parser.add_mutually_exclusive_group()
    growth.add_argument(
        "--append",
        action="store_true",
        help="add the slides of MANIFESTS that the corpus in --out does not hold yet as a new generation of shards; "
        "every existing shard stays byte-identical (same build options as the corpus was built with)",
    )
    growth.add_argument(
        "--reshuffle",
        action="store_true",
        help="rebuild every shard of --out in one shuffle over all slides of MANIFESTS (give every manifest the "
        "corpus holds), reusing finished slides: the bytes of a fresh build of those manifests",
    )
    parser.add_argument("--work-dir", type=Path, help="per-slide work folder (default: <out>/.work)")
    parser.add_argument(
        "--release-units",
        action="store_true",
        help="delete each slide's samples from the work folder once packed into shards, so the build's disk stays "
        "bounded (a rerun that repacks, after a changed, added or failed slide or with --reshuffle, then builds "
        "the released slides again; default: kept)",
    )
    parser.add_argument(
        "--work-budget",
        type=_size,
        metavar="SIZE",
        help="most bytes of slide samples the work folder may hold, e.g. 50G or 500M (needs --release-units): a "
        "slide's unit waits until the pack has released enough, counting finished units as measured and running "
        "ones as estimated; the slide the pack needs next always starts, so a budget below what the shuffle "
        "window holds builds one slide at a time",
    )
    parser.add_argument("--cache", type=Path, help="download cache (default: $STCORPUS_CACHE or ~/.cache/stcorpus)")
    group = parser.add_argument_group("downloads")
    group.add_argument(
        "--keep-sources",
        action="store_true",
        help="keep each slide's downloaded inputs in the cache (default: delete them once the slide's unit is "
        "committed, when no other slide still needs the same bytes)",
    )
    group.add_argument("--release-sources", nargs=0, action=_Removed, help=argparse.SUPPRESS)
    group.add_argument(
        "--cache-budget",
        type=_size,
        metavar="SIZE",
        help="most bytes the download cache may hold, e.g. 200G or 500M: a slide's downloads wait for room "
        "(inputs no running slide needs are deleted to make it)",
    )
    group.add_argument(
        "--per-host",
        type=_positive,
        metavar="N",
        help="connections per host at once across all workers sharing --cache, their range reads and the "
        "build's prefetch (default 8; per node where each node has a --cache of its own)",
    )
    group.add_argument(
        "--prefetch",
        type=_whole,
        default=2,
        metavar="N",
        help="download the sources of the next N slides while the running ones compute (default 2; 0: off), "
        "within --per-host and --cache-budget; on Dask only when the workers share --cache (else each fetches its own)",
    )
    group.add_argument(
        "--mirror",
        action="append",
        type=_mirror,
        default=[],
        metavar="PREFIX=PATH",
        help="read sources whose URL starts with PREFIX from the local folder PATH, verified by sha256 where the "
        "manifest or its lock file has one (e.g. hf://datasets/MahmoodLab/hest/=/data/hest/); repeatable",
    )
    parser.add_argument(
        "--no-range-reads",
        action="store_true",
        help="download remote TIFFs whole (default: a pinned http(s)/hf:// TIFF is read by byte range, only the "
        "tiles the build decodes)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_selection_arguments(parser)
    add_executor_arguments(parser)

    group = parser.add_argument_group("tiles")
    group.add_argument("--patch-size", type=int, default=tiles.patch_size, help="patch side in px (default 224)")
    group.add_argument("--patch-mpp", type=float, default=tiles.patch_mpp, help="patch um/px (default 0.5)")
    group.add_argument("--region-size", type=int, default=tiles.region_size, help="region side in px (default 224)")
    group.add_argument("--jpeg-quality", type=int, default=tiles.jpeg_quality, help="JPEG quality (default 90)")
    group.add_argument("--no-regions", action="store_true", help="cut patches only")
    group.add_argument(
        "--max-outside",
        type=float,
        default=tiles.max_outside_fraction,
        help="reject spots whose patch lies more than this fraction outside the image (default 0.5)",
    )
    group.add_argument(
        "--min-tissue",
        type=float,
        default=tiles.min_tissue_fraction,
        help="reject spots whose patch is less than this fraction tissue (default 0.1)",
    )

    group.add_argument(
        "--max-upsample",
        type=float,
        default=tiles.max_upsample,
        help="largest enlargement of an image too coarse for --patch-mpp (default 2; 1: never enlarge)",
    )

    from stcorpus.curate.build.unit import GeneSettings
    from stcorpus.curate.qc import QCSettings

    qc, genes = QCSettings(), GeneSettings()
    group = parser.add_argument_group("quality control")
    group.add_argument(
        "--max-mpp",
        type=float,
        default=qc.max_mpp,
        help=f"coarsest image accepted, in um/px (default {qc.max_mpp:g}: coarser slides are quarantined, as "
        "0.5 um/px tiles from them would be upsampled guesses)",
    )
    group.add_argument(
        "--mpp-tolerance",
        type=float,
        default=qc.mpp_tolerance,
        help=f"largest relative difference between a slide's um/px and its spot lattice's (default "
        f"{qc.mpp_tolerance:g})",
    )
    group.add_argument(
        "--scale-mismatch",
        choices=("flag", "quarantine"),
        default="quarantine" if qc.scale_mismatch_blocking else "flag",
        help="a slide whose um/px and lattice disagree by more than --mpp-tolerance: build it flagged (default) "
        "or quarantine it",
    )
    group.add_argument(
        "--max-spots-outside",
        type=float,
        default=qc.max_outside_fraction,
        help=f"largest fraction of in-tissue spot centres outside the image before a slide is quarantined "
        f"(default {qc.max_outside_fraction:g})",
    )
    group.add_argument(
        "--min-mapped-fraction",
        type=float,
        default=genes.min_mapped_fraction,
        help=f"fewest of a slide's features that must map to genes (default {genes.min_mapped_fraction:g})",
    )

    group = parser.add_argument_group("images")
    group.add_argument(
        "--max-image-pixels",
        type=_positive,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="largest image decoded at once (a PNG/JPEG whole, one tile or strip of a TIFF), in pixels; larger ones "
        f"are refused before decoding as image_too_large (default {DEFAULT_MAX_PIXELS:_}, 1.5 GiB as RGB)",
    )

    group = parser.add_argument_group("shards")
    group.add_argument(
        "--order", choices=("shuffled", "slide"), default=pack.order, help="sample order (default shuffled)"
    )
    group.add_argument(
        "--shuffle-window",
        type=_positive,
        default=pack.window,
        metavar="N",
        help=f"slides each split draws samples from at once in the shuffled order (default {pack.window}): more mixes "
        "better and keeps more slides' samples on disk until packed",
    )
    group.add_argument(
        "--formats",
        default=",".join(pack.formats),
        metavar="parquet|wds|parquet,wds",
        help="the shard formats to write, comma-separated (default parquet,wds: the same samples in both); "
        "--formats parquet writes only the Parquet shards, what the loader reads by default (at real depth ~49 kB "
        "a sample against ~135 kB in the tars: about a quarter of both formats' disk); an --append or a rerun must "
        "give the formats the corpus holds",
    )
    group.add_argument("--samples-per-shard", type=int, default=pack.samples_per_shard, help="(default 10000)")
    group.add_argument(
        "--max-shard-mb", type=float, default=pack.max_shard_bytes / 1024**2, help="shard size cap in MiB (default 768)"
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the sample order and the splits (default 0)")
    group.add_argument(
        "--splits",
        type=_ratios,
        default=(splits.train, splits.validation, splits.test),
        help="train,validation,test ratios of patients/studies (default 0.9,0.05,0.05)",
    )
    group.add_argument(
        "--holdout-policy",
        choices=("test", "exclude"),
        default=splits.holdout,
        help="held-out slides go to test (default) or are left out",
    )


def selection_from(args: argparse.Namespace) -> Any:
    """The ``Selection`` the filter arguments describe."""
    from stcorpus.curate.build.pipeline import Selection

    return Selection(
        technologies=args.technology, species=args.species, organs=args.organ, ids=args.ids, licences=args.licence
    )


def holdout_from(args: argparse.Namespace) -> Any:
    """The holdout list the arguments name (``--holdout``: default, a file, or none)."""
    from stcorpus.curate.build.splits import resolve_holdout

    return resolve_holdout(args.holdout)


def run(args: argparse.Namespace) -> int:
    """Build the corpus and print the summary."""
    from stcorpus.curate.build.pack import PackSettings
    from stcorpus.curate.build.pipeline import BuildSettings, build
    from stcorpus.curate.build.splits import SplitSettings
    from stcorpus.curate.build.unit import GeneSettings, UnitSettings
    from stcorpus.curate.errors import SettingsError
    from stcorpus.curate.fetch import FetchSettings
    from stcorpus.curate.imaging import ImageSettings
    from stcorpus.curate.qc import QCSettings
    from stcorpus.curate.tiles import TileSettings

    try:  # the settings check their values; a refusal names the flag that set the value
        tiles = TileSettings(
            patch_size=args.patch_size,
            patch_mpp=args.patch_mpp,
            region_size=args.region_size,
            jpeg_quality=args.jpeg_quality,
            regions=not args.no_regions,
            max_outside_fraction=args.max_outside,
            min_tissue_fraction=args.min_tissue,
            max_upsample=args.max_upsample,
        )
        qc = QCSettings(
            max_mpp=args.max_mpp,
            mpp_tolerance=args.mpp_tolerance,
            scale_mismatch_blocking=args.scale_mismatch == "quarantine",
            max_outside_fraction=args.max_spots_outside,
        )
        genes = GeneSettings(min_mapped_fraction=args.min_mapped_fraction)
    except SettingsError as exc:
        raise SettingsError(_name_flags(str(exc))) from None
    if not math.isfinite(args.max_shard_mb) or args.max_shard_mb * 1024**2 < 1:
        raise SettingsError(f"--max-shard-mb must be a positive number of MiB, not {args.max_shard_mb}")
    train, validation, test = args.splits
    settings = BuildSettings(
        name=args.name,
        workers=args.workers,
        on_bad_sample=args.on_bad_sample,
        selection=selection_from(args),
        unit=UnitSettings(tiles=tiles, qc=qc, genes=genes, images=ImageSettings(max_pixels=args.max_image_pixels)),
        splits=SplitSettings(
            train=train, validation=validation, test=test, seed=args.seed, holdout=args.holdout_policy
        ),
        pack=PackSettings(
            order=args.order,
            samples_per_shard=args.samples_per_shard,
            max_shard_bytes=int(args.max_shard_mb * 1024**2),
            seed=args.seed,
            window=args.shuffle_window,
            formats=tuple(args.formats.split(",")),
        ),
        holdout=args.holdout,
        work_dir=args.work_dir,
        allow_local=args.allow_local,
        overwrite=args.overwrite,
        append=args.append,
        reshuffle=args.reshuffle,
        release_units=args.release_units,
        work_budget=args.work_budget,
        progress=not args.no_progress,
    )
    fetch = FetchSettings(
        allow_local=args.allow_local,
        keep_sources=args.keep_sources,
        cache_budget=args.cache_budget,
        # Unset, FetchSettings' DEFAULT_HOST_CAP holds: one cap for the whole build, never one per worker.
        **({"host_cap": args.per_host} if args.per_host is not None else {}),
        prefetch=args.prefetch,
        mirrors=tuple(args.mirror),
        progress_every=None if args.no_progress else 10.0,
        range_reads=not args.no_range_reads,
        **({"cache_dir": args.cache} if args.cache else {}),
    )
    with executor_from(args) as executor:
        summary = build(args.manifests, out=args.out, settings=settings, fetch=fetch, executor=executor)
    logging.getLogger(__name__).debug("build finished")
    print(f"curate build: wrote {args.out}")
    for line in summary.lines():
        print(line)
    return summary.exit_code  # 0, or 1 when some slides failed (README: exit codes)


# --- where units run (the Dask executor, issue 10) ---------------------------------------------


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """``--executor``, ``--scheduler``, ``--dask-cluster``."""
    group = parser.add_argument_group(
        "where slides are processed",
        "the pack always runs here; with Dask, --work-dir, --cache and local source paths must be on a "
        "filesystem the workers share",
    )
    group.add_argument(
        "--executor",
        choices=("local", "dask"),
        help="local: a pool of --workers processes on this machine (the default); dask: a Dask cluster "
        "(the default when --scheduler or --dask-cluster is given)",
    )
    group.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler, e.g. tcp://host:8786")
    group.add_argument(
        "--dask-cluster",
        metavar="local|FILE",
        help="start a cluster: 'local' (a LocalCluster of --workers processes, the default with --executor "
        "dask) or a dask-jobqueue cluster file (SLURM/PBS/SGE; see curate/build/slurm-example.yaml)",
    )


def executor_from(args: argparse.Namespace) -> Any:
    """The executor the arguments ask for, as a context manager that releases it."""
    import contextlib

    from stcorpus.curate.build.executors import LocalExecutor
    from stcorpus.curate.errors import SettingsError

    dask_options = args.scheduler is not None or args.dask_cluster is not None
    if args.executor == "local" and dask_options:
        raise SettingsError("--scheduler and --dask-cluster need --executor dask (or no --executor)")
    if args.executor != "dask" and not dask_options:
        return contextlib.nullcontext(LocalExecutor(args.workers))
    from stcorpus.curate.build.dask_executor import open_executor

    executor = open_executor(
        scheduler=args.scheduler,
        cluster=args.dask_cluster,
        workers=args.workers,
        quiet_dask=getattr(args, "verbose", 0) < 2,  # -vv shows Dask's own INFO lines
    )
    print(f"curate build: slides run on {executor.describe()}")  # names the Dask dashboard's address
    return executor
