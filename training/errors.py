"""Errors of ``training``: messages say what is wrong and what to do next.

They hang under :class:`stcorpus.errors.StcorpusError`, the base of every error this project
raises on purpose, so ``training`` never imports ``curate`` to catch them.
"""

from __future__ import annotations

from stcorpus.errors import StcorpusError


class TrainingError(StcorpusError):
    """Base class of every error ``training`` raises on purpose."""


class ConfigError(TrainingError, ValueError):
    """A run config that does not follow the config model (unknown key, bad value, bad override)."""


class CheckpointError(TrainingError):
    """A checkpoint that cannot be read, or that does not fit the run resuming from it."""


class MissingExtraError(TrainingError, ImportError):
    """An optional dependency (an extra such as ``timm``) that the config asks for is not installed."""


class BatchContractError(TrainingError, ValueError):
    """A batch from the data source that does not follow ``loaders/batch.py``."""


class DataSourceUnavailableError(TrainingError):
    """A data source the config names that cannot be built here (yet)."""
