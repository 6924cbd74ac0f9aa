"""Build internals that need no reader: splits, the work folder, the pack and the card."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stcorpus import schema
from stcorpus.curate.build.card import CardInputs, render_card
from stcorpus.curate.build.pack import PackSettings, pack, shard_size, slide_rows
from stcorpus.curate.build.splits import SplitSettings, assign_splits, group_of, load_holdouts, split_of_group
from stcorpus.curate.build.workdir import UnitResult, WorkDir, unit_sample_schema, write_samples
from stcorpus.curate.errors import ManifestError, SettingsError
from stcorpus.curate.genes import GeneIndex
from stcorpus.curate.manifest import parse_manifest
from stcorpus.curate.shards import write_shard_index
from tests.conftest import FULLRES

IMAGE = Image.open(FULLRES / "test_img.jpg").convert("RGB")
MANIFEST = """
manifest: stcorpus-manifest/1
name: t
defaults: {source: hest, technology: hest, assay: visium, species: human, licence: CC-BY-4.0}
studies:
  - id: s1
    samples:
      - {id: A1, patient: P1, sources: {st: "https://x/a.h5ad", wsi: "https://x/a.tif"}}
      - {id: A2, patient: P1, sources: {st: "https://x/b.h5ad", wsi: "https://x/b.tif"}}
      - {id: A3, patient: P2, sources: {st: "https://x/c.h5ad", wsi: "https://x/c.tif"}}
  - id: s2
    samples:
      - {id: B1, sources: {st: "https://x/d.h5ad", wsi: "https://x/d.tif"}}
      - {id: B2, sources: {st: "https://x/e.h5ad", wsi: "https://x/e.tif"}}
