"""The batch's sparse arrays: one cast-while-concatenating pass equals concatenate-then-cast."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stcorpus.loaders import CorpusDataset, CorpusLoader, LoaderSettings
from stcorpus.loaders.dataset import _sparse

DATA = Path(__file__).parent / "data"
SPLITS = {"corpus-stcorpus-1": "test", "corpus-stcorpus-2": "test"}


@pytest.mark.parametrize(
    ("stored", "wanted"),
    [(np.uint16, np.int32), (np.uint8, np.int32), (np.uint16, np.float32), (np.int32, np.int32), (np.uint32, np.int64)],
)
def test_one_pass_equals_concatenate_then_cast(stored: type, wanted: type) -> None:
    rng = np.random.default_rng(0)
    arrays: list[np.ndarray[Any, Any]] = [
        rng.integers(0, np.iinfo(stored).max, size=n).astype(stored) for n in (0, 5, 3000, 1, 0)
    ]
    values, offsets = _sparse(arrays, np.dtype(wanted))
    assert values.dtype == np.dtype(wanted)
    np.testing.assert_array_equal(values, np.concatenate(arrays).astype(wanted))
    np.testing.assert_array_equal(offsets, [0, 0, 5, 3005, 3006, 3006])
    empty, none = _sparse([], np.dtype(wanted))
    assert empty.dtype == np.dtype(wanted) and len(empty) == 0 and none.tolist() == [0]


@pytest.mark.parametrize("name", ["corpus-stcorpus-1", "corpus-stcorpus-2"])
def test_frozen_corpus_batches_hold_each_samples_arrays(name: str) -> None:
    """Every batch's flat arrays split by its offsets give back the per-sample rows the reader read."""
    root = DATA / name
    options = {"split": SPLITS[name], "batch_size": 4, "shuffle": False, "drop_last": False, "views": ["patch"]}
    loader = CorpusLoader(CorpusDataset(root, LoaderSettings.from_dict({**options, "genes": {"transform": "counts"}})))
    batches = list(loader)
    assert batches
    for batch in batches:
        genes, counts, offsets = (batch[k].numpy() for k in ("genes", "counts", "offsets"))
        assert genes.dtype == np.int32 and offsets[0] == 0 and offsets[-1] == len(genes) == len(counts)
        assert len(offsets) == len(batch["key"]) + 1 and (np.diff(offsets) >= 0).all()
        assert (counts > 0).all()
