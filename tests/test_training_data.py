"""The synthetic source: batch contract, determinism, disjoint sharding, exact resume; batch checks."""

from __future__ import annotations

import pytest
import torch

from stcorpus.loaders import batch as B
from stcorpus.schema import parse_key
from stcorpus.training.config import SyntheticSection, load_config
from stcorpus.training.data import (
    SyntheticSource,
    build_run_data,
    check_batch,
    make_synthetic_bank,
    resolve_config,
)
from stcorpus.training.errors import BatchContractError, CheckpointError, ConfigError, DataSourceUnavailableError

SMALL = SyntheticSection(n_slides=4, spots_per_slide=24, val_slides=1, n_genes=16, image_size=24, max_tokens=8)


@pytest.fixture(scope="module")
def bank():
    return make_synthetic_bank(SMALL, split="train", seed=0, views=("patch", "region"))


def test_batches_follow_the_batch_contract(bank) -> None:
    batch = next(iter(SyntheticSource(bank, batch_size=8)))
    check_batch(
        batch, needs=[B.KEY, B.SLIDE_ID, B.PATCH, B.REGION, B.POS, B.EXPR, B.EXPR_MASK, B.TOKENS, B.TOKENS_MASK]
    )
    assert batch[B.PATCH].shape == (8, 3, 24, 24) and batch[B.PATCH].dtype == torch.uint8
    assert batch[B.REGION].shape == (8, 3, 24, 24)
    assert batch[B.EXPR].shape == (8, 16) and batch[B.TOKENS].shape == (8, 8)
    for key, slide in zip(batch[B.KEY], batch[B.SLIDE_ID], strict=True):
        assert parse_key(key)[0] == slide


def test_expression_respects_the_mask_and_tokens_rank_it(bank) -> None:
    assert torch.all(bank.expr[~bank.expr_mask] == 0)
    assert not bank.expr_mask.all()  # some genes are unmeasured on some slides
    assert torch.all(bank.tokens[~bank.tokens_mask] == 0)  # 0 is padding
    for row in range(5):
        ids = bank.tokens[row][bank.tokens_mask[row]] - 1  # token ids are column + 1 (loaders/batch.py)
        assert ids.min() >= 0
        values = bank.expr[row, ids]
        assert torch.all(values[:-1] >= values[1:])
        assert torch.all(bank.expr_mask[row, ids]) and torch.all(values > 0)


def test_region_holds_the_patch_in_cell_pos(bank) -> None:
    cell = SMALL.image_size // 3
    own = torch.nn.functional.interpolate(bank.patch[:16].float(), size=(cell, cell), mode="area")
    for i in range(16):
        row, col = divmod(int(bank.pos[i]), 3)
        crop = bank.region[i, :, row * cell : (row + 1) * cell, col * cell : (col + 1) * cell].float()
        assert (crop - own[i]).abs().mean() < 2.0  # uint8 rounding only
        other = (int(bank.pos[i]) + 1) % 9
        orow, ocol = divmod(other, 3)
        elsewhere = bank.region[i, :, orow * cell : (orow + 1) * cell, ocol * cell : (ocol + 1) * cell].float()
        assert (elsewhere - own[i]).abs().mean() > 2.0


def test_banks_are_deterministic_and_splits_disjoint(bank) -> None:
    again = make_synthetic_bank(SMALL, split="train", seed=0, views=("patch", "region"))
    assert again.keys == bank.keys
    assert torch.equal(again.patch, bank.patch) and torch.equal(again.expr, bank.expr)
    other = make_synthetic_bank(SMALL, split="train", seed=1)
    assert not torch.equal(other.expr, bank.expr)
    val = make_synthetic_bank(SMALL, split="val", seed=0)
    assert set(val.slide_ids).isdisjoint(bank.slide_ids)
    assert len(val) == 24 and len(bank) == 72


def test_ranks_see_disjoint_equal_shards(bank) -> None:
    seen = []
    for rank in range(3):
        source = SyntheticSource(bank, batch_size=6, world_size=3, rank=rank)
        keys = [k for batch in source for k in batch[B.KEY]]
        assert len(keys) == len(source) * 6 == 24
        seen.append(set(keys))
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert len(set.union(*seen)) == 72


def test_epochs_reshuffle_deterministically(bank) -> None:
    source = SyntheticSource(bank, batch_size=8, seed=5)
    epoch0 = [k for b in source for k in b[B.KEY]]
    epoch1 = [k for b in source for k in b[B.KEY]]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    fresh = SyntheticSource(bank, batch_size=8, seed=5)
    assert [k for b in fresh for k in b[B.KEY]] == epoch0
    assert source.state_dict()["epoch"] == 2


@pytest.mark.parametrize("consumed", [3, 9, 13])  # mid-epoch, exactly at the epoch end, into the next epoch
def test_state_dict_resumes_at_the_next_batch(bank, consumed: int) -> None:
    reference = SyntheticSource(bank, batch_size=8, seed=2, world_size=2, rank=1)
    stream: list[list[str]] = []
    while len(stream) < consumed + 3:
        stream += [b[B.KEY] for b in reference]

    source = SyntheticSource(bank, batch_size=8, seed=2, world_size=2, rank=1)
    taken = 0
    iterator = iter(source)
    while taken < consumed:
        try:
            next(iterator)
            taken += 1
        except StopIteration:
            iterator = iter(source)
    state = source.state_dict()

    resumed = SyntheticSource(bank, batch_size=8, seed=2, world_size=2, rank=1)
    resumed.load_state_dict(state)
    following: list[list[str]] = []
    while len(following) < 3:
        following += [b[B.KEY] for b in resumed]
    assert following[:3] == stream[consumed : consumed + 3]


