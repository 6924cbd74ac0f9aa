"""Gene and image transforms, with values worked out by hand on small inputs."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from stcorpus.loaders import CorpusDataset, CorpusLoader, LoaderSettings
from stcorpus.loaders.errors import BadSampleError, LoaderSettingsError
from stcorpus.loaders.expression import ExpressionTransform, to_csr
from stcorpus.loaders.genes import GeneSpace
from stcorpus.loaders.images import Augment, JpegDecoder
from stcorpus.loaders.settings import AugmentSettings, GeneSettings
from tests.corpus_fixture import FixtureCorpus, vocabulary, write_corpus

# ---------------------------------------------------------------------------------------------
# Genes on a hand-made vocabulary
# ---------------------------------------------------------------------------------------------

#: index, id, species, human_ortholog, human_ortholog_id, panels
TINY = [
    (0, "ENSG0", "human", None, None, ["p1"]),
    (1, "ENSG1", "human", None, None, ["p1", "p2"]),
    (2, "ENSG2", "human", None, None, []),
    (3, "ENSMUSG3", "mouse", 1, "ENSG1", []),
    (4, "ENSMUSG4", "mouse", None, None, []),
    (5, "ENSMUSG5", "mouse", None, "ENSG_OUTSIDE_VOCABULARY", []),
]
MEASURED = {"h": np.array([0, 1, 2]), "m": np.array([3, 4])}


def tiny() -> pa.Table:
    rows = [
        {"index": i, "ensembl_id": e, "species": s, "human_ortholog": o, "human_ortholog_id": oid, "panels": p}
        for i, e, s, o, oid, p in TINY
    ]
    return pa.Table.from_pylist(rows)


def transform(**options: Any) -> ExpressionTransform:
    means = options.pop("means", None)
    settings = GeneSettings(**options)
    return ExpressionTransform(GeneSpace.build(tiny(), settings), settings, measured=MEASURED, means=means)


def flat(*samples: tuple[list[int], list[Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's sparse ``(genes, counts, offsets)``, as the loader's workers hand them over."""
    genes = torch.tensor([g for gs, _ in samples for g in gs], dtype=torch.int32)
    counts = torch.tensor([c for _, cs in samples for c in cs], dtype=torch.int32)
    offsets = torch.tensor([0, *np.cumsum([len(gs) for gs, _ in samples]).tolist()], dtype=torch.int64)
    return genes, counts, offsets


def dense(t: ExpressionTransform, *samples: tuple[list[int], list[Any]]) -> np.ndarray:
    return t.dense(*flat(*samples)).numpy()


def tokens(t: ExpressionTransform, *samples: tuple[list[int], list[Any]]) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = t.tokens(*flat(*samples))
    return ids.numpy(), mask.numpy()


def mask(t: ExpressionTransform, slides: list[str]) -> np.ndarray:
    return t.tables(torch.device("cpu"))["mask"][torch.from_numpy(t.slide_index(slides))].numpy()


BATCH: tuple[tuple[list[int], list[Any]], ...] = (
    ([0, 2], [3, 1]),
    ([3, 4, 5], [5, 2, 1]),
    ([0, 1, 2], [3, 3, 1]),
    ([], []),
)


