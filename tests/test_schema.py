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
