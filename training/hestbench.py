"""HEST-Bench as published, for any image encoder: ``python -m stcorpus.training.hestbench``.

``python -m stcorpus.training.hestbench --bench-root eval/bench_data --encoder MahmoodLab/UNI2-h --weights hub``

Runs an image encoder over a folder laid out as HEST-Bench publishes it (the
``MahmoodLab/hest-bench`` dataset on the Hub), one folder per task::

    <bench-root>/<TASK>/splits/train_<i>.csv, test_<i>.csv   columns sample_id, patches_path, expr_path
    <bench-root>/<TASK>/patches/<sample_id>.h5                img (N,224,224,3) uint8, coords (N,2), barcode (N,1)
    <bench-root>/<TASK>/adata/<sample_id>.h5ad                spots x genes, obs names = barcodes
    <bench-root>/<TASK>/var_50genes.json                      {"genes": [...]} (the 50 most variable)

with HEST-Bench's protocol, as ``mahmoodlab/HEST`` ``src/hest/bench/benchmark.py``,
``trainer.py`` and ``st_dataset.py`` (and ``bench_config/bench_config.yaml``) write it:

1. embed every patch once (the encoder's features; its normalisation and input size);
2. targets: the task's gene list, ``log1p`` of the spots' counts (``normalize: True`` is
   ``sc.pp.log1p`` only), spots matched by barcode;
3. per fold ``i`` (the patient splits ``train_i``/``test_i``): ``StandardScaler`` + ``PCA(256,
   random_state=seed)`` fitted on the training spots (``dimreduce: PCA``, ``latent_dim: 256``),
   features cast to float32, then ``Ridge(solver="lsqr", alpha=100 / (n_features * n_genes),
   fit_intercept=False, max_iter=1000, random_state=seed)``; ``--alpha`` replaces the default
   alpha (HEST-Bench's leaderboard also lists tuned-alpha numbers);
4. Pearson r per gene (``scipy.stats.pearsonr``) on the test spots, its mean over genes per
   fold, then the mean (and std) over folds is the task's score; the benchmark's number is the
   mean over tasks. Seed 1 as ``BenchmarkConfig``.

The published numbers to compare with (mean over tasks) are in :data:`PUBLISHED`. The encoder
is a preset (``--encoder MahmoodLab/UNI2-h --weights hub|<file>``), a timm model
(``--encoder timm:<name>``), or the image tower of a run (``--checkpoint runs/x/checkpoints/step-*.pt``,
loaded back onto its base). ``--corpus <dir>`` runs the same protocol on a corpus's held-out
slides instead: the training split's spots against a held-out split's, one fold, on the 50 most
variable genes of the training spots that every spot on both sides measured.

Differences from HEST's own run: patches are resized to the encoder's input on the device
(bilinear up, area down) rather than with torchvision's PIL transforms; HEST-Bench's patches are
already 224 px, so only the 448 px CONCH trunk is resized. scikit-learn is needed
(``pip install 'stcorpus[hestbench]'``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from stcorpus.errors import StcorpusError
from stcorpus.training.errors import ConfigError, DataSourceUnavailableError, MissingExtraError

logger = logging.getLogger("stcorpus.training")

#: HEST-Bench's split CSV columns and the patch file's datasets (hest.bench.st_dataset.H5PatchDataset
#: accepts these names, in this order of preference).
SPLIT_COLUMNS: Final = ("sample_id", "patches_path", "expr_path")
IMAGE_KEYS: Final = ("img", "imgs", "images")
BARCODE_KEYS: Final = ("barcodes", "barcode")
GENE_LIST: Final = "var_50genes.json"
#: HEST-Bench defaults (hest.bench.benchmark.BenchmarkConfig).
SEED: Final = 1
LATENT_DIM: Final = 256

#: Published HEST-Bench mean Pearson (mean over tasks) a reproduction compares with.
PUBLISHED: Final = {
    "bioptimus/H-optimus-0": {"default_alpha": 0.4146},
    "MahmoodLab/UNI2-h": {"default_alpha": 0.4083, "tuned_alpha": 0.4338},
}

FloatArray = NDArray[np.float64]


# ---------------------------------------------------------------------------------------------
# The protocol (pure functions of arrays)
# ---------------------------------------------------------------------------------------------


def default_alpha(n_features: int, n_genes: int) -> float:
    """HEST-Bench's ridge alpha: ``100 / (n_features * n_genes)`` (trainer.train_test_reg)."""
    return 100.0 / (n_features * n_genes)


