"""The shared schema: key format and the Arrow/datasets descriptions of a sample."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stcorpus import schema


def test_key_round_trip_common_barcodes() -> None:
    assert schema.sample_key("TENX95", "AAACAAGTATCTCCCA-1") == "TENX95__AAACAAGTATCTCCCA-1"
    assert schema.parse_key("GSE1_GSM2__10%2E5x3") == ("GSE1_GSM2", "10.5x3")


@given(st.text(min_size=1, max_size=30))
def test_key_round_trip_any_barcode(barcode: str) -> None:
    key = schema.sample_key("S1", barcode)
    assert "." not in key and "/" not in key
    assert schema.parse_key(key) == ("S1", barcode)


@pytest.mark.parametrize("bad", ["a.b", "a__b", "_a", "a/b", "", "a b"])
def test_bad_slide_ids(bad: str) -> None:
    with pytest.raises(schema.SampleKeyError):
        schema.sample_key(bad, "AAAC-1")


def test_arrow_schema_carries_datasets_features() -> None:
    import json

    arrow = schema.sample_arrow_schema("float32")
    assert arrow.names == list(schema.SAMPLE_COLUMNS)
    features = json.loads(arrow.metadata[b"huggingface"])["info"]["features"]
    assert features["patch"] == {"_type": "Image"}
    assert features["counts"]["feature"]["dtype"] == "float32"
    with pytest.raises(ValueError, match="counts dtype"):
        schema.sample_arrow_schema("int64")


def test_shard_paths() -> None:
    assert schema.shard_path("parquet", "validation", 12) == "parquet/validation/validation-000012.parquet"
    with pytest.raises(ValueError, match="unknown split"):
        schema.shard_path("wds", "val", 0)


def test_views_come_from_corpus_json_and_fall_back_for_schema_1() -> None:
    recorded = {"views": {"patch": {"size_px": 256, "mpp": 1.0}, "region": {"size_px": 128, "mpp": 6.0}}}
    assert schema.corpus_views(recorded) == {
        "patch": schema.View("patch", 256, 1.0),
        "region": schema.View("region", 128, 6.0),
    }
    # A schema 1 corpus built by curate build: its settings say; region um/px derived when unset.
    tiles = {"settings": {"tiles": {"patch_size": 300, "patch_mpp": 0.5, "region_size": 300, "region_mpp": None}}}
    assert schema.corpus_views(tiles)["region"] == schema.View("region", 300, 1.5)
    assert schema.corpus_views({}) == schema.SCHEMA1_VIEWS  # schema 1's contract: 224 px at 0.5 / 1.5
    for bad in ({"views": {"patch": {"size_px": 0, "mpp": 0.5}}}, {"views": {"thumb": {"size_px": 8, "mpp": 1}}}):
        with pytest.raises(ValueError, match=r"corpus\.json views"):
            schema.corpus_views(bad)
    assert schema.views_record(schema.SCHEMA1_VIEWS) == {
        "patch": {"size_px": 224, "mpp": 0.5},
        "region": {"size_px": 224, "mpp": 1.5},
    }


def test_table_types_live_in_the_contract() -> None:
    import pyarrow as pa

    slides = schema.slides_arrow_schema()
    assert slides.names == list(schema.SLIDE_COLUMNS) and slides.field("measured_genes").type == pa.list_(pa.int32())
    assert slides.field("count_kind").type == pa.string() and slides.metadata == {b"stcorpus": b"stcorpus/2"}
    shards = schema.shards_arrow_schema()
    assert shards.names == list(schema.SHARD_COLUMNS) and shards.field("generation").type == pa.int32()
    assert schema.READABLE_SCHEMAS == ("stcorpus/1", "stcorpus/2")
    # counts travel as the corpus stores them (int32, or float32): every other entry has one dtype
    assert set(schema.SPARSE_EXPRESSION) - set(schema.BATCH_DTYPES) == {"counts", "niche_counts"}
    assert schema.NICHE_FIELDS == ("niche_genes", "niche_counts", "n_neighbors")
