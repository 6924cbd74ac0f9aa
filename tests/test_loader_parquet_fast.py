"""The numba decoder of the expression list leaves (loaders/parquet_fast.py): exactly pyarrow's
offsets and values on shards in the writer's layout, a refusal (pyarrow reads the column chunk)
for any other layout, and the same batches from the loader with it on and off; and the image
leaves, located where they lie in the shard's bytes."""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stcorpus import schema
from stcorpus.curate.shards import ShardSettings, _list_array, parquet_leaf_options
from stcorpus.loaders import CorpusDataset, CorpusLoader, LoaderSettings, parquet_fast, read
from stcorpus.loaders import settings as settings_module
from stcorpus.loaders.errors import LoaderSettingsError
from tests.corpus_fixture import FixtureCorpus, write_corpus

LISTS = [e.value for e in schema.Expr]
PAIRS = (
    (schema.Expr.GENES.value, schema.Expr.COUNTS.value),
    (schema.Expr.NICHE_GENES.value, schema.Expr.NICHE_COUNTS.value),
)


def lists(n: int, *, seed: int = 0, counts_dtype: str = "int32") -> dict[str, list[np.ndarray]]:
    """``n`` rows of the four list columns: sorted gene indices, counts; every 5th row empty, a few long."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {name: [] for name in LISTS}
    for i in range(n):
        for genes, counts in PAIRS:
            size = 0 if i % 5 == 0 else int(rng.integers(1, 4000 if i % 11 == 1 else 300))
            out[genes].append(np.sort(rng.choice(60_000, size, replace=False)).astype(np.int32))
            if counts_dtype == "float32":
                out[counts].append(rng.gamma(1.0, 3.0, size).astype(np.float32))
            else:  # the tail reaches int32's top: the byte streams' high bytes are used
                out[counts].append(
                    np.where(rng.random(size) < 0.01, 2**31 - 1, rng.integers(1, 400, size)).astype(np.int32)
                )
    return out


def write(
    path: Path,
    n: int,
    *,
    settings: ShardSettings | None = None,
    counts_dtype: str = "int32",
    seed: int = 0,
    **options: Any,
) -> Path:
    """The four list columns as the shard writer writes them (its schema and leaf options), with ``options``."""
    full = schema.sample_arrow_schema(counts_dtype)
    fields = [full.field(name) for name in LISTS]
    data = lists(n, seed=seed, counts_dtype=counts_dtype)
    table = pa.Table.from_arrays([_list_array(data[f.name], f.type) for f in fields], schema=pa.schema(fields))
    write_as_the_writer(table, path, settings, **options)
    return path


def write_as_the_writer(table: pa.Table, path: Path, settings: ShardSettings | None = None, **options: Any) -> None:
    """``table`` with the shard writer's leaf options (encodings, compression, dictionaries), then ``options``."""
    leaf = parquet_leaf_options(table.schema, settings or ShardSettings())
    kwargs = {
        "compression": leaf["compression"],
        "use_dictionary": leaf["use_dictionary"],
        "column_encoding": leaf["column_encoding"],
        "write_statistics": False,
    } | options
    pq.write_table(table, path, **kwargs)


def file_bytes(path: Path) -> np.ndarray:
    with path.open("rb") as handle:
        return np.frombuffer(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)


def decode_all(path: Path) -> tuple[list[dict[str, parquet_fast.ListChunk]], list[dict[str, str]]]:
    metadata = pq.ParquetFile(path).metadata
    buffer = file_bytes(path)
    decoded, refused = [], []
    for g in range(metadata.num_row_groups):
        d, r = parquet_fast.read_lists(buffer, 0, metadata, g, LISTS)
        decoded.append(d)
        refused.append(r)
    return decoded, refused


def assert_as_pyarrow(path: Path, decoded: list[dict[str, parquet_fast.ListChunk]]) -> None:
    parquet = pq.ParquetFile(path)
    for g, columns in enumerate(decoded):
        table = parquet.read_row_group(g, columns=list(columns))
        for name, (offsets, values) in columns.items():
            array = table.column(name).combine_chunks()
            assert offsets.dtype == np.int64
            np.testing.assert_array_equal(offsets, array.offsets.to_numpy(), err_msg=f"{name} offsets, group {g}")
            expected = array.values.to_numpy()
            assert values.dtype == expected.dtype
            np.testing.assert_array_equal(
                values.view(np.uint32), expected.view(np.uint32), err_msg=f"{name}, group {g}"
            )