@dataclass(frozen=True)
class FoldResult:
    """One fold: Pearson r per gene on the test spots and their mean."""

    pearson_per_gene: dict[str, float]
    pearson_mean: float
    alpha: float
    n_train: int
    n_test: int


def probe_fold(
    x_train: NDArray[Any],
    y_train: NDArray[Any],
    x_test: NDArray[Any],
    y_test: NDArray[Any],
    *,
    genes: Sequence[str],
    latent_dim: int | None = LATENT_DIM,
    alpha: float | None = None,
    seed: int = SEED,
) -> FoldResult:
    """HEST-Bench's probe of one fold: scaler + PCA (``latent_dim``; None: none), ridge, Pearson per gene."""
    try:
        from scipy.stats import pearsonr
        from sklearn.decomposition import PCA
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as exc:
        raise MissingExtraError("HEST-Bench's probe needs scikit-learn: pip install 'stcorpus[hestbench]'") from exc
    if latent_dim is not None:
        limit = min(x_train.shape[0], x_train.shape[1])
        if latent_dim > limit:
            raise ConfigError(
                f"PCA to {latent_dim} dimensions needs at least that many training spots and features, but there are "
                f"{x_train.shape[0]} spots of {x_train.shape[1]} features; pass --latent-dim {limit} or lower"
            )
        pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=latent_dim, random_state=seed))])
        # HEST wraps the reduced features in torch.Tensor: float32 from here on.
        x_train = pipe.fit_transform(x_train).astype(np.float32)
        x_test = pipe.transform(x_test).astype(np.float32)
    used = alpha if alpha is not None else default_alpha(x_train.shape[1], y_train.shape[1])
    reg = Ridge(solver="lsqr", alpha=used, random_state=seed, fit_intercept=False, max_iter=1000)
    reg.fit(x_train, y_train)
    pred = reg.predict(x_test)
    per_gene: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's ConstantInputWarning: the r is NaN, counted below
        for j, gene in enumerate(genes):
            per_gene[gene] = float(pearsonr(y_test[:, j], pred[:, j])[0])
    values = list(per_gene.values())
    if any(math.isnan(v) for v in values):
        nan = [g for g, v in per_gene.items() if math.isnan(v)]
        logger.warning("Pearson r is undefined (a constant gene or prediction) for %s; the mean is NaN as in HEST", nan)
    return FoldResult(
        pearson_per_gene=per_gene,
        pearson_mean=float(np.mean(values)),
        alpha=float(used),
        n_train=len(y_train),
        n_test=len(y_test),
    )


@dataclass
class TaskResult:
    """A task's folds, and HEST-Bench's summary of them (mean and std over folds)."""

    name: str
    folds: list[FoldResult] = field(default_factory=list)

    @property
    def pearson_mean(self) -> float:
        return float(np.mean([f.pearson_mean for f in self.folds]))

    @property
    def pearson_std(self) -> float:
        return float(np.std([f.pearson_mean for f in self.folds]))

    def to_dict(self) -> dict[str, Any]:
        genes = list(self.folds[0].pearson_per_gene) if self.folds else []
        return {
            "task": self.name,
            "pearson_mean": self.pearson_mean,
            "pearson_std": self.pearson_std,
            "mean_per_split": [f.pearson_mean for f in self.folds],
            "alpha": [f.alpha for f in self.folds],
            "n_train": [f.n_train for f in self.folds],
            "n_test": [f.n_test for f in self.folds],
            "pearson_per_gene": {g: float(np.mean([f.pearson_per_gene[g] for f in self.folds])) for g in genes},
        }


