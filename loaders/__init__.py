"""loaders: read a built corpus (a folder, HTTP(S), the Hub, or any fsspec store) as a torch stream.

>>> from stcorpus.loaders import CorpusDataset, CorpusLoader, LoaderSettings  # doctest: +SKIP
>>> dataset = CorpusDataset("hf://datasets/org/corpus", LoaderSettings(split="train", batch_size=256))
>>> loader = CorpusLoader(dataset, num_workers=8)
>>> for batch in loader: ...   # dicts as described in loaders/batch.py

Importing this package does not import torch (nor pyarrow): ``CorpusDataset``, ``CorpusLoader``
and ``resume_state_from`` are loaded from ``stcorpus.loaders.dataset`` on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stcorpus.loaders.errors import (
    BadSampleError,
    CorpusError,
    EmptySelectionError,
    LoaderError,
    LoaderSettingsError,
    RemoteAuthError,
    RemoteError,
    ResumeError,
    SchemaVersionError,
    ShardError,
)
from stcorpus.loaders.settings import (
    AugmentSettings,
    CacheSettings,
    Filters,
    GeneSettings,
    HttpSettings,
    LoaderSettings,
)

if TYPE_CHECKING:
    from stcorpus.loaders.corpus import Corpus, open_corpus
    from stcorpus.loaders.dataset import CorpusDataset, CorpusLoader, resume_state_from

__all__ = [
    "AugmentSettings",
    "BadSampleError",
    "CacheSettings",
    "Corpus",
    "CorpusDataset",
    "CorpusError",
    "CorpusLoader",
    "EmptySelectionError",
    "Filters",
    "GeneSettings",
    "HttpSettings",
    "LoaderError",
    "LoaderSettings",
    "LoaderSettingsError",
    "RemoteAuthError",
    "RemoteError",
    "ResumeError",
    "SchemaVersionError",
    "ShardError",
    "open_corpus",
    "resume_state_from",
]

_LAZY = {
    "CorpusDataset": "stcorpus.loaders.dataset",
    "CorpusLoader": "stcorpus.loaders.dataset",
    "resume_state_from": "stcorpus.loaders.dataset",
    "Corpus": "stcorpus.loaders.corpus",
    "open_corpus": "stcorpus.loaders.corpus",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stcorpus.loaders' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
