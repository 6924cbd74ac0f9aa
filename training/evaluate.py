"""Evaluation: cross-modal retrieval and a HEST-Benchmark-style linear probe.

The metrics are pure functions of arrays (:func:`recall_at_k`, :func:`retrieval_metrics`,
:func:`linear_probe`), testable on constructed data with known answers; :func:`collect` is
the only part that runs a model.

- Retrieval: in a pool of N held-out spots, image i's true partner is gene profile i. The rank
  of the partner is the number of gallery items scored strictly higher (ties favour the truth);
  recall@k is the fraction ranked below k. Chance is k / N. Reported pooled (the whole pool is
  the gallery) and per held-out slide (each slide's spots against that slide's spots only:
  ``image_to_gene_r@5/slide/<id>``, chance ``k / n_slide``), with the mean over slides
  (``image_to_gene_r@5/slide_mean``).
- Linear probe: ridge regression from frozen image features to log1p expression of the most
  variable genes (chosen on the training spots), alpha chosen on held-out *training slides*,
  refitted on all training spots and scored on held-out slides as the Pearson correlation per
  gene, averaged over genes (HEST-Benchmark's summary).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    import torch

    from stcorpus.training.config import EvalSection

FloatArray = NDArray[np.floating[Any]]


def _unit_rows(x: FloatArray) -> NDArray[np.float64]:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    result: NDArray[np.float64] = x / np.maximum(norm, 1e-12)
    return result


def recall_at_k(queries: FloatArray, gallery: FloatArray, *, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@k of retrieving ``gallery[i]`` for ``queries[i]`` by cosine similarity.

    >>> import numpy as np
    >>> recall_at_k(np.eye(3), np.eye(3), ks=(1,))
    {1: 1.0}
    """
    q, g = _unit_rows(queries), _unit_rows(gallery)
    if q.shape != g.shape or q.ndim != 2:
        raise ValueError(f"queries and gallery must be paired (N,D) arrays, got {q.shape} and {g.shape}")
    rank = np.empty(len(q), dtype=np.int64)
    for start in range(0, len(q), 1024):  # bounded memory for large pools
        sim = q[start : start + 1024] @ g.T
        rows = np.arange(len(sim))
        # the partner's score from the same product, so rounding cannot rank it above itself
        true = sim[rows, start + rows]
        rank[start : start + 1024] = (sim > true[:, None]).sum(axis=1)
    return {k: float((rank < k).mean()) for k in ks}


