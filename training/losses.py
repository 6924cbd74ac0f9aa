"""Contrastive losses as small modules (open_clip ``ClipLoss`` style), gathered across ranks.

Under ``torch.distributed`` each rank holds a local batch; features of every rank are
gathered (with gradients, so that the negatives a rank borrows still train the rank that
made them) and each rank scores its local rows against the global batch (``local_loss``), or
the whole global matrix (``local_loss=False``, more compute, same value). Data-parallel
gradient averaging then gives exactly the gradient of the loss on the global batch.

The math lives in plain functions (:func:`clip_loss`, :func:`siglip_loss`) that tests compare
against hand computations; the modules add the gathering and the bookkeeping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from stcorpus.training.config import LossSection


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_sizes(n: int, *, device: torch.device | None = None, group: Any = None) -> list[int]:
    """Every rank's local batch size (rank order); ``[n]`` without a process group.

    ``group``: a process group for the exchange (training passes a gloo group on CUDA runs, so
    that reading the sizes never waits for the GPU).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return [n]
    world_size = dist.get_world_size(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    parts = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(parts, mine, group=group)
    return [int(p.item()) for p in parts]


def gather_features(features: Tensor, *, with_grad: bool = True, sizes: Sequence[int] | None = None) -> Tensor:
    """Concatenate ``features`` of every rank along dim 0 (rank order); identity without a process group.

    ``with_grad=True`` uses an autograd-aware all-gather, whose backward sends each rank the
    sum over ranks of the gradient of its own features. Otherwise only the local slice keeps
    its graph (open_clip's ``gather_with_grad=False``). ``sizes``: every rank's row count
    (:func:`batch_sizes`; asked for when None). Ranks may hold different counts (a loader that
    skipped bad samples): rows are padded to the largest count for the collective and the
    padding is cut out again, so the result has ``sum(sizes)`` rows.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return features
    if sizes is None:
        sizes = batch_sizes(features.shape[0], device=features.device)
    sizes = tuple(int(n) for n in sizes)
    if with_grad:
        return _all_gather_autograd(features, sizes)
    rank, _ = _world()
    parts = _gather_padded(features, sizes)
    parts[rank] = features
    return torch.cat(parts, dim=0)


def _gather_padded(features: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """Each rank's rows (``sizes[r]`` of them), through one all-gather of rows padded to ``max(sizes)``."""
    longest = max(sizes)
    local = features.contiguous()
    if local.shape[0] < longest:
        local = torch.cat([local, local.new_zeros((longest - local.shape[0], *local.shape[1:]))])
    parts = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(parts, local)
    return [part[:n] if n < longest else part for part, n in zip(parts, sizes, strict=True)]


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns each rank the summed gradient of its own rows.

    Plain ``all_gather`` + ``all_reduce`` (the collectives DDP itself uses), rather than
    ``torch.distributed.nn.functional.all_gather`` (deprecated; on gloo its all-to-all backward
    leaves processes aborting at exit) or functional collectives (same abort, intermittently, on
    gloo). The all-reduce of a (B_global, D) feature gradient is a few MB at most.
    """

    @staticmethod
    def forward(ctx: Any, features: Tensor, sizes: tuple[int, ...]) -> Tensor:
        rank, _ = _world()
        start = sum(sizes[:rank])
        ctx.rows = (start, start + features.shape[0])
        return torch.cat(_gather_padded(features, sizes), dim=0)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, None]:
        grad = grads[0].contiguous().clone()
        dist.all_reduce(grad)
        start, stop = ctx.rows
        return grad[start:stop], None


def _all_gather_autograd(features: Tensor, sizes: tuple[int, ...]) -> Tensor:
    gathered: Tensor = _AllGatherWithGrad.apply(features, sizes)
    return gathered


def share_of_global(sizes: Sequence[int] | None) -> float:
    """``B_local * world / B_global``: the weight that makes per-rank mean losses, averaged over
    ranks (as DDP averages gradients), the mean over the global batch. 1.0 when ranks hold as many rows.
    """
    if sizes is None or len(set(sizes)) <= 1:
        return 1.0
    rank, _ = _world()
    return sizes[rank] * len(sizes) / sum(sizes)


def clip_loss(
    queries: Tensor,
    gallery: Tensor,
    logit_scale: Tensor,
    *,
    offset: int = 0,
    bidirectional: bool = True,
    gallery_queries: Tensor | None = None,
    query_gallery: Tensor | None = None,
) -> Tensor:
    """InfoNCE of ``queries`` (B,D) against ``gallery`` (N,D): row i's positive is gallery row ``offset + i``.

    With ``bidirectional`` the loss is the mean of both directions: queries -> gallery, and the
    local gallery rows (``query_gallery``, default ``gallery[offset:offset+B]``) against all
    queries (``gallery_queries``, default ``queries``). Features are expected L2-normalised.
    """
    labels = torch.arange(queries.shape[0], device=queries.device) + offset
    logits = logit_scale * queries @ gallery.T
    loss = F.cross_entropy(logits.float(), labels)
    if not bidirectional:
        return loss
    local_gallery = gallery[offset : offset + queries.shape[0]] if query_gallery is None else query_gallery
    all_queries = queries if gallery_queries is None else gallery_queries
    logits_back = logit_scale * local_gallery @ all_queries.T
    return (loss + F.cross_entropy(logits_back.float(), labels)) / 2


def siglip_loss(
    queries: Tensor, gallery: Tensor, logit_scale: Tensor, logit_bias: Tensor, *, offset: int = 0
) -> Tensor:
    """Sigmoid loss (SigLIP): every (query, gallery) pair is a binary problem, positive on ``offset + i``.

    ``-sum(log sigmoid(z_ij * (t * q_i . g_j + b))) / B`` with ``z`` = +1 on positives, -1 elsewhere.
    """
    logits = (logit_scale * queries @ gallery.T + logit_bias).float()
    labels = -torch.ones_like(logits)
    rows = torch.arange(queries.shape[0], device=queries.device)
    labels[rows, rows + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / queries.shape[0]


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the entries where ``mask`` is True (an unmeasured gene is no target)."""
    err = (pred.float() - target.float()) ** 2 * mask
    return err.sum() / mask.sum().clamp(min=1)


class PairOutput(NamedTuple):
    """A pair loss and the shape of the logits matrix it scored (rows local, columns global)."""

    loss: Tensor
    logits_shape: tuple[int, int]


class ClipLoss(nn.Module):
    """CLIP InfoNCE between two L2-normalised feature sets, gathered across ranks.

    ``forward(a, b, logit_scale)`` with ``a``, ``b`` of shape (B_local, D). On one process it is
    :func:`clip_loss`; under ``torch.distributed`` it gathers both sides first.
    """

    def __init__(self, *, local_loss: bool = True, gather_with_grad: bool = True, bidirectional: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.bidirectional = bidirectional

    def forward(self, a: Tensor, b: Tensor, logit_scale: Tensor, *, sizes: Sequence[int] | None = None) -> PairOutput:
        """The loss and the logits shape (rows, columns) of the a -> b direction.

        ``sizes``: every rank's row count (asked for when None); ranks may differ.
        """
        rank, _ = _world()
        distributed = dist.is_available() and dist.is_initialized()
        if not distributed:
            loss = clip_loss(a, b, logit_scale, bidirectional=self.bidirectional)
            return PairOutput(loss, (a.shape[0], b.shape[0]))
        if sizes is None:
            sizes = batch_sizes(a.shape[0], device=a.device)
        all_a = gather_features(a, with_grad=self.gather_with_grad, sizes=sizes)
        all_b = gather_features(b, with_grad=self.gather_with_grad, sizes=sizes)
        if self.local_loss:
            offset = sum(sizes[:rank])
            loss = clip_loss(
                a,
                all_b,
                logit_scale,
                offset=offset,
                bidirectional=self.bidirectional,
                gallery_queries=all_a,
                query_gallery=b,
            )
            share = share_of_global(sizes)
            return PairOutput(loss * share if share != 1.0 else loss, (a.shape[0], all_b.shape[0]))
        loss = clip_loss(all_a, all_b, logit_scale, bidirectional=self.bidirectional)
        return PairOutput(loss, (all_a.shape[0], all_b.shape[0]))


class SigLipLoss(nn.Module):
    """SigLIP's sigmoid loss; each rank scores its local queries against the gathered gallery.

    The value on rank r is ``sum over (local rows, global columns) / B_local``; averaged over ranks
    it equals :func:`siglip_loss` on the global batch.
    """

    def __init__(self, *, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.gather_with_grad = gather_with_grad

    def forward(
        self, a: Tensor, b: Tensor, logit_scale: Tensor, logit_bias: Tensor, *, sizes: Sequence[int] | None = None
    ) -> PairOutput:
        """The loss and the logits shape (rows, columns); ``sizes`` as in :class:`ClipLoss`."""
        rank, _ = _world()
        distributed = dist.is_available() and dist.is_initialized()
        if distributed and sizes is None:
            sizes = batch_sizes(a.shape[0], device=a.device)
        all_b = gather_features(b, with_grad=self.gather_with_grad, sizes=sizes)
        offset = sum(sizes[:rank]) if sizes is not None else 0
        loss = siglip_loss(a, all_b, logit_scale, logit_bias, offset=offset)
        share = share_of_global(sizes)
        return PairOutput(loss * share if share != 1.0 else loss, (a.shape[0], all_b.shape[0]))


class ContrastiveObjective(nn.Module):
    """STAMP-style multi-term objective over a model's outputs.

    Terms (a zero weight in :class:`~training.config.LossSection` switches one off):

    - ``patch_spot``: patch embedding <-> gene embedding (the CLIP/SigLIP term)
    - ``region_spot``: region embedding <-> gene embedding
    - ``patch_region``: patch -> region (which region holds this patch), one direction
    - ``pos``: 9-way classification of the patch's cell inside its region
    - ``gene_recon``: SEAL's reconstruction of the spot's expression from the patch features
      (mean squared error over the measured genes, :func:`masked_mse`)

    ``forward(outputs, pos)`` returns a dict with ``loss`` (weighted sum) and each active term;
    :attr:`last_logits_shape` holds the (rows, columns) of the main term's logits.
    """

    def __init__(self, cfg: LossSection) -> None:
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.kind
        if cfg.kind == "clip":
            self.pair: nn.Module = ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad)
            self.one_way: nn.Module = ClipLoss(
                local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, bidirectional=False
            )
        else:
            self.pair = SigLipLoss(gather_with_grad=cfg.gather_with_grad)
            self.one_way = self.pair
        self.last_logits_shape: tuple[int, int] = (0, 0)

    def _pair(
        self, module: nn.Module, a: Tensor, b: Tensor, outputs: Mapping[str, Tensor], sizes: Sequence[int] | None
    ) -> PairOutput:
        if self.kind == "clip":
            result: PairOutput = module(a, b, outputs["logit_scale"], sizes=sizes)
        else:
            result = module(a, b, outputs["logit_scale"], outputs["logit_bias"], sizes=sizes)
        return result

    def forward(
        self, outputs: Mapping[str, Tensor], pos: Tensor | None = None, *, sizes: Sequence[int] | None = None
    ) -> dict[str, Tensor]:
        """Loss terms from model outputs (``patch``, ``gene``, ``region``, ``pos_logits``, ``logit_scale``, ...).

        ``sizes``: every rank's local batch size, when known (one exchange per step instead of one
        per term); ranks may hold different counts, and each term is weighted so that its average
        over ranks is its mean over the global batch.
        """
        cfg = self.cfg
        if sizes is None and dist.is_available() and dist.is_initialized():
            sizes = batch_sizes(outputs["patch"].shape[0], device=outputs["patch"].device)
        terms: dict[str, Tensor] = {}
        total = torch.zeros((), device=outputs["patch"].device)
        if cfg.patch_spot > 0:
            main = self._pair(self.pair, outputs["patch"], outputs["gene"], outputs, sizes)
            self.last_logits_shape = main.logits_shape
            terms["patch_spot"] = main.loss
            total = total + cfg.patch_spot * main.loss
        if cfg.region_spot > 0:
            region = self._pair(self.pair, outputs["region"], outputs["gene"], outputs, sizes)
            if cfg.patch_spot == 0:
                self.last_logits_shape = region.logits_shape
            terms["region_spot"] = region.loss
            total = total + cfg.region_spot * region.loss
        if cfg.patch_region > 0:
            cross = self._pair(self.one_way, outputs["patch"], outputs["region"], outputs, sizes)
            terms["patch_region"] = cross.loss
            total = total + cfg.patch_region * cross.loss
        if cfg.pos > 0:
            if pos is None:
                raise ValueError("the pos term needs the batch's 'pos' labels")
            logits = outputs["pos_logits"].float()
            share = share_of_global(sizes)
            terms["pos"] = F.cross_entropy(logits, pos) * share if share != 1.0 else F.cross_entropy(logits, pos)
            terms["pos_acc"] = (logits.argmax(dim=1) == pos).float().mean().detach() * share
            total = total + cfg.pos * terms["pos"]
        if cfg.gene_recon > 0:
            recon = masked_mse(outputs["gene_pred"], outputs["gene_target"], outputs["gene_target_mask"])
            share = share_of_global(sizes)
            terms["gene_recon"] = recon * share if share != 1.0 else recon
            total = total + cfg.gene_recon * terms["gene_recon"]
        terms["loss"] = total
        return terms
