"""Errors of ``curate``: one hierarchy, messages that say what is wrong and what to do next.

``SlideError`` and its subclasses are the per-slide failures a build turns into a quarantine
record (``slides.parquet`` ``status="quarantined"``, ``reason="<code>: <message>"``); every
other ``CurateError`` stops the command.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import ClassVar, Final

from stcorpus.errors import StcorpusError

#: Every "timed out" exception a library may raise: on Python 3.10 asyncio's and
#: concurrent.futures' are not the builtin ``TimeoutError`` (dask.distributed's waits raise
#: asyncio's); from 3.11 on all three are the same class.
TIMEOUT_ERRORS: Final[tuple[type[BaseException], ...]] = (
    TimeoutError,
    asyncio.TimeoutError,
    concurrent.futures.TimeoutError,
)


class CurateError(StcorpusError):
    """Base class of every error ``curate`` raises on purpose."""


class ManifestError(CurateError, ValueError):
    """A manifest file that does not follow the manifest model."""


class SettingsError(CurateError, ValueError):
    """Build, fetch or tile settings that cannot work together."""


# --- fetching -------------------------------------------------------------------------------


class FetchError(CurateError):
    """A source that could not be fetched."""


class UnsupportedSchemeError(FetchError, ValueError):
    """A source URL whose scheme the fetch layer does not handle (ftp://, or a store without its fsspec backend)."""


class LocalSourceNotAllowedError(FetchError, PermissionError):
    """A local path or file:// URL in a manifest that does not allow local sources."""


class ChecksumMismatchError(FetchError):
    """Downloaded bytes whose sha256 differs from the manifest's."""


class SizeMismatchError(FetchError):
    """A download that ended short (truncated body) or long of its announced size."""


class NotADataFileError(FetchError):
    """An HTML page (a directory listing, a login page) served where a data file or archive is expected."""


class UnsafeArchiveError(FetchError):
    """An archive with an absolute path, a '..' component, an outside link or an absurd size."""


class BudgetExceededError(FetchError):
    """A slide whose inputs alone are larger than the cache budget (``--cache-budget``)."""


# --- slides (quarantine reasons) ------------------------------------------------------------


class SlideError(CurateError):
    """A slide that cannot be built; the build quarantines it with ``code`` and the message."""

    code: ClassVar[str] = "slide_error"

    def __init__(self, message: str, *, slide_id: str | None = None) -> None:
        super().__init__(message)
        self.slide_id = slide_id
        #: Further failures of the same slide found by the same step (QC records every failing check).
        self.also: tuple[SlideError, ...] = ()

    @property
    def codes(self) -> list[str]:
        """The code of this failure and of every further one, in the order they were found."""
        return [self.code, *(other.code for other in self.also)]

    @property
    def reason(self) -> str:
        """``"<code>: <message>"`` (and ``"; also <code>: <message>"`` for each further failure), as written
        to ``slides.parquet`` and the QC report."""
        return "; also ".join(f"{error.code}: {error}" for error in (self, *self.also))


class SourceMissingError(SlideError):
    """A file the reader needs is neither named in the manifest nor found in the source folder."""

    code = "missing_file"


class CorruptSourceError(SlideError):
    """A source file that exists but cannot be parsed (corrupt h5, malformed CSV, bad TIFF)."""

    code = "corrupt_file"


class NoReaderError(SlideError):
    """A technology that is valid in manifests but has no reader yet."""

    code = "no_reader"


class QCError(SlideError):
    """A blocking quality-control failure."""

    code = "qc"


class BarcodeMismatchError(QCError):
    """Matrix barcodes and position barcodes do not overlap enough to trust either."""

    code = "barcode_mismatch"


class NoSpotsError(QCError):
    """No in-tissue spot with counts is left to build."""

    code = "no_spots"


class NonIntegerCountsError(QCError):
    """Expression that is not raw integer counts in a sample not declared ``counts: normalized``."""

    code = "not_raw_counts"


class ScaleMismatchError(QCError):
    """The um/px from metadata/scale factors and from the spot lattice disagree by more than allowed."""

    code = "scale_mismatch"


class BlankImageError(QCError):
    """An image that is fully blank, fully transparent or a single colour."""

    code = "blank_image"


class ImageTooCoarseError(QCError):
    """An image coarser than the tiles' um/px allows (no honest 0.5 um/px tiles from it)."""

    code = "image_too_coarse"


class ImageTooLargeError(SlideError):
    """An image that must be decoded whole (PNG, JPEG, a flat TIFF) and is larger than the pixel budget."""

    code = "image_too_large"


class SpotsOutsideImageError(QCError):
    """Spot centres outside the image (wrong image, wrong scale or swapped axes)."""

    code = "spots_outside_image"


class GeneMappingError(SlideError):
    """Too few of a slide's features map to the gene vocabulary."""

    code = "unmapped_genes"


class UnsupportedSpeciesError(GeneMappingError):
    """A species with no gene reference table in the package."""

    code = "unsupported_species"


class DuplicateSlideError(SlideError):
    """The slide holds the same data as another slide kept in the corpus."""

    code = "duplicate"


class BuildError(CurateError):
    """A build that cannot go on (bad settings, a bad slide with ``on_bad_sample='error'``)."""


# --- fetching: HTTP statuses (appended by the fetch layer) -----------------------------------


class HttpStatusError(FetchError):
    """A server that answered with an HTTP error status (after retries, where retrying made sense)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AccessDeniedError(HttpStatusError, PermissionError):
    """401/403: a gated or private file, or a missing, expired or insufficient token."""


class RemoteNotFoundError(HttpStatusError, FileNotFoundError):
    """404/410: no file at that URL (check the path, the revision, the repository name)."""


# --- genes (appended by the gene harmonisation layer) -----------------------------------------


class GeneVocabularyError(CurateError, LookupError):
    """Gene ids that do not fit the corpus vocabulary (missing from it, unknown, wrong species)."""


class UnsupportedAssayError(SlideError):
    """An assay a reader cannot place on a spot lattice or give a scale (e.g. no spot diameter on record)."""

    code = "unsupported_assay"


# --- executors (appended by the Dask executor) ------------------------------------------------


class ExecutorError(BuildError):
    """A cluster that cannot run a build's units: a missing extra, an unreachable scheduler, no
    workers, or workers that cannot see the work folder or run another stcorpus version."""


# --- publishing (appended by the publish layer) ----------------------------------------------


class PublishError(CurateError):
    """A corpus that cannot be published to the target (unreachable, refused, wrong target)."""


class CorpusValidationError(PublishError):
    """A corpus folder whose card, provenance or shard index fails validation; ``problems`` lists each."""

    def __init__(self, message: str, *, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems


class TargetUnreachableError(PublishError, ConnectionError):
    """A publish target (the Hub, an fsspec URL) that cannot be reached or is offline."""


class ExportError(CurateError):
    """``curate export`` could not write what was asked (no such slide, unknown target format)."""
