"""Evaluation metrics on constructed data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stcorpus.training.evaluate import (
    linear_probe,
    pearson_per_column,
    recall_at_k,
    retrieval_metrics,
    retrieval_per_slide,
    select_genes,
)


def test_recall_counts_fixed_points_of_a_permutation() -> None:
    # queries e_i, gallery row j = e_sigma(j): query i's partner scores 1 only where sigma(i) = i;
    # elsewhere exactly one other gallery row scores 1 and the partner 0, so its rank is 1.
    sigma = [0, 2, 1, 3]
    queries = np.eye(4)
    gallery = np.eye(4)[sigma]
    assert recall_at_k(queries, gallery, ks=(1, 2, 4)) == {1: 0.5, 2: 1.0, 4: 1.0}


def test_recall_ranks_by_cosine_not_dot_product() -> None:
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    # gallery row 1 is long but points away from query 0; its partner is short and aligned
    gallery = np.array([[0.1, 0.0], [10.0, 10.0]])
    assert recall_at_k(queries, gallery, ks=(1,)) == {1: 1.0}


def test_ties_favour_the_true_partner() -> None:
    gallery = np.ones((5, 3))
    assert recall_at_k(np.ones((5, 3)), gallery, ks=(1,)) == {1: 1.0}


def test_recall_of_random_pairs_is_near_chance() -> None:
    rng = np.random.default_rng(0)
    values = [recall_at_k(rng.normal(size=(200, 16)), rng.normal(size=(200, 16)), ks=(10,))[10] for _ in range(10)]
    assert np.mean(values) == pytest.approx(10 / 200, abs=0.02)


def test_retrieval_metrics_are_directional_and_report_chance() -> None:
    queries = np.eye(4)
    gallery = np.eye(4)[[0, 2, 1, 3]]
    gallery[1] = gallery[1] + np.array([0.0, 0.0, 0.0, 0.9])  # breaks the symmetry of the two directions
    metrics = retrieval_metrics(queries, gallery, ks=(1, 2))
    assert metrics["chance_r@1"] == 0.25
    assert metrics["pool_size"] == 4
    assert metrics["image_to_gene_r@1"] == recall_at_k(queries, gallery, ks=(1,))[1]
    assert metrics["gene_to_image_r@1"] == recall_at_k(gallery, queries, ks=(1,))[1]
    with pytest.raises(ValueError, match="paired"):
        recall_at_k(np.eye(4), np.eye(3))


def test_pearson_per_column() -> None:
    x = np.arange(10.0)
    pred = np.stack([x, x, np.ones(10), x], axis=1)
    truth = np.stack([2 * x + 1, -x, x, np.ones(10)], axis=1)
    r = pearson_per_column(pred, truth)
    assert r[0] == pytest.approx(1.0)
    assert r[1] == pytest.approx(-1.0)
    assert math.isnan(r[2]) and math.isnan(r[3])


def _probe_data(seed: int, *, signal: bool) -> tuple:
    rng = np.random.default_rng(seed)
    n, d, g = 360, 12, 80
    w = rng.normal(size=(d, g))
    w /= np.linalg.norm(w, axis=0)  # every gene's signal has unit variance ...
    spread = 1.15 ** np.arange(g)  # ... scaled so that gene j's variance grows with j

    def make(m: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(m, d))
        core = x @ w if signal else rng.normal(size=(m, g))
        y = (core + 0.3 * rng.normal(size=(m, g))) * spread
        return x, y

    train_x, train_y = make(n)
    test_x, test_y = make(120)
    slides = [f"s{i % 6}" for i in range(n)]
    return train_x, train_y, slides, test_x, test_y


def test_probe_recovers_a_linear_map_and_picks_the_most_variable_genes() -> None:
    train_x, train_y, slides, test_x, test_y = _probe_data(0, signal=True)
    result = linear_probe(train_x, train_y, slides, test_x, test_y, n_genes=20)
    assert result.pearson_mean > 0.9
    assert sorted(result.genes) == list(range(60, 80))
    assert len(result.pearson_per_gene) == 20
    assert result.alpha in result.alpha_scores
    assert result.alpha_selection == "slides"
    assert result.metrics()["probe_pearson"] == result.pearson_mean


def test_probe_on_unrelated_features_is_near_zero() -> None:
    train_x, train_y, slides, test_x, test_y = _probe_data(1, signal=False)
    result = linear_probe(train_x, train_y, slides, test_x, test_y, n_genes=20)
    assert abs(result.pearson_mean) < 0.15


def test_probe_with_one_training_slide_chooses_alpha_on_spots() -> None:
    train_x, train_y, _, test_x, test_y = _probe_data(2, signal=True)
    result = linear_probe(train_x, train_y, ["only"] * len(train_x), test_x, test_y, n_genes=5)
    assert result.alpha_selection == "spots"
    assert result.pearson_mean > 0.9


def test_gene_selection_skips_genes_not_measured_everywhere() -> None:
    y = np.array([[0.0, 1.0, 5.0], [2.0, 1.0, 0.0], [4.0, 1.0, 9.0]])
    assert select_genes(y, n_genes=3) == [2, 0]  # gene 1 is constant
    test_mask = np.array([[True, True, False], [True, True, True]])
    assert select_genes(y, n_genes=3, test_mask=test_mask) == [0]
    with pytest.raises(ValueError, match="nothing to probe"):
        linear_probe(np.ones((3, 2)), np.ones((3, 3)), ["a", "b", "c"], np.ones((2, 2)), np.ones((2, 3)))


def test_recall_is_chunk_independent_on_large_pools() -> None:
    rng = np.random.default_rng(3)
    latent = rng.normal(size=(2500, 8))
    queries = latent + 0.5 * rng.normal(size=latent.shape)
    gallery = latent + 0.5 * rng.normal(size=latent.shape)
    got = recall_at_k(queries, gallery, ks=(1, 10))
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    sim = q @ g.T
    rank = (sim > np.diag(sim)[:, None]).sum(axis=1)
    assert got == {1: float((rank < 1).mean()), 10: float((rank < 10).mean())}
    assert got[10] > 10 / 2500


def test_recall_is_reported_per_held_out_slide_as_well_as_pooled() -> None:

    rng = np.random.default_rng(0)
    # slide a: genes are the images (perfect); slide b: genes are noise; c: a single spot
    img_a, img_b, img_c = rng.normal(size=(10, 8)), rng.normal(size=(10, 8)), rng.normal(size=(1, 8))
    image = np.concatenate([img_a, img_b, img_c])
    gene = np.concatenate([img_a, rng.normal(size=(10, 8)), img_c])
    slides = ["a"] * 10 + ["b"] * 10 + ["c"]
    per = retrieval_per_slide(image, gene, slides, ks=(1, 5))
    assert per["image_to_gene_r@1/slide/a"] == 1.0 and per["gene_to_image_r@1/slide/a"] == 1.0
    assert per["image_to_gene_r@1/slide/b"] < 0.5
    assert per["pool_size/slide/b"] == 10 and per["chance_r@5/slide/b"] == 0.5
    assert per["image_to_gene_r@1/slide/c"] == 1.0  # listed, but left out of the mean
    expected = (per["image_to_gene_r@1/slide/a"] + per["image_to_gene_r@1/slide/b"]) / 2
    assert per["image_to_gene_r@1/slide_mean"] == pytest.approx(expected)
    pooled = retrieval_metrics(image, gene, ks=(1, 5))
    assert pooled["pool_size"] == 21  # the pooled numbers stay, over the whole pool
    assert pooled["image_to_gene_r@1"] != per["image_to_gene_r@1/slide_mean"]
