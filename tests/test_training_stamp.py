"""STAMP's two stages end to end on the fixture corpus (real counts, real niches, real H&E pixels).

Stage 1 (``stamp-stage1``) pretrains the gene encoder alone by masked-expression modelling on
expression plus niche; stage 2 (``stamp-stage2``) aligns images with it at several scales,
starting from stage 1's checkpoint. Sizes are cut to a CPU test; the configs are the built-in ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stcorpus.training.checkpoint import load_checkpoint
from stcorpus.training.config import load_config
from stcorpus.training.data import build_run_data, resolve_config
from stcorpus.training.errors import CheckpointError, ConfigError
from stcorpus.training.model import build_run_model
from stcorpus.training.pretrain import train
from stcorpus.training.stamp import hide_genes
from tests.corpus_fixture import FixtureCorpus, write_corpus

TINY = ["run.threads=1", "data.num_workers=0", "data.batch_size=16", "data.loader.shuffle_window=64"]
GENE = ["model.gene.hidden=32", "model.gene.depth=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> FixtureCorpus:
    return write_corpus(tmp_path_factory.mktemp("stamp-corpus"))


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_hidden_genes_are_measured_ones_and_every_spot_keeps_some() -> None:
    mask = torch.tensor([[True, True, False, True], [True, False, False, False], [True, True, True, True]])
    for seed in range(20):
        hidden = hide_genes(mask, ratio=0.9, generator=torch.Generator().manual_seed(seed))
        assert not bool((hidden & ~mask).any())
        assert bool(hidden[0].any()) and bool((mask[0] & ~hidden[0]).any())
        assert not bool(hidden[1].any())  # one measured gene: nothing to hide it from
        assert bool((mask[2] & ~hidden[2]).any())


def test_stamp_stage_1_then_stage_2(corpus: FixtureCorpus, tmp_path: Path) -> None:
    stage1 = tmp_path / "stage1"
    cfg1 = load_config(
        "stamp-stage1",
        overrides=[
            f"data.corpus={corpus.root}",
            f"run.out_dir={stage1}",
            *TINY,
            *GENE,
            "optim.max_steps=12",
            "optim.warmup_steps=2",
            "run.log_every=4",
            "eval.every=0",
            "eval.pool_size=25",
        ],
    )
    result1 = train(cfg1)
    losses = [r["loss"] for r in _records(stage1, "train")]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    metrics = result1.metrics
    assert metrics["pool_size"] == 25 and metrics["masked_genes"] > 0 and math.isfinite(metrics["mask_mse"])
    assert result1.checkpoint is not None
    state1 = load_checkpoint(result1.checkpoint)
    gene_keys = {k for k in state1["model"] if k.startswith("gene_encoder.")}
    assert gene_keys and all(k.startswith(("gene_encoder.", "decoder.")) for k in state1["model"])
    # the niche is an input: the first layer reads 3 x G values
    n_genes = json.loads(state1["config"])["model"]["gene"]["n_genes"]
    assert state1["model"]["gene_encoder.net.0.weight"].shape[1] == 3 * n_genes

    stage2 = tmp_path / "stage2"
    overrides2 = [
        f"data.corpus={corpus.root}",
        f"run.out_dir={stage2}",
        f"model.gene.init={stage1}",  # the run folder: its latest checkpoint
        *TINY,
        *GENE,
        "model.image.name=small-cnn",
        "model.image.width=16",
        "model.image.depth=2",
        "model.image.image_size=32",
        "model.embed_dim=16",
        "optim.max_steps=3",
        "optim.warmup_steps=1",
        "eval.pool_size=25",
        "eval.probe_train_size=25",
        "eval.probe_train_slides=[mbrain-a]",  # the mouse slide: the validation slide is mouse too
        "eval.probe_genes=8",
        "data.loader.augment={}",
    ]
    cfg2 = load_config("stamp-stage2", overrides=overrides2)
    data = build_run_data(cfg2, rank=0, world_size=1)
    model = build_run_model(resolve_config(cfg2, data), image_size=data.image_size)
    for key in gene_keys:  # stage 2 starts from stage 1's gene encoder
        assert torch.equal(model.state_dict()[key], state1["model"][key]), key
    result2 = train(cfg2)
    last = _records(stage2, "train")[-1]
    for term in ("patch_spot", "region_spot", "patch_region", "pos"):
        assert math.isfinite(last[f"loss/{term}"]), term
    assert "image_to_gene_r@5" in result2.metrics and "probe_pearson" in result2.metrics
    # recall per held-out slide beside the pooled one (the validation split is the one slide mbrain-b)
    assert result2.metrics["pool_size/slide/mbrain-b"] == 25
    assert result2.metrics["gene_to_image_r@5/slide/mbrain-b"] == result2.metrics["gene_to_image_r@5"]
    assert "image_to_gene_r@5/slide_mean" in _records(stage2, "eval")[-1]

    # stage 2 with other gene settings than stage 1 is refused, naming the setting
    with pytest.raises(CheckpointError, match=r"differs in hidden \(32 there, 48 here\)"):
        other = load_config("stamp-stage2", overrides=[*overrides2, "model.gene.hidden=48"])
        train(other.model_copy(update={"run": other.run.model_copy(update={"out_dir": str(tmp_path / "x")})}))


def test_the_gene_stage_needs_dense_expression_and_the_niche_needs_the_loader() -> None:
    with pytest.raises(ConfigError, match=r"needs model\.gene\.name=mlp"):
        load_config("stamp-stage1", overrides=["model.gene.name=transformer", "model.gene.niche=false"])
    with pytest.raises(ConfigError, match=r"set data\.loader\.genes\.niche=true"):
        load_config("stamp-stage1", overrides=["data.loader.genes.niche=false"])
    with pytest.raises(ConfigError, match="image-gene alignment needs"):
        load_config("stamp-stage1", overrides=["run.stage=align"])
