"""Schema stcorpus/2: compact expression on disk, the contract's layout fields, and the loader's
sparse batches, JPEG-bytes path, count-kind policy and non-224 tiles."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from stcorpus import schema
from stcorpus.curate.errors import SettingsError
from stcorpus.curate.shards import ShardSettings, ShardWriter, encode_expr, parquet_leaf_paths
from stcorpus.loaders import CorpusDataset, CorpusLoader, LoaderSettings
from stcorpus.loaders.errors import BadSampleError, LoaderSettingsError, ShardError
from stcorpus.loaders.images import Augment, AugmentParams, apply_numpy, apply_torch
from stcorpus.loaders.settings import AugmentSettings
from tests.corpus_fixture import FixtureCorpus, write_corpus
from tests.test_shards import make_samples

# ---------------------------------------------------------------------------------------------
# On disk
# ---------------------------------------------------------------------------------------------


def test_parquet_leaves_are_compressed_as_chosen_and_expression_leaves_are_encoded(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, split="train", settings=ShardSettings(samples_per_shard=8, row_group_size=4)) as w:
        w.add_all(make_samples(8))
    path = tmp_path / schema.shard_path("parquet", "train", 0)
    metadata = pq.ParquetFile(path).metadata
    leaves = [leaf for f in schema.sample_arrow_schema() for leaf in parquet_leaf_paths(f)]
    assert [metadata.schema.column(i).path for i in range(metadata.num_columns)] == leaves
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            leaf = chunk.path_in_schema
            # JPEG bytes are compressed already; the spot gene indices are packed by their delta
            # encoding, and zstd on them cost more read time than its 13% of their bytes were worth
            # (bench/README.md, issue 16: bench/parquet_decode.py).
            plain = ("patch.bytes", "region.bytes", "genes.list.element")
            expected = "UNCOMPRESSED" if leaf in plain else "ZSTD"
            assert chunk.compression == expected, leaf  # schema 1 left every list and struct leaf plain
            if leaf in ("genes.list.element", "niche_genes.list.element"):
                assert "DELTA_BINARY_PACKED" in chunk.encodings, leaf
            if leaf in ("counts.list.element", "niche_counts.list.element"):
                assert "BYTE_STREAM_SPLIT" in chunk.encodings, leaf
    # Expression lists are required (no definition levels to decode) and still what datasets reads.
    arrow = pq.read_schema(path)
    assert not arrow.field("genes").nullable and not arrow.field("genes").type.value_field.nullable


def test_spot_gene_leaf_compression_is_a_setting(tmp_path: Path) -> None:
    settings = ShardSettings(samples_per_shard=8, row_group_size=8, genes_compression=None)
    with ShardWriter(tmp_path, split="train", settings=settings) as w:
        w.add_all(make_samples(8))
    group = pq.ParquetFile(tmp_path / schema.shard_path("parquet", "train", 0)).metadata.row_group(0)
    codecs = {group.column(c).path_in_schema: group.column(c).compression for c in range(group.num_columns)}
    assert codecs["genes.list.element"] == codecs["niche_genes.list.element"] == "ZSTD"  # None: parquet_compression
    with pytest.raises(SettingsError, match="genes_compression"):
        ShardSettings(genes_compression="zip")


def test_tar_expression_in_the_smallest_dtypes(tmp_path: Path) -> None:
    dtypes = schema.TarDtypes.smallest(n_genes=60_000, max_count=368, max_niche_count=70_000)
    assert dtypes == schema.TarDtypes(genes="uint16", counts="uint16", niche_counts="uint32")
    assert schema.TarDtypes.smallest(n_genes=70_000, max_count=9, max_niche_count=40).genes == "uint32"
    assert schema.TarDtypes.smallest(n_genes=10, max_count=9, max_niche_count=9, counts_dtype="float32").counts == (
        "float32"
    )
    genes = np.array([3, 59_999], dtype=np.int32)
    blob = encode_expr(genes, np.array([1, 368]), genes, np.array([2, 70_000]), dtypes=dtypes)
    with np.load(io.BytesIO(blob)) as arrays:
        assert {name: str(arrays[name].dtype) for name in arrays.files} == {
            "genes": "uint16",
            "counts": "uint16",
            "niche_genes": "uint16",
            "niche_counts": "uint32",
        }
        assert arrays["niche_counts"].tolist() == [2, 70_000]
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
    with pytest.raises(ValueError, match="without changing them"):
        encode_expr(genes, np.array([1, 70_000]), genes, np.array([1, 1]), dtypes=dtypes)  # never a silent wrap
    deflated = encode_expr(genes, np.array([1, 368]), genes, np.array([2, 70_000]), dtypes=dtypes, deflate=True)
    with zipfile.ZipFile(io.BytesIO(deflated)) as archive:
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_DEFLATED}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stcorpus.curate.build.pipeline import BuildSettings, build
    from stcorpus.curate.build.splits import SplitSettings
    from tests.build_fixtures import good_slides, manifest

    root = tmp_path_factory.mktemp("v2")
    path = manifest(root / "m", good_slides(root / "data", 1, integer=True))
    splits = SplitSettings(train=1.0, validation=0.0, test=0.0)
    build([path], out=root / "corpus", settings=BuildSettings(progress=False, name="v2", splits=splits))
    return root / "corpus"


def test_a_build_records_the_layout_of_schema_2(built: Path) -> None:
    info = json.loads((built / schema.CORPUS_FILE).read_text())
    assert info["schema"] == schema.SCHEMA_ID == "stcorpus/2"
    assert info["views"] == {"patch": {"size_px": 224, "mpp": 0.5}, "region": {"size_px": 224, "mpp": 1.5}}
    # The pack picked the dtypes from the corpus's values; every tar member uses them.
    dtypes = info["expression"]
    shard = built / schema.shard_path("wds", "train", 0)
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".expr.npz"))
        data = tar.extractfile(member).read()  # type: ignore[union-attr]
    with np.load(io.BytesIO(data)) as arrays:
        assert {name: str(arrays[name].dtype) for name in arrays.files} == dtypes
    # The largest index a gene takes decides: a mouse slide's genes sit after the references' 70,770
    # human genes, past uint16 (a human corpus's mostly below 65,536 keep uint16).
    genes = pq.read_table(built / schema.GENES_FILE, columns=["species", "measured"]).to_pylist()
    top = max(i for i, g in enumerate(genes) if g["measured"])
    assert dtypes["genes"] == ("uint16" if top < 1 << 16 else "uint32") == "uint32"
    shards = pq.read_table(built / schema.SHARDS_FILE)
    assert shards.schema.names == list(schema.SHARD_COLUMNS) and set(shards.column("generation").to_pylist()) == {0}
    slides = pq.read_table(built / schema.SLIDES_FILE)
    assert slides.schema.equals(schema.slides_arrow_schema(), check_metadata=False)


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> FixtureCorpus:
    return write_corpus(tmp_path_factory.mktemp("corpus"), normalized=("heart-b",))


def settings(**options: Any) -> LoaderSettings:
    base: dict[str, Any] = {"split": "train", "batch_size": 8, "shuffle_window": 16, "drop_last": False}
    base.update(options)
    return LoaderSettings.from_dict(base)


def test_count_transforms_refuse_normalized_slides_unless_the_filter_says(corpus: FixtureCorpus) -> None:
    for transform in ("log1p", "cp10k_log1p", "rank"):
        with pytest.raises(LoaderSettingsError, match=r"1 selected slides hold normalized values.*heart-b"):
            CorpusDataset(corpus.root, settings(genes={"transform": transform}))
    raw_only = CorpusDataset(corpus.root, settings(filters={"count_kind": ["raw"]}))
    assert raw_only.selection.slide_ids == {"heart-a", "mbrain-a"}
    knowingly = CorpusDataset(corpus.root, settings(filters={"count_kind": ["raw", "normalized"]}))
    assert knowingly.selection.n_samples == 94
    counts = CorpusDataset(corpus.root, settings(genes={"transform": "counts"}))  # not a count-based transform
    assert counts.selection.n_samples == 94
    with pytest.raises(LoaderSettingsError, match="count_kind"):
        settings(filters={"count_kind": ["raw", "log"]})


def _all(loader: CorpusLoader) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            out[key] = {k: v[i] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.ndim and k != "key"}
    return out


def test_sparse_batches_finished_on_the_consumer_equal_dense_ones(corpus: FixtureCorpus) -> None:
    genes = {"transform": "cp10k_log1p", "niche": True}
    options = {"filters": {"count_kind": ["raw", "normalized"]}}
    sparse_ds = CorpusDataset(corpus.root, settings(genes=genes, **options))
    handed = next(iter(CorpusLoader(sparse_ds, num_workers=1)))
    assert {"genes", "counts", "offsets", "niche_genes", "niche_offsets", "slide_index"} <= set(handed)
    assert "expr" not in handed and "niche" not in handed, "workers hand over sparse raw counts"
    assert handed["offsets"].shape == (9,) and int(handed["offsets"][-1]) == handed["genes"].numel()
    dense_ds = CorpusDataset(corpus.root, settings(genes={**genes, "output": "dense"}, **options))
    dense = _all(CorpusLoader(dense_ds, num_workers=1))
    finished = _all(CorpusLoader(sparse_ds, num_workers=1, device="cpu"))
    assert finished.keys() == dense.keys() and len(dense) == 94
    for key, sample in dense.items():
        for name in ("expr", "expr_mask", "niche", "patch", "pos"):
            assert finished[key][name].equal(sample[name]), (key, name)


class _CpuDecoder:
    """A stand-in for nvJPEG in tests: simplejpeg on the CPU, the same batched interface."""

    def __call__(self, images: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        import simplejpeg

        return [
            torch.from_numpy(simplejpeg.decode_jpeg(x.numpy().tobytes(), colorspace="RGB")).permute(2, 0, 1).to(device)
            for x in images
        ]


def test_jpeg_bytes_path_draws_the_same_augmentation_and_gives_the_same_batches(corpus: FixtureCorpus) -> None:
    augment = {"hflip": True, "rot90": True, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2}
    common = {"augment": augment, "genes": {"transform": "counts"}}
    cpu = CorpusDataset(corpus.root, settings(**common))
    gpu = CorpusDataset(corpus.root, settings(decode="nvjpeg", **common))
    handed = next(iter(CorpusLoader(gpu, num_workers=1)))
    assert "patch" not in handed and handed["patch_jpeg"].dtype == torch.uint8
    offsets = handed["patch_jpeg_offsets"].tolist()
    for i, key in enumerate(handed["key"]):  # the shard's JPEG bytes, untouched
        assert handed["patch_jpeg"][offsets[i] : offsets[i + 1]].numpy().tobytes() == corpus.by_key[key].patch
    params = Augment(cpu.settings.augment, seed=0).draw(len(handed["key"]), epoch=0, rank=0, batch=0)
    assert handed["augment_rot90"].tolist() == params.k.tolist()
    assert handed["augment_hflip"].tolist() == params.hflip.tolist()
    assert np.array_equal(handed["augment_jitter"].numpy(), params.jitter)
    gpu.device_decoder = _CpuDecoder()
    decoded_there = _all(CorpusLoader(gpu, num_workers=1, device="cpu"))
    decoded_here = _all(CorpusLoader(cpu, num_workers=1, device="cpu"))
    assert decoded_there.keys() == decoded_here.keys()
    for key, sample in decoded_here.items():
        for name in ("patch", "region", "pos", "expr"):
            assert decoded_there[key][name].equal(sample[name]), (key, name)


def test_jpeg_bytes_path_refuses_a_wrong_sized_image_in_the_worker(corpus: FixtureCorpus, tmp_path: Path) -> None:
    from PIL import Image

    from stcorpus.loaders.dataset import Handler, PassImages, RawBatch
    from stcorpus.loaders.read import RawSample

    small = io.BytesIO()
    Image.new("RGB", (100, 100)).save(small, "JPEG")
    good, bad = RawSample("S__a"), RawSample("S__b")
    good.patch, bad.patch = corpus.samples["train"][0].patch, small.getvalue()
    stage = PassImages(views={"patch": schema.View("patch", 224, 0.5)}, handler=Handler("error", None))
    with pytest.raises(BadSampleError, match=r"S__b: patch is 100x100, expected 224x224"):
        stage.pass_on(RawBatch(0, [good, bad]))
    lenient = PassImages(views={"patch": schema.View("patch", 224, 0.5)}, handler=Handler("skip", None))
    out = lenient.pass_on(RawBatch(0, [good, bad]))
    assert [s.key for s in out.samples] == ["S__a"] and out.jpegs["patch"][1].tolist() == [0, len(good.patch)]


def test_torch_augmentation_gives_the_pixels_of_the_numpy_one() -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    augment = Augment(
        AugmentSettings(hflip=True, vflip=True, rot90=True, brightness=0.3, contrast=0.3, saturation=0.3), seed=1
    )
    params = augment.draw(12, epoch=2, rank=1, batch=5)
    assert isinstance(params, AugmentParams) and params.k.any() and params.hflip.any()
    expected = images.copy()
    apply_numpy(expected, params)
    got = apply_torch(torch.from_numpy(images).permute(0, 3, 1, 2), params).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got, expected)


def test_a_flood_of_bad_samples_gives_few_warnings_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    from stcorpus.loaders.dataset import Handler

    handler = Handler("warn", None)
    with caplog.at_level(logging.WARNING, logger="stcorpus.loaders.dataset"):
        for i in range(2_500):
            handler.sample(BadSampleError(f"S__{i}: broken", key=f"S__{i}"))
        handler.shard(ShardError("wds/train/train-000007.tar: truncated"), "wds/train/train-000007.tar", 300)
        lines = [r.getMessage() for r in caplog.records]
        assert lines[:5] == [f"skipping sample S__{i}: S__{i}: broken" for i in range(5)]
        assert lines[5:] == [
            f"skipped 1000 more bad samples ({n + 1} in all in this process); the last: "
            f"skipping sample S__{n}: S__{n}: broken"
            for n in (1004, 2004)
        ]
        handler.close()  # the end of the epoch: the 795 not reported yet, in one line
    assert caplog.records[-1].getMessage() == (
        "skipped 795 more bad samples (2800 in all in this process, end of epoch); the last: skipping 300 samples "
        "of wds/train/train-000007.tar: wds/train/train-000007.tar: truncated"
    )
    assert len(caplog.records) == 8
    handler.close()
    assert len(caplog.records) == 8, "nothing pending, nothing more to say"


def test_rate_limit_settings_are_checked() -> None:
    from stcorpus.loaders.dataset import RateLimitedLog

    with pytest.raises(ValueError, match="every >= 1"):
        RateLimitedLog(every=0)


def _no_shard_error(exc: ShardError, path: str, lost: int) -> None:
    raise AssertionError(f"{path}: {exc} ({lost} samples lost)")


def test_tar_and_parquet_read_into_one_sample_shape(corpus: FixtureCorpus) -> None:
    from stcorpus.loaders.plan import Segment
    from stcorpus.loaders.read import RawSample, ShardReader

    read: dict[str, dict[str, RawSample]] = {}
    for fmt in ("parquet", "wds"):
        dataset = CorpusDataset(corpus.root, settings(format=fmt, genes={"transform": "counts", "niche": True}))
        shards = dataset.selection.shards
        reader = ShardReader(
            dataset.shard_source,
            shards,
            fmt=fmt,
            columns=dataset.columns,
            http=dataset.settings.http,
            on_shard_error=_no_shard_error,
        )
        segments = [Segment(i, np.arange(entry.n_rows)) for i, entry in enumerate(shards)]
        samples = [s for s in reader.iter_samples(segments) if s is not None]
        read[fmt] = {s.key: s for s in samples}
    assert read["parquet"].keys() == read["wds"].keys() == set(corpus.keys("train"))
    for key, pq_sample in read["parquet"].items():
        tar_sample, written = read["wds"][key], corpus.by_key[key]
        assert type(pq_sample) is type(tar_sample) is RawSample
        for sample in (pq_sample, tar_sample):
            assert sample.fault is None and sample.slide_id == key.partition("__")[0]
            assert bytes(sample.patch) == written.patch and bytes(sample.region) == written.region  # type: ignore[arg-type]
            assert sample.pos == written.meta["pos"] and sample.n_neighbors == written.meta["n_neighbors"]
            for name in ("genes", "counts", "niche_genes", "niche_counts"):
                array = getattr(sample, name)
                assert isinstance(array, np.ndarray) and array.ndim == 1, name
                assert np.array_equal(array, getattr(written, name)), (key, name)
            assert sample.genes.dtype.kind in "iu"  # type: ignore[union-attr]
        # Images are not decoded by the reader: that is the next stage, on the CPU or the GPU.
        assert isinstance(tar_sample.patch, bytes | memoryview) and isinstance(pq_sample.patch, bytes | memoryview)


# ---------------------------------------------------------------------------------------------
# Tile size and um/px come from corpus.json
# ---------------------------------------------------------------------------------------------


def test_a_256_px_1_um_per_px_corpus_trains_a_step(tmp_path: Path) -> None:
    from stcorpus.curate.build.pipeline import BuildSettings, build
    from stcorpus.curate.build.splits import SplitSettings
    from stcorpus.curate.build.unit import UnitSettings
    from stcorpus.curate.tiles import TileSettings
    from stcorpus.training.config import load_config
    from stcorpus.training.pretrain import train
    from tests.build_fixtures import good_slides, manifest

    path = manifest(tmp_path / "m", good_slides(tmp_path / "data", 4, integer=True))
    tiles = TileSettings(patch_size=256, patch_mpp=1.0, region_size=256)
    build_settings = BuildSettings(
        progress=False,
        name="tiles-256",
        unit=UnitSettings(tiles=tiles),
        splits=SplitSettings(train=0.6, validation=0.4, test=0.0, seed=3),  # as tests/test_train_corpus.py
    )
    build([path], out=tmp_path / "corpus", settings=build_settings)
    info = json.loads((tmp_path / "corpus" / schema.CORPUS_FILE).read_text())
    assert info["views"] == {"patch": {"size_px": 256, "mpp": 1.0}, "region": {"size_px": 256, "mpp": 3.0}}
    dataset = CorpusDataset(tmp_path / "corpus", settings(genes={"transform": "log1p"}))
    batch = next(iter(CorpusLoader(dataset, device="cpu")))
    assert batch["patch"].shape[1:] == (3, 256, 256) and batch["region"].shape[1:] == (3, 256, 256)
    cfg = load_config(
        "corpus-cpu",
        overrides=[
            f"data.corpus={tmp_path / 'corpus'}",
            f"run.out_dir={tmp_path / 'run'}",
            "run.threads=1",
            "data.num_workers=0",
            "data.batch_size=8",
            "data.views=[patch,region]",
            "loss.region_spot=0.5",
            "optim.max_steps=1",
            "eval.every=0",
            "eval.probe=false",
            "eval.pool_size=8",
        ],
    )
    result = train(cfg)
    assert result.step == 1
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "train" and np.isfinite(r["loss"]) for r in log)
