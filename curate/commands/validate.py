"""``curate validate FILE...``: check manifests (and holdout lists) without downloading anything."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``curate validate``."""
    parser.add_argument(
        "manifests",
        nargs="+",
        metavar="FILE",
        help="manifest YAML files; a holdout list among them is checked against the manifests given",
    )
    parser.add_argument("--allow-local", action="store_true", help="allow local paths in manifests that do not")


def _is_holdout(path: Path) -> bool:
    import yaml

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, yaml.YAMLError):  # ValueError: not UTF-8
        return False  # let the manifest loader report it
    return isinstance(document, dict) and "holdout" in document


def run(args: argparse.Namespace) -> int:
    """Validate every file; print one line per file and every problem found; exit 1 on any."""
    from stcorpus.curate.build.splits import load_holdouts
    from stcorpus.curate.errors import ManifestError
    from stcorpus.curate.manifest import Manifest, load_manifest, load_manifests
    from stcorpus.curate.validation import check_manifests

    paths = [Path(p) for p in args.manifests]
    holdout_paths = [p for p in paths if _is_holdout(p)]
    manifest_paths = [p for p in paths if p not in holdout_paths]
    failed = 0
    manifests: list[Manifest] = []
    for path in manifest_paths:
        try:
            manifest = load_manifest(path, allow_local=args.allow_local)
        except ManifestError as exc:
            print(exc, file=sys.stderr)
            failed += 1
            continue
        # The validation `curate plan` and `curate build` run too (curate.validation).
        checked = check_manifests([manifest])
        for problem in [*checked.problems, *checked.missing_local]:
            print(problem, file=sys.stderr)
        if checked.problems or checked.missing_local:
            failed += 1
            continue
        manifests.append(manifest)
        by_tech = Counter(s.technology for s in manifest.samples)
        summary = ", ".join(f"{n} {t}" for t, n in sorted(by_tech.items()))
        print(f"{path}: ok: {len(manifest.samples)} samples in {len(manifest.studies)} studies ({summary})")
        note = checked.no_reader_line()
        if note:
            print(f"{path}: note: {note}")
    if failed == 0 and len(manifest_paths) > 1:
        try:
            load_manifests(manifest_paths, allow_local=args.allow_local)
        except ManifestError as exc:
            print(exc, file=sys.stderr)
            failed += 1
    known = {s.id for m in manifests for s in m.samples}
    for path in holdout_paths:
        try:
            holdouts = load_holdouts(path)
        except ManifestError as exc:
            print(exc, file=sys.stderr)
            failed += 1
            continue
        unknown = sorted(set(holdouts) - known) if manifest_paths else []
        if unknown:
            print(
                f"{path}: {len(unknown)} held-out id(s) are in none of the manifests given: {', '.join(unknown[:10])}"
                + (" ..." if len(unknown) > 10 else ""),
                file=sys.stderr,
            )
            failed += 1
            continue
        against = " (every id is in the manifests given)" if manifest_paths else ""
        print(f"{path}: ok: holdout list of {len(holdouts)} slides{against}")
    return 1 if failed else 0
