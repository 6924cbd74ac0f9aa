"""``curate validate MANIFEST...``: check manifests without downloading anything."""

from __future__ import annotations

import argparse
import sys
from collections import Counter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``curate validate``."""
    parser.add_argument("manifests", nargs="+", metavar="MANIFEST", help="manifest YAML files")


def run(args: argparse.Namespace) -> int:
    """Validate every manifest; print one line per manifest, every problem found, exit 1 on any."""
    from curate.errors import ManifestError
    from curate.manifest import load_manifest, load_manifests
    from curate.readers import check_sample

    failed = 0
    for path in args.manifests:
        try:
            manifest = load_manifest(path)
        except ManifestError as exc:
            print(exc, file=sys.stderr)
            failed += 1
            continue
        problems = [p for sample in manifest.samples for p in check_sample(sample)]
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            failed += 1
            continue
        by_tech = Counter(s.technology for s in manifest.samples)
        summary = ", ".join(f"{n} {t}" for t, n in sorted(by_tech.items()))
        print(f"{path}: ok: {len(manifest.samples)} samples in {len(manifest.studies)} studies ({summary})")
    if failed == 0 and len(args.manifests) > 1:
        try:
            load_manifests(args.manifests)
        except ManifestError as exc:
            print(exc, file=sys.stderr)
            return 1
    return 1 if failed else 0
