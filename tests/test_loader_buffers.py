"""The loader's reusable batch memory: a buffer is handed out again only once nothing refers to it."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
import torch

from stcorpus.loaders import CorpusDataset, CorpusLoader, LoaderSettings
from stcorpus.loaders.buffers import ArrayPool
from tests.corpus_fixture import FixtureCorpus, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> FixtureCorpus:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def test_get_gives_the_shape_and_dtype_asked_for() -> None:
    pool = ArrayPool()
    a = pool.get((3, 4, 5), np.float32)
    assert a.shape == (3, 4, 5) and a.dtype == np.float32 and a.flags["C_CONTIGUOUS"]
    b = pool.get(7, np.int64)
    assert b.shape == (7,) and b.dtype == np.int64
    assert pool.get(0, np.int32).shape == (0,)


def test_a_buffer_in_use_is_never_handed_out_again() -> None:
    pool = ArrayPool()
    held = [pool.get(100, np.int32) for _ in range(5)]
    for i, array in enumerate(held):
        array[:] = i
    more = [pool.get(100, np.int32) for _ in range(5)]
    for array in more:
        array[:] = -1
    assert [int(a[0]) for a in held] == list(range(5))
    assert len({id(a.base) for a in held + more}) == 10


def test_a_released_buffer_is_reused_and_the_smallest_that_fits_is_taken() -> None:
    pool = ArrayPool()
    small, large = pool.get(100, np.int32), pool.get(10_000, np.int32)
    small_base, large_base = id(small.base), id(large.base)  # ids: holding the bases would keep them in use
    del small, large
    assert id(pool.get(50, np.int32).base) == small_base
    assert id(pool.get(5_000, np.float32).base) == large_base
    assert len(pool) == 2


@pytest.mark.parametrize("hold", ["tensor", "tensor slice", "view", "reshaped"])
def test_what_is_made_from_an_array_keeps_its_buffer(hold: str) -> None:
    pool = ArrayPool()
    array = pool.get((4, 6), np.int32)
    array[:] = 7
    makers: dict[str, Any] = {
        "tensor": torch.from_numpy,
        "tensor slice": lambda a: torch.from_numpy(a).permute(1, 0)[:2],
        "view": lambda a: a[1:],
        "reshaped": lambda a: a.reshape(-1),
    }
    keep = makers[hold](array)
    del array
    other = pool.get((4, 6), np.int32)
    other[:] = -1
    assert (np.asarray(keep) == 7).all()
    del keep, other
    assert id(pool.get((4, 6), np.int32).base) in {id(b) for b in pool.buffers}
    assert len(pool) == 2


def test_past_its_size_the_pool_forgets_but_never_frees_what_is_held() -> None:
    pool = ArrayPool(size=3)
    held = [pool.get(10, np.uint8) for _ in range(6)]
    for i, array in enumerate(held):
        array[:] = i
    assert len(pool) == 3
    assert [int(a[0]) for a in held] == list(range(6))


def test_a_pickled_pool_is_empty() -> None:
    pool = ArrayPool(size=5)
    kept = pool.get(1000, np.uint8)
    copy = pickle.loads(pickle.dumps(pool))
    assert len(copy) == 0 and copy.size == 5 and len(kept) == 1000


@pytest.mark.parametrize("fmt", ["parquet", "wds"])
def test_batches_a_consumer_keeps_are_not_overwritten_by_later_ones(corpus: FixtureCorpus, fmt: str) -> None:
    """Held batches (images and sparse expression) stay as they were while the loader goes on."""
    options = {
        "split": "train",
        "format": fmt,
        "batch_size": 3,
        "shuffle_window": 6,
        "drop_last": False,
        "views": ["patch", "region"],
        "genes": {"transform": "counts", "niche": True},
    }
    dataset = CorpusDataset(corpus.root, LoaderSettings.from_dict(options))
    copies = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in CorpusLoader(dataset)]
    for _ in range(2):  # the second epoch reuses the first one's buffers, once they are released
        held = list(CorpusLoader(dataset))
        assert len(held) == len(copies) > 2
        for batch, copy in zip(held, copies, strict=True):
            assert batch.keys() == copy.keys()
            for name, value in batch.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, copy[name]), name
                else:
                    assert value == copy[name], name
        del held, batch
    assert len(dataset.buffers) > 0
