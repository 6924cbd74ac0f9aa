"""``curate publish``: send a built corpus to a Hugging Face Hub dataset repository or an fsspec URL.

The steps, in order (what flows between them in brackets)::

    scan       [every file to publish, hashed once: size, sha256, git blob id]
    validate   [problems: card, provenance, shard index against the files] -> refuse on any
    compare    [new / changed / unchanged per file, remote-only files] (skipped offline: unknown)
    upload     [bounded commits / batches, shards first, the description files last]

A dry run (the default) stops after ``compare`` and returns the plan; ``upload=True`` sends the
files the plan marks new, changed or unknown. Nothing is sent from a folder that fails
validation, and hidden or temporary paths (the build's ``.work/``, ``*.partial``) never are.

>>> plan = publish(Path("corpora/hest-visium"), HubTarget("my-org/hest-visium"))  # doctest: +SKIP
>>> print("\\n".join(plan.plan.lines(delete=False)))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from stcorpus.curate.errors import CorpusValidationError, PublishError
from stcorpus.curate.publish.fs import INDEX_FILE, FsspecTarget
from stcorpus.curate.publish.hub import HubTarget, offline_requested
from stcorpus.curate.publish.plan import CommitLimits, PlannedFile, PublishPlan, make_plan
from stcorpus.curate.publish.validate import CorpusScan, LocalFile, check_corpus, scan_corpus

Target = HubTarget | FsspecTarget


@dataclass
class PublishResult:
    """What ``publish`` did: the plan, whether it uploaded, and in how many commits (Hub) or batches."""

    plan: PublishPlan
    uploaded: bool = False
    commits: int = 0


def validate_for_publish(
    root: Path, *, hub: bool = False, jobs: int = 4, progress: Callable[[int], None] | None = None
) -> CorpusScan:
    """Scan and validate ``root``; raise :class:`CorpusValidationError` listing every problem."""
    if not root.is_dir():
        raise PublishError(f"{root} is not a folder: give the --out folder of `curate build`")
    scan = scan_corpus(root, jobs=jobs, progress=progress)
    problems = check_corpus(scan, hub=hub)
    if problems:
        raise CorpusValidationError(
            f"{root} cannot be published: {len(problems)} problem(s); nothing was uploaded", problems=problems
        )
    return scan


def name_the_repository(scan: CorpusScan, repo_id: str) -> None:
    """Publish the card with its usage examples naming ``repo_id`` (the folder's own card stays as it is)."""
    from stcorpus import schema
    from stcorpus.curate.build.card import card_for_repo

    card = scan.files.get(schema.CARD_FILE)
    if card is None:
        return
    text = (scan.root / card.path).read_text(encoding="utf-8")
    named = card_for_repo(text, repo_id)
    if named != text:
        scan.files[card.path] = card.with_content(named.encode("utf-8"))


def plan_publish(
    root: Path,
    target: Target,
    *,
    offline: bool = False,
    for_upload: bool = False,
    jobs: int = 4,
    progress: Callable[[int], None] | None = None,
) -> PublishPlan:
    """Validate ``root`` and compare it with ``target`` (not asked when ``offline``: every status unknown).

    An unreachable target raises :class:`TargetUnreachableError` at once (the Hub is probed with
    one request before huggingface_hub's retries could start).
    """
    if isinstance(target, FsspecTarget):
        target.check_source(root)
    scan = validate_for_publish(root, hub=isinstance(target, HubTarget), jobs=jobs, progress=progress)
    if isinstance(target, HubTarget):
        name_the_repository(scan, target.repo_id)
    offline = offline or (isinstance(target, HubTarget) and offline_requested())
    if offline:
        if for_upload:
            raise PublishError("cannot upload offline: drop --offline (and HF_HUB_OFFLINE) to publish")
        return make_plan(
            target.describe(),
            scan.files,
            None,
            unknown_reason="offline (--offline or HF_HUB_OFFLINE): the target was not asked",
            skipped=scan.skipped,
        )
    # An unreachable target raises TargetUnreachableError, in a dry run too: its message says to add
    # --offline, the one way to list what would be sent without contacting the target.
    statuses, remote_only = target.compare(scan.files)
    return make_plan(target.describe(), scan.files, statuses, remote_paths=remote_only, skipped=scan.skipped)


def read_commands(target: Target, plan: PublishPlan) -> list[str]:
    """How to read what ``plan`` publishes to ``target``: a ``datasets`` line and a stcorpus loader line."""
    from stcorpus import schema

    paths = [f.file.path for f in plan.files]
    # A corpus built with --formats wds has no Parquet shards: its lines read the tars.
    wds_only = not any(p.startswith(f"{schema.PARQUET_DIR}/") for p in paths) and any(
        p.startswith(f"{schema.WDS_DIR}/") for p in paths
    )
    shard_dir = schema.WDS_DIR if wds_only else schema.PARQUET_DIR
    splits = sorted(
        {p.split("/")[1] for p in paths if p.startswith(f"{shard_dir}/")},
        key=lambda split: schema.SPLITS.index(split) if split in schema.SPLITS else len(schema.SPLITS),
    )
    fmt = ', format="wds"' if wds_only else ""
    settings = f'LoaderSettings(split="{splits[0] if splits else schema.SPLITS[0]}"{fmt})'
    if isinstance(target, HubTarget):
        revision = f', revision="{target.revision}"' if target.revision != "main" else ""
        at = f"@{target.revision}" if target.revision != "main" else ""
        return [
            f'load_dataset("{target.repo_id}"{revision}, streaming=True)',
            f'CorpusDataset("hf://datasets/{target.repo_id}{at}", {settings})',
        ]
    url = target.url.rstrip("/")
    if target.is_local:
        datasets_line = f'load_dataset("{url.removeprefix("file://")}", streaming=True)'
    else:
        pattern, builder = ("*.tar", "webdataset") if wds_only else ("*.parquet", "parquet")
        files = ", ".join(f'"{split}": "{url}/{shard_dir}/{split}/{pattern}"' for split in splits)
        datasets_line = f'load_dataset("{builder}", data_files={{{files}}}, streaming=True)'
    return [datasets_line, f'CorpusDataset("{url}", {settings})']


def apply_plan(
    root: Path,
    target: Target,
    plan: PublishPlan,
    *,
    delete: bool = False,
    limits: CommitLimits | None = None,
    message: str | None = None,
    on_commit: Callable[[Sequence[PlannedFile]], None] | None = None,
) -> int:
    """Send what ``plan`` (from :func:`plan_publish` on ``target``) marks for upload; return the commits made.

    A plan with unknown statuses (offline, unreachable) is refused: an upload compares first.
    """
    if not plan.remote_known:
        raise PublishError(f"cannot upload without comparing with the target first: {plan.unknown_reason}")
    if not plan.uploads and not (delete and plan.remote_only):
        return 0
    return target.upload(
        root,
        plan,
        delete=delete,
        limits=limits or CommitLimits(),
        message=message or f"Publish {root.resolve().name} with stcorpus",
        on_commit=on_commit,
    )


def publish(
    root: Path,
    target: Target,
    *,
    upload: bool = False,
    delete: bool = False,
    offline: bool = False,
    jobs: int = 4,
    limits: CommitLimits | None = None,
    message: str | None = None,
    progress: Callable[[int], None] | None = None,
    on_commit: Callable[[Sequence[PlannedFile]], None] | None = None,
) -> PublishResult:
    """Publish the corpus folder ``root`` to ``target`` (a dry run unless ``upload``).

    ``delete`` removes files on the target that the corpus no longer has; ``limits`` bounds
    each commit (Hub) or index checkpoint (fsspec); ``on_commit`` is called after each.
    """
    plan = plan_publish(root, target, offline=offline, for_upload=upload, jobs=jobs, progress=progress)
    if not upload:
        return PublishResult(plan=plan)
    commits = apply_plan(root, target, plan, delete=delete, limits=limits, message=message, on_commit=on_commit)
    return PublishResult(plan=plan, uploaded=True, commits=commits)


__all__ = [
    "INDEX_FILE",
    "CommitLimits",
    "CorpusScan",
    "FsspecTarget",
    "HubTarget",
    "LocalFile",
    "PlannedFile",
    "PublishPlan",
    "PublishResult",
    "Target",
    "apply_plan",
    "plan_publish",
    "publish",
    "read_commands",
    "validate_for_publish",
]
