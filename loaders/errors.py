"""Errors of ``loaders``: one hierarchy, messages that say what is wrong and what to do next.

``loaders`` does not import ``curate`` (training imports loaders, never the build), so it has
its own small hierarchy under ``LoaderError``, which derives from the project's one base error.
"""

from __future__ import annotations

from stcorpus.errors import RemoteAuthError as _BaseRemoteAuthError
from stcorpus.errors import RemoteError as _BaseRemoteError
from stcorpus.errors import StcorpusError


class LoaderError(StcorpusError):
    """Base class of every error ``loaders`` raises on purpose."""


class LoaderSettingsError(LoaderError, ValueError):
    """Loader settings that are unknown, malformed or cannot work together."""


class CorpusError(LoaderError):
    """A corpus folder/URL that does not hold a readable ``stcorpus`` corpus."""


class SchemaVersionError(CorpusError):
    """A corpus written under a schema version this loader does not read."""


class MissingFileError(CorpusError, FileNotFoundError):
    """A file of the corpus that is not where it should be (locally, on a server, in a store)."""


class RemoteError(LoaderError, _BaseRemoteError):
    """An HTTP(S), Hub or store request that failed after its retries."""


class RemoteAuthError(RemoteError, _BaseRemoteAuthError):
    """The server refused the request (401/403): a gated or private dataset without a valid token."""


class ShardError(LoaderError):
    """A shard that cannot be read to its end: missing, truncated, corrupt, or not the bytes recorded."""


class BadSampleError(LoaderError):
    """One sample that cannot be decoded (corrupt JPEG, malformed expression or metadata)."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class EmptySelectionError(LoaderError, ValueError):
    """Filters or a split that leave no sample, or too few for the ranks and workers asked for."""


class ResumeError(LoaderError, ValueError):
    """A loader state that does not belong to this corpus, split or settings."""
