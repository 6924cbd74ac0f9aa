"""curate: regenerate a corpus of (H&E tile, gene expression) pairs from manifests.

Importing this package does no network access, configures no logging and loads no heavy
library; the command line is :mod:`stcorpus.curate.cli`.
"""

from stcorpus import __version__

__all__ = ["__version__"]
