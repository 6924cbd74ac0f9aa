"""A corpus made by `curate build` from real slides, read back by our loader and by `datasets`.

Also reads the frozen copies of schemas stcorpus/1 and stcorpus/2 in tests/data/corpus-stcorpus-*
(made once by `curate build`, see their SOURCE.md): a change that breaks reading a released corpus
fails here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stcorpus import schema
from stcorpus.curate.build.pipeline import BuildSettings, build
from stcorpus.curate.build.splits import SplitSettings
from tests.build_fixtures import good_slides, manifest
from tests.conftest import DATA

FROZEN = DATA / "corpus-stcorpus-1"
FROZEN_2 = DATA / "corpus-stcorpus-2"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("roundtrip")
    path = manifest(root / "m", good_slides(root / "data", 3, integer=True))
    settings = BuildSettings(
        progress=False, name="roundtrip", splits=SplitSettings(train=1.0, validation=0.0, test=0.0)
    )
    build([path], out=root / "corpus", settings=settings)
    return root / "corpus"


def read_all(location: Path, **settings: object) -> list[dict]:
    from stcorpus.loaders import CorpusDataset, LoaderSettings

    options = {
        "split": "train",
        "batch_size": 8,
        "drop_last": False,
        "shuffle": False,
        "genes": {"transform": "counts"},
    }
    options.update(settings)
    dataset = CorpusDataset(str(location), LoaderSettings.from_dict(options))
    return [dataset.finish(batch) for batch in dataset]


@pytest.mark.parametrize("fmt", ["parquet", "wds"])
def test_loader_reads_a_built_corpus_like_datasets(corpus: Path, fmt: str) -> None:
    import datasets

    batches = read_all(corpus, format=fmt)
    keys = [k for b in batches for k in b["key"]]
    rows = list(datasets.load_dataset(str(corpus), split="train", streaming=True))
    assert sorted(keys) == sorted(r["__key__"] for r in rows)
    assert len(keys) == sum(r["n_spots_written"] for r in pq.read_table(corpus / schema.SLIDES_FILE).to_pylist())
    by_key = {r["__key__"]: r for r in rows}
    genes = pq.read_table(corpus / schema.GENES_FILE)
    measured = np.asarray(genes.column("measured").to_pylist())  # the default columns: the measured genes
    for batch in batches:
        for i, key in enumerate(batch["key"]):
            row = by_key[key]
            patch = batch["patch"][i].permute(1, 2, 0).numpy()
            assert np.array_equal(patch, np.asarray(row["patch"]))  # both decoders are libjpeg-turbo
            dense = np.zeros(genes.num_rows, dtype=np.float32)
            dense[row["genes"]] = row["counts"]
            assert np.array_equal(batch["expr"][i].numpy(), dense[measured])
            columns = np.searchsorted(np.flatnonzero(measured), row["genes"])
            assert bool(batch["expr_mask"][i][columns].all())
            assert int(batch["pos"][i]) == row["pos"]


def test_a_built_corpus_marks_its_measured_genes_and_the_loader_exposes_them(corpus: Path) -> None:
    from stcorpus.loaders import CorpusDataset, open_corpus

    slides = pq.read_table(corpus / schema.SLIDES_FILE).to_pylist()
    union = sorted({g for r in slides if r["status"] == "built" for g in r["measured_genes"]})
    opened = open_corpus(corpus)
    assert opened.measured_indices().tolist() == union and 0 < len(union) < opened.n_genes
    dataset = CorpusDataset(corpus, {"split": "train", "batch_size": 4, "genes": {"transform": "counts"}})
    assert dataset.measured_genes.tolist() == union
    assert dataset.gene_transform is not None and dataset.gene_transform.space.indices.tolist() == union
    # measured_only: false: the whole reference vocabulary, one column per gene.
    full = CorpusDataset(
        corpus, {"split": "train", "batch_size": 4, "genes": {"transform": "counts", "measured_only": False}}
    )
    batch = full.finish(next(iter(full)))
    assert batch["expr"].shape[1] == opened.n_genes and not bool(batch["expr_mask"][:, ~opened.measured].any())


def assert_every_gene_measured(root: Path) -> None:
    """A corpus without genes.parquet `measured` reads as one that measured every gene of its vocabulary."""
    from stcorpus.loaders import CorpusDataset, open_corpus

    corpus = open_corpus(root)
    assert corpus.measured.dtype == np.bool_ and corpus.measured.all() and len(corpus.measured) == corpus.n_genes
    assert corpus.measured_indices().tolist() == list(range(corpus.n_genes))
    assert corpus.genes.column("measured").type == pa.bool_()
    dataset = CorpusDataset(root, {"split": "test", "batch_size": 2, "genes": {"transform": "log1p"}})
    assert dataset.measured_genes.tolist() == list(range(corpus.n_genes))
    assert dataset.gene_transform is not None and dataset.gene_transform.size == corpus.n_genes


def test_frozen_corpus_still_reads() -> None:
    import datasets

    corpus = (FROZEN / schema.CORPUS_FILE).read_text()
    assert '"schema": "stcorpus/1"' in corpus
    for fmt in ("parquet", "wds"):
        keys = [k for b in read_all(FROZEN, format=fmt, split="test") for k in b["key"]]
        assert len(keys) == 4
    rows = list(datasets.load_dataset(str(FROZEN), split="test", streaming=True))
    assert len(rows) == 4 and rows[0]["patch"].size == (224, 224)
    wds = list(datasets.load_dataset(str(FROZEN), data_dir="wds", split="test", streaming=True))
    assert [r["__key__"] for r in wds] == [r["__key__"] for r in rows]
    assert np.array_equal(np.asarray(wds[0]["patch.jpg"]), np.asarray(rows[0]["patch"]))
    assert "measured" not in pq.read_schema(FROZEN / schema.GENES_FILE).names
    assert_every_gene_measured(FROZEN)


def test_frozen_stcorpus_2_still_reads() -> None:
    import json

    import datasets

    info = json.loads((FROZEN_2 / schema.CORPUS_FILE).read_text())
    assert info["schema"] == "stcorpus/2"
    assert schema.corpus_views(info)["region"] == schema.View("region", 224, 1.5)
    by_format = {}
    for fmt in ("parquet", "wds"):
        batches = read_all(FROZEN_2, format=fmt, split="test", genes={"transform": "log1p"})
        by_format[fmt] = {k: b["expr"][i] for b in batches for i, k in enumerate(b["key"])}
    assert len(by_format["parquet"]) == 6
    assert all(by_format["parquet"][k].equal(v) for k, v in by_format["wds"].items())
    rows = list(datasets.load_dataset(str(FROZEN_2), split="test", streaming=True))
    wds = list(datasets.load_dataset(str(FROZEN_2), data_dir="wds", split="test", streaming=True))
    assert [r["__key__"] for r in wds] == [r["__key__"] for r in rows] and len(rows) == 6
    for row, sample in zip(rows, wds, strict=True):
        npz = sample["expr.npz"]
        assert np.asarray(npz["genes"]).dtype == np.uint16 and np.asarray(npz["counts"]).dtype == np.uint16
        assert np.array_equal(np.asarray(npz["genes"]), row["genes"])
        assert np.array_equal(np.asarray(npz["counts"]), row["counts"])
        assert np.array_equal(np.asarray(npz["niche_counts"]), row["niche_counts"])
    shards = pq.read_table(FROZEN_2 / schema.SHARDS_FILE)
    assert shards.column("generation").to_pylist() == [0] * 4
    # Written before genes.parquet had `measured` (its vocabulary was the union of its slides'):
    # the readers take every gene as measured, and the default gene columns are the whole vocabulary.
    assert "measured" not in pq.read_schema(FROZEN_2 / schema.GENES_FILE).names
    assert_every_gene_measured(FROZEN_2)
    assert pq.read_table(FROZEN_2 / schema.SLIDES_FILE).column("count_kind").to_pylist() == ["raw"]
