"""``curate publish DIR --repo <org>/<name> | --to URL``: send a built corpus to the Hub or an fsspec target.

A dry run unless ``--yes``: every file is listed with its size and status (new, changed,
unchanged, or unknown when the target is not asked), then the totals, then the commands that
read the corpus from the target. With ``--repo`` the card is sent with its usage examples
naming the repository (the folder's own card is left as it is). ``--offline``: a dry run that
does not contact the target at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``curate publish``."""
    parser.add_argument("corpus", type=Path, metavar="DIR", help="the corpus folder (the --out of `curate build`)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo", metavar="ORG/NAME", help="a Hugging Face Hub dataset repository")
    where.add_argument("--to", metavar="URL", help="an fsspec URL or local folder (file://, s3://, /data/corpus)")
    parser.add_argument("--revision", default="main", help="Hub branch to commit to (default main)")
    parser.add_argument("--yes", action="store_true", help="upload for real (without it: a dry run that lists files)")
    parser.add_argument(
        "--delete", action="store_true", help="delete files on the target that the corpus no longer has"
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="do not contact the target: list what would be sent, status unknown (dry run only)",
    )
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private if it is new")
    parser.add_argument("--jobs", type=int, default=4, help="files hashed in parallel (default 4)")
    parser.add_argument(
        "--max-files-per-commit", type=int, default=200, help="files per Hub commit / index checkpoint (default 200)"
    )
    parser.add_argument(
        "--max-commit-gb", type=float, default=16.0, help="bytes per Hub commit / index checkpoint, in GiB (default 16)"
    )
    parser.add_argument("--message", help="Hub commit message (default: 'Publish <name> with stcorpus')")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while hashing")


def _target(args: argparse.Namespace) -> Any:
    from stcorpus.curate.publish import FsspecTarget, HubTarget

    if args.repo:
        return HubTarget(args.repo, revision=args.revision, private=True if args.private else None)
    return FsspecTarget(args.to)


def run(args: argparse.Namespace) -> int:
    """Validate, compare, print the plan; upload with ``--yes``. Exit 1 when the corpus fails validation."""
    from stcorpus.curate.errors import CorpusValidationError, SettingsError
    from stcorpus.curate.publish import CommitLimits, apply_plan, plan_publish

    if args.yes and args.offline:
        raise SettingsError("--yes uploads and --offline forbids contacting the target: choose one")
    if args.jobs < 1:
        raise SettingsError(f"--jobs must be >= 1, not {args.jobs}")
    limits = CommitLimits(max_files=args.max_files_per_commit, max_bytes=int(args.max_commit_gb * (1 << 30)))
    _one_line_per_hub_warning()
    target = _target(args)
    progress = None if args.no_progress else _Progress(str(args.corpus))
    print(f"publish {args.corpus} -> {target.describe()}" + ("" if args.yes else " (dry run)"))
    try:
        plan = plan_publish(
            args.corpus, target, offline=args.offline, for_upload=args.yes, jobs=args.jobs, progress=progress
        )
    except CorpusValidationError as exc:
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        print(f"curate publish: {exc}", file=sys.stderr)
        return 1
    finally:
        if progress is not None:
            progress.close()
    for line in plan.lines(delete=args.delete):
        print(line)
    if not args.yes:
        print("dry run: nothing was uploaded; add --yes to upload")
        _print_read_commands(target, plan, published=False)
        return 0
    commits = apply_plan(
        args.corpus, target, plan, delete=args.delete, limits=limits, message=args.message, on_commit=_CommitLog()
    )
    if commits:
        what = "commit(s)" if args.repo else "batch(es)"
        print(f"uploaded {len(plan.uploads):,} file(s) to {target.describe()} in {commits} {what}")
    else:
        print(f"{target.describe()} is up to date: nothing to upload")
    _print_read_commands(target, plan, published=True)
    return 0


def _print_read_commands(target: Any, plan: Any, *, published: bool) -> None:
    """The lines that read the published corpus (``datasets`` and the stcorpus loader)."""
    from stcorpus.curate.publish import read_commands

    datasets_line, loader_line = read_commands(target, plan)
    print("read it with:" if published else "once uploaded, read it with:")
    print(f">>> from datasets import load_dataset; ds = {datasets_line}")
    print(f">>> from stcorpus.loaders import CorpusDataset, LoaderSettings; dataset = {loader_line}")


def _one_line_per_hub_warning() -> None:
    """Print each huggingface_hub warning once: it adds its own handler to its logger *and* lets its
    records reach the root logger, whose handler ``curate`` configures, so every warning came twice."""
    import logging

    import huggingface_hub.utils.logging  # noqa: F401 - adds its handler to its logger on import

    if not logging.getLogger().handlers:
        return
    hub_logger = logging.getLogger("huggingface_hub")
    for handler in list(hub_logger.handlers):
        if type(handler) is logging.StreamHandler:
            hub_logger.removeHandler(handler)


class _Progress:
    """A byte progress bar over hashing (quiet when stderr is not a terminal)."""

    def __init__(self, label: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(unit="B", unit_scale=True, desc=f"hashing {label}", disable=None, leave=False)

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class _CommitLog:
    """Prints one line per finished commit (a re-run after an interruption starts after the last one)."""

    def __init__(self) -> None:
        self.done = 0

    def __call__(self, group: Any) -> None:
        self.done += 1
        size = sum(item.file.size for item in group)
        print(f"  committed {len(group):,} file(s), {size / 1e6:,.1f} MB", flush=True)
