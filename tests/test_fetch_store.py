"""``curate fetch`` from an object store (s3:// against an S3-compatible server on 127.0.0.1): the store's
own credentials, verified into the cache, pinned in the lock file, and a cache hit without a request."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import fsspec
import pytest

from stcorpus.curate.cli import main
from stcorpus.curate.fetch import read_lock
from tests.conftest import HEART
from tests.s3_standin import serve_s3


def test_fetch_from_s3_pins_and_reuses_the_objects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with tarfile.open(tmp_path / "spatial.tar.gz", "w:gz") as tar:
        tar.add(HEART / "spatial", arcname="spatial")
    matrix = (HEART / "filtered_feature_bc_matrix.h5").read_bytes()
    manifest = tmp_path / "store.yaml"
    manifest.write_text(
        "manifest: stcorpus-manifest/1\nname: store\n"
        "defaults: {source: 10x, technology: spaceranger, species: human, licence: CC-BY-4.0}\n"
        "studies:\n  - id: tenx\n    samples:\n      - id: V1_Human_Heart\n        sources:\n"
        "          matrix: s3://lab-data/heart/filtered_feature_bc_matrix.h5\n"
        "          spatial: s3://lab-data/heart/spatial.tar.gz\n"
        "      - id: Gone\n        sources:\n          matrix: s3://lab-data/gone/matrix.h5\n"
    )
    args = ["fetch", str(manifest), "--cache", str(tmp_path / "cache"), "--no-progress", "--retries", "0"]
    with serve_s3() as s3:
        fs = fsspec.filesystem("s3")
        fs.mkdir("lab-data")
        fs.pipe_file("lab-data/heart/filtered_feature_bc_matrix.h5", matrix)
        fs.put_file(str(tmp_path / "spatial.tar.gz"), "lab-data/heart/spatial.tar.gz")
        assert main(args) == 1
        captured = capsys.readouterr()
        assert "2 of 3 sources ready: 2 downloaded" in captured.out
        assert "FAILED Gone/matrix:" in captured.err and "no such object" in captured.err
        assert "testing" not in captured.out + captured.err  # the credentials stay in the AWS configuration
        lock = read_lock(tmp_path / "store.lock.json")
        pinned = {(e["sample"], e["source"]): e["sha256"] for e in lock["sources"]}
        assert pinned == {
            ("V1_Human_Heart", "matrix"): hashlib.sha256(matrix).hexdigest(),
            ("V1_Human_Heart", "spatial"): hashlib.sha256((tmp_path / "spatial.tar.gz").read_bytes()).hexdigest(),
        }
        s3.clear()
        assert main([*args, "--samples", "V1_Human_Heart"]) == 0
        assert "2 cache hits" in capsys.readouterr().out
        assert not [r for r in s3.requests if r.method == "GET" and r.path.startswith("/lab-data/heart/")]
    unpacked = tmp_path / "cache"
    assert list(unpacked.rglob("tissue_positions_list.csv")), "the archive was unpacked in the cache"


def test_a_store_without_its_backend_says_what_to_install(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401

        pytest.skip("gcsfs is installed here")
    except ImportError:
        pass
    manifest = tmp_path / "gcs.yaml"
    manifest.write_text(
        "manifest: stcorpus-manifest/1\nname: gcs\n"
        "defaults: {source: 10x, technology: spaceranger, species: human, licence: CC-BY-4.0}\n"
        "studies:\n  - id: s\n    samples:\n      - id: A\n        sources:\n          matrix: gs://bucket/m.h5\n"
    )
    assert main(["fetch", str(manifest), "--cache", str(tmp_path / "cache"), "--no-progress"]) == 1
    assert "install its backend (s3fs for s3://, gcsfs for gs://" in capsys.readouterr().err
