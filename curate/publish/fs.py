"""Publishing to an fsspec URL: a local folder, ``file://``, ``s3://``, ``gs://``, ...

The target keeps a small index, ``.stcorpus-publish.json``, of the size and sha256 of every
file a publish wrote, rewritten after each bounded batch and at the end. A re-publish compares
the corpus with it (and with the sizes the target lists): a file whose index entry and remote
size match the local file is unchanged and not copied. A file on the target with no index
entry is read back and hashed where that is cheap (a local filesystem); elsewhere it is copied
again, as its content cannot be known without downloading it.

Copies to a local filesystem go to a hidden ``.<name>.partial`` beside the destination and
are renamed into place, so a file under its final name is always complete; object stores
write an object atomically on their own. The index is hidden too (``datasets`` and the
corpus scan both skip dot files).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final

from stcorpus.curate.errors import TIMEOUT_ERRORS, PublishError, TargetUnreachableError
from stcorpus.curate.publish.plan import CommitLimits, PlannedFile, PublishPlan, Status, batches
from stcorpus.curate.publish.validate import LocalFile, check_unchanged, hash_file, is_skipped

#: What a target or scheduler that cannot be reached raises.
_UNREACHABLE: tuple[type[BaseException], ...] = (OSError, *TIMEOUT_ERRORS)

log = logging.getLogger(__name__)

INDEX_FILE: Final = ".stcorpus-publish.json"
INDEX_FORMAT: Final = "stcorpus-publish/1"


@dataclass
class FsspecTarget:
    """A folder named by an fsspec URL or a local path."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    _fs: Any = field(default=None, init=False, repr=False)
    _base: str = field(default="", init=False, repr=False)
    _index: dict[str, dict[str, Any]] = field(default_factory=dict, init=False, repr=False)
    _read_back: dict[str, str] = field(default_factory=dict, init=False, repr=False)  # path -> sha256

    def __post_init__(self) -> None:
        from fsspec.core import url_to_fs

        try:
            self._fs, base = url_to_fs(self.url, **self.storage_options)
        except (ValueError, ImportError) as exc:
            raise PublishError(
                f"--to {self.url!r}: no filesystem for it ({exc}); install the fsspec backend (e.g. s3fs for s3://)"
            ) from exc
        self._base = str(base).rstrip("/") or "/"

    @property
    def is_local(self) -> bool:
        """True for a local filesystem (where reading files back is cheap and renames are atomic)."""
        protocol = self._fs.protocol
        return "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))

    def describe(self) -> str:
        """The target as the user named it."""
        return self.url

    def check_source(self, root: Path) -> None:
        """Refuse to publish a corpus into itself (the scan would then pick the copy up)."""
        if not self.is_local:
            return
        target, source = Path(self._base).resolve(), root.resolve()
        if target == source or source in target.parents:
            raise PublishError(f"--to {self.url} is the corpus folder {root} or inside it: choose another folder")

    def _remote(self, relative: str) -> str:
        return f"{self._base}/{relative}" if self._base != "/" else f"/{relative}"

    # --- comparison ----------------------------------------------------------------------------

    def _listing(self) -> dict[str, int]:
        try:
            if not self._fs.exists(self._base):
                return {}
            found = self._fs.find(self._base, detail=True, withdirs=False)
        except _UNREACHABLE as exc:
            raise TargetUnreachableError(f"cannot list {self.url}: {exc}") from exc
        prefix = self._base.rstrip("/") + "/"
        out = {}
        for name, info in found.items():
            name = str(name)
            if name.startswith(prefix):
                out[name[len(prefix) :]] = int(info.get("size") or 0)
        return out

    def _read_index(self) -> dict[str, dict[str, Any]]:
        path = self._remote(INDEX_FILE)
        try:
            if not self._fs.exists(path):
                return {}
            document = json.loads(self._fs.cat_file(path))
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable publish index (%s): every file is compared by reading it back", path, exc)
            return {}
        if not isinstance(document, dict) or document.get("format") != INDEX_FORMAT:
            log.warning("%s is not a %s index: ignored", path, INDEX_FORMAT)
            return {}
        files = document.get("files")
        return {str(k): dict(v) for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}

    def compare(self, local: Mapping[str, LocalFile]) -> tuple[dict[str, Status], list[str]]:
        """Each local file's status and the remote-only paths."""
        listing = self._listing()
        self._index = self._read_index()
        statuses: dict[str, Status] = {}
        for path, file in local.items():
            size = listing.get(path)
            entry = self._index.get(path)
            if size is None:
                statuses[path] = "new"
            elif size != file.size:
                statuses[path] = "changed"
            elif entry is not None:
                same = entry.get("sha256") == file.sha256 and entry.get("size") == file.size
                statuses[path] = "unchanged" if same else "changed"
            elif self.is_local:
                sha256, _ = hash_file(Path(self._remote(path)))
                self._read_back[path] = sha256
                statuses[path] = "unchanged" if sha256 == file.sha256 else "changed"
            else:
                statuses[path] = "changed"  # same size, content unknown without downloading it
        # Hidden files at the target (the index, a .git folder, partial copies) are not the corpus's.
        remote_only = sorted(p for p in listing if p not in local and not is_skipped(PurePosixPath(p)))
        return statuses, remote_only

    # --- upload --------------------------------------------------------------------------------

    def _write_index(self, files: Mapping[str, Mapping[str, Any]]) -> None:
        from stcorpus.curate import __version__

        document = {
            "format": INDEX_FORMAT,
            "tool_version": __version__,
            "files": {path: dict(files[path]) for path in sorted(files)},
        }
        data = (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()
        self._put_bytes(INDEX_FILE, data)

    def _put_bytes(self, relative: str, data: bytes) -> None:
        destination = self._remote(relative)
        if self.is_local:
            tmp = self._tmp_name(destination)
            self._fs.pipe_file(tmp, data)
            self._fs.mv(tmp, destination)
        else:
            self._fs.pipe_file(destination, data)

    def _tmp_name(self, destination: str) -> str:
        parent, _, name = destination.rpartition("/")
        return f"{parent}/.{name}.partial"

    def _copy(self, root: Path, file: LocalFile) -> None:
        source = root / file.path
        destination = self._remote(file.path)
        self._fs.makedirs(destination.rpartition("/")[0] or "/", exist_ok=True)
        if file.content is not None:
            self._put_bytes(file.path, file.content)
        elif self.is_local:
            tmp = self._tmp_name(destination)
            try:
                self._fs.put_file(str(source), tmp)
                self._fs.mv(tmp, destination)
            except BaseException:
                if self._fs.exists(tmp):
                    self._fs.rm_file(tmp)
                raise
        else:
            self._fs.put_file(str(source), destination)
        written = int(self._fs.size(destination))
        if written != file.size:
            raise PublishError(f"{destination}: {written:,} bytes written for {file.size:,}; publish again")

    def upload(
        self,
        root: Path,
        plan: PublishPlan,
        *,
        delete: bool,
        limits: CommitLimits,
        message: str,
        on_commit: Callable[[Sequence[PlannedFile]], None] | None = None,
    ) -> int:
        """Copy the plan's uploads in bounded batches, checkpointing the index after each; return the batches."""
        del message  # a folder has no commit messages
        self._fs.makedirs(self._base, exist_ok=True)
        index = dict(self._index)  # entries of deleted files go when the files do
        for item in plan.files:
            if item.status == "unchanged":
                index[item.file.path] = {"size": item.file.size, "sha256": item.file.sha256}
            else:
                index.pop(item.file.path, None)  # until it is copied
        groups = list(batches(plan.files, limits=limits))
        try:
            for group in groups:
                for item in group:
                    check_unchanged(root, item.file)
                    self._copy(root, item.file)
                    index[item.file.path] = {"size": item.file.size, "sha256": item.file.sha256}
                self._write_index(index)
                if on_commit is not None:
                    on_commit(group)
            if delete:
                for path in plan.remote_only:
                    self._fs.rm_file(self._remote(path))
                    index.pop(path, None)
        except OSError as exc:
            self._write_index(index)  # what was copied stays known to the next run
            raise PublishError(f"copying to {self.url} failed: {exc}; run the same command again to finish") from exc
        self._write_index(index)
        return len(groups)
