"""Publishing to a Hugging Face Hub dataset repository (huggingface_hub 2.4).

Comparison: ``list_repo_tree(recursive=True)`` gives every remote file's size and git blob id,
and for LFS/Xet files the sha256 of the content; a local file is unchanged when its sha256
equals the remote LFS sha256, or (for small files kept in git) its git blob id equals the
remote's. Both local digests come from the one read done by validation. The listing asks
for ``expand=False``: the LFS/Xet fields come with the plain listing (1,000 entries per page,
as ``HfFileSystem`` reads them); ``expand=True`` only adds last-commit and security-scan
fields at 50 entries per page, 20 times the requests for a 10k-file corpus.

Upload: ``create_commit`` per bounded batch (``CommitLimits``) of ``CommitOperationAdd``;
with ``hf_xet`` installed (the default) ``create_commit`` sends the bytes through Xet storage
(content-defined chunks, deduplicated server side), else through LFS. Each finished commit
stays, so a re-run after an interruption compares again and sends only what is missing; bytes
of an interrupted batch already in Xet storage are not sent twice. ``upload_folder``'s
streamed pipeline would also batch, but it commits in path order -- ``README.md`` (whose
``configs`` name the new shards) would land in the first commit, before the shards it
describes -- and it cannot skip the files the comparison already found unchanged without a
glob pattern per file. Here the description files and any ``--delete`` go last, in one commit
(see ``stcorpus.curate.publish.plan``).

Tokens are huggingface_hub's own (``hf auth login`` or ``HF_TOKEN``); nothing here reads,
prints or stores them. The endpoint is ``HF_ENDPOINT`` read at call time (as the fetch layer
does), so mirrors and test stand-ins work.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from stcorpus.curate.errors import TIMEOUT_ERRORS, PublishError, TargetUnreachableError
from stcorpus.curate.publish.plan import CommitLimits, PlannedFile, PublishPlan, Status, batches
from stcorpus.curate.publish.validate import LocalFile, check_unchanged, is_skipped

log = logging.getLogger(__name__)


def _reason(exc: BaseException) -> str:
    """The innermost ``[Errno N] ...`` of a transport error (requests wraps it three times), else its type."""
    text = str(exc)
    found = re.findall(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if found:
        return str(found[-1]).strip()
    return "timed out" if "timed out" in text.lower() else type(exc).__name__


@dataclass(frozen=True)
class RemoteEntry:
    """A file of the remote repository as the tree listing gives it."""

    path: str
    size: int
    blob_id: str
    sha256: str | None  # LFS/Xet files only


def offline_requested() -> bool:
    """True when huggingface_hub's offline mode is on (``HF_HUB_OFFLINE``, read now)."""
    import huggingface_hub.constants as constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return bool(constants.HF_HUB_OFFLINE) or (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _unreachable_types() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import OfflineModeIsEnabled

    types: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, *TIMEOUT_ERRORS]
    try:
        import httpx2

        types.append(httpx2.TransportError)
    except ImportError:  # huggingface_hub < 1.0 talks through requests
        import requests

        types += [requests.ConnectionError, requests.Timeout]
    return tuple(types)


def default_api() -> Any:
    """An ``HfApi`` on the endpoint of ``HF_ENDPOINT`` (read now), with huggingface_hub's own token."""
    from huggingface_hub import HfApi

    from stcorpus.curate import __version__
    from stcorpus.hub import endpoint

    return HfApi(endpoint=endpoint(), library_name="stcorpus", library_version=__version__)