needs_numba = pytest.mark.skipif(not parquet_fast.numba_available(), reason="numba is not installed")


@needs_numba
@pytest.mark.parametrize(
    ("n", "options"),
    [
        pytest.param(64, {"row_group_size": 20}, id="writer layout"),
        pytest.param(9, {"row_group_size": 1}, id="one-row row groups"),
        pytest.param(120, {"row_group_size": 60, "data_page_size": 2048}, id="many pages per chunk"),
        pytest.param(120, {"row_group_size": 60, "data_page_size": 4096, "data_page_version": "2.0"}, id="pages v2"),
        pytest.param(
            40, {"row_group_size": 40, "data_page_version": "2.0", "compression": "none"}, id="v2 uncompressed"
        ),
        pytest.param(40, {"row_group_size": 16, "compression": "zstd"}, id="all zstd"),
        pytest.param(40, {"row_group_size": 16, "compression": "none"}, id="all uncompressed"),
    ],
)
def test_decodes_exactly_what_pyarrow_reads(tmp_path: Path, n: int, options: dict[str, Any]) -> None:
    path = write(tmp_path / "a.parquet", n, **options)
    decoded, refused = decode_all(path)
    assert refused == [{}] * len(decoded)
    if options.get("data_page_size"):
        chunk = pq.ParquetFile(path).metadata.row_group(0).column(2)
        assert chunk.total_compressed_size > 3 * options["data_page_size"]  # several pages
    assert_as_pyarrow(path, decoded)


@needs_numba
@pytest.mark.parametrize("counts_encoding", ["PLAIN", "BYTE_STREAM_SPLIT", "DELTA_BINARY_PACKED"])
@pytest.mark.parametrize("counts_dtype", ["int32", "float32"])
def test_every_value_encoding_of_both_count_dtypes(tmp_path: Path, counts_encoding: str, counts_dtype: str) -> None:
    if counts_dtype == "float32" and counts_encoding == "DELTA_BINARY_PACKED":
        pytest.skip("DELTA_BINARY_PACKED is for integers")
    settings = ShardSettings(
        counts_encoding=counts_encoding, genes_encoding="PLAIN" if counts_encoding == "PLAIN" else "DELTA_BINARY_PACKED"
    )
    path = write(tmp_path / "a.parquet", 50, settings=settings, counts_dtype=counts_dtype, row_group_size=25)
    decoded, refused = decode_all(path)
    assert refused == [{}, {}]
    assert_as_pyarrow(path, decoded)


@needs_numba
def test_all_empty_lists_and_a_row_group_of_one_empty_row(tmp_path: Path) -> None:
    path = write(tmp_path / "a.parquet", 5, row_group_size=1)  # row 0 is empty in all four columns
    decoded, refused = decode_all(path)
    assert refused == [{}] * 5
    assert all(len(values) == 0 for values in (decoded[0][name][1] for name in LISTS))
    assert_as_pyarrow(path, decoded)


@needs_numba
@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        pytest.param({"settings": ShardSettings(counts_encoding="RLE_DICTIONARY")}, "dictionary", id="dictionary"),
        pytest.param({"compression": "snappy"}, "compression", id="snappy"),
    ],
)
def test_a_layout_it_does_not_decode_is_refused(tmp_path: Path, kwargs: dict[str, Any], reason: str) -> None:
    path = write(tmp_path / "a.parquet", 30, row_group_size=15, **kwargs)
    decoded, refused = decode_all(path)
    assert refused[0], "something must be refused"
    assert all(reason in why for why in refused[0].values())
    assert_as_pyarrow(path, decoded)  # what it did decode is exact