# ---------------------------------------------------------------------------------------------
# Reading HEST-Bench's files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One row of a split CSV."""

    sample_id: str
    patches: Path
    expr: Path


def read_split(path: Path, *, task_dir: Path) -> list[Split]:
    """A ``splits/train_<i>.csv`` / ``test_<i>.csv`` (columns sample_id, patches_path, expr_path)."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in SPLIT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataSourceUnavailableError(
                f"{path}: no column {', '.join(missing)} (HEST-Bench split files have {', '.join(SPLIT_COLUMNS)}; "
                f"found {reader.fieldnames})"
            )
        rows = [Split(r["sample_id"], task_dir / r["patches_path"], task_dir / r["expr_path"]) for r in reader]
    if not rows:
        raise DataSourceUnavailableError(f"{path}: no samples")
    return rows


_FOLD: Final = re.compile(r"^(train|test)_(\d+)\.csv$")


def task_folds(task_dir: Path) -> list[tuple[list[Split], list[Split]]]:
    """The folds of a task: ``splits/train_<i>.csv`` with ``splits/test_<i>.csv``, by ``i``."""
    split_dir = task_dir / "splits"
    if not split_dir.is_dir():
        raise DataSourceUnavailableError(f"{task_dir}: no splits/ folder; is this a HEST-Bench task folder?")
    found: dict[int, dict[str, Path]] = {}
    for path in split_dir.iterdir():
        if m := _FOLD.match(path.name):
            found.setdefault(int(m.group(2)), {})[m.group(1)] = path
    unpaired = sorted(i for i, sides in found.items() if set(sides) != {"train", "test"})
    if unpaired or not found:
        raise DataSourceUnavailableError(
            f"{split_dir}: folds {unpaired or '(none)'} lack a train_<i>.csv or test_<i>.csv; HEST-Bench pairs them"
        )
    return [
        (read_split(found[i]["train"], task_dir=task_dir), read_split(found[i]["test"], task_dir=task_dir))
        for i in sorted(found)
    ]


def read_gene_list(task_dir: Path, name: str = GENE_LIST) -> list[str]:
    """The task's gene list (``{"genes": [...]}``)."""
    path = task_dir / name
    try:
        genes = json.loads(path.read_text())["genes"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataSourceUnavailableError(f'{path}: not a HEST-Bench gene list ({{"genes": [...]}}): {exc}') from exc
    return [str(g) for g in genes]


def embed_patches(path: Path, embed: Embed, *, chunk: int = 1024) -> tuple[NDArray[np.float32], list[str]]:
    """The features of a patch file's images (read ``chunk`` at a time, never the whole file) and its barcodes."""
    import h5py

    if not path.is_file():
        raise DataSourceUnavailableError(f"{path}: no such patch file")
    with h5py.File(path, "r") as f:
        image_key = next((k for k in IMAGE_KEYS if k in f), None)
        barcode_key = next((k for k in BARCODE_KEYS if k in f), None)
        if image_key is None or barcode_key is None:
            raise DataSourceUnavailableError(
                f"{path}: needs an image dataset ({'/'.join(IMAGE_KEYS)}) and barcodes ({'/'.join(BARCODE_KEYS)}); "
                f"it has {sorted(f)}"
            )
        images = f[image_key]
        raw = np.asarray(f[barcode_key][()]).reshape(-1)
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] != len(raw):
            raise DataSourceUnavailableError(f"{path}: images {images.shape} and {len(raw)} barcodes do not pair up")
        parts = [
            embed(np.asarray(images[start : start + chunk], dtype=np.uint8)) for start in range(0, len(raw), chunk)
        ]
    barcodes = [b.decode() if isinstance(b, bytes) else str(b) for b in raw]
    return np.concatenate(parts), barcodes


