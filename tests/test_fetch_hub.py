"""hf:// sources against a local Hub stand-in (HF_ENDPOINT): digests, revisions, gated repos, tokens."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from stcorpus.curate.errors import AccessDeniedError, ChecksumMismatchError, FetchError, UnsupportedSchemeError
from stcorpus.curate.fetch import Fetcher
from stcorpus.curate.fetch.hub import HubFile, parse_hf_url
from tests.httpserver import Fault, HubRepo, LocalServer, serve
from tests.test_fetch_http import make_sample, settings

TOKEN = "hf_TESTtokenDoNotLeak0123456789abcdef"
COMMIT = "1234567890abcdef1234567890abcdef12345678"
V1_COMMIT = "abcdefabcdefabcdefabcdefabcdefabcdefabcd"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A Hub stand-in; HF_ENDPOINT points at it and no real token of this machine is used."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    with serve(tmp_path / "www") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)  # set after huggingface_hub was imported
        yield server


def add_repo(server: LocalServer, tmp_path: Path, files: dict[str, bytes], **options: Any) -> HubRepo:
    folder = tmp_path / "repo"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return server.add_repo("MahmoodLab/hest-mini", HubRepo(folder=folder, commit=COMMIT, **options))


def test_hf_file_is_fetched_through_the_cdn_with_the_hub_digest(
    tmp_path: Path, hub: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    data = os.urandom(200_000)
    sha = hashlib.sha256(data).hexdigest()
    add_repo(hub, tmp_path, {"st/TENX95.h5ad": data})
    sample = make_sample(tmp_path, {"st": "hf://datasets/MahmoodLab/hest-mini/st/TENX95.h5ad"})
    with Fetcher(settings(tmp_path)) as fetcher:
        fetched = fetcher.fetch(sample.sources["st"], sample=sample)
    assert fetched.sha256 == sha and fetched.path.read_bytes() == data and fetched.path.name == "TENX95.h5ad"
    assert fetched.commit == COMMIT and fetched.url == "hf://datasets/MahmoodLab/hest-mini/st/TENX95.h5ad"
    (head,) = hub.requests_for("/datasets/MahmoodLab/hest-mini/resolve/main/st/TENX95.h5ad", method="HEAD")
    assert head.headers["authorization"] == f"Bearer {TOKEN}"
    # The GET asks for the commit the HEAD saw, with the token; the CDN (another origin) never sees it.
    (get,) = hub.requests_for(f"/datasets/MahmoodLab/hest-mini/resolve/{COMMIT}/st/TENX95.h5ad", method="GET")
    assert get.headers["authorization"] == f"Bearer {TOKEN}"
    (cdn,) = hub.requests_for(f"/cdn/{sha}")
    assert cdn.host == f"localhost:{hub.port}" and "authorization" not in cdn.headers


def test_the_hub_digest_is_enforced_when_the_manifest_has_none(tmp_path: Path, hub: LocalServer) -> None:
    data = os.urandom(50_000)
    lie = hashlib.sha256(b"another file").hexdigest()
    add_repo(hub, tmp_path, {"wsis/A.tif": data}, linked_etag={"wsis/A.tif": lie})
    sample = make_sample(tmp_path, {"wsi": "hf://datasets/MahmoodLab/hest-mini/wsis/A.tif"})
    with Fetcher(settings(tmp_path)) as fetcher, pytest.raises(ChecksumMismatchError) as info:
        fetcher.fetch(sample.sources["wsi"], sample=sample)
    message = str(info.value)
    assert lie in message and hashlib.sha256(data).hexdigest() in message and "'wsi'" in message
    assert not list((tmp_path / "cache" / "blobs").rglob("*.*")) and not (tmp_path / "cache" / "urls").exists()


def test_manifest_digest_that_disagrees_with_the_hub_fails_before_downloading(tmp_path: Path, hub: LocalServer) -> None:
    add_repo(hub, tmp_path, {"st/B.h5ad": b"new version"})
    pinned = hashlib.sha256(b"old version").hexdigest()
    sample = make_sample(tmp_path, {"st": {"url": "hf://datasets/MahmoodLab/hest-mini/st/B.h5ad", "sha256": pinned}})
    with Fetcher(settings(tmp_path)) as fetcher, pytest.raises(ChecksumMismatchError) as info:
        fetcher.fetch(sample.sources["st"], sample=sample)
    assert pinned in str(info.value) and hashlib.sha256(b"new version").hexdigest() in str(info.value)
    assert [r.method for r in hub.requests] == ["HEAD"]


def test_revision_in_the_url_is_resolved_and_pinned(tmp_path: Path, hub: LocalServer) -> None:
    add_repo(hub, tmp_path, {"meta.csv": b"id\n1\n"}, revisions={"v1.1": V1_COMMIT}, cdn=False)
    sample = make_sample(tmp_path, {"meta": "hf://datasets/MahmoodLab/hest-mini@v1.1/meta.csv"})
    with Fetcher(settings(tmp_path)) as fetcher:
        fetched = fetcher.fetch(sample.sources["meta"], sample=sample)
    assert fetched.commit == V1_COMMIT and fetched.path.read_bytes() == b"id\n1\n"
    assert hub.count(f"/datasets/MahmoodLab/hest-mini/resolve/{V1_COMMIT}/meta.csv", method="GET") == 1


def test_small_git_files_without_linked_etag_are_hashed_and_recorded(tmp_path: Path, hub: LocalServer) -> None:
    add_repo(hub, tmp_path, {"README.md": b"# card\n"}, lfs=False, cdn=False)
    sample = make_sample(tmp_path, {"card": "hf://datasets/MahmoodLab/hest-mini/README.md"})
    with Fetcher(settings(tmp_path)) as fetcher:
        fetched = fetcher.fetch(sample.sources["card"], sample=sample)
        again = fetcher.fetch(sample.sources["card"], sample=sample)
    assert fetched.sha256 == hashlib.sha256(b"# card\n").hexdigest() and not fetched.cache_hit
    assert again.cache_hit and again.commit == COMMIT and len(hub.requests) == 2  # HEAD + GET, then nothing


def test_gated_dataset_without_a_token_says_to_accept_the_terms_and_log_in(tmp_path: Path, hub: LocalServer) -> None:
    add_repo(hub, tmp_path, {"st/G.h5ad": b"gated"}, token=TOKEN)
    sample = make_sample(tmp_path, {"st": "hf://datasets/MahmoodLab/hest-mini/st/G.h5ad"})
    with Fetcher(settings(tmp_path)) as fetcher, pytest.raises(AccessDeniedError) as info:
        fetcher.fetch(sample.sources["st"], sample=sample)
    message = str(info.value)
    assert info.value.status == 401
    assert f"{hub.url}/datasets/MahmoodLab/hest-mini" in message and "accept its terms" in message
    assert "hf auth login" in message and "HF_TOKEN" in message and "'st'" in message


def test_token_never_appears_in_logs_errors_cache_or_lock_file(
    tmp_path: Path, hub: LocalServer, monkeypatch: pytest.MonkeyPatch, caplog, capsys
) -> None:
    from stcorpus.curate.cli import main

    data = os.urandom(120_000)
    sha = hashlib.sha256(data).hexdigest()
    add_repo(hub, tmp_path, {"st/T.h5ad": data, "st/denied.h5ad": b"x"}, token=TOKEN)
    hub.add_fault(f"/cdn/{sha}", Fault(drop_after=40_000))  # a retry path that logs
    hub.add_fault("/datasets/MahmoodLab/hest-mini/resolve/main/st/T.h5ad", Fault(status=503, methods=("HEAD",)))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    manifest = tmp_path / "hub.yaml"
    manifest.write_text(
        "manifest: stcorpus-manifest/1\nname: hub\n"
        "defaults: {source: hest, technology: hest, assay: visium, species: human, licence: CC-BY-NC-SA-4.0}\n"
        "studies:\n  - id: s\n    samples:\n"
        "      - id: T1\n        sources: {st: 'hf://datasets/MahmoodLab/hest-mini/st/T.h5ad'}\n"
    )
    code = main(["-vv", "fetch", str(manifest), "--cache", str(tmp_path / "cache")])
    assert code == 0
    lock_text = (tmp_path / "hub.lock.json").read_text()
    assert sha in lock_text

    # A token the repo does not accept: 403, and the message must not echo it.
    monkeypatch.setenv("HF_TOKEN", TOKEN[::-1])
    hub.hub["MahmoodLab/hest-mini"].token = TOKEN
    sample = make_sample(tmp_path, {"st": "hf://datasets/MahmoodLab/hest-mini/st/denied.h5ad"})
    with Fetcher(settings(tmp_path)) as fetcher, pytest.raises(AccessDeniedError) as info:
        fetcher.fetch(sample.sources["st"], sample=sample)
    assert info.value.status == 403 and "your token has no access" in str(info.value)

    out = capsys.readouterr()
    everything = [caplog.text, out.out, out.err, str(info.value), lock_text]
    everything += [p.read_bytes().decode("latin-1") for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    for text in everything:
        assert TOKEN not in text and TOKEN[::-1] not in text
    assert "X-Amz-Signature=cafe" not in caplog.text  # signed CDN URLs are redacted in logs too
    assert any("retrying" in r.getMessage() for r in caplog.records)


def test_hf_url_parsing() -> None:
    assert parse_hf_url("hf://datasets/org/ds/a/b.h5ad") == HubFile("org/ds", "a/b.h5ad", "main")
    assert parse_hf_url("hf://datasets/org/ds@refs%2Fpr%2F3/x.tif") == HubFile("org/ds", "x.tif", "refs/pr/3")
    with pytest.raises(UnsupportedSchemeError, match="dataset repositories"):
        parse_hf_url("hf://models/org/m/w.bin")
    with pytest.raises(FetchError, match="not an hf:// dataset file URL"):
        parse_hf_url("hf://datasets/org/ds")
