"""``hf://datasets/<org>/<name>[@<revision>]/<path>`` through the Hugging Face Hub, for both wings.

The URL of a file is built with ``huggingface_hub.hf_hub_url`` against the endpoint in
``HF_ENDPOINT`` *at call time* (huggingface_hub reads the variable once, at import, into
``huggingface_hub.constants.ENDPOINT``; reading it here lets a test or a mirror set it later).
Auth headers come from ``huggingface_hub.utils.build_hf_headers``: the token of ``hf auth login``
or ``HF_TOKEN``. The token goes to the Hub's origin only (:class:`stcorpus.http.HttpClient` drops
it on the redirect to the CDN) and never into a log line, an error, a lock file or a card.

A HEAD on the resolve URL answers like the Hub does for LFS/Xet files: ``X-Linked-Etag`` is the
file's sha256, ``X-Linked-Size`` its size, ``X-Repo-Commit`` the commit the revision points at
(:func:`metadata_from_head`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote

from stcorpus.errors import HubUrlError

if TYPE_CHECKING:
    from stcorpus.http import HeadResult

DEFAULT_ENDPOINT: Final = "https://huggingface.co"
HF_PREFIX: Final = "hf://datasets/"
_HF_URL: Final = re.compile(
    r"^hf://datasets/(?P<org>[^/@]+)/(?P<name>[^/@]+)(?:@(?P<revision>[^/]+))?(?:/(?P<path>.*))?$"
)
_HEX40: Final = re.compile(r"^[0-9a-f]{40}$")
_HEX64: Final = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HubFile:
    """A file (or, with ``path=""``, the root) of a Hub dataset repository, as an hf:// URL names it."""

    repo_id: str  # "<org>/<name>"
    path: str
    revision: str  # branch, tag or commit; "main" when the URL names none

    def page(self, *, endpoint: str) -> str:
        """The dataset's page on the Hub, where gated datasets ask users to accept their terms."""
        return f"{endpoint}/datasets/{self.repo_id}"

    def child(self, path: str) -> HubFile:
        """The file ``path`` below this one (``path`` relative to it)."""
        joined = f"{self.path.rstrip('/')}/{path}" if self.path else path
        return HubFile(self.repo_id, joined, self.revision)


def parse_hf(url: str, *, file: bool) -> HubFile:
    """Split ``hf://datasets/<org>/<name>[@<revision>][/<path>]``; a revision may be %-encoded (``refs%2Fpr%2F1``).

    ``file=True`` requires a path (a file URL); ``file=False`` accepts a repository or a folder of one.
    Raises :class:`HubUrlError` (``unsupported`` for model and space repositories).

    >>> parse_hf("hf://datasets/MahmoodLab/hest@v1.1/st/TENX95.h5ad", file=True)
    HubFile(repo_id='MahmoodLab/hest', path='st/TENX95.h5ad', revision='v1.1')
    >>> parse_hf("hf://datasets/org/corpus", file=False)
    HubFile(repo_id='org/corpus', path='', revision='main')
    """
    match = _HF_URL.match(url)
    path = (match.group("path") or "").strip("/") if match else ""
    if match is None or (file and not path):
        if url.startswith("hf://") and not url.startswith(HF_PREFIX):
            raise HubUrlError(
                f"{url!r}: only dataset repositories are supported (hf://datasets/<org>/<name>/<path>)",
                unsupported=True,
            )
        if file:
            raise HubUrlError(
                f"{url!r} is not an hf:// dataset file URL: write hf://datasets/<org>/<name>[@<rev>]/<path>"
            )
        raise HubUrlError(f"{url!r}: Hub corpora are addressed as hf://datasets/<org>/<name>[@<revision>][/<folder>]")
    revision = unquote(match.group("revision")) if match.group("revision") else "main"
    return HubFile(repo_id=f"{match.group('org')}/{match.group('name')}", path=path, revision=revision)


def endpoint() -> str:
    """The Hub endpoint: ``$HF_ENDPOINT`` read now, else https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def resolve_url(file: HubFile, *, revision: str | None = None) -> str:
    """The resolve URL of ``file`` at ``revision`` (default: the URL's own) on the current endpoint."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(
        file.repo_id, file.path, repo_type="dataset", revision=revision or file.revision, endpoint=endpoint()
    )


def auth_headers() -> dict[str, str]:
    """Headers for Hub requests: the user's token (``hf auth login`` / ``HF_TOKEN``) and a user agent."""
    # Exported lazily by huggingface_hub.utils, which mypy cannot see.
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    from stcorpus import __version__

    headers: dict[str, str] = build_hf_headers(library_name="stcorpus", library_version=__version__)
    return {k: v for k, v in headers.items() if k.lower() in ("authorization", "user-agent")}


def token_of(headers: dict[str, str]) -> str | None:
    """The bearer token inside ``headers``, so messages can be scrubbed of it."""
    for name, value in headers.items():
        if name.lower() == "authorization" and value.lower().startswith("bearer "):
            return value[7:].strip() or None
    return None


def access_hint(file: HubFile, *, logged_in: bool) -> str:
    """What to do about a 401/403 from the Hub."""
    page = file.page(endpoint=endpoint())
    if logged_in:
        return (
            f"the dataset {file.repo_id} is gated or private and your token has no access to it: accept its terms "
            f"on {page} (logged in as the token's user), or use a token with access (`hf auth login` or HF_TOKEN)"
        )
    return (
        f"the dataset {file.repo_id} is gated or private (or does not exist): accept its terms on {page}, then log "
        "in with `hf auth login` (or set HF_TOKEN) so the download can use your token"
    )


@dataclass(frozen=True)
class HubMetadata:
    """What a HEAD on the resolve URL says about a file."""

    sha256: str | None  # from X-Linked-Etag (LFS/Xet files); None for small files kept in git
    size: int | None
    commit: str | None


def metadata_from_head(head: HeadResult) -> HubMetadata:
    """Read X-Linked-Etag / X-Linked-Size / X-Repo-Commit (the headers ``get_hf_file_metadata`` reads)."""
    headers = head.headers
    linked = _normalise_etag(headers.get("X-Linked-Etag"))
    sha256 = linked if linked and _HEX64.match(linked) else None
    size_text = headers.get("X-Linked-Size") or (None if 300 <= head.status < 400 else headers.get("Content-Length"))
    size = int(size_text) if size_text and size_text.isdigit() else None
    commit = headers.get("X-Repo-Commit")
    return HubMetadata(sha256=sha256, size=size, commit=commit if commit and _HEX40.match(commit) else None)


def _normalise_etag(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"').lower() or None