"""


def samples() -> Any:
    return parse_manifest(MANIFEST, path=Path("t.yaml")).samples


def test_groups_and_split_determinism() -> None:
    a1, a2, a3, b1, b2 = samples()
    assert group_of(a1) == group_of(a2) != group_of(a3)
    assert group_of(b1) == group_of(b2) == "study:s2"
    splits = assign_splits(samples(), settings=SplitSettings(seed=3), holdouts={})
    assert splits["A1"] == splits["A2"] and splits["B1"] == splits["B2"]
    assert splits == assign_splits(samples(), settings=SplitSettings(seed=3), holdouts={})
    # Ratios are honoured over many groups.
    names = [f"study:s{i}" for i in range(4000)]
    share = np.mean([split_of_group(n, settings=SplitSettings()) == "train" for n in names])
    assert 0.88 < share < 0.92


def test_holdouts(tmp_path: Path) -> None:
    path = tmp_path / "holdout.yaml"
    path.write_text("holdout: stcorpus-holdout/1\nslides:\n  - {id: A1, reason: HEST-Benchmark}\n")
    holdouts = load_holdouts(path)
    to_test = assign_splits(samples(), settings=SplitSettings(train=1.0, validation=0.0, test=0.0), holdouts=holdouts)
    assert to_test["A1"] == to_test["A2"] == "test"  # the whole patient goes with its held-out slide
    assert to_test["A3"] == to_test["B1"] == "train"
    excluded = assign_splits(
        samples(), settings=SplitSettings(train=1.0, validation=0.0, test=0.0, holdout="exclude"), holdouts=holdouts
    )
    assert excluded["A1"] is None and excluded["A2"] == "test"
    path.write_text("holdout: stcorpus-holdout/1\nslides:\n  - {id: A1}\n")
    with pytest.raises(ManifestError, match="exactly `id` and `reason`"):
        load_holdouts(path)
    with pytest.raises(SettingsError, match="sum to 1"):
        SplitSettings(train=0.5, validation=0.1, test=0.1)


def test_slide_rows() -> None:
    assert slide_rows(5, order="slide", seed=0, split="train", slide_id="A").tolist() == [0, 1, 2, 3, 4]
    rows = slide_rows(50, order="shuffled", seed=0, split="train", slide_id="A")
    assert sorted(rows.tolist()) == list(range(50)) and rows.tolist() != list(range(50))
    assert np.array_equal(rows, slide_rows(50, order="shuffled", seed=0, split="train", slide_id="A"))
    assert not np.array_equal(rows, slide_rows(50, order="shuffled", seed=0, split="train", slide_id="B"))


def jpeg(x: int, y: int) -> bytes:
    out = io.BytesIO()
    IMAGE.crop((x, y, x + 224, y + 224)).save(out, "JPEG", quality=90)
    return out.getvalue()


def fake_unit(work: WorkDir, slide_id: str, n: int, gene_ids: list[str], *, dtype: str = "int32") -> UnitResult:
    rng = np.random.default_rng(len(slide_id) + n)
    rows: dict[str, list[Any]] = {name: [] for name in unit_sample_schema(dtype).names}
    for i in range(n):
        local = np.unique(rng.integers(0, len(gene_ids), 5)).astype(np.int32)
        counts = rng.integers(1, 9, len(local))
        rows["key"].append(schema.sample_key(slide_id, f"BC{i:03d}"))
        rows["patch"].append(jpeg(i * 3, 0))
        rows["region"].append(jpeg(0, i * 3))
        rows["genes"].append(local.tolist())
        rows["counts"].append(counts.tolist())
        rows["niche_genes"].append(local[:2].tolist())
        rows["niche_counts"].append((counts[:2] * 2).tolist())
        rows["barcode"].append(f"BC{i:03d}")
        rows["x_um"].append(float(i))
        rows["y_um"].append(2.0)
        rows["array_row"].append(i)
        rows["array_col"].append(2 * i)
        rows["pos"].append(i % 9)
        rows["neighbors"].append([])
        rows["n_neighbors"].append(0)
        rows["total_counts"].append(float(counts.sum()))
        rows["n_genes"].append(len(local))
        rows["outside_fraction"].append(0.0)
    tmp = work.begin(slide_id)
    table = pa.Table.from_pydict(rows, schema=unit_sample_schema(dtype))
    write_samples(tmp / "samples.arrow", table)
    result = UnitResult(
        slide_id=slide_id,
        status="built",
        settings_digest="x",
        unit_key="x",
        slide={
            "slide_id": slide_id,
            "study_id": "s",
            "species": "human",
            "organ": "brain",
            "technology": "hest",
            "assay": "visium",
        },
        gene_ids=gene_ids,
        counts_dtype=dtype,
        n_samples=n,
        sample_bytes=sum(len(p) + len(r) for p, r in zip(rows["patch"], rows["region"], strict=True)),
    )
    work.commit(tmp, result)
    return result


def test_workdir_commit_is_atomic_and_reusable(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / "work")
    work.prepare()
    stale = work.begin("S9")  # a killed run's leftover
    unit = fake_unit(work, "S1", 3, ["ENSG01", "ENSG02"])
    assert work.prepare() == 1 and not stale.exists()
    assert work.reusable("S1", "x") == unit
    assert work.reusable("S1", "other-settings") is None
    assert work.samples("S1").num_rows == 3
    assert [r.slide_id for r in work.results()] == ["S1"]


def test_pack_round_trip(tmp_path: Path) -> None:
    import datasets

    work = WorkDir(tmp_path / "work")
    work.prepare()
    genes_a = ["ENSG00000000003", "ENSG00000000005", "ENSG00000000419"]
    genes_b = ["ENSG00000000005", "ENSG00000000457", "ENSG00000000460", "ENSG00000000938"]
    units = [fake_unit(work, "A", 7, genes_a), fake_unit(work, "B", 6, genes_b)]
    vocab = sorted(set(genes_a) | set(genes_b))
    out = tmp_path / "corpus"
    settings = PackSettings(samples_per_shard=4, seed=1)
    result = pack(
        out, work=work, units=units, splits={"A": "train", "B": "train"}, gene_index=GeneIndex(vocab), settings=settings
    )
    write_shard_index(out, result.shards)
    assert result.n_samples == {"train": 13} and result.samples_per_shard == 4
    rows = list(
        datasets.load_dataset("parquet", data_files=str(out / "parquet/train/*.parquet"), split="train", streaming=True)
    )
    assert len({r["__key__"] for r in rows}) == 13
    assert {r["slide_id"] for r in rows[:6]} == {"A", "B"}  # shuffled across slides
    for row in rows:
        slide_genes = genes_a if row["slide_id"] == "A" else genes_b
        assert all(vocab[g] in slide_genes for g in row["genes"])  # remapped onto the vocabulary
        assert row["genes"] == sorted(row["genes"]) and row["split"] == "train"
    # Same inputs, same bytes.
    out2 = tmp_path / "corpus2"
    again = pack(
        out2,
        work=work,
        units=units,
        splits={"A": "train", "B": "train"},
        gene_index=GeneIndex(vocab),
        settings=settings,
    )
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in result.shards]
    # Slide order: slides by id, rows as the unit wrote them.
    ordered = pack(
        tmp_path / "c3",
        work=work,
        units=units,
        splits={"A": "train", "B": "train"},
        gene_index=GeneIndex(vocab),
        settings=PackSettings(order="slide", samples_per_shard=100),
    )
    table = pq.read_table(tmp_path / "c3" / ordered.shards[1].path)
    assert table.column("__key__").to_pylist()[:8] == [schema.sample_key("A", f"BC{i:03d}") for i in range(7)] + [
        schema.sample_key("B", "BC000")
    ]


def test_hub_layout_warnings() -> None:
    from stcorpus.curate.build.pipeline import hub_layout_warnings
    from stcorpus.curate.shards import ShardInfo

    def shard(i: int) -> ShardInfo:
        return ShardInfo(f"wds/train/train-{i:06d}.tar", "wds", "train", i, 1, 1, "", "", "", ())

    assert hub_layout_warnings([shard(i) for i in range(1000)]) == []
    (warning,) = hub_layout_warnings([shard(i) for i in range(1001)])
    assert "wds/train/ holds 1,001 shards" in warning and "--max-shard-mb" in warning


def test_shard_size_respects_bytes() -> None:
    unit = UnitResult(slide_id="A", status="built", settings_digest="x", n_samples=1000, sample_bytes=1000 * 50_000)
    assert shard_size([unit], PackSettings(samples_per_shard=10_000, max_shard_bytes=1_000_000)) == 20
    assert shard_size([unit], PackSettings(samples_per_shard=10, max_shard_bytes=10**9)) == 10


def test_card_loads_with_datasets(tmp_path: Path) -> None:
    import datasets

    work = WorkDir(tmp_path / "work")
    work.prepare()
    units = [fake_unit(work, "A", 5, ["ENSG1"]), fake_unit(work, "B", 3, ["ENSG1"])]
    out = tmp_path / "corpus"
    result = pack(
        out,
        work=work,
        units=units,
        splits={"A": "train", "B": "validation"},
        gene_index=GeneIndex(["ENSG1"]),
        settings=PackSettings(),
    )
    slides = [
        {
            "slide_id": u.slide_id,
            "study_id": "s",
            "source": "hest",
            "licence": "CC-BY-4.0",
            "citation": "doi:1",
            "split": s,
            "status": "built",
            "n_spots_written": u.n_samples,
            "organ": "brain",
            "species": "human",
            "assay": "visium",
        }
        for u, s in zip(units, ("train", "validation"), strict=True)
    ] + [{"slide_id": "C", "status": "quarantined", "reason": "image_too_coarse: 13.7 um/px", "licence": "CC-BY-4.0"}]
    inputs = CardInputs(
        name="t",
        slides=slides,
        shards=result.shards,
        n_genes=1,
        counts_dtype="int32",
        tool_version="0",
        settings={},
    )
    text = render_card(inputs)
    (out / "README.md").write_text(text)
    assert "image_too_coarse" in text and "license: cc-by-4.0" in text
    ds = datasets.load_dataset(str(out), streaming=True)
    assert {k: sum(1 for _ in v) for k, v in ds.items()} == {"train": 5, "validation": 3}
    assert ds["train"].info.splits["train"].num_examples == 5
    wds = datasets.load_dataset(str(out), data_dir="wds", streaming=True)
    assert {k: sum(1 for _ in v) for k, v in wds.items()} == {"train": 5, "validation": 3}
    assert render_card(inputs) == text  # the same inputs give the same bytes


def test_the_tar_gene_dtype_follows_the_largest_index_written(tmp_path: Path) -> None:
    """The reference vocabulary has ~128k genes, but a corpus whose genes sit below 65,536 keeps uint16 indices."""
    from stcorpus.curate.genes import build_vocabulary

    index = GeneIndex(build_vocabulary([]))
    assert len(index) > 1 << 16
    low = [str(i) for i in index.ids[:5]]
    high = [str(i) for i in index.ids[-5:]]  # mouse genes, after every human one
    dtypes = {}
    for name, genes in (("LOW", low), ("HIGH", high)):
        work = WorkDir(tmp_path / name / "work")
        work.prepare()
        unit = fake_unit(work, name, 4, genes)
        packed = pack(
            tmp_path / name / "out",
            work=work,
            units=[unit],
            splits={name: "train"},
            gene_index=index,
            settings=PackSettings(samples_per_shard=10),
        )
        dtypes[name] = packed.tar_dtypes.genes
    assert dtypes == {"LOW": "uint16", "HIGH": "uint32"}