def read_expression(path: Path, *, barcodes: Sequence[str], genes: Sequence[str]) -> FloatArray:
    """``log1p`` of the spots' (barcodes, in order) counts of ``genes`` (HEST's load_adata(normalize=True))."""
    import anndata
    import scipy.sparse

    try:
        adata = anndata.read_h5ad(path)
    except (OSError, KeyError) as exc:
        raise DataSourceUnavailableError(f"{path}: not a readable h5ad ({exc})") from exc
    missing_spots = sorted(set(barcodes) - set(adata.obs_names))
    missing_genes = [g for g in genes if g not in set(adata.var_names)]
    if missing_spots or missing_genes:
        raise DataSourceUnavailableError(
            f"{path}: lacks {len(missing_spots)} of the patch file's barcodes ({missing_spots[:3]}) and genes "
            f"{missing_genes[:5]} of the task's gene list"
        )
    sub = adata[list(barcodes), list(genes)]
    x = sub.X.toarray() if scipy.sparse.issparse(sub.X) else np.asarray(sub.X)
    return np.log1p(x.astype(np.float64))


# ---------------------------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------------------------

Embed = Callable[[NDArray[np.uint8]], NDArray[np.float32]]


def image_embedder(
    *,
    encoder: str | None = None,
    weights: str | None = None,
    small: bool = False,
    checkpoint: str | None = None,
    device: str = "auto",
    batch_size: int = 128,
    precision: str = "fp32",
    seed: int = SEED,
) -> Embed:
    """A function from uint8 (N,H,W,3) patches to (N,D) features: a preset / timm encoder or a run's tower.

    torch is seeded with ``seed`` first, as HEST-Bench's ``set_seed`` does (a randomly
    initialised encoder is then the same in every run).
    """
    import torch

    from stcorpus.training.model import ImageNormalize

    torch.manual_seed(seed)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    if checkpoint is not None:
        from stcorpus.training.model import ImageGeneModel, load_trained_model

        model, _ = load_trained_model(checkpoint, device=dev)
        if not isinstance(model, ImageGeneModel):
            raise ConfigError(f"{checkpoint} is a gene-stage checkpoint: it has no image tower")
        normalize, tower = model.normalize, model.image_encoder
    elif encoder is not None:
        from stcorpus.training.config import ImageEncoderSection
        from stcorpus.training.encoders import build_image_encoder, encoder_defaults

        section = encoder_defaults(ImageEncoderSection(name=encoder, pretrained=weights, small=small), tile=224)
        tower = build_image_encoder(section, image_size=section.image_size).to(dev).eval()
        assert section.mean is not None and section.std is not None  # resolved by encoder_defaults
        normalize = ImageNormalize(section.mean, section.std, size=section.image_size).to(dev)
    else:
        raise ConfigError("give --encoder (with --weights) or --checkpoint")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def embed(images: NDArray[np.uint8]) -> NDArray[np.float32]:
        parts = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                chunk = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).to(dev)
                with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                    parts.append(tower(normalize(chunk)).float().cpu())
        return torch.cat(parts).numpy()

    return embed


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def run_task(
    task_dir: Path,
    embed: Embed,
    *,
    gene_list: str = GENE_LIST,
    latent_dim: int | None = LATENT_DIM,
    alpha: float | None = None,
    seed: int = SEED,
) -> TaskResult:
    """One HEST-Bench task: every sample embedded once, then each fold probed."""
    genes = read_gene_list(task_dir, gene_list)
    folds = task_folds(task_dir)
    cache: dict[str, tuple[NDArray[np.float32], FloatArray]] = {}

    def sample(split: Split) -> tuple[NDArray[np.float32], FloatArray]:
        if split.sample_id not in cache:
            features, barcodes = embed_patches(split.patches, embed)
            cache[split.sample_id] = (features, read_expression(split.expr, barcodes=barcodes, genes=genes))
            logger.info("%s: embedded %s (%d spots)", task_dir.name, split.sample_id, len(barcodes))
        return cache[split.sample_id]

    result = TaskResult(task_dir.name)
    for train, test in folds:
        x_tr, y_tr = (np.concatenate(parts) for parts in zip(*(sample(s) for s in train), strict=True))
        x_te, y_te = (np.concatenate(parts) for parts in zip(*(sample(s) for s in test), strict=True))
        result.folds.append(
            probe_fold(x_tr, y_tr, x_te, y_te, genes=genes, latent_dim=latent_dim, alpha=alpha, seed=seed)
        )
    return result


