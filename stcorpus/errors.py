"""The one base error of the project, below both wings.

``stcorpus.curate`` (writes corpora), ``stcorpus.loaders`` (reads them) and ``stcorpus.training``
(consumes what loaders yield) each raise their own hierarchy (``CurateError``, ``LoaderError``,
``TrainingError``), and all three derive from :class:`StcorpusError`, so a caller catches every
error this project raises on purpose with one ``except StcorpusError`` and no wing imports another
wing's errors to do so.
"""

from __future__ import annotations


class StcorpusError(Exception):
    """Base class of every error stcorpus raises on purpose; messages say what to do next."""


class RemoteError(StcorpusError, OSError):
    """A remote read (HTTP(S), the Hub, an fsspec store) that failed, after its retries where they made sense.

    ``status`` is the HTTP status when one was answered. The wings turn these into their own
    errors with their own advice (``stcorpus.curate.errors.FetchError``, ``stcorpus.loaders.errors``).
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RemoteAuthError(RemoteError, PermissionError):
    """401/403: a gated or private file, or a missing, expired or insufficient token."""


class RemoteNotFoundError(RemoteError, FileNotFoundError):
    """404/410: nothing at that URL or path."""


class RemoteTruncatedError(RemoteError):
    """A body that ended before the bytes it announced (or the caller recorded), after every resume."""


class RemoteChangedError(RemoteError):
    """A file that was replaced on the server while it was being read (its validator changed)."""


class HubUrlError(StcorpusError, ValueError):
    """An ``hf://`` URL that does not name a Hub dataset repository (or a file of one)."""

    def __init__(self, message: str, *, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported


__all__ = [
    "HubUrlError",
    "RemoteAuthError",
    "RemoteChangedError",
    "RemoteError",
    "RemoteNotFoundError",
    "RemoteTruncatedError",
    "StcorpusError",
]