@dataclass
class HubTarget:
    """A dataset repository ``<org>/<name>`` at ``revision``; ``api`` defaults to :func:`default_api`."""

    repo_id: str
    revision: str = "main"
    private: bool | None = None  # only used when the repository is created
    api_factory: Callable[[], Any] = default_api
    _api: Any = field(default=None, init=False, repr=False)
    _exists: bool | None = field(default=None, init=False, repr=False)
    _branch_missing: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        parts = self.repo_id.split("/")
        if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
            raise PublishError(f"--repo {self.repo_id!r}: write the dataset repository as <org>/<name>")

    @property
    def api(self) -> Any:
        """The Hub client (created on first use, so a dry run offline never builds one)."""
        if self._api is None:
            self._api = self.api_factory()
        return self._api

    def describe(self) -> str:
        """``hf://datasets/<org>/<name>`` (and ``@revision`` when not main)."""
        suffix = f"@{self.revision}" if self.revision != "main" else ""
        return f"hf://datasets/{self.repo_id}{suffix}"

    # --- comparison ----------------------------------------------------------------------------

    def check_reachable(self) -> None:
        """Raise :class:`TargetUnreachableError` at once when nothing answers at the Hub's endpoint.

        One request, no retries: without a network, huggingface_hub's own backoff spends about
        25 s in five retries before it gives up, which a dry run should not.
        """
        import requests

        from stcorpus.http import HttpClient, RetryPolicy, redact_url

        url = str(getattr(self.api, "endpoint", "") or "").rstrip("/")
        if not url.startswith(("http://", "https://")):
            return  # a stand-in API object with no HTTP endpoint of its own
        client = HttpClient(RetryPolicy(retries=0, connect_timeout=10.0, read_timeout=20.0))
        try:
            response, _ = client.send("HEAD", f"{url}/", {}, follow="same-origin")
            response.close()
        except requests.RequestException as exc:
            raise TargetUnreachableError(
                f"the Hub at {redact_url(url)} cannot be reached ({_reason(exc)}): nothing was compared or sent. "
                "Add --offline for a dry run that does not contact the Hub (every status unknown), or try again "
                "when the network is back"
            ) from None
        finally:
            client.close()

    def remote_files(self) -> dict[str, RemoteEntry] | None:
        """Every file of the repository (None: no such repository yet); TargetUnreachableError without the Hub."""
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

        self.check_reachable()
        try:
            entries = list(
                self.api.list_repo_tree(
                    self.repo_id, recursive=True, expand=False, revision=self.revision, repo_type="dataset"
                )
            )
        except RevisionNotFoundError:
            # A branch that does not exist yet: every file is new, and the upload creates the branch.
            self._exists, self._branch_missing = True, True
            return {}
        except RepositoryNotFoundError:
            self._exists = False
            return None
        except _unreachable_types() as exc:
            raise TargetUnreachableError(
                f"the Hub at {getattr(self.api, 'endpoint', '?')} cannot be reached ({exc}): nothing was compared "
                "or sent. Add --offline for a dry run that does not contact the Hub"
            ) from exc
        except HfHubHTTPError as exc:
            raise PublishError(f"listing {self.describe()} failed: {exc}") from exc
        self._exists = True
        remote: dict[str, RemoteEntry] = {}
        for entry in entries:
            if not hasattr(entry, "blob_id"):  # a folder
                continue
            lfs = getattr(entry, "lfs", None)
            sha256 = lfs.sha256 if lfs is not None else None
            remote[entry.path] = RemoteEntry(
                path=entry.path, size=int(entry.size), blob_id=entry.blob_id, sha256=sha256
            )
        return remote

    def compare(self, local: Mapping[str, LocalFile]) -> tuple[dict[str, Status], list[str]]:
        """Each local file's status and the remote-only paths."""
        remote = self.remote_files() or {}
        statuses: dict[str, Status] = {}
        for path, file in local.items():
            entry = remote.get(path)
            if entry is None:
                statuses[path] = "new"
            elif entry.size == file.size and (
                entry.sha256 == file.sha256 if entry.sha256 is not None else entry.blob_id == file.git_oid != ""
            ):
                statuses[path] = "unchanged"
            else:
                statuses[path] = "changed"
        # Hidden files (.gitattributes, which the Hub keeps in every repository) are not the corpus's.
        return statuses, sorted(p for p in remote if p not in local and not is_skipped(PurePosixPath(p)))

    # --- upload --------------------------------------------------------------------------------

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
        """Send the plan's uploads in bounded commits (deletions ride the last); return the number of commits."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.errors import HfHubHTTPError

        if self._exists is None:
            self.remote_files()
        if self._exists is False:
            try:
                self.api.create_repo(self.repo_id, repo_type="dataset", private=self.private, exist_ok=True)
            except HfHubHTTPError as exc:
                raise PublishError(
                    f"cannot create the dataset repository {self.repo_id}: {exc} (log in with a write token: "
                    "`hf auth login`, or set HF_TOKEN)"
                ) from exc
            log.info("created the dataset repository %s", self.repo_id)
            self._exists, self._branch_missing = True, self.revision != "main"
        if self._branch_missing:
            try:
                self.api.create_branch(self.repo_id, branch=self.revision, repo_type="dataset", exist_ok=True)
            except HfHubHTTPError as exc:
                raise PublishError(f"cannot create the branch {self.revision!r} of {self.repo_id}: {exc}") from exc
            self._branch_missing = False
        groups = list(batches(plan.files, limits=limits))
        deletions = plan.remote_only if delete else []
        if deletions and not groups:
            groups = [[]]
        for number, group in enumerate(groups, start=1):
            for item in group:
                check_unchanged(root, item.file)
            operations: list[Any] = [
                CommitOperationAdd(
                    path_in_repo=item.file.path,
                    path_or_fileobj=item.file.content if item.file.content is not None else str(root / item.file.path),
                )
                for item in group
            ]
            if number == len(groups):
                operations += [CommitOperationDelete(path_in_repo=path, is_folder=False) for path in deletions]
            part = f" (part {number}/{len(groups)})" if len(groups) > 1 else ""
            try:
                self.api.create_commit(
                    self.repo_id,
                    operations,
                    commit_message=f"{message}{part}",
                    repo_type="dataset",
                    revision=self.revision,
                )
            except _unreachable_types() as exc:
                raise TargetUnreachableError(
                    f"the Hub connection failed in commit {number} of {len(groups)}: {exc}; the {number - 1} "
                    "finished commit(s) stay: run the same command again to send the rest"
                ) from exc
            except HfHubHTTPError as exc:
                raise PublishError(
                    f"commit {number} of {len(groups)} to {self.describe()} failed: {exc}; the {number - 1} "
                    "finished commit(s) stay: run the same command again to send the rest (a 401/403 needs a "
                    "write token: `hf auth login` or HF_TOKEN)"
                ) from exc
            if on_commit is not None:
                on_commit(group)
        return len(groups)
