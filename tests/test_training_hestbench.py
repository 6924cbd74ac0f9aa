"""HEST-Bench's protocol on a small task laid out exactly as HEST-Bench publishes its files.

The fixture is generated at test time: ``<task>/splits/{train,test}_<i>.csv`` (sample_id,
patches_path, expr_path), ``patches/<id>.h5`` (``img`` (N,224,224,3) uint8 with the
``patch_size_target`` attribute, ``coords`` (N,2), ``barcode`` (N,1) bytes, as hestcore's
``patcher.to_h5`` writes them), ``adata/<id>.h5ad`` (spots x genes, barcodes as obs names) and
``var_50genes.json``. The patches' colour follows a latent factor that also drives half of the
genes, so an encoder's features can predict those genes.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import anndata
import h5py
import numpy as np
import pytest

from stcorpus.training.errors import DataSourceUnavailableError
from stcorpus.training.hestbench import (
    PUBLISHED,
    default_alpha,
    embed_patches,
    image_embedder,
    main,
    probe_fold,
    run_corpus,
    run_task,
    task_folds,
)

GENES = [f"GENE{i:02d}" for i in range(60)]
LISTED = GENES[:50]
SAMPLES = ["TENX1", "TENX2", "NCBI3", "NCBI4"]


def _write_sample(task: Path, sample_id: str, rng: np.random.Generator, *, n: int = 40) -> None:
    latent = rng.normal(size=n)
    barcodes = [f"{sample_id}-{i:04d}-1" for i in range(n)]
    colour = (255 / (1 + np.exp(-latent)))[:, None, None, None]
    img = np.clip(colour * np.array([1.0, 0.6, 0.8]) + rng.normal(0, 8, size=(n, 224, 224, 3)), 0, 255).astype(np.uint8)
    with h5py.File(task / "patches" / f"{sample_id}.h5", "w") as f:
        f.create_dataset("img", data=img, chunks=(1, 224, 224, 3))
        f["img"].attrs["patch_size_target"] = 224
        f.create_dataset("coords", data=rng.integers(0, 10_000, size=(n, 2)))
        f.create_dataset("barcode", data=np.array(barcodes, dtype="S").reshape(n, 1))
    rate = np.exp(np.outer(latent, np.r_[np.ones(30), np.zeros(30)]) + 1.0)
    counts = rng.poisson(rate).astype(np.float32)
    adata = anndata.AnnData(X=counts, obs={"in_tissue": np.ones(n, dtype=int)})
    adata.obs_names = barcodes
    adata.var_names = GENES
    adata.write_h5ad(task / "adata" / f"{sample_id}.h5ad")


def _write_split(path: Path, ids: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sample_id", "patches_path", "expr_path"])
        for i in ids:
            writer.writerow([i, f"patches/{i}.h5", f"adata/{i}.h5ad"])


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hest-bench")
    task = root / "IDC"
    for sub in ("patches", "adata", "splits"):
        (task / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for sample in SAMPLES:
        _write_sample(task, sample, rng)
    # two patient folds, as HEST-Bench's: train on two patients, test on the other two
    _write_split(task / "splits" / "train_0.csv", SAMPLES[:2])
    _write_split(task / "splits" / "test_0.csv", SAMPLES[2:])
    _write_split(task / "splits" / "train_1.csv", SAMPLES[2:])
    _write_split(task / "splits" / "test_1.csv", SAMPLES[:2])
    (task / "var_50genes.json").write_text(json.dumps({"genes": LISTED}))
    return root


def test_the_protocol_on_a_hest_bench_task(bench: Path, tmp_path: Path) -> None:
    embed = image_embedder(encoder="MahmoodLab/UNI", small=True, batch_size=32)
    result = run_task(bench / "IDC", embed, latent_dim=16)
    assert len(result.folds) == 2
    for fold in result.folds:
        assert (fold.n_train, fold.n_test) == (80, 80)
        assert fold.alpha == pytest.approx(100 / (16 * 50)) == default_alpha(16, 50)
        assert list(fold.pearson_per_gene) == LISTED
    summary = result.to_dict()
    assert summary["pearson_mean"] == pytest.approx(np.mean([f.pearson_mean for f in result.folds]))
    assert summary["pearson_std"] == pytest.approx(np.std([f.pearson_mean for f in result.folds]))
    # the genes the latent drives are predicted from the images; the others are noise
    driven = np.mean([summary["pearson_per_gene"][g] for g in LISTED[:30]])
    noise = np.mean([summary["pearson_per_gene"][g] for g in LISTED[30:]])
    assert driven > 0.5 and abs(noise) < 0.2, (driven, noise)

    # the command line: the same numbers, the published ones beside them, a tuned alpha differs
    out = tmp_path / "results.json"
    args = [
        "--bench-root",
        str(bench),
        "--encoder",
        "MahmoodLab/UNI",
        "--small",
        "--latent-dim",
        "16",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    written = json.loads(out.read_text())
    assert written["pearson_mean"] == pytest.approx(summary["pearson_mean"], abs=1e-6)
    assert written["tasks"][0]["task"] == "IDC"
    assert main([*args, "--alpha", "1000"]) == 0
    assert json.loads(out.read_text())["pearson_mean"] != pytest.approx(summary["pearson_mean"], abs=1e-6)
    assert PUBLISHED["MahmoodLab/UNI2-h"] == {"default_alpha": 0.4083, "tuned_alpha": 0.4338}


def test_the_probe_follows_hest_benchmarks_steps() -> None:
    # HEST-Bench, step by step: StandardScaler + PCA(seed) fitted on train, float32, then ridge with
    # lsqr, no intercept, alpha 100 / (dims x genes); Pearson per gene; mean over genes.
    from scipy.stats import pearsonr
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    x_tr, x_te = rng.normal(size=(120, 40)), rng.normal(size=(60, 40))
    w = rng.normal(size=(40, 5))
    y_tr, y_te = x_tr @ w + rng.normal(size=(120, 5)), x_te @ w + rng.normal(size=(60, 5))
    genes = [f"g{i}" for i in range(5)]
    got = probe_fold(x_tr, y_tr, x_te, y_te, genes=genes, latent_dim=10, seed=1)
    scaler = StandardScaler().fit(x_tr)
    pca = PCA(n_components=10, random_state=1).fit(scaler.transform(x_tr))
    a, b = (pca.transform(scaler.transform(x)).astype(np.float32) for x in (x_tr, x_te))
    pred = (
        Ridge(solver="lsqr", alpha=100 / (10 * 5), fit_intercept=False, max_iter=1000, random_state=1)
        .fit(a, y_tr)
        .predict(b)
    )
    expected = [pearsonr(y_te[:, j], pred[:, j])[0] for j in range(5)]
    assert got.pearson_mean == pytest.approx(float(np.mean(expected)), abs=1e-6)  # float32 rounding
    assert math.isfinite(got.pearson_mean) and got.pearson_mean > 0.2  # PCA to 10 of 40 dimensions keeps part


def test_files_not_laid_out_as_hest_bench_are_named(bench: Path, tmp_path: Path) -> None:
    task = tmp_path / "BAD"
    (task / "splits").mkdir(parents=True)
    (task / "splits" / "train_0.csv").write_text("sample_id,patches\nA,patches/A.h5\n")
    with pytest.raises(DataSourceUnavailableError, match=r"test_<i>\.csv"):
        task_folds(task)
    (task / "splits" / "test_0.csv").write_text("sample_id,patches\nA,patches/A.h5\n")
    with pytest.raises(DataSourceUnavailableError, match="no column patches_path, expr_path"):
        task_folds(task)
    assert main(["--bench-root", str(tmp_path / "missing"), "--encoder", "MahmoodLab/UNI", "--small"]) == 2
    no_barcodes = tmp_path / "patches.h5"
    with h5py.File(no_barcodes, "w") as f:
        f.create_dataset("img", data=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(DataSourceUnavailableError, match=r"patches\.h5: needs an image dataset .* and barcodes"):
        embed_patches(no_barcodes, lambda x: x.reshape(len(x), -1).astype(np.float32))


def test_patches_are_embedded_a_chunk_at_a_time(bench: Path) -> None:
    seen: list[int] = []

    def embed(images: np.ndarray) -> np.ndarray:
        seen.append(len(images))
        return images.reshape(len(images), -1)[:, :5].astype(np.float32)

    whole, barcodes = embed_patches(bench / "IDC" / "patches" / "TENX1.h5", embed)
    parts, same = embed_patches(bench / "IDC" / "patches" / "TENX1.h5", embed, chunk=7)
    assert np.array_equal(whole, parts) and barcodes == same and barcodes[0] == "TENX1-0000-1"
    assert seen == [40, *[7] * 5, 5]


def test_the_protocol_on_a_corpus_held_out_slides(tmp_path: Path) -> None:
    from tests.corpus_fixture import write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    embed = image_embedder(encoder="MahmoodLab/UNI", small=True, batch_size=32)
    # the human heart slides: train heart-a and heart-b, held-out heart-c (the test split)
    result = run_corpus(str(corpus.root), embed, train_slides=["heart-a", "heart-b"], n_genes=20, latent_dim=16)
    (fold,) = result.folds
    assert (fold.n_train, fold.n_test) == (70, 30) and len(fold.pearson_per_gene) == 20
    assert all(g.startswith("ENSG") for g in fold.pearson_per_gene)
    with pytest.raises(DataSourceUnavailableError, match="measured in every spot"):
        run_corpus(str(corpus.root), embed, train_slides=["mbrain-a"], latent_dim=16)