def test_counts_log1p_and_cp10k_by_hand() -> None:
    counts = dense(transform(transform="counts"), *BATCH)
    assert counts.dtype == np.float32 and counts.shape == (4, 6)
    assert counts.tolist() == [[3, 0, 1, 0, 0, 0], [0, 0, 0, 5, 2, 1], [3, 3, 1, 0, 0, 0], [0] * 6]
    log1p = dense(transform(transform="log1p"), *BATCH)
    assert np.allclose(log1p[0], [np.log(4), 0, np.log(2), 0, 0, 0])
    cp10k = dense(transform(transform="cp10k_log1p"), *BATCH)
    assert np.allclose(cp10k[0], [np.log1p(7500), 0, np.log1p(2500), 0, 0, 0])  # library 4
    assert np.allclose(cp10k[1, 3:], np.log1p(np.array([5, 2, 1]) / 8 * 1e4))
    assert not cp10k[3].any(), "an empty spot stays zero (no division by zero)"
    t = transform(transform="log1p")
    assert mask(t, ["h", "m", "h"]).tolist() == [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0]]
    with pytest.raises(LoaderSettingsError, match="not among the selected slides"):
        t.slide_index(["unknown"])
    # The whole step on a sparse batch dict: sparse entries replaced by expr and its mask.
    genes, counts_t, offsets = flat(*BATCH)
    batch = {"genes": genes, "counts": counts_t, "offsets": offsets, "slide_index": torch.tensor([0, 1, 0, 0])}
    out = t(batch)
    assert set(out) == {"expr", "expr_mask"} and np.allclose(out["expr"].numpy(), log1p)
    csr = to_csr({"genes": genes, "counts": counts_t, "offsets": offsets}, n_genes=6)
    assert np.array_equal(csr.to_dense().numpy(), counts_of(BATCH))


def counts_of(samples: tuple[tuple[list[int], list[Any]], ...]) -> np.ndarray:
    out = np.zeros((len(samples), 6), dtype=np.int32)
    for i, (genes, counts) in enumerate(samples):
        out[i, genes] = counts
    return out


def test_selection_by_panel_and_by_id() -> None:
    t = transform(transform="counts", panel="p1")
    assert t.space.ensembl_ids == ["ENSG0", "ENSG1"]
    assert dense(t, *BATCH)[2].tolist() == [3, 3]
    t = transform(transform="counts", genes=("ENSG2", 3, "ENSG0.14"))  # a versioned id is matched unversioned
    assert dense(t, *BATCH).tolist() == [[1, 0, 3], [0, 5, 0], [1, 0, 3], [0, 0, 0]]
    with pytest.raises(LoaderSettingsError, match=r"panels in genes\.parquet"):
        transform(panel="nope")
    with pytest.raises(LoaderSettingsError, match="not in the vocabulary"):
        transform(genes=("ENSG9",))


def test_the_default_selection_is_the_measured_genes_a_panel_is_fixed() -> None:
    """On a reference vocabulary (``measured`` in genes.parquet) the default columns are the measured genes."""
    genes = tiny().append_column("measured", pa.array([True, False, True, False, True, False]))
    assert GeneSpace.build(genes, GeneSettings()).ensembl_ids == ["ENSG0", "ENSG2", "ENSMUSG4"]
    assert GeneSpace.build(genes, GeneSettings(measured_only=False)).ensembl_ids == [e for _, e, *_ in TINY]
    # A panel or explicit genes are a fixed gene space: unmeasured genes stay (the mask says so).
    assert GeneSpace.build(genes, GeneSettings(panel="p1")).ensembl_ids == ["ENSG0", "ENSG1"]
    assert GeneSpace.build(genes, GeneSettings(genes=("ENSG1",))).ensembl_ids == ["ENSG1"]
    # Projected: measured mouse genes land on their human orthologs' columns, measured or not.
    projected = genes.set_column(6, "measured", pa.array([False, False, False, True, False, False]))
    assert GeneSpace.build(projected, GeneSettings(to_human=True)).ensembl_ids == ["ENSG1"]
    # Without the column (a corpus written before it), every gene counts as measured.
    assert GeneSpace.build(tiny(), GeneSettings()).ensembl_ids == [e for _, e, *_ in TINY]


