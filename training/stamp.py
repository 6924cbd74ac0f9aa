"""STAMP's stage 1: the gene encoder alone, pretrained on expression with its niche.

STAMP first pretrains a spatially aware gene encoder, then aligns it with images at several
scales (stage 2: the ``align`` stage with ``loss.region_spot``/``patch_region``/``pos`` and
``model.gene.init`` pointing at stage 1's checkpoint). Stage 1 here is masked-expression
modelling over the corpus (``run.stage: gene``, ``data.views: []``, no image decoded): a
fraction ``loss.mask_ratio`` of each spot's measured genes is hidden from the encoder, which
sees the rest of the spot and, with ``model.gene.niche``, the summed expression of its
neighbours; a linear decoder reconstructs every gene from the encoder's features, and the loss
is the mean squared error over the hidden genes. A hidden gene enters the encoder exactly like
an unmeasured one (value 0, mask False), so the task is the one the mask input already
expresses. Evaluation reconstructs a fixed hiding of the validation pool (``mask_mse``,
``mask_pearson``: Pearson r of hidden values against the truth over the pool).

The checkpoint of stage 1 holds the gene encoder as ``gene_encoder.*``, which
:func:`stcorpus.training.model.init_gene_encoder` loads into stage 2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from stcorpus.loaders import batch as B
from stcorpus.training.config import EvalSection, GeneEncoderSection
from stcorpus.training.encoders import build_gene_encoder
from stcorpus.training.losses import share_of_global


def hide_genes(mask: Tensor, *, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """A (B,G) bool of measured genes to hide: each measured gene with probability ``ratio``.

    A spot keeps at least one measured gene visible, and one with two or more hides at least one.
    """
    scores = torch.rand(mask.shape, generator=generator, device="cpu").to(mask.device)
    hidden = (scores < ratio) & mask
    measured = mask.sum(dim=1)
    # a spot whose draw hid nothing (or everything) hides its lowest-scoring (keeps its highest) gene
    ranked = scores.masked_fill(~mask, 2.0)
    lowest = ranked.argmin(dim=1)
    none_hidden = (hidden.sum(dim=1) == 0) & (measured >= 2)
    hidden[none_hidden, lowest[none_hidden]] = True
    highest = scores.masked_fill(~mask, -1.0).argmax(dim=1)
    all_hidden = (hidden.sum(dim=1) == measured) & (measured >= 1)
    hidden[all_hidden, highest[all_hidden]] = False
    return hidden


class MaskedGeneModel(nn.Module):
    """The gene encoder with a linear decoder over every gene, for masked-expression modelling.

    ``forward(batch)`` hides genes (a fresh draw in training, the given ``generator`` otherwise)
    and returns ``pred`` (B,G), ``target`` (B,G) and ``hidden`` (B,G bool).
    """

    def __init__(self, cfg: GeneEncoderSection, *, mask_ratio: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.mask_ratio = mask_ratio
        self.gene_encoder = build_gene_encoder(cfg)
        self.decoder = nn.Linear(self.gene_encoder.out_dim, cfg.n_genes)

    def forward(self, batch: Mapping[str, Tensor], *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Reconstruction of the hidden genes (see the class docstring)."""
        expr, mask = batch[B.EXPR], batch[B.EXPR_MASK]
        hidden = hide_genes(mask, ratio=self.mask_ratio, generator=generator)
        visible = mask & ~hidden
        features = self.gene_encoder(expr.masked_fill(hidden, 0.0), visible, batch.get(B.NICHE))
        return {"pred": self.decoder(features), "target": expr, "hidden": hidden}


class MaskedExpressionObjective(nn.Module):
    """Mean squared error over the hidden genes (the loop's objective for ``run.stage: gene``).

    ``forward(outputs, pos, sizes=...)`` has the contrastive objective's signature; ``pos`` is unused.
    """

    last_logits_shape: tuple[int, int] = (0, 0)

    def forward(
        self, outputs: Mapping[str, Tensor], pos: Tensor | None = None, *, sizes: Sequence[int] | None = None
    ) -> dict[str, Tensor]:
        """``{"loss", "mask_mse"}``, weighted so that the mean over ranks is the global mean."""
        del pos
        hidden = outputs["hidden"]
        err = (outputs["pred"].float() - outputs["target"].float()) ** 2
        mse = (err * hidden).sum() / hidden.sum().clamp(min=1)
        share = share_of_global(sizes)
        loss = mse * share if share != 1.0 else mse
        return {"loss": loss, "mask_mse": loss.detach()}


def evaluate_gene(
    model: MaskedGeneModel,
    batches: Iterator[Mapping[str, Any]],
    cfg: EvalSection,
    *,
    device: torch.device,
    autocast: Callable[[], Any],
    seed: int = 0,
) -> dict[str, float]:
    """Reconstruction of a fixed hiding (seeded) over the first ``cfg.pool_size`` validation spots."""
    from stcorpus.training.data import to_device

    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    preds: list[np.ndarray] = []
    truths: list[np.ndarray] = []
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                take = min(len(batch[B.KEY]), cfg.pool_size - seen)
                if take <= 0:
                    break
                on_device = to_device({k: v[:take] for k, v in batch.items()}, device)
                with autocast():
                    out = model(on_device, generator=generator)
                hidden = out["hidden"].cpu()
                preds.append(out["pred"].float().cpu()[hidden].numpy())
                truths.append(out["target"].float().cpu()[hidden].numpy())
                seen += take
    finally:
        model.train(was_training)
    if not seen:
        raise ValueError("the evaluation source yielded no spots")
    pred, truth = np.concatenate(preds), np.concatenate(truths)
    metrics = {
        "pool_size": float(seen),
        "mask_mse": float(np.mean((pred - truth) ** 2)),
        "masked_genes": float(len(pred)),
    }
    if len(pred) > 1 and pred.std() > 0 and truth.std() > 0:
        metrics["mask_pearson"] = float(np.corrcoef(pred, truth)[0, 1])
    return metrics