def test_state_from_another_layout_is_refused(bank) -> None:
    state = SyntheticSource(bank, batch_size=8, world_size=2).state_dict()
    with pytest.raises(CheckpointError, match="world_size"):
        SyntheticSource(bank, batch_size=8, world_size=3).load_state_dict(state)


def test_too_small_split_is_a_config_error(bank) -> None:
    with pytest.raises(ConfigError, match="fewer than one batch"):
        SyntheticSource(bank, batch_size=64, world_size=2)


def test_check_batch_names_what_is_wrong(bank) -> None:
    batch = bank.batch(torch.arange(4))
    with pytest.raises(BatchContractError, match="tokens"):
        check_batch({k: v for k, v in batch.items() if k != B.TOKENS}, needs=[B.TOKENS])
    with pytest.raises(BatchContractError, match="uint8"):
        check_batch({**batch, B.PATCH: batch[B.PATCH].float()}, needs=[])
    with pytest.raises(BatchContractError, match="batch size"):
        check_batch({**batch, B.EXPR: batch[B.EXPR][:3]}, needs=[])
    with pytest.raises(BatchContractError, match=r"0\.\.8"):
        check_batch({**batch, B.POS: batch[B.POS] + 9}, needs=[])
    with pytest.raises(BatchContractError, match=r"\(B,3,H,W\)"):
        check_batch({**batch, B.PATCH: batch[B.PATCH][:, :1]}, needs=[])


def test_a_missing_corpus_is_a_clear_data_source_error(tmp_path) -> None:
    cfg = load_config("tiny-cpu", overrides=["data.source=corpus", f"data.corpus={tmp_path / 'nowhere'}"])
    with pytest.raises(DataSourceUnavailableError, match=r"cannot read split train of the corpus .*nowhere"):
        build_run_data(cfg, rank=0, world_size=1)


def test_resolve_fills_sizes_from_the_data_and_checks_set_ones() -> None:
    cfg = load_config("tiny-cpu", overrides=["model.gene.name=transformer", "model.gene.hidden=32"])
    data = build_run_data(cfg, rank=0, world_size=1)
    resolved = resolve_config(cfg, data)
    # the transformer's vocabulary is G + 1 token ids (0 is padding)
    assert resolved.model.gene.n_genes == 65 and resolved.model.gene.max_tokens == 24
    assert resolved.model.image.image_size == 48
    wrong = load_config("tiny-cpu", overrides=["model.gene.n_genes=10"])
    with pytest.raises(ConfigError, match="n_genes"):
        resolve_config(wrong, data)


def test_on_device_bank_gives_the_same_batches(bank) -> None:
    moved = bank.to(torch.device("cpu"))
    index = torch.tensor([5, 1, 7])
    a, b = bank.batch(index), moved.batch(index)
    assert a[B.KEY] == b[B.KEY]
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    cfg = load_config("tiny-cpu", overrides=["data.synthetic.on_device=true"])
    data = build_run_data(cfg, rank=0, world_size=1, device=torch.device("cpu"))
    assert next(iter(data.train))[B.PATCH].device.type == "cpu"


def test_loader_settings_training_stream_and_evaluation_pools() -> None:
    from stcorpus.training.data import loader_settings

    cfg = load_config(
        "corpus-cpu",
        overrides=[
            "data.seed=7",
            "data.views=[patch,region]",
            "data.loader.filters.slide_ids=[a]",
            "data.loader.filters.organ=[heart]",
            "data.loader.augment.hflip=true",
            "model.gene.name=transformer",
            "model.gene.max_tokens=40",
        ],
    )
    stream = loader_settings(cfg, split="train", shuffle=True)
    assert (stream.split, stream.batch_size, stream.seed, stream.shuffle, stream.drop_last) == (
        ("train",),
        32,
        7,
        True,
        True,
    )
    assert stream.views == ("patch", "region") and stream.augment.hflip
    assert (stream.genes.transform, stream.genes.context_length) == ("rank", 40)
    assert stream.filters.slide_ids == ("a",) and stream.filters.organ == ("heart",)
    # a pool: shard order, every sample, tiles as stored, the training allow-list of slides dropped
    pool = loader_settings(cfg, split="validation", shuffle=False)
    assert (pool.shuffle, pool.drop_last, pool.augment.active()) == (False, False, False)
    assert pool.filters.slide_ids == () and pool.filters.organ == ("heart",)
    probe = loader_settings(cfg, split="train", shuffle=False, slide_ids=["b"], views=(), transform="log1p")
    assert probe.filters.slide_ids == ("b",) and probe.views == () and probe.genes.transform == "log1p"


def test_synthetic_images_are_laid_out_like_the_loaders(bank) -> None:
    # (B,3,H,W) views of channels-last memory, as decoded JPEGs arrive from the corpus loader
    batch = bank.batch(torch.tensor([2, 0, 5]))
    for view in (B.PATCH, B.REGION):
        assert batch[view].is_contiguous(memory_format=torch.channels_last), view