def test_mouse_to_human_projection_by_hand() -> None:
    t = transform(transform="cp10k_log1p", to_human=True)
    # ENSMUSG5's ortholog is not in the vocabulary but still gets a column (by its Ensembl id).
    assert t.space.ensembl_ids == ["ENSG0", "ENSG1", "ENSG2", "ENSG_OUTSIDE_VOCABULARY"]
    assert t.space.indices.tolist() == [0, 1, 2, -1]
    assert t.space.dropped == ["ENSMUSG4"]
    out = dense(t, *BATCH)
    # The mouse spot's library (8) is taken before projection; ENSMUSG3 lands on ENSG1.
    assert np.allclose(out[1], [0, np.log1p(5 / 8 * 1e4), 0, np.log1p(1 / 8 * 1e4)])
    assert np.allclose(out[0], [np.log1p(7500), 0, np.log1p(2500), 0]), "human spots are unchanged"
    assert mask(t, ["m"]).tolist() == [[False, True, False, False]]
    # A spot that mixes a human gene and its mouse ortholog sums them before log1p.
    mixed = dense(transform(transform="log1p", to_human=True), ([1, 3], [2, 5]))
    assert np.allclose(mixed, [[0, np.log(8), 0, 0]])
    picked = transform(transform="counts", to_human=True, genes=("ENSMUSG3", "ENSG_OUTSIDE_VOCABULARY"))
    assert picked.space.ensembl_ids == ["ENSG1", "ENSG_OUTSIDE_VOCABULARY"]
    assert dense(picked, BATCH[1]).tolist() == [[5, 1]]
    with pytest.raises(LoaderSettingsError, match="no one-to-one human ortholog"):
        transform(to_human=True, genes=("ENSMUSG4",))


def test_rank_tokens_by_hand() -> None:
    t = transform(transform="rank", context_length=4)
    ids, real = tokens(t, *BATCH)
    assert ids.dtype == np.int64 and ids.shape == (4, 4)
    # ids are column + 1 (0 pads); ties (genes 0 and 1 of spot 2) go to the lower column.
    assert ids.tolist() == [[1, 3, 0, 0], [4, 5, 6, 0], [1, 2, 3, 0], [0, 0, 0, 0]]
    assert real.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    short = tokens(transform(transform="rank", context_length=2), *BATCH)[0]
    assert short.tolist() == [[1, 3], [4, 5], [1, 2], [0, 0]]
    # Dividing by gene means reorders: gene 2 (mean 0.1) first, then gene 0 (1), then gene 1 (3).
    weighted = transform(transform="rank", context_length=3, means=np.array([1, 3, 0.1, 1, 1, 1]))
    assert tokens(weighted, BATCH[2])[0].tolist() == [[3, 1, 2]]
    with pytest.raises(LoaderSettingsError, match="not positive finite"):
        transform(transform="rank", means=np.array([1, 0, 1, 1, 1, 1]))
    human = transform(transform="rank", to_human=True, context_length=3)
    assert tokens(human, BATCH[1])[0].tolist() == [[2, 4, 0]]  # ENSG1 (5), ENSG_OUTSIDE (1); ENSMUSG4 dropped
    # A spot holding a human gene and its mouse ortholog: summed first (2 + 5 on ENSG1), then ranked.
    assert tokens(human, ([1, 2, 3], [2, 6, 5]))[0].tolist() == [[2, 3, 0]]
    assert human.vocab_size == 5


def test_fixture_vocabulary_projection_drops_genes_without_a_human_ortholog_in_it() -> None:
    genes = pa.Table.from_pylist(vocabulary())
    space = GeneSpace.build(genes, GeneSettings(to_human=True))
    symbols = {g["ensembl_id"]: g["symbol"] for g in vocabulary()}
    dropped = sorted(symbols[g] for g in space.dropped)
    # 15 of the 49 mouse genes have no one-to-one human ortholog (Ensembl BioMart): they drop out.
    assert len(dropped) == 15
    assert {"Gm1992", "Snhg6", "1700034P13Rik", "4732440D04Rik"} <= set(dropped)
    assert not {"Xkr4", "Sox17"} & set(dropped)
    by_symbol = {g["symbol"]: g for g in vocabulary()}
    xkr4, sox17 = by_symbol["Xkr4"], by_symbol["Sox17"]
    assert space.indices[space.lut[xkr4["index"]]] == xkr4["human_ortholog"], "onto XKR4 of the vocabulary"
    # SOX17 is left out of the fixture vocabulary: Sox17 still lands on a SOX17 column, by Ensembl id.
    assert sox17["human_ortholog"] is None
    assert space.ensembl_ids[space.lut[sox17["index"]]] == sox17["human_ortholog_id"] == "ENSG00000164736"
    assert space.indices[space.lut[sox17["index"]]] == -1
    assert space.size == 131 + 3, "131 human genes of the vocabulary and 3 orthologs outside it"
    assert all(i.startswith("ENSG0") for i in space.ensembl_ids)


