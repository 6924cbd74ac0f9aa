"""Issue 17 item 6: reuse what users have -- local mirrors (--mirror, `mirrors:`) and huggingface_hub's cache."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from stcorpus.curate.errors import ChecksumMismatchError
from stcorpus.curate.fetch import Fetcher
from stcorpus.curate.fetch.fetcher import hf_cache_dir
from stcorpus.curate.fetch.lockfile import LOCK_FORMAT, default_lock_path
from stcorpus.curate.manifest import Sample, parse_manifest
from tests.httpserver import HubRepo, LocalServer, serve
from tests.test_fetch_http import make_sample, settings

PREFIX = "hf://datasets/MahmoodLab/hest-mini/"
COMMIT = "1234567890abcdef1234567890abcdef12345678"


def _mirror(tmp_path: Path, files: dict[str, bytes]) -> Path:
    folder = tmp_path / "mirror"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_a_mirror_file_is_used_in_place_without_a_request(tmp_path: Path, http_server: LocalServer) -> None:
    data = os.urandom(30_000)
    folder = _mirror(tmp_path, {"st/A.h5ad": data})
    url = PREFIX + "st/A.h5ad"
    sample = make_sample(tmp_path, {"st": {"url": url, "sha256": hashlib.sha256(data).hexdigest()}})
    with Fetcher(settings(tmp_path, mirrors=((PREFIX, folder),))) as fetcher:
        assert not fetcher.needs_download(sample.sources["st"], sample=sample)
        got = fetcher.fetch(sample.sources["st"], sample=sample)
    assert got.path == folder / "st" / "A.h5ad" and got.local and got.sha256 == hashlib.sha256(data).hexdigest()
    assert http_server.requests == [] and not (tmp_path / "cache" / "blobs").exists()


def test_a_mirror_file_that_differs_from_the_manifest_is_an_error_naming_the_mapping(tmp_path: Path) -> None:
    folder = _mirror(tmp_path, {"st/A.h5ad": b"an older copy"})
    pinned = hashlib.sha256(b"the file the manifest means").hexdigest()
    sample = make_sample(tmp_path, {"st": {"url": PREFIX + "st/A.h5ad", "sha256": pinned}})
    with (
        Fetcher(settings(tmp_path, mirrors=((PREFIX, folder),))) as fetcher,
        pytest.raises(ChecksumMismatchError) as info,
    ):
        fetcher.fetch(sample.sources["st"], sample=sample)
    message = str(info.value)
    assert str(folder / "st" / "A.h5ad") in message and pinned in message
    assert hashlib.sha256(b"an older copy").hexdigest() in message and "--mirror" in message and "`mirrors`" in message


def test_the_lock_file_verifies_a_mirror_when_the_manifest_has_no_digest(tmp_path: Path) -> None:
    folder = _mirror(tmp_path, {"st/A.h5ad": b"tampered"})
    url = PREFIX + "st/A.h5ad"
    sample = make_sample(tmp_path, {"st": url})
    locked = {"sample": "S1", "source": "st", "url": url, "size": 8, "kind": "file", "commit": None}
    locked["sha256"] = hashlib.sha256(b"original").hexdigest()
    lock = {"format": LOCK_FORMAT, "manifest": {}, "complete": True, "sources": [locked]}
    default_lock_path(sample.manifest_path).write_text(json.dumps(lock))
    with (
        Fetcher(settings(tmp_path, mirrors=((PREFIX, folder),))) as fetcher,
        pytest.raises(ChecksumMismatchError) as info,
    ):
        fetcher.fetch(sample.sources["st"], sample=sample)
    assert hashlib.sha256(b"original").hexdigest() in str(info.value)
    (folder / "st" / "A.h5ad").write_bytes(b"original")
    with Fetcher(settings(tmp_path, mirrors=((PREFIX, folder),))) as fetcher:
        assert fetcher.fetch(sample.sources["st"], sample=sample).path.read_bytes() == b"original"


def test_the_manifest_mirrors_key_maps_a_prefix_to_a_folder_beside_it(tmp_path: Path, http_server: LocalServer) -> None:
    _mirror(tmp_path, {"wsis/B.tif": b"tiff bytes"})
    www = http_server.root
    (www / "C.tif").write_bytes(b"only on the server")
    sample = _manifest_sample(
        tmp_path,
        mirrors={f"{http_server.url}/data/": "mirror/"},
        sources={"wsi": f"{http_server.url}/data/wsis/B.tif", "other": http_server.file_url("C.tif")},
    )
    assert sample.mirrors == {f"{http_server.url}/data/": (tmp_path / "mirror").absolute()}
    with Fetcher(settings(tmp_path)) as fetcher:
        files = fetcher.fetch_sample(sample)
    assert files["wsi"] == tmp_path / "mirror" / "wsis" / "B.tif"
    assert files["other"].read_bytes() == b"only on the server"  # outside the prefix: downloaded
    assert [r.path for r in http_server.requests] == ["/C.tif"]


def test_a_file_missing_from_the_mirror_is_downloaded(tmp_path: Path, http_server: LocalServer) -> None:
    (http_server.root / "D.bin").write_bytes(b"fetched")
    folder = _mirror(tmp_path, {})
    sample = make_sample(tmp_path, {"d": http_server.file_url("D.bin")})
    with Fetcher(settings(tmp_path, mirrors=((http_server.url + "/", folder),))) as fetcher:
        got = fetcher.fetch(sample.sources["d"], sample=sample)
    assert not got.local and got.path.read_bytes() == b"fetched" and http_server.count("/D.bin", method="GET") == 1


def test_a_mirror_path_may_not_leave_its_folder(tmp_path: Path) -> None:
    folder = _mirror(tmp_path, {})
    (tmp_path / "secret").write_bytes(b"x")
    sample = make_sample(tmp_path, {"s": PREFIX + "%2E%2E/secret"})
    with Fetcher(settings(tmp_path, mirrors=((PREFIX, folder),))) as fetcher, pytest.raises(Exception) as info:
        fetcher.fetch(sample.sources["s"], sample=sample)
    assert "leaves the mirror folder" in str(info.value)


# --- huggingface_hub's cache ----------------------------------------------------------------


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The Hub stand-in of tests/httpserver.py with one dataset; HF_ENDPOINT points at it."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    (tmp_path / "www").mkdir()
    with serve(tmp_path / "www") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def _hub_file(tmp_path: Path, hub: LocalServer, data: bytes) -> str:
    folder = tmp_path / "repo"
    (folder / "st").mkdir(parents=True)
    (folder / "st" / "T.h5ad").write_bytes(data)
    hub.add_repo("MahmoodLab/hest-mini", HubRepo(folder=folder, commit=COMMIT))
    return PREFIX + "st/T.h5ad"


def _user_download(hub: LocalServer) -> Path:
    """What a user did before the build: hf_hub_download into their (here: the test's) HF cache."""
    from huggingface_hub import hf_hub_download

    # cache_dir: huggingface_hub reads HF_HUB_CACHE once, at import; the test sets it per test.
    cache = hf_cache_dir()
    path = hf_hub_download("MahmoodLab/hest-mini", "st/T.h5ad", repo_type="dataset", endpoint=hub.url, cache_dir=cache)
    hub.requests.clear()
    return Path(path)


def test_a_pinned_hf_file_in_the_hf_cache_is_not_fetched_again(tmp_path: Path, hub: LocalServer) -> None:
    data = os.urandom(40_000)
    url = _hub_file(tmp_path, hub, data)
    cached = _user_download(hub)
    sample = make_sample(tmp_path, {"st": {"url": url, "sha256": hashlib.sha256(data).hexdigest()}})
    with Fetcher(settings(tmp_path)) as fetcher:
        assert not fetcher.needs_download(sample.sources["st"], sample=sample)
        got = fetcher.fetch(sample.sources["st"], sample=sample)
    assert got.path == cached and got.local and got.path.read_bytes() == data
    assert hub.requests == []  # not even a HEAD: the manifest's digest says which bytes


def test_an_unpinned_hf_file_costs_one_head_and_no_download(tmp_path: Path, hub: LocalServer) -> None:
    data = os.urandom(40_000)
    url = _hub_file(tmp_path, hub, data)
    cached = _user_download(hub)
    sample = make_sample(tmp_path, {"st": url})
    with Fetcher(settings(tmp_path)) as fetcher:
        got = fetcher.fetch(sample.sources["st"], sample=sample)
    assert got.path == cached and got.commit == COMMIT and got.sha256 == hashlib.sha256(data).hexdigest()
    assert [r.method for r in hub.requests] == ["HEAD"]


def test_a_different_file_in_the_hf_cache_is_not_used(tmp_path: Path, hub: LocalServer) -> None:
    data = os.urandom(40_000)
    url = _hub_file(tmp_path, hub, data)
    cached = _user_download(hub)
    cached.resolve().chmod(0o644)
    cached.resolve().write_bytes(b"corrupted in the user's cache")
    sample = make_sample(tmp_path, {"st": {"url": url, "sha256": hashlib.sha256(data).hexdigest()}})
    with Fetcher(settings(tmp_path)) as fetcher:
        got = fetcher.fetch(sample.sources["st"], sample=sample)
    assert not got.local and got.path.read_bytes() == data  # downloaded into stcorpus's cache instead


def test_the_hf_cache_is_not_read_when_turned_off(tmp_path: Path, hub: LocalServer) -> None:
    data = os.urandom(10_000)
    url = _hub_file(tmp_path, hub, data)
    _user_download(hub)
    sample = make_sample(tmp_path, {"st": {"url": url, "sha256": hashlib.sha256(data).hexdigest()}})
    with Fetcher(settings(tmp_path, use_hf_cache=False)) as fetcher:
        got = fetcher.fetch(sample.sources["st"], sample=sample)
    assert not got.local and hub.count(f"/cdn/{hashlib.sha256(data).hexdigest()}", method="GET") == 1


def _manifest_sample(tmp_path: Path, *, mirrors: dict[str, str], sources: dict[str, str]) -> Sample:
    text = yaml.safe_dump(
        {
            "manifest": "stcorpus-manifest/1",
            "name": "t",
            "mirrors": mirrors,
            "defaults": {"source": "10x", "technology": "spaceranger", "species": "human", "licence": "CC-BY-4.0"},
            "studies": [{"id": "study", "samples": [{"id": "S1", "sources": sources}]}],
        }
    )
    path = tmp_path / "manifest.yaml"
    path.write_text(text)
    return parse_manifest(text, path=path).samples[0]
