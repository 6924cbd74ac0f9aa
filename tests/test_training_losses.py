"""Losses: CLIP and SigLIP against hand computations, the gathered path on one rank, STAMP terms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from stcorpus.training.config import LossSection
from stcorpus.training.losses import ClipLoss, ContrastiveObjective, SigLipLoss, clip_loss, siglip_loss


def _softmax_ce(row: list[float], target: int) -> float:
    return -row[target] + math.log(sum(math.exp(v) for v in row))


def test_clip_loss_equals_hand_computation() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    # logits a.b^T * 2 = [[2, 1.2], [0, 1.6]]; the transpose for the gene -> image direction
    image_to_gene = (_softmax_ce([2.0, 1.2], 0) + _softmax_ce([0.0, 1.6], 1)) / 2
    gene_to_image = (_softmax_ce([2.0, 0.0], 0) + _softmax_ce([1.2, 1.6], 1)) / 2
    expected = (image_to_gene + gene_to_image) / 2
    assert float(clip_loss(a, b, scale)) == pytest.approx(expected, rel=1e-6)
    assert float(clip_loss(a, b, scale, bidirectional=False)) == pytest.approx(image_to_gene, rel=1e-6)


def test_siglip_loss_equals_hand_computation() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t, bias = 2.0, -1.0
    total = 0.0
    for i in range(2):
        for j in range(2):
            z = 1.0 if i == j else -1.0
            logit = t * float(a[i] @ b[j]) + bias
            total += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    expected = total / 2
    got = siglip_loss(a, b, torch.tensor(t), torch.tensor(bias))
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_perfect_alignment_gives_lower_loss_than_shuffled() -> None:
    torch.manual_seed(0)
    a = F.normalize(torch.randn(16, 8), dim=-1)
    shuffled = a[torch.randperm(16)]
    scale = torch.tensor(10.0)
    assert clip_loss(a, a, scale) < clip_loss(a, shuffled, scale)
    assert siglip_loss(a, a, scale, torch.tensor(-5.0)) < siglip_loss(a, shuffled, scale, torch.tensor(-5.0))


def test_modules_without_process_group_are_the_plain_functions() -> None:
    torch.manual_seed(1)
    a, b = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    out = ClipLoss()(a, b, torch.tensor(5.0))
    assert out.logits_shape == (6, 6)
    assert torch.equal(out.loss, clip_loss(a, b, torch.tensor(5.0)))
    sig = SigLipLoss()(a, b, torch.tensor(5.0), torch.tensor(-3.0))
    assert torch.equal(sig.loss, siglip_loss(a, b, torch.tensor(5.0), torch.tensor(-3.0)))


def _grads(module, *, siglip: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(2)
    wa = torch.randn(5, 4, requires_grad=True)
    wb = torch.randn(3, 4, requires_grad=True)
    xa, xb = torch.randn(8, 5), torch.randn(8, 3)
    a, b = F.normalize(xa @ wa, dim=-1), F.normalize(xb @ wb, dim=-1)
    out = module(a, b, torch.tensor(4.0), torch.tensor(-2.0)) if siglip else module(a, b, torch.tensor(4.0))
    out.loss.backward()
    assert wa.grad is not None and wb.grad is not None
    return out.loss.detach(), [wa.grad, wb.grad]


@pytest.mark.parametrize(
    ("make", "siglip"),
    [
        (lambda: ClipLoss(local_loss=True), False),
        (lambda: ClipLoss(local_loss=False), False),
        (lambda: ClipLoss(gather_with_grad=False), False),
        (SigLipLoss, True),
    ],
)
def test_gathered_loss_on_one_rank_equals_local(make, siglip, tmp_path) -> None:
    local_loss, local_grads = _grads(make(), siglip=siglip)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.get_world_size() == 1
        gathered_loss, gathered_grads = _grads(make(), siglip=siglip)
    finally:
        dist.destroy_process_group()
    assert torch.allclose(gathered_loss, local_loss, atol=1e-6)
    for gathered, local in zip(gathered_grads, local_grads, strict=True):
        assert torch.allclose(gathered, local, atol=1e-6)


def _outputs(batch: int = 8, dim: int = 6) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return {
        "patch": F.normalize(torch.randn(batch, dim), dim=-1),
        "gene": F.normalize(torch.randn(batch, dim), dim=-1),
        "region": F.normalize(torch.randn(batch, dim), dim=-1),
        "pos_logits": torch.randn(batch, 9),
        "logit_scale": torch.tensor(10.0),
        "logit_bias": torch.tensor(-4.0),
    }


def test_objective_weights_terms_and_switches_off_zero_weights() -> None:
    out = _outputs()
    pos = torch.randint(9, (8,), generator=torch.Generator().manual_seed(0))
    cfg = LossSection(patch_spot=1.0, region_spot=0.5, patch_region=0.25, pos=2.0)
    terms = ContrastiveObjective(cfg)(out, pos)
    assert set(terms) == {"loss", "patch_spot", "region_spot", "patch_region", "pos", "pos_acc"}
    assert torch.equal(terms["patch_spot"], clip_loss(out["patch"], out["gene"], out["logit_scale"]))
    assert torch.equal(terms["region_spot"], clip_loss(out["region"], out["gene"], out["logit_scale"]))
    one_way = clip_loss(out["patch"], out["region"], out["logit_scale"], bidirectional=False)
    assert torch.equal(terms["patch_region"], one_way)
    assert torch.allclose(terms["pos"], F.cross_entropy(out["pos_logits"], pos))
    expected = terms["patch_spot"] + 0.5 * terms["region_spot"] + 0.25 * terms["patch_region"] + 2.0 * terms["pos"]
    assert torch.allclose(terms["loss"], expected)

    only_main = ContrastiveObjective(LossSection())(out, None)
    assert set(only_main) == {"loss", "patch_spot"}


def test_objective_siglip_uses_the_bias_and_reports_logits_shape() -> None:
    out = _outputs()
    objective = ContrastiveObjective(LossSection(kind="siglip"))
    terms = objective(out, None)
    expected = siglip_loss(out["patch"], out["gene"], out["logit_scale"], out["logit_bias"])
    assert torch.equal(terms["patch_spot"], expected)
    assert objective.last_logits_shape == (8, 8)


def test_temperature_gets_a_gradient() -> None:
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    out = _outputs()
    loss = clip_loss(out["patch"], out["gene"], log_scale.exp())
    loss.backward()  # type: ignore[no-untyped-call]
    assert log_scale.grad is not None and float(log_scale.grad) != 0.0
