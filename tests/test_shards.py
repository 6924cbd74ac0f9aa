"""Shard writers: both formats hold the same samples in the same order, reproducibly."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stcorpus import schema
from stcorpus.curate.shards import ShardSample, ShardSettings, ShardWriter, encode_expr, write_shard_index
from tests.conftest import FULLRES

IMAGE = Image.open(FULLRES / "test_img.jpg").convert("RGB")


def jpeg(x: int, y: int) -> bytes:
    out = io.BytesIO()
    IMAGE.crop((x, y, x + 224, y + 224)).save(out, "JPEG", quality=90)
    return out.getvalue()


def make_samples(n: int, *, slide: str = "S1", dtype: str = "int32") -> list[ShardSample]:
    samples = []
    for i in range(n):
        rng = np.random.default_rng(i)
        genes = np.unique(rng.integers(0, 500, 40)).astype(np.int32)
        counts = rng.integers(1, 20, len(genes)).astype(dtype)
        meta: dict[str, Any] = {
            "slide_id": slide,
            "barcode": f"AAAC{i:04d}-1",
            "study_id": "study",
            "split": "train",
            "species": "mouse",
            "organ": None if i % 3 else "brain",
            "technology": "hest",
            "assay": "visium",
            "x_um": 100.0 * i,
            "y_um": 55.5,
            "array_row": i,
            "array_col": 2 * i,
            "pos": i % 9,
            "neighbors": [schema.sample_key(slide, f"AAAC{i + 1:04d}-1")],
            "n_neighbors": 1,
            "total_counts": float(counts.sum()),
            "n_genes": len(genes),
            "outside_fraction": 0.0,
        }
        samples.append(
            ShardSample(
                key=schema.sample_key(slide, meta["barcode"]),
                patch=jpeg(5 * i, 0),
                region=jpeg(0, 5 * i),
                genes=genes,
                counts=counts,
                niche_genes=genes[::2].copy(),
                niche_counts=(counts[::2] * 3).astype(dtype),
                meta=meta,
            )
        )
    return samples


def write(root: Path, samples: list[ShardSample], **settings: Any) -> list:
    with ShardWriter(root, split="train", settings=ShardSettings(**settings)) as writer:
        writer.add_all(samples)
    write_shard_index(root, writer.shards)
    return writer.shards


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_equal_count_shards_in_both_formats(tmp_path: Path) -> None:
    shards = write(tmp_path, make_samples(11), samples_per_shard=4, row_group_size=3)
    by_format = {fmt: [s for s in shards if s.format == fmt] for fmt in ("wds", "parquet")}
    assert [s.n_samples for s in by_format["wds"]] == [4, 4, 3]
    assert [s.n_samples for s in by_format["parquet"]] == [4, 4, 3]
    for info in shards:
        path = tmp_path / info.path
        assert path.stat().st_size == info.bytes
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info.sha256
    assert not list(tmp_path.rglob(".*partial")), "temporary files left behind"
    parquet_file = pq.ParquetFile(tmp_path / by_format["parquet"][0].path)
    assert parquet_file.metadata.num_row_groups == 2  # 4 rows in groups of 3
    index = pq.read_table(tmp_path / schema.SHARDS_FILE).to_pylist()
    assert [r["n_samples"] for r in index if r["format"] == "parquet"] == [4, 4, 3]


def test_tar_members_are_fixed_and_ordered(tmp_path: Path) -> None:
    samples = make_samples(2)
    write(tmp_path, samples)
    with tarfile.open(tmp_path / "wds/train/train-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:4]] == [f"{samples[0].key}.{m.value}" for m in schema.Member]
    assert {(m.mtime, m.uid, m.gid, m.mode, m.uname, m.gname) for m in members} == {(0, 0, 0, 0o444, "", "")}


def test_byte_reproducible(tmp_path: Path) -> None:
    write(tmp_path / "a", make_samples(9), samples_per_shard=4)
    write(tmp_path / "b", make_samples(9), samples_per_shard=4)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    one = encode_expr(*(np.arange(3, dtype=np.int32),) * 4)
    assert one == encode_expr(*(np.arange(3, dtype=np.int32),) * 4)


@pytest.mark.parametrize("dtype", ["int32", "float32"])
def test_datasets_reads_both_formats_identically(tmp_path: Path, dtype: str) -> None:
    import datasets

    samples = make_samples(7, dtype=dtype)
    with ShardWriter(tmp_path, split="train", counts_dtype=dtype, settings=ShardSettings(samples_per_shard=3)) as w:
        w.add_all(samples)
    parquet = datasets.load_dataset(
        "parquet", data_files={"train": str(tmp_path / "parquet/train/*.parquet")}, streaming=True, split="train"
    )
    wds = datasets.load_dataset(
        "webdataset", data_files={"train": str(tmp_path / "wds/train/*.tar")}, streaming=True, split="train"
    )
    rows_p, rows_w = list(parquet), list(wds)
    assert [r["__key__"] for r in rows_p] == [r["__key__"] for r in rows_w] == [s.key for s in samples]
    for sample, rp, rw in zip(samples, rows_p, rows_w, strict=True):
        assert np.array_equal(np.asarray(rp["patch"]), np.asarray(rw["patch.jpg"]))
        assert rp["patch"].size == (224, 224)
        expr = rw["expr.npz"]
        for name in ("genes", "counts", "niche_genes", "niche_counts"):
            assert np.array_equal(np.asarray(rp[name]), getattr(sample, name))
            assert np.array_equal(np.asarray(expr[name]), getattr(sample, name))
        assert {k: rp[k] for k in schema.META_FIELD_NAMES} == rw["json"] == dict(sample.meta)


def test_counts_dtype_checked(tmp_path: Path) -> None:
    with (
        pytest.raises(ValueError, match="cannot store float64 values as int32"),
        ShardWriter(tmp_path, split="train") as writer,
    ):
        samples = make_samples(1)
        bad = ShardSample(**{**vars(samples[0]), "counts": samples[0].counts + 0.5})
        writer.add(bad)
    assert not list(tmp_path.rglob("*.tar")), "a failed shard must not appear under its final name"
    assert not list(tmp_path.rglob("*.partial")), "temporary files left behind"


def test_lossless_cast() -> None:
    from stcorpus.curate.shards import lossless_cast

    assert lossless_cast(np.array([1, 2], dtype=np.int64), np.dtype(np.int32)).dtype == np.int32
    assert lossless_cast(np.array([1.0, 2.0]), np.dtype(np.int32)).tolist() == [1, 2]
    for bad, dtype in (([1.5], np.int32), ([2**40], np.int32), ([np.nan], np.int32), ([2**25 + 1], np.float32)):
        with pytest.raises(ValueError, match="without changing them"):
            lossless_cast(np.array(bad), np.dtype(dtype))


@pytest.mark.parametrize("fmt", schema.FORMATS)
def test_one_format_writes_only_its_shards_with_the_bytes_of_both(tmp_path: Path, fmt: str) -> None:
    """``formats=(fmt,)``: the same shard files of that format as a writer of both, none of the other, retyped alike."""
    narrow = schema.TarDtypes(genes="uint16", counts="uint8", niche_counts="uint8")
    wide = schema.TarDtypes(genes="uint32", counts="uint16", niche_counts="uint32")
    samples = make_samples(10)
    both = ShardSettings(samples_per_shard=4)
    with ShardWriter(tmp_path / "both", split="train", settings=both, tar_dtypes=wide) as w:
        w.add_all(samples)
    one = ShardWriter(
        tmp_path / "one", split="train", settings=ShardSettings(samples_per_shard=4, formats=(fmt,)), tar_dtypes=narrow
    )
    one.add_all(samples[:6])  # one shard committed, one open: the streaming pack's retype path
    one.retype(wide)
    one.add_all(samples[6:])
    one.close()
    assert {s.format for s in one.shards} == {fmt}
    assert [s.row() for s in one.shards] == [s.row() for s in w.shards if s.format == fmt]
    other = next(f for f in schema.FORMATS if f != fmt)
    assert not (tmp_path / "one" / other).exists()
    assert digests(tmp_path / "one") == {k: v for k, v in digests(tmp_path / "both").items() if k.startswith(fmt)}


def test_formats_are_checked_and_ordered() -> None:
    from stcorpus.curate.errors import SettingsError

    assert ShardSettings(formats=("wds", "parquet", "wds")).formats == schema.FORMATS
    for bad in ((), ("tar",), ("parquet", "")):
        with pytest.raises(SettingsError, match=r"--formats must name one or more of parquet, wds"):
            ShardSettings(formats=bad)


def test_a_row_group_that_fails_on_the_encoding_thread_fails_the_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq_module

    calls = {"n": 0}
    original = pq_module.ParquetWriter.write_table

    def failing(self: Any, table: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        original(self, table, *args, **kwargs)

    monkeypatch.setattr(pq_module.ParquetWriter, "write_table", failing)
    with (
        pytest.raises(OSError, match="disk full"),
        ShardWriter(tmp_path, split="train", settings=ShardSettings(samples_per_shard=8, row_group_size=2)) as writer,
    ):
        writer.add_all(make_samples(8))
    assert calls["n"] >= 2
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "no shard of either format, no temporary file"


@pytest.mark.parametrize(
    ("name", "size"),
    [("S1__AAAC0001-1.patch.jpg", 0), ("S1__AAAC0001-1.json", 511), ("x" * 100, 512), ("x" * 101, 5), ("é.json", 3)],
)
def test_member_headers_are_tarfiles_own(name: str, size: int) -> None:
    from stcorpus.curate.shards import tar_member_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
    assert tar_member_header(name, size) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_a_shard_ends_as_tarfile_ends_one(tmp_path: Path) -> None:
    shards = write(tmp_path, make_samples(3), formats=("wds",))
    path = tmp_path / shards[0].path
    assert path.stat().st_size % tarfile.RECORDSIZE == 0
    expected = io.BytesIO()
    with tarfile.open(path) as tar, tarfile.open(fileobj=expected, mode="w|", format=tarfile.PAX_FORMAT) as copy:
        for member in tar:
            copy.addfile(member, tar.extractfile(member))
    assert path.read_bytes() == expected.getvalue()