# ---------------------------------------------------------------------------------------------
# Genes end to end on the fixture corpus
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> FixtureCorpus:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def everything(corpus: FixtureCorpus, genes: dict[str, Any], **options: Any) -> list[dict[str, Any]]:
    settings = LoaderSettings.from_dict(
        {"split": "train", "batch_size": 8, "drop_last": False, "views": ["patch"], "genes": genes, **options}
    )
    return list(CorpusLoader(CorpusDataset(corpus.root, settings), device="cpu"))


def test_niche_expression_gets_the_same_transform(corpus: FixtureCorpus) -> None:
    batches = everything(corpus, {"transform": "log1p", "niche": True})
    checked = 0
    for batch in batches:
        for i, key in enumerate(batch["key"]):
            sample = corpus.by_key[key]
            niche = np.zeros(len(corpus.genes), dtype=np.float32)
            n = max(sample.meta["n_neighbors"], 1)
            niche[sample.niche_genes] = np.log1p(sample.niche_counts / n)
            assert np.allclose(batch["niche"][i].numpy(), niche)
            checked += sample.meta["n_neighbors"] > 0
    assert checked == 4, "the fixture has 4 train spots with an in-tissue neighbour"


def test_rank_tokens_on_the_corpus(corpus: FixtureCorpus) -> None:
    batches = everything(corpus, {"transform": "rank", "context_length": 6, "niche": True})
    batch = batches[0]
    assert set(batch) >= {"tokens", "tokens_mask", "niche_tokens", "niche_tokens_mask"}
    assert "expr" not in batch
    for i, key in enumerate(batch["key"]):
        sample = corpus.by_key[key]
        order = sorted(zip(sample.counts.tolist(), sample.genes.tolist(), strict=True), key=lambda cg: (-cg[0], cg[1]))
        expected = [g + 1 for _, g in order[:6]]
        assert batch["tokens"][i][: len(expected)].tolist() == expected
        assert int(batch["tokens_mask"][i].sum()) == len(expected)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def test_decoders_agree_and_refuse_bad_images(corpus: FixtureCorpus) -> None:
    sample = corpus.samples["train"][0]
    a = np.empty((224, 224, 3), dtype=np.uint8)
    b = np.empty((224, 224, 3), dtype=np.uint8)
    JpegDecoder("simplejpeg")(sample.patch, a, key=sample.key, view="patch")
    JpegDecoder("pil")(sample.patch, b, key=sample.key, view="patch")
    assert np.array_equal(a, b)
    small = io.BytesIO()
    Image.new("RGB", (100, 224)).save(small, "JPEG")
    for name in ("simplejpeg", "pil"):
        with pytest.raises(BadSampleError, match="patch is 100x224, expected 224x224"):
            JpegDecoder(name)(small.getvalue(), a, key="k", view="patch")
        with pytest.raises(BadSampleError, match="not a decodable JPEG"):
            JpegDecoder(name)(b"\xff\xd8garbage" * 40, a, key="k", view="patch")
        with pytest.raises(BadSampleError, match="no region image"):
            JpegDecoder(name)(None, a, key="k", view="region")


EDGES = (0, 75, 149, 224)  # the 3x3 cells of a 224-pixel region
COLOURS = np.array([[30 * c, 255 - 25 * c, (97 * c) % 256] for c in range(9)], dtype=np.uint8)


