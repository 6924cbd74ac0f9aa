"""A publish plan: each local file against the target (new / changed / unchanged / unknown), in upload order.

Upload order keeps a live target consistent: shards first, the QC report and other files next,
and the files that *describe* the shards (``genes.parquet``, ``slides.parquet``,
``shards.parquet``, ``corpus.json``, ``README.md``) last, together, with any deletions. A reader
who loads the target mid-publish sees the previous card pointing at shards that are all still
there; the new card appears only once every shard it names is in place.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from stcorpus import schema
from stcorpus.curate.errors import SettingsError
from stcorpus.curate.publish.validate import LocalFile

Status = Literal["new", "changed", "unchanged", "unknown"]
STATUSES: Final[tuple[Status, ...]] = ("new", "changed", "unknown", "unchanged")

#: Files describing the shards: uploaded last, in one commit, in this order.
DESCRIPTION_FILES: Final = (
    schema.GENES_FILE,
    schema.SLIDES_FILE,
    schema.SHARDS_FILE,
    schema.CORPUS_FILE,
    schema.CARD_FILE,
)


def upload_rank(path: str) -> tuple[int, int, str]:
    """Sort key of the upload order (see the module docstring)."""
    top = path.split("/", 1)[0]
    if top in (schema.WDS_DIR, schema.PARQUET_DIR) and "/" in path:
        return (0, 0, path)
    if path in DESCRIPTION_FILES:
        return (2, DESCRIPTION_FILES.index(path), path)
    return (1, 0, path)


def is_description(path: str) -> bool:
    """True for the files uploaded in the final commit."""
    return upload_rank(path)[0] == 2


@dataclass(frozen=True)
class PlannedFile:
    """One local file and what the target holds under its path."""

    file: LocalFile
    status: Status

    @property
    def uploads(self) -> bool:
        """Whether a publish sends this file (unknown status is sent: better twice than stale)."""
        return self.status != "unchanged"


@dataclass
class PublishPlan:
    """What a publish does to a target, file by file."""

    target: str  # the target, for people
    files: list[PlannedFile]  # in upload order
    remote_only: list[str] = field(default_factory=list)  # on the target, not in the corpus
    remote_known: bool = True  # False: the target was not asked (offline) or not reachable
    unknown_reason: str = ""
    skipped: list[str] = field(default_factory=list)  # hidden/temporary local paths, never sent

    @property
    def uploads(self) -> list[PlannedFile]:
        """Files a publish sends, in upload order."""
        return [f for f in self.files if f.uploads]

    def count(self, status: Status) -> tuple[int, int]:
        """Files and bytes with ``status``."""
        chosen = [f.file.size for f in self.files if f.status == status]
        return len(chosen), sum(chosen)

    def lines(self, *, delete: bool) -> list[str]:
        """Every file (path, size, status) and the totals, as printed by ``curate publish``."""
        width = max((len(f"{f.file.size:,}") for f in self.files), default=1)
        lines = [f"  {f.status:<9} {f.file.size:>{width},}  {f.file.path}" for f in self.files]
        verb = "delete" if delete else "keep"
        lines += [f"  {'remote':<9} {'':>{width}}  {path}  (not in the corpus: {verb})" for path in self.remote_only]
        total = sum(f.file.size for f in self.files)
        sending = self.uploads
        lines.append(
            f"{len(self.files):,} files, {_human(total)}; to upload: {len(sending):,} files, "
            f"{_human(sum(f.file.size for f in sending))} ("
            + ", ".join(f"{s} {self.count(s)[0]:,}" for s in STATUSES if self.count(s)[0])
            + ")"
        )
        if not self.remote_known:
            lines.append(f"changed/unchanged status unknown: {self.unknown_reason}")
        if self.remote_only:
            lines.append(
                f"{len(self.remote_only):,} file(s) on the target are not in the corpus: "
                + ("deleted by this publish" if delete else "kept (--delete removes them)")
            )
        if self.skipped:
            lines.append(
                f"never published (hidden or temporary): {', '.join(self.skipped[:5])}"
                + (f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else "")
            )
        return lines


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1000
    return f"{size:,.1f} TB"


@dataclass(frozen=True)
class CommitLimits:
    """Bounds of one commit (Hub) or one index checkpoint (fsspec).

    Bounded commits keep each one well inside the Hub's limits and timeouts, and bound what an
    interruption can lose: every finished commit stays, and a re-run sends only the rest.
    """

    max_files: int = 200  # huggingface_hub's own pipeline starts at 200 files per commit
    max_bytes: int = 16 << 30

    def __post_init__(self) -> None:
        if self.max_files < 1 or self.max_bytes < 1:
            raise SettingsError(f"commit limits must be >= 1 (max_files={self.max_files}, max_bytes={self.max_bytes})")


def batches(files: Sequence[PlannedFile], *, limits: CommitLimits) -> Iterator[list[PlannedFile]]:
    """Files to upload in commits: shards and other data in bounded batches, then the description files together."""
    data = [f for f in files if f.uploads and not is_description(f.file.path)]
    batch: list[PlannedFile] = []
    size = 0
    for item in data:
        if batch and (len(batch) >= limits.max_files or size + item.file.size > limits.max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item.file.size
    if batch:
        yield batch
    description = [f for f in files if f.uploads and is_description(f.file.path)]
    if description:
        yield description


def make_plan(
    target: str,
    local: Mapping[str, LocalFile],
    statuses: Mapping[str, Status] | None,
    *,
    remote_paths: Sequence[str] = (),
    unknown_reason: str = "",
    skipped: Sequence[str] = (),
) -> PublishPlan:
    """The plan for ``local`` given each file's status on the target (None: the target was not asked)."""
    ordered = sorted(local.values(), key=lambda f: upload_rank(f.path))
    if statuses is None:
        files = [PlannedFile(f, "unknown") for f in ordered]
        return PublishPlan(target, files, remote_known=False, unknown_reason=unknown_reason, skipped=list(skipped))
    files = [PlannedFile(f, statuses.get(f.path, "new")) for f in ordered]
    remote_only = sorted(p for p in remote_paths if p not in local)
    return PublishPlan(target, files, remote_only=remote_only, skipped=list(skipped))
