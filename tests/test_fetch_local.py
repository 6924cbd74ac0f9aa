"""Local paths and file:// URLs: allowed only on purpose, used in place, pinned by digests."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tarfile
from pathlib import Path

import pytest

from stcorpus.curate.errors import ChecksumMismatchError, FetchError, LocalSourceNotAllowedError, SizeMismatchError
from stcorpus.curate.fetch import Fetcher
from stcorpus.curate.fetch.cache import Cache
from stcorpus.curate.fetch.local import local_path, tree_digest
from tests.conftest import HEART, MOUSE_BRAIN
from tests.test_fetch_http import make_sample, settings


def test_local_sources_are_refused_unless_allowed(tmp_path: Path) -> None:
    (tmp_path / "m.h5").write_bytes(b"h5")
    allowed = make_sample(tmp_path, {"matrix": "m.h5", "again": f"file://{tmp_path / 'm.h5'}"}, allow_local=True)
    refused = dataclasses.replace(allowed, allow_local=False)
    with Fetcher(settings(tmp_path)) as fetcher:
        for name in ("matrix", "again"):
            with pytest.raises(LocalSourceNotAllowedError) as info:
                fetcher.fetch(refused.sources[name], sample=refused)
            assert "allow_local: true" in str(info.value) and "--allow-local" in str(info.value)
            assert f"'{name}'" in str(info.value)
    with Fetcher(settings(tmp_path, allow_local=True)) as fetcher:  # the run-wide override
        assert fetcher.fetch(refused.sources["matrix"], sample=refused).path == tmp_path / "m.h5"


def test_local_file_is_used_in_place_and_hashed(tmp_path: Path) -> None:
    source_file = HEART / "filtered_feature_bc_matrix.h5"
    sample = make_sample(tmp_path, {"matrix": str(source_file), "url": source_file.as_uri()}, allow_local=True)
    digest = hashlib.sha256(source_file.read_bytes()).hexdigest()
    with Fetcher(settings(tmp_path)) as fetcher:
        by_path = fetcher.fetch(sample.sources["matrix"], sample=sample)
        by_url = fetcher.fetch(sample.sources["url"], sample=sample)
    for fetched in (by_path, by_url):
        assert fetched.path == source_file.absolute() and fetched.local and not fetched.is_folder
        assert fetched.sha256 == digest and fetched.size == source_file.stat().st_size
    assert not (tmp_path / "cache" / "blobs").exists()  # nothing copied


def test_local_hash_is_remembered_until_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"one")
    cache = Cache(tmp_path / "cache")
    assert cache.local_sha256(path) == hashlib.sha256(b"one").hexdigest()
    (memo,) = (tmp_path / "cache" / "local").rglob("*.json")
    assert hashlib.sha256(b"one").hexdigest() in memo.read_text()
    path.write_bytes(b"two!")
    assert cache.local_sha256(path) == hashlib.sha256(b"two!").hexdigest()


def test_local_folder_tree_digest_is_deterministic_and_content_sensitive(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    a, b = tmp_path / "a" / "outs", tmp_path / "b" / "outs"
    shutil.copytree(MOUSE_BRAIN / "outs", a)
    # The same files created in the reverse order: same digest.
    for path in sorted((MOUSE_BRAIN / "outs").rglob("*"), reverse=True):
        if path.is_file():
            target = b / path.relative_to(MOUSE_BRAIN / "outs")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    digest_a, size_a = tree_digest(a, cache=cache)
    assert (digest_a, size_a) == tree_digest(b, cache=cache)
    assert size_a == sum(p.stat().st_size for p in a.rglob("*") if p.is_file())
    (b / "spatial" / "tissue_positions_list.csv").write_text("changed")
    assert tree_digest(b, cache=cache)[0] != digest_a
    (b / "spatial" / "tissue_positions_list.csv").rename(b / "spatial" / "renamed.csv")
    assert tree_digest(b, cache=cache)[0] != digest_a


def test_local_folder_source_is_returned_as_is(tmp_path: Path) -> None:
    sample = make_sample(tmp_path, {"outs": str(MOUSE_BRAIN / "outs")}, allow_local=True)
    with Fetcher(settings(tmp_path)) as fetcher:
        fetched = fetcher.fetch(sample.sources["outs"], sample=sample)
        files = fetcher.fetch_sample(sample)
    assert fetched.is_folder and fetched.unpacked is None and files["outs"] == (MOUSE_BRAIN / "outs").absolute()
    assert len(fetched.sha256) == 64


def test_local_archive_is_unpacked_into_the_cache(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "spatial.tar.gz", "w:gz") as tar:
        tar.add(HEART / "spatial", arcname="spatial")
    sample = make_sample(tmp_path, {"spatial": "spatial.tar.gz"}, allow_local=True)
    with Fetcher(settings(tmp_path)) as fetcher:
        folder = fetcher.fetch_sample(sample)["spatial"]
    assert folder.is_relative_to(tmp_path / "cache" / "unpacked")
    assert (folder / "spatial" / "scalefactors_json.json").read_bytes() == (
        HEART / "spatial" / "scalefactors_json.json"
    ).read_bytes()


def test_local_digest_and_size_from_the_manifest_are_checked(tmp_path: Path) -> None:
    (tmp_path / "f.csv").write_text("a,b\n")
    wrong = "0" * 64
    sample = make_sample(
        tmp_path, {"f": {"url": "f.csv", "sha256": wrong}, "g": {"url": "f.csv", "size": 3}}, allow_local=True
    )
    with Fetcher(settings(tmp_path)) as fetcher:
        with pytest.raises(ChecksumMismatchError) as info:
            fetcher.fetch(sample.sources["f"], sample=sample)
        assert wrong in str(info.value) and hashlib.sha256(b"a,b\n").hexdigest() in str(info.value)
        with pytest.raises(SizeMismatchError):
            fetcher.fetch(sample.sources["g"], sample=sample)


def test_missing_local_path_is_an_error_naming_it(tmp_path: Path) -> None:
    sample = make_sample(tmp_path, {"f": "nope/missing.h5"}, allow_local=True)
    with Fetcher(settings(tmp_path)) as fetcher, pytest.raises(FetchError) as info:
        fetcher.fetch(sample.sources["f"], sample=sample)
    assert str(tmp_path / "nope" / "missing.h5") in str(info.value)


def test_local_path_resolution(tmp_path: Path) -> None:
    assert local_path("x/y.h5", base_dir=tmp_path) == tmp_path / "x" / "y.h5"
    assert local_path("file:///data/a%20b.h5", base_dir=tmp_path) == Path("/data/a b.h5")
    assert local_path("file://localhost/data/c.h5", base_dir=tmp_path) == Path("/data/c.h5")
    with pytest.raises(FetchError, match="host"):
        local_path("file://fileserver/share/c.h5", base_dir=tmp_path)
