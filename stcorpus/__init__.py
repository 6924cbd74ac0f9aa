"""stcorpus: the shared contract between ``curate`` (writes corpora) and ``loaders`` (reads them).

The schema of a sample lives in :mod:`stcorpus.schema`; this package holds nothing else that
either side could disagree on.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stcorpus")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
