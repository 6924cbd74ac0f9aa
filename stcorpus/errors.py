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


__all__ = ["StcorpusError"]
