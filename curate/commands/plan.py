"""``curate plan MANIFEST...``: what a build would fetch and make, without downloading anything."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``curate plan`` (the build's selection options, plus what to list)."""
    from stcorpus.curate.commands.build import add_selection_arguments

    parser.add_argument("manifests", nargs="+", metavar="MANIFEST", help="manifest YAML files")
    add_selection_arguments(parser)
    parser.add_argument(
        "--holdout-policy",
        choices=("test", "exclude"),
        default="test",
        help="held-out slides go to test or are left out",
    )
    parser.add_argument("--list", action="store_true", help="list every slide with its sources and sizes")
    parser.add_argument(
        "--candidates", type=int, default=20, metavar="N", help="show N duplicate candidate pairs (default 20; -1: all)"
    )


def run(args: argparse.Namespace) -> int:
    """Print the plan (the one ``curate build`` would run: same validation, filters, holdout list)."""
    from stcorpus.curate.build.splits import SplitSettings, resolve_holdout
    from stcorpus.curate.commands.build import selection_from
    from stcorpus.curate.manifest import load_manifests
    from stcorpus.curate.plan import make_plan

    manifests = load_manifests(args.manifests, allow_local=args.allow_local)
    selection = selection_from(args)
    plan = make_plan(
        manifests,
        selection=selection,
        splits=SplitSettings(holdout=args.holdout_policy),
        holdout=resolve_holdout(args.holdout),
    )
    for manifest in manifests:
        chosen = [s for s in manifest.samples if selection.matches(s)]
        print(f"{manifest.path}: {len(chosen):,} of {len(manifest.samples):,} slides selected")
    for line in plan.lines():
        print(line)
    shown = plan.candidates if args.candidates < 0 else plan.candidates[: args.candidates]
    for candidate in shown:
        print(f"  {candidate.first} ~ {candidate.second}: {candidate.rule}: {candidate.detail}")
    if len(shown) < len(plan.candidates):
        print(f"  ... {len(plan.candidates) - len(shown):,} more (--candidates -1 lists all)")
    if args.list:
        for sample in plan.samples:
            status = plan.excluded.get(sample.id) or (
                "held out: " + plan.held_out[sample.id] if sample.id in plan.held_out else "build"
            )
            print(f"{sample.id}\t{sample.technology}\t{sample.species}\t{sample.licence}\t{status}")
            for name, source in sorted(sample.sources.items()):
                size = f"{source.size:,} B" if source.size is not None else "size unknown"
                print(f"    {name}: {source.url} ({size})")
    return 0