@needs_numba
def test_nullable_values_are_refused(tmp_path: Path) -> None:
    typ = pa.list_(pa.field("element", pa.int32(), nullable=True))
    table = pa.table({"genes": pa.array([[1, None, 3], [], None, [4]], typ)})
    path = tmp_path / "a.parquet"
    pq.write_table(table, path)
    metadata = pq.ParquetFile(path).metadata
    decoded, refused = parquet_fast.read_lists(file_bytes(path), 0, metadata, 0, ["genes"])
    assert decoded == {}
    assert "levels" in refused["genes"]


@needs_numba
def test_a_damaged_page_is_refused_or_read_as_pyarrow_reads_it(tmp_path: Path) -> None:
    """Damage the bytes of every page header and level run: the decoder refuses, or reads what pyarrow reads."""
    path = write(tmp_path / "a.parquet", 30, row_group_size=30, compression="none")
    original = path.read_bytes()
    metadata = pq.ParquetFile(path).metadata
    rng = np.random.default_rng(0)
    decoded_some = refused_some = 0
    for c in range(metadata.num_columns):
        chunk = metadata.row_group(0).column(c)
        for offset in rng.integers(chunk.data_page_offset, chunk.data_page_offset + 64, 12).tolist():
            damaged = bytearray(original)
            damaged[offset] ^= 0xFF
            bad = tmp_path / "bad.parquet"
            bad.write_bytes(bytes(damaged))
            decoded, refused = parquet_fast.read_lists(file_bytes(bad), 0, metadata, 0, LISTS)
            refused_some += bool(refused)
            name = chunk.path_in_schema.split(".")[0]
            if name not in decoded:
                continue
            decoded_some += 1
            try:
                table = pq.ParquetFile(bad).read_row_group(0, columns=[name])
            except (pa.ArrowException, OSError):
                pytest.fail(f"decoded column {name} damaged at {offset} that pyarrow cannot read")
            array = table.column(name).combine_chunks()
            np.testing.assert_array_equal(decoded[name][0], array.offsets.to_numpy())
            np.testing.assert_array_equal(decoded[name][1], array.values.to_numpy())
    assert refused_some  # the damage was seen at least somewhere


# ---------------------------------------------------------------------------------------------
# The loader with the decoder on and off
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> FixtureCorpus:
    return write_corpus(tmp_path_factory.mktemp("corpus"), samples_per_shard=7, row_group_size=3)


def epoch(
    corpus: FixtureCorpus, decoder: str, *, filters: dict[str, Any] | None = None, **genes: Any
) -> list[dict[str, Any]]:
    settings = LoaderSettings.from_dict(
        {
            "split": "train",
            "batch_size": 4,
            "shuffle_window": 8,
            "drop_last": False,
            "genes": {"transform": "counts", **genes},
            "parquet_decoder": decoder,
            "filters": filters or {},
        }
    )
    return list(CorpusLoader(CorpusDataset(corpus.root, settings)))