def bench_tasks(root: Path, tasks: Sequence[str] = ()) -> list[Path]:
    """The task folders under ``root`` (those with a ``splits/`` folder), or the named ones."""
    if not root.is_dir():
        raise DataSourceUnavailableError(f"{root}: no such folder (download MahmoodLab/hest-bench there)")
    if tasks:
        missing = [t for t in tasks if not (root / t / "splits").is_dir()]
        if missing:
            raise DataSourceUnavailableError(f"{root}: no HEST-Bench task {missing} (tasks have a splits/ folder)")
        return [root / t for t in tasks]
    found = sorted(p for p in root.iterdir() if (p / "splits").is_dir())
    if not found:
        raise DataSourceUnavailableError(f"{root}: no HEST-Bench task folders (each has splits/, patches/, adata/)")
    return found


def run_corpus(
    corpus: str,
    embed: Embed,
    *,
    train_split: str = "train",
    test_split: str = "test",
    train_slides: Sequence[str] = (),
    test_slides: Sequence[str] = (),
    n_genes: int = 50,
    latent_dim: int | None = LATENT_DIM,
    alpha: float | None = None,
    seed: int = SEED,
    batch_size: int = 64,
) -> TaskResult:
    """The protocol on a corpus: training-split spots against held-out-split spots, one fold.

    Targets: ``log1p`` counts (the loader's ``log1p``) of the ``n_genes`` most variable genes of the
    training spots among those every spot on both sides measured.
    """
    from stcorpus.training.evaluate import select_genes

    def read(split: str, slides: Sequence[str]) -> tuple[NDArray[np.float32], FloatArray, NDArray[np.bool_], list[str]]:
        from stcorpus.loaders import CorpusDataset, CorpusLoader, LoaderSettings
        from stcorpus.loaders.errors import LoaderError

        raw: dict[str, Any] = {
            "split": split,
            "batch_size": batch_size,
            "shuffle": False,
            "drop_last": False,
            "views": ["patch"],
            "genes": {"transform": "log1p"},
        }
        if slides:
            raw["filters"] = {"slide_ids": list(slides)}
        try:
            dataset = CorpusDataset(corpus, LoaderSettings.from_dict(raw))
        except LoaderError as exc:
            raise DataSourceUnavailableError(f"cannot read split {split} of {corpus}: {exc}") from exc
        feats, exprs, masks, ids = [], [], [], []
        for batch in _batches(CorpusLoader(dataset, device="cpu")):  # finished: dense expr + expr_mask
            feats.append(embed(batch["patch"].permute(0, 2, 3, 1).contiguous().numpy()))
            exprs.append(batch["expr"].numpy().astype(np.float64))
            masks.append(batch["expr_mask"].numpy())
            ids += list(batch["slide_id"])
        if not feats:
            raise DataSourceUnavailableError(f"split {split} of {corpus} has no spots")
        space = dataset.gene_transform.space if dataset.gene_transform is not None else None
        names = list(space.ensembl_ids) if space is not None else []
        return np.concatenate(feats), np.concatenate(exprs), np.concatenate(masks), names

    x_tr, y_tr, m_tr, names = read(train_split, train_slides)
    x_te, y_te, m_te, _ = read(test_split, test_slides)
    columns = select_genes(y_tr, n_genes=n_genes, train_mask=m_tr, test_mask=m_te)
    if not columns:
        raise DataSourceUnavailableError(
            f"no gene of {corpus} varies over the {train_split} spots and is measured in every spot of both splits; "
            "choose slides of one panel / species with --train-slides / --test-slides"
        )
    genes = [names[c] if c < len(names) else str(c) for c in columns]
    result = TaskResult(f"{corpus}:{train_split}->{test_split}")
    fold = probe_fold(
        x_tr, y_tr[:, columns], x_te, y_te[:, columns], genes=genes, latent_dim=latent_dim, alpha=alpha, seed=seed
    )
    result.folds.append(fold)
    return result