def retrieval_metrics(
    image_emb: FloatArray, gene_emb: FloatArray, *, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Image -> gene and gene -> image recall@k over a pool, with chance levels, as flat metric names."""
    n = len(image_emb)
    out: dict[str, float] = {"pool_size": float(n)}
    for k, value in recall_at_k(image_emb, gene_emb, ks=ks).items():
        out[f"image_to_gene_r@{k}"] = value
    for k, value in recall_at_k(gene_emb, image_emb, ks=ks).items():
        out[f"gene_to_image_r@{k}"] = value
    for k in ks:
        out[f"chance_r@{k}"] = min(1.0, k / n)
    return out


def retrieval_per_slide(
    image_emb: FloatArray, gene_emb: FloatArray, slide_ids: Sequence[str], *, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k within each slide (its spots are the gallery) and the mean over slides, as flat names.

    Slides with a single spot in the pool are left out of the mean (recall is 1 trivially) but
    still listed. Keys: ``<direction>_r@<k>/slide/<id>``, ``pool_size/slide/<id>``,
    ``chance_r@<k>/slide/<id>`` and ``<direction>_r@<k>/slide_mean``.
    """
    slides = np.asarray(slide_ids)
    if len(slides) != len(image_emb):
        raise ValueError("one slide id per pooled spot is needed")
    out: dict[str, float] = {}
    means: dict[str, list[float]] = {}
    for slide in sorted(set(slides.tolist())):
        rows = np.flatnonzero(slides == slide)
        n = len(rows)
        out[f"pool_size/slide/{slide}"] = float(n)
        for direction, (q, g) in {
            "image_to_gene": (image_emb[rows], gene_emb[rows]),
            "gene_to_image": (gene_emb[rows], image_emb[rows]),
        }.items():
            for k, value in recall_at_k(q, g, ks=ks).items():
                out[f"{direction}_r@{k}/slide/{slide}"] = value
                if n > 1:
                    means.setdefault(f"{direction}_r@{k}/slide_mean", []).append(value)
        for k in ks:
            out[f"chance_r@{k}/slide/{slide}"] = min(1.0, k / n)
    out.update({name: float(np.mean(values)) for name, values in means.items()})
    return out


# ---------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """What :func:`linear_probe` measured."""

    pearson_mean: float
    #: Pearson r per probed gene on the test spots (NaN where a gene or its prediction is constant).
    pearson_per_gene: list[float]
    #: Column indices of the probed genes in the target arrays.
    genes: list[int]
    alpha: float
    #: Mean Pearson on the alpha-selection slides, per alpha.
    alpha_scores: dict[float, float] = field(default_factory=dict)
    #: ``slides`` when alpha was chosen on held-out training slides, ``spots`` when only one
    #: training slide exists (then half its spots, in a seeded shuffle).
    alpha_selection: str = "slides"

    def metrics(self) -> dict[str, float]:
        """Flat metric names for logs."""
        return {
            "probe_pearson": self.pearson_mean,
            "probe_alpha": self.alpha,
            "probe_genes": float(sum(not math.isnan(r) for r in self.pearson_per_gene)),
        }


def pearson_per_column(pred: FloatArray, truth: FloatArray) -> NDArray[np.float64]:
    """Pearson r of each column pair; NaN where either column is constant."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    p = p - p.mean(axis=0)
    t = t - t.mean(axis=0)
    denom = np.sqrt((p * p).sum(axis=0) * (t * t).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(axis=0) / denom
    r[denom <= 1e-12] = np.nan
    result: NDArray[np.float64] = r
    return result


class _Ridge:
    """Ridge regression for many alphas from one eigendecomposition of X^T X (standardised X, centred Y)."""

    def __init__(self, x: FloatArray, y: FloatArray) -> None:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        self.x_mean = x.mean(axis=0)
        self.x_std = np.maximum(x.std(axis=0), 1e-8)
        self.y_mean = y.mean(axis=0)
        xs = (x - self.x_mean) / self.x_std
        self.eigval, self.eigvec = np.linalg.eigh(xs.T @ xs)
        self.xty_rot = self.eigvec.T @ (xs.T @ (y - self.y_mean))

    def predict(self, x: FloatArray, *, alpha: float) -> NDArray[np.float64]:
        weights = self.eigvec @ (self.xty_rot / (np.maximum(self.eigval, 0.0) + alpha)[:, None])
        xs = (np.asarray(x, dtype=np.float64) - self.x_mean) / self.x_std
        result: NDArray[np.float64] = xs @ weights + self.y_mean
        return result


def _nanmean(values: NDArray[np.float64]) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def select_genes(
    train_y: FloatArray,
    *,
    n_genes: int,
    train_mask: NDArray[np.bool_] | None = None,
    test_mask: NDArray[np.bool_] | None = None,
) -> list[int]:
    """The ``n_genes`` most variable target columns on the training spots (ties: lower index first).

    With masks, only genes measured in every training and test spot are eligible: an unmeasured
    gene's zeros are not expression.
    """
    y = np.asarray(train_y, dtype=np.float64)
    variance = y.var(axis=0)
    eligible = variance > 0
    for mask in (train_mask, test_mask):
        if mask is not None:
            eligible &= np.asarray(mask, dtype=bool).all(axis=0)
    candidates = np.flatnonzero(eligible)
    order = candidates[np.argsort(-variance[candidates], kind="stable")]
    return [int(i) for i in order[:n_genes]]


def linear_probe(
    train_x: FloatArray,
    train_y: FloatArray,
    train_slides: Sequence[str],
    test_x: FloatArray,
    test_y: FloatArray,
    *,
    alphas: Sequence[float] = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0),
    n_genes: int = 50,
    alpha_fraction: float = 0.25,
    train_mask: NDArray[np.bool_] | None = None,
    test_mask: NDArray[np.bool_] | None = None,
    seed: int = 0,
) -> ProbeResult:
    """Ridge probe from features to targets (already log1p expression), scored by mean Pearson per gene.

    ``train_*`` come from training slides, ``test_*`` from held-out slides. Genes: the
    ``n_genes`` most variable on the training spots (:func:`select_genes`). Alpha: the one with
    the best mean Pearson on ``alpha_fraction`` of the training slides (seeded choice) after
    fitting on the others. Then refit on all training spots and score the test spots.
    """
    train_x = np.asarray(train_x, dtype=np.float64)
    test_x = np.asarray(test_x, dtype=np.float64)
    if len(train_x) != len(train_y) or len(train_x) != len(train_slides) or len(test_x) != len(test_y):
        raise ValueError("features, targets and slides must have one row per spot")
    genes = select_genes(train_y, n_genes=n_genes, train_mask=train_mask, test_mask=test_mask)
    if not genes:
        raise ValueError("no gene varies across the training spots (or none is measured everywhere); nothing to probe")
    y_train = np.asarray(train_y, dtype=np.float64)[:, genes]
    y_test = np.asarray(test_y, dtype=np.float64)[:, genes]

    rng = np.random.default_rng(seed)
    slides = np.asarray(train_slides)
    unique = np.array(sorted(set(slides.tolist())))
    if len(unique) >= 2:
        n_hold = min(len(unique) - 1, max(1, round(alpha_fraction * len(unique))))
        held = set(rng.permutation(unique)[:n_hold].tolist())
        hold = np.array([s in held for s in slides.tolist()])
        selection = "slides"
    else:
        hold = np.zeros(len(slides), dtype=bool)
        hold[rng.permutation(len(slides))[: len(slides) // 2]] = True
        selection = "spots"
    fit = _Ridge(train_x[~hold], y_train[~hold])
    scores = {
        float(a): _nanmean(pearson_per_column(fit.predict(train_x[hold], alpha=a), y_train[hold])) for a in alphas
    }
    finite = {a: s for a, s in scores.items() if not math.isnan(s)}
    best = max(finite, key=lambda a: (finite[a], -a)) if finite else float(alphas[0])

    final = _Ridge(train_x, y_train)
    per_gene = pearson_per_column(final.predict(test_x, alpha=best), y_test)
    return ProbeResult(
        pearson_mean=_nanmean(per_gene),
        pearson_per_gene=[float(r) for r in per_gene],
        genes=genes,
        alpha=best,
        alpha_scores=scores,
        alpha_selection=selection,
    )


# ---------------------------------------------------------------------------------------------
# Running a model over a pool
# ---------------------------------------------------------------------------------------------


@dataclass
class Embedded:
    """Embeddings and targets of a pool of spots, as numpy arrays (one row per spot)."""

    image_emb: NDArray[np.float32]
    gene_emb: NDArray[np.float32]
    image_features: NDArray[np.float32]
    expr: NDArray[np.float32] | None
    expr_mask: NDArray[np.bool_] | None
    slide_ids: list[str]
    keys: list[str]


def collect(
    model: torch.nn.Module,
    batches: Iterator[Mapping[str, Any]],
    *,
    limit: int,
    device: torch.device,
    autocast: Callable[[], Any],
) -> Embedded:
    """Run ``model`` (an ``ImageGeneModel``, in eval mode) over batches until ``limit`` spots.

    The probe's targets are a batch's ``probe_expr``/``probe_expr_mask`` when it has them (log1p
    beside another training transform), else its ``expr``/``expr_mask``. Empty batches (a loader
    that skipped bad samples) are passed over.
    """
    import torch

    from stcorpus.loaders import batch as B
    from stcorpus.training.data import PROBE_EXPR, PROBE_EXPR_MASK, to_device

    parts: dict[str, list[Any]] = {"image_emb": [], "gene_emb": [], "features": [], "expr": [], "mask": []}
    slides: list[str] = []
    keys: list[str] = []
    seen = 0
    with torch.no_grad():
        for batch in batches:
            take = min(len(batch[B.KEY]), limit - seen)
            if take == 0:
                continue
            on_device = to_device({k: v[:take] for k, v in batch.items()}, device)
            with autocast():
                features, image_emb = model.encode_image(on_device[B.PATCH])  # type: ignore[operator]
                _, gene_emb = model.encode_gene(on_device)  # type: ignore[operator]
            parts["image_emb"].append(image_emb.float().cpu())
            parts["gene_emb"].append(gene_emb.float().cpu())
            parts["features"].append(features.float().cpu())
            target, target_mask = (PROBE_EXPR, PROBE_EXPR_MASK) if PROBE_EXPR in batch else (B.EXPR, B.EXPR_MASK)
            if target in batch:
                parts["expr"].append(batch[target][:take].float())
                parts["mask"].append(batch[target_mask][:take])
            slides += list(batch[B.SLIDE_ID][:take])
            keys += list(batch[B.KEY][:take])
            seen += take
            if seen >= limit:
                break
    if not seen:
        raise ValueError("the evaluation source yielded no spots")
    return Embedded(
        image_emb=torch.cat(parts["image_emb"]).numpy(),
        gene_emb=torch.cat(parts["gene_emb"]).numpy(),
        image_features=torch.cat(parts["features"]).numpy(),
        expr=torch.cat(parts["expr"]).numpy() if parts["expr"] else None,
        expr_mask=torch.cat(parts["mask"]).numpy() if parts["mask"] else None,
        slide_ids=slides,
        keys=keys,
    )


@dataclass
class Evaluation:
    """Metrics of one evaluation and exactly which slides each side used."""

    metrics: dict[str, float]
    #: Slides of the retrieval pool, which are also the probe's test slides (validation split).
    pool_slides: list[str]
    #: Slides of the spots the probe was fitted on (training split; empty without a probe).
    probe_train_slides: list[str]


def evaluate(
    model: torch.nn.Module,
    data: Any,
    cfg: EvalSection,
    *,
    device: torch.device,
    autocast: Callable[[], Any],
    seed: int = 0,
) -> Evaluation:
    """Retrieval over the validation pool (pooled, per slide) and the linear probe (training spots -> held-out slides).

    ``data`` is a :class:`stcorpus.training.data.RunData`. The pool is the first ``pool_size`` spots of
    ``data.val_batches()``; the probe is fitted on the first ``probe_train_size`` spots of
    ``data.probe_train_batches()`` (training-split slides; alpha chosen on some of those slides)
    and scored on the pool's spots, whose slides it never saw: a slide on both sides is an
    error. It needs log1p targets in the batches (``probe_expr`` or ``expr``). The model is put
    in eval mode and back.
    """
    was_training = model.training
    model.eval()
    probe_slides: list[str] = []
    try:
        val = collect(model, data.val_batches(), limit=cfg.pool_size, device=device, autocast=autocast)
        metrics = retrieval_metrics(val.image_emb, val.gene_emb, ks=cfg.recall_ks)
        metrics.update(retrieval_per_slide(val.image_emb, val.gene_emb, val.slide_ids, ks=cfg.recall_ks))
        if cfg.probe and val.expr is not None:
            train = collect(
                model, data.probe_train_batches(), limit=cfg.probe_train_size, device=device, autocast=autocast
            )
            probe_slides = sorted(set(train.slide_ids))
            shared = sorted(set(probe_slides) & set(val.slide_ids))
            if shared:
                raise ValueError(
                    f"the probe would be fitted and scored on the same slides ({shared[:5]}): the training and "
                    "validation splits share slides; split the corpus by patient or study"
                )
            if train.expr is not None:
                result = linear_probe(
                    train.image_features,
                    train.expr,
                    train.slide_ids,
                    val.image_features,
                    val.expr,
                    alphas=cfg.probe_alphas,
                    n_genes=cfg.probe_genes,
                    alpha_fraction=cfg.probe_alpha_fraction,
                    train_mask=train.expr_mask,
                    test_mask=val.expr_mask,
                    seed=seed,
                )
                metrics.update(result.metrics())
                metrics["probe_train_spots"] = float(len(train.keys))
    finally:
        model.train(was_training)
    return Evaluation(metrics=metrics, pool_slides=sorted(set(val.slide_ids)), probe_train_slides=probe_slides)


def evaluate_model(
    model: torch.nn.Module,
    data: Any,
    cfg: EvalSection,
    *,
    device: torch.device,
    autocast: Callable[[], Any],
    seed: int = 0,
) -> dict[str, float]:
    """The metrics of :func:`evaluate`."""
    return evaluate(model, data, cfg, device=device, autocast=autocast, seed=seed).metrics