def assert_same_batches(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    import torch

    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert x[key].dtype == y[key].dtype
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


@needs_numba
@pytest.mark.parametrize("niche", [False, True])
@pytest.mark.parametrize("read_batch", [32, 2])
def test_the_loader_yields_the_same_batches_with_the_decoder_on_and_off(
    corpus: FixtureCorpus, monkeypatch: pytest.MonkeyPatch, niche: bool, read_batch: int
) -> None:
    """Record batches of 2 rows: a row group is several, each takes its slice of the row group's offsets."""
    pytest.importorskip("torch")
    monkeypatch.setattr(read, "PARQUET_READ_BATCH", read_batch)
    assert_same_batches(epoch(corpus, "numba", niche=niche), epoch(corpus, "pyarrow", niche=niche))


@needs_numba
def test_a_column_the_decoder_refuses_is_read_by_pyarrow(
    corpus: FixtureCorpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    decode = parquet_fast.decode_chunk
    seen: list[int] = []

    def refuse_counts(
        buffer: Any, base: int, metadata: Any, group: int, column: int, pool: Any = None
    ) -> parquet_fast.ListChunk:
        if metadata.schema.column(column).path.startswith(schema.Expr.COUNTS.value + "."):
            raise parquet_fast.Refused("test")
        seen.append(column)
        return decode(buffer, base, metadata, group, column, pool)

    expected = epoch(corpus, "pyarrow", niche=True)
    monkeypatch.setattr(parquet_fast, "decode_chunk", refuse_counts)
    assert_same_batches(epoch(corpus, "numba", niche=True), expected)
    assert seen  # the other columns were decoded by the fast path


def test_parquet_decoder_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert LoaderSettings().parquet_decoder == "auto"
    with pytest.raises(LoaderSettingsError, match="parquet_decoder"):
        LoaderSettings(parquet_decoder="fast")
    assert parquet_fast.resolve("auto") == ("numba" if parquet_fast.numba_available() else "pyarrow")
    monkeypatch.setattr(parquet_fast, "numba_available", lambda: False)
    monkeypatch.setattr(settings_module, "numba_available", lambda: False)
    assert parquet_fast.resolve("auto") == "pyarrow"
    assert parquet_fast.resolve("pyarrow") == "pyarrow"
    with pytest.raises(LoaderSettingsError, match=r"stcorpus\[fast\]"):
        LoaderSettings(parquet_decoder="numba")


def test_auto_without_numba_reads_with_pyarrow(corpus: FixtureCorpus, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    expected = epoch(corpus, "pyarrow", niche=True)
    monkeypatch.setattr(parquet_fast, "numba_available", lambda: False)

    def no_numba() -> None:
        raise AssertionError("the fast path was used")

    monkeypatch.setattr(parquet_fast, "read_lists", no_numba)
    assert_same_batches(epoch(corpus, "auto", niche=True), expected)


@needs_numba
def test_a_few_rows_of_a_row_group_keep_only_their_own_values(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter that keeps one or two rows of a row group: those samples must not hold the whole
    row group's decoded lists (read._compact) or its bytes (read._compact_binary), and read what
    pyarrow reads."""
    pytest.importorskip("torch")
    sparse = write_corpus(tmp_path_factory.mktemp("sparse"), samples_per_shard=14, row_group_size=14)
    compact = read._compact
    calls: list[int] = []

    def spy(offsets: Any, values: Any, local: Any) -> Any:
        calls.append(len(local))
        out = compact(offsets, values, local)
        assert len(out[1]) == sum(int(offsets[r + 1] - offsets[r]) for r in local)
        return out

    compact_binary = read._compact_binary
    copied: list[int] = []

    def spy_binary(begins: Any, ends: Any, data: Any, local: Any) -> Any:
        out = compact_binary(begins, ends, data, local)
        copied.append(len(out[2]))
        assert len(out[2]) == sum(int(ends[r] - begins[r]) for r in local)  # the JPEGs of those rows only
        return out

    monkeypatch.setattr(read, "_compact", spy)
    monkeypatch.setattr(read, "_compact_binary", spy_binary)
    mouse = {"species": ["mouse"]}
    expected = epoch(sparse, "pyarrow", niche=True, filters=mouse)
    assert_same_batches(epoch(sparse, "numba", niche=True, filters=mouse), expected)
    assert calls and copied


@needs_numba
@pytest.mark.parametrize("encoding", ["DELTA_BINARY_PACKED", "BYTE_STREAM_SPLIT", "PLAIN"])
def test_int32_extremes_and_deltas_that_wrap(tmp_path: Path, encoding: str) -> None:
    """Values at both ends of int32, so the writer's deltas wrap at 32 bits; long rows (many miniblocks)."""
    rng = np.random.default_rng(1)
    extremes = np.array([-(2**31), 2**31 - 1, 0, -1, 1, 2**31 - 1, -(2**31)], np.int32)
    rows = [extremes, rng.integers(-(2**31), 2**31, 5000, dtype=np.int64).astype(np.int32), np.array([], np.int32)]
    rows += [np.repeat(extremes, 40), rng.integers(0, 3, 300).astype(np.int32)]
    typ = pa.list_(pa.field("element", pa.int32(), nullable=False))
    table = pa.Table.from_arrays([pa.array(rows, typ)], schema=pa.schema([pa.field("counts", typ, nullable=False)]))
    path = tmp_path / "a.parquet"
    pq.write_table(
        table,
        path,
        compression="zstd",
        use_dictionary=False,
        column_encoding={"counts.list.element": encoding},
        data_page_size=4096,
    )
    metadata = pq.ParquetFile(path).metadata
    decoded, refused = parquet_fast.read_lists(file_bytes(path), 0, metadata, 0, ["counts"])
    assert refused == {}
    assert_as_pyarrow(path, [decoded])


@needs_numba
def test_delta_miniblocks_of_every_bit_width(tmp_path: Path) -> None:
    """Rows whose deltas span exactly ``w`` bits for every ``w`` from 0 to 32 (the kernel reads
    narrow, middle and wide miniblocks differently), each long enough for whole miniblocks."""
    rng = np.random.default_rng(2)
    rows = []
    for width in range(33):
        # Deltas in [0, 2**width): one at each end of the range per miniblock fixes its width.
        top = (1 << width) - 1
        deltas = rng.integers(0, top + 1, 400, dtype=np.int64) if width else np.zeros(400, np.int64)
        deltas[::32], deltas[1::32] = 0, top
        values = (np.cumsum(deltas) - (1 << 31)) % (1 << 32) - (1 << 31)  # wraps like int32
        rows.append(values.astype(np.int32))
    typ = pa.list_(pa.field("element", pa.int32(), nullable=False))
    table = pa.Table.from_arrays([pa.array(rows, typ)], schema=pa.schema([pa.field("genes", typ, nullable=False)]))
    path = tmp_path / "a.parquet"
    pq.write_table(
        table,
        path,
        compression="none",
        use_dictionary=False,
        column_encoding={"genes.list.element": "DELTA_BINARY_PACKED"},
    )
    metadata = pq.ParquetFile(path).metadata
    decoded, refused = parquet_fast.read_lists(file_bytes(path), 0, metadata, 0, ["genes"])
    assert refused == {}
    assert_as_pyarrow(path, [decoded])


def test_auto_falls_back_to_pyarrow_when_numba_is_found_but_does_not_import(
    corpus: FixtureCorpus, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("torch")
    expected = epoch(corpus, "pyarrow")

    def broken() -> None:
        raise ImportError("numba built for another numpy")

    monkeypatch.setattr(parquet_fast, "numba_available", lambda: True)
    monkeypatch.setattr(settings_module, "numba_available", lambda: True)
    monkeypatch.setattr(parquet_fast, "kernels", broken)
    with caplog.at_level("WARNING"):
        assert_same_batches(epoch(corpus, "auto"), expected)
    assert "decoding with pyarrow" in caplog.text
    with pytest.raises(ImportError, match="another numpy"):
        epoch(corpus, "numba")


# ---------------------------------------------------------------------------------------------
# The image leaves: located in the shard's bytes, not copied
# ---------------------------------------------------------------------------------------------

IMAGE_LEAVES = ["patch.bytes", "region.bytes"]


def write_images(path: Path, n: int, *, nulls: bool = False, seed: int = 0, **options: Any) -> list[list[bytes | None]]:
    """``n`` rows of the two image structs as the writer stores them (bytes of many sizes, some empty)."""
    rng = np.random.default_rng(seed)
    full = schema.sample_arrow_schema("int32")
    fields = [full.field(schema.PATCH_COLUMN), full.field(schema.REGION_COLUMN)]
    values: list[list[bytes | None]] = []
    for _ in fields:
        column: list[bytes | None] = []
        for i in range(n):
            size = 0 if i % 7 == 3 else int(rng.integers(1, 5000 if i % 5 else 40))
            column.append(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        if nulls:
            column[n // 2] = None
        values.append(column)
    arrays = [
        pa.array([None if v is None else {"bytes": v, "path": None} for v in column], type=f.type)
        for f, column in zip(fields, values, strict=True)
    ]
    write_as_the_writer(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), path, **options)
    return values


@needs_numba
@pytest.mark.parametrize(
    ("n", "options"),
    [
        pytest.param(50, {"row_group_size": 20}, id="writer layout"),
        pytest.param(5, {"row_group_size": 1}, id="one-row row groups"),
        pytest.param(90, {"row_group_size": 45, "data_page_size": 8192}, id="many pages per chunk"),
        pytest.param(90, {"row_group_size": 45, "data_page_size": 8192, "data_page_version": "2.0"}, id="pages v2"),
    ],
)
def test_locates_exactly_the_image_bytes_pyarrow_reads(tmp_path: Path, n: int, options: dict[str, Any]) -> None:
    path = tmp_path / "images.parquet"
    values = write_images(path, n, **options)
    metadata = pq.ParquetFile(path).metadata
    if options.get("data_page_size"):
        assert metadata.row_group(0).column(0).total_compressed_size > 3 * options["data_page_size"]
    buffer = file_bytes(path)
    row = 0
    for g in range(metadata.num_row_groups):
        located, refused = parquet_fast.read_binary(buffer, 0, metadata, g, IMAGE_LEAVES)
        assert refused == {} and list(located) == IMAGE_LEAVES
        rows = metadata.row_group(g).num_rows
        for column, leaf in zip(values, IMAGE_LEAVES, strict=True):
            begins, ends = located[leaf]
            assert [buffer[b:e].tobytes() for b, e in zip(begins, ends, strict=True)] == column[row : row + rows]
        row += rows
    assert row == n


@needs_numba
def test_a_flat_required_binary_column_is_located_too(tmp_path: Path) -> None:
    path = tmp_path / "flat.parquet"
    data = [bytes([i]) * i for i in range(30)]
    table = pa.table({"blob": pa.array(data, pa.binary())}, schema=pa.schema([pa.field("blob", pa.binary(), False)]))
    pq.write_table(table, path, compression="none", use_dictionary=False, row_group_size=12)
    metadata = pq.ParquetFile(path).metadata
    buffer = file_bytes(path)
    got: list[bytes] = []
    for g in range(metadata.num_row_groups):
        located, refused = parquet_fast.read_binary(buffer, 0, metadata, g, ["blob"])
        assert refused == {}
        got += [buffer[b:e].tobytes() for b, e in zip(*located["blob"], strict=True)]
    assert got == data


@needs_numba
@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"nulls": True}, "null"),
        ({"compression": "zstd"}, "compression ZSTD"),
        ({"use_dictionary": True, "column_encoding": None}, "dictionary"),
    ],
)
def test_image_leaves_in_another_layout_are_refused(tmp_path: Path, kwargs: dict[str, Any], reason: str) -> None:
    path = tmp_path / "images.parquet"
    write_images(path, 30, row_group_size=30, **kwargs)
    located, refused = parquet_fast.read_binary(file_bytes(path), 0, pq.ParquetFile(path).metadata, 0, IMAGE_LEAVES)
    assert located == {} and set(refused) == set(IMAGE_LEAVES)
    assert all(reason in why for why in refused.values()), refused


@needs_numba
def test_damaged_image_pages_are_refused(tmp_path: Path) -> None:
    """A value length that runs past its page, or a page cut short, is refused, never misread."""
    path = tmp_path / "images.parquet"
    write_images(path, 20, row_group_size=20)
    metadata = pq.ParquetFile(path).metadata
    chunk = metadata.row_group(0).column(0)
    raw = bytearray(path.read_bytes())
    # The first value's length prefix lies after the page header and the definition levels:
    # find it by the first value's real length, then make it too long.
    buffer = np.frombuffer(bytes(raw), np.uint8)
    (begins, _), *_ = parquet_fast.read_binary(buffer, 0, metadata, 0, ["patch.bytes"])[0].values()
    first = int(begins[0])
    raw[first - 4 : first] = (10**8).to_bytes(4, "little")
    located, refused = parquet_fast.read_binary(np.frombuffer(bytes(raw), np.uint8), 0, metadata, 0, ["patch.bytes"])
    assert located == {} and "PLAIN BYTE_ARRAY" in refused["patch.bytes"]
    # The buffer ends inside the column chunk (a span cut short).
    cut = np.frombuffer(path.read_bytes()[: chunk.data_page_offset + chunk.total_compressed_size // 2], np.uint8)
    located, refused = parquet_fast.read_binary(cut, 0, metadata, 0, ["patch.bytes"])
    assert located == {} and "outside the buffer" in refused["patch.bytes"]