def _batches(loader: Any) -> Iterator[dict[str, Any]]:
    for batch in loader:
        if len(batch["key"]):
            yield batch


def summary(results: Sequence[TaskResult], *, encoder: str | None) -> dict[str, Any]:
    """The run's JSON: per task, the mean over tasks, and the published numbers for this encoder."""
    out: dict[str, Any] = {"tasks": [r.to_dict() for r in results]}
    out["pearson_mean"] = float(np.mean([r.pearson_mean for r in results])) if results else float("nan")
    if encoder in PUBLISHED:
        out["published"] = PUBLISHED[encoder]
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m stcorpus.training.hestbench``."""
    p = argparse.ArgumentParser(prog="python -m stcorpus.training.hestbench", description=__doc__.split("\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--bench-root", type=Path, help="a folder of HEST-Bench tasks (IDC/, PRAD/, ...)")
    where.add_argument("--corpus", help="a corpus folder, URL or hf:// repository (held-out slides instead)")
    p.add_argument("--tasks", nargs="+", default=[], help="tasks to run (default: every task folder)")
    p.add_argument("--encoder", help="a preset Hub name (MahmoodLab/UNI2-h, ...) or timm:<name>")
    p.add_argument("--weights", help="the encoder's weights: 'hub' or a local file / folder")
    p.add_argument("--small", action="store_true", help="a preset at test size (smoke runs)")
    p.add_argument("--checkpoint", help="a training checkpoint: its image tower, loaded back onto its base")
    p.add_argument("--gene-list", default=GENE_LIST, help=f"the task's gene list file (default {GENE_LIST})")
    p.add_argument("--latent-dim", type=int, default=LATENT_DIM, help="PCA dimensions (0: no PCA); HEST: 256")
    p.add_argument("--alpha", type=float, default=None, help="ridge alpha (default HEST's 100 / (dims x genes))")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument("--train-slides", nargs="+", default=[], help="--corpus: training slides to use (default all)")
    p.add_argument("--test-slides", nargs="+", default=[], help="--corpus: held-out slides to use (default all)")
    p.add_argument("--genes", type=int, default=50, help="--corpus: the most variable genes to probe")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--out", type=Path, help="write the results JSON here (and print it)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    latent = args.latent_dim or None
    try:
        embed = image_embedder(
            encoder=args.encoder,
            weights=args.weights,
            small=args.small,
            checkpoint=args.checkpoint,
            device=args.device,
            batch_size=args.batch_size,
            precision=args.precision,
            seed=args.seed,
        )
        if args.corpus:
            results = [
                run_corpus(
                    args.corpus,
                    embed,
                    train_split=args.train_split,
                    test_split=args.test_split,
                    train_slides=args.train_slides,
                    test_slides=args.test_slides,
                    n_genes=args.genes,
                    latent_dim=latent,
                    alpha=args.alpha,
                    seed=args.seed,
                )
            ]
        else:
            results = [
                run_task(task, embed, gene_list=args.gene_list, latent_dim=latent, alpha=args.alpha, seed=args.seed)
                for task in bench_tasks(args.bench_root, args.tasks)
            ]
    except StcorpusError as exc:
        logger.error("%s", exc)
        return 2
    text = json.dumps(summary(results, encoder=args.encoder), indent=2, sort_keys=True)
    if args.out is not None:
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
