"""The ``curate`` command line: ``curate <command> ...``.

Each command is a module in :mod:`stcorpus.curate.commands` with ``add_arguments(parser)`` and
``run(args) -> int``; those modules import only argparse at the top, so ``curate --help``
stays fast and heavy libraries load only for the command that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from stcorpus.curate.errors import CurateError

#: (command, module under curate.commands, one-line help), in the order ``--help`` lists them.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("validate", "validate", "check manifests without downloading anything"),
    ("fetch", "fetch", "download the manifests' sources into the cache and pin them in lock files"),
    ("plan", "plan", "what a build would fetch and make: totals, licences, duplicate candidates (no download)"),
    ("build", "build", "build a corpus (WebDataset + Parquet shards, card, QC report) from manifests"),
    ("export", "export", "write one slide of a built corpus as an AnnData .h5ad file"),
    ("publish", "publish", "upload a built corpus to a Hub dataset repository or an fsspec URL (dry run by default)"),
)


def _command_module(module: str) -> ModuleType:
    return importlib.import_module(f"stcorpus.curate.commands.{module}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``curate`` with every command."""
    from stcorpus.curate import __version__

    parser = argparse.ArgumentParser(
        prog="curate",
        description="Build harmonised (H&E tile, gene expression) corpora from spatial transcriptomics studies.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module, help_text in COMMANDS:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _command_module(module).add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curate`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        code: int = _command_module(args._module).run(args)
    except CurateError as exc:
        print(f"curate {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder or file of the command itself (--out, --work-dir, ...), not of one slide
        where = f"{exc.filename}: " if exc.filename else ""
        print(
            f"curate {args.command}: error: {where}{exc.strerror or exc}; check that the path given exists and is "
            "writable",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"curate {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