def cells(n: int, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Regions of nine coloured cells, and patches of the colour of cell ``pos`` (B, H, W, 3)."""
    region = np.zeros((n, 224, 224, 3), dtype=np.uint8)
    for c in range(9):
        r, q = divmod(c, 3)
        region[:, EDGES[r] : EDGES[r + 1], EDGES[q] : EDGES[q + 1]] = COLOURS[c]
    patch = np.repeat(COLOURS[pos][:, None, None, :], 224, axis=1).repeat(224, axis=2)
    return patch, region


def colour_at(region: np.ndarray, cell: int) -> list[int]:
    r, q = divmod(cell, 3)
    y, x = (EDGES[r] + EDGES[r + 1]) // 2, (EDGES[q] + EDGES[q + 1]) // 2
    colour: list[int] = region[y, x].tolist()
    return colour


def test_flips_and_rotations_move_pos_with_the_patch() -> None:
    pos = np.arange(9).repeat(4)  # every cell, several draws
    patch, region = cells(len(pos), pos)
    augment = Augment(AugmentSettings(hflip=True, vflip=True, rot90=True), seed=3)
    views, new_pos = augment({"patch": patch.copy(), "region": region.copy()}, pos, epoch=0, rank=0, batch=0)
    assert (new_pos != pos).any(), "nothing moved"
    assert not np.array_equal(views["region"], region)
    for i in range(len(pos)):
        assert colour_at(views["region"][i], int(new_pos[i])) == views["patch"][i, 100, 100].tolist()
        # The colours of a rotated/flipped grid are still the nine colours, each once.
        assert sorted(map(tuple, (colour_at(views["region"][i], c) for c in range(9)))) == sorted(
            map(tuple, COLOURS.tolist())
        )
    again, again_pos = augment({"patch": patch.copy(), "region": region.copy()}, pos, epoch=0, rank=0, batch=0)
    assert np.array_equal(again_pos, new_pos) and np.array_equal(again["region"], views["region"])
    _, other_pos = augment({"patch": patch.copy(), "region": region.copy()}, pos, epoch=1, rank=0, batch=0)
    assert not np.array_equal(other_pos, new_pos), "the epoch must change the draw"


def test_colour_jitter_is_bounded_and_shared_by_both_views() -> None:
    pos = np.zeros(16, dtype=np.int64)
    grey = np.full((16, 224, 224, 3), 100, dtype=np.uint8)
    augment = Augment(AugmentSettings(brightness=0.4, contrast=0.3, saturation=0.3), seed=0)
    views, _ = augment({"patch": grey.copy(), "region": grey.copy()}, pos, epoch=0, rank=0, batch=5)
    values = views["patch"][:, 0, 0, 0].astype(float)
    assert views["patch"].dtype == np.uint8
    assert values.min() >= 60 and values.max() <= 140 and values.std() > 5
    assert (views["patch"] == views["patch"][:, :1, :1]).all(), "a flat image stays flat (contrast, saturation)"
    assert np.array_equal(views["patch"], views["region"]), "both views of a sample get the same factors"
    # Brightness alone is a plain scale: 100 * factor, rounded.
    bright = Augment(AugmentSettings(brightness=0.4), seed=0)
    factor = np.random.default_rng([0, 0, 0, 5, 0xA061]).uniform(0.6, 1.4, 16)
    out, _ = bright({"patch": grey.copy()}, pos, epoch=0, rank=0, batch=5)
    assert np.array_equal(out["patch"][:, 0, 0, 0], np.rint(100 * factor.astype(np.float32)).astype(np.uint8))


def test_augmented_loader_is_deterministic(corpus: FixtureCorpus) -> None:
    augment = {"hflip": True, "rot90": True, "contrast": 0.2}
    settings = {"views": ["patch", "region"], "augment": augment}
    a = everything(corpus, {"transform": "none"}, **settings)
    b = everything(corpus, {"transform": "none"}, **settings)
    plain = everything(corpus, {"transform": "none"}, views=["patch", "region"])
    assert all(x["patch"].equal(y["patch"]) and x["pos"].equal(y["pos"]) for x, y in zip(a, b, strict=True))
    assert any(not x["patch"].equal(y["patch"]) for x, y in zip(a, plain, strict=True))
    assert {int(p) for x in a for p in x["pos"]} <= set(range(9))
