"""``curate fetch`` end to end: real HTTP, real Space Ranger files, a lock file that pins them."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from stcorpus.curate.cli import main
from stcorpus.curate.fetch import read_lock
from tests.conftest import HEART
from tests.httpserver import Fault, LocalServer, serve


@pytest.fixture
def server(tmp_path: Path):
    with serve(tmp_path / "www") as running:
        yield running


def publish_heart(server: LocalServer) -> dict[str, bytes]:
    """The real Space Ranger 1.0 heart subset, as 10x publishes it: an h5 and spatial.tar.gz."""
    (server.root / "heart").mkdir(parents=True)
    matrix = (HEART / "filtered_feature_bc_matrix.h5").read_bytes()
    (server.root / "heart" / "filtered_feature_bc_matrix.h5").write_bytes(matrix)
    with tarfile.open(server.root / "heart" / "spatial.tar.gz", "w:gz") as tar:
        tar.add(HEART / "spatial", arcname="spatial")
    return {"matrix": matrix, "spatial": (server.root / "heart" / "spatial.tar.gz").read_bytes()}


def write_manifest(tmp_path: Path, server: LocalServer, *, extra_sample: str = "") -> Path:
    text = f"""\
manifest: stcorpus-manifest/1
name: heart-demo
allow_local: true
defaults: {{source: 10x, technology: spaceranger, species: human, licence: CC-BY-4.0}}
studies:
  - id: tenx
    samples:
      - id: V1_Human_Heart
        sources:
          matrix: {server.file_url("heart/filtered_feature_bc_matrix.h5")}
          spatial: {server.file_url("heart/spatial.tar.gz")}
          lowres: {HEART / "spatial" / "tissue_lowres_image.png"}
{extra_sample}"""
    path = tmp_path / "heart.yaml"
    path.write_text(text)
    return path


def test_fetch_writes_a_correct_deterministic_lock_file(tmp_path: Path, server: LocalServer, capsys) -> None:
    published = publish_heart(server)
    manifest = write_manifest(tmp_path, server)
    cache = tmp_path / "cache"
    assert main(["fetch", str(manifest), "--cache", str(cache), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 sources ready: 2 downloaded" in out and "0 cache hits, 1 local; 0 failed" in out

    lock_path = tmp_path / "heart.lock.json"
    lock = read_lock(lock_path)
    assert lock["manifest"] == {
        "file": "heart.yaml",
        "name": "heart-demo",
        "sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
    }
    assert lock["complete"] is True
    by_source = {entry["source"]: entry for entry in lock["sources"]}
    assert [(e["sample"], e["source"]) for e in lock["sources"]] == [
        ("V1_Human_Heart", "lowres"),
        ("V1_Human_Heart", "matrix"),
        ("V1_Human_Heart", "spatial"),
    ]
    for name in ("matrix", "spatial"):
        assert by_source[name]["sha256"] == hashlib.sha256(published[name]).hexdigest()
        assert by_source[name]["size"] == len(published[name]) and by_source[name]["kind"] == "file"
        assert by_source[name]["url"] == server.file_url(f"heart/{Path(by_source[name]['url']).name}")
    lowres = (HEART / "spatial" / "tissue_lowres_image.png").read_bytes()
    assert by_source["lowres"]["sha256"] == hashlib.sha256(lowres).hexdigest()
    assert by_source["lowres"]["url"] == str(HEART / "spatial" / "tissue_lowres_image.png")
    first = lock_path.read_bytes()

    # Again: everything from the cache, not one request, and the very same lock bytes.
    requests_before = len(server.requests)
    assert main(["fetch", str(manifest), "--cache", str(cache), "--no-progress"]) == 0
    assert "2 cache hits, 1 local" in capsys.readouterr().out
    assert len(server.requests) == requests_before and lock_path.read_bytes() == first


def test_fetch_lists_failures_and_exits_1(tmp_path: Path, server: LocalServer, capsys) -> None:
    publish_heart(server)
    extra = f"""\
      - id: Broken_Slide
        sources:
          matrix: {server.file_url("nowhere/matrix.h5")}
          spatial: {{url: {server.file_url("heart/spatial.tar.gz")}, sha256: "{"ab" * 32}"}}
"""
    manifest = write_manifest(tmp_path, server, extra_sample=extra)
    server.add_fault("/heart/filtered_feature_bc_matrix.h5", Fault(drop_after=10_000))  # recovers by resuming
    code = main(["fetch", str(manifest), "--cache", str(tmp_path / "cache"), "--no-progress", "--workers", "3"])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAILED Broken_Slide/matrix:" in captured.err and "HTTP 404" in captured.err
    assert "FAILED Broken_Slide/spatial:" in captured.err and "sha256 mismatch" in captured.err
    assert "3 of 5 sources ready" in captured.out and "2 failed" in captured.out
    lock = json.loads((tmp_path / "heart.lock.json").read_text())
    assert lock["complete"] is False
    assert {e["sample"] for e in lock["sources"]} == {"V1_Human_Heart"}


def test_fetch_selected_samples_and_custom_lock_path(tmp_path: Path, server: LocalServer, capsys) -> None:
    publish_heart(server)
    extra = f"""\
      - id: Other
        sources:
          matrix: {server.file_url("heart/filtered_feature_bc_matrix.h5")}
"""
    manifest = write_manifest(tmp_path, server, extra_sample=extra)
    lock_path = tmp_path / "locks" / "custom.json"
    lock_path.parent.mkdir()
    args = ["fetch", str(manifest), "--cache", str(tmp_path / "cache"), "--no-progress", "--lock", str(lock_path)]
    assert main([*args, "--samples", "Other"]) == 0
    lock = read_lock(lock_path)
    assert [e["sample"] for e in lock["sources"]] == ["Other"] and lock["complete"] is False
    # The rest later: the entries of the first run are kept, and the lock is now complete.
    assert main([*args, "--samples", "V1_Human_Heart"]) == 0
    lock = read_lock(lock_path)
    assert {e["sample"] for e in lock["sources"]} == {"Other", "V1_Human_Heart"} and lock["complete"] is True
    assert main([*args, "--samples", "Nope,Other"]) == 2
    assert "'Nope'" in capsys.readouterr().err


def test_fetch_refuses_lock_path_for_several_manifests(tmp_path: Path, server: LocalServer, capsys) -> None:
    one = write_manifest(tmp_path, server)
    two = tmp_path / "two.yaml"
    two.write_text(one.read_text().replace("V1_Human_Heart", "Second"))
    assert main(["fetch", str(one), str(two), "--lock", str(tmp_path / "x.json")]) == 2
    assert "--lock" in capsys.readouterr().err


def test_an_html_directory_listing_is_refused_and_not_pinned(tmp_path: Path, capsys) -> None:
    """A `spatial` folder URL answered with a real directory listing (http.server's) is not a data file."""
    import functools
    from http.server import SimpleHTTPRequestHandler

    from tests.httpserver import serve_in_thread

    www = tmp_path / "listing"
    shutil.copytree(HEART, www / "heart")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(www))
    with serve_in_thread(handler) as httpd:  # type: ignore[arg-type]
        base = f"http://127.0.0.1:{httpd.server_address[1]}/heart"
        manifest = tmp_path / "listing.yaml"
        manifest.write_text(
            "manifest: stcorpus-manifest/1\nname: listing\n"
            "defaults: {source: 10x, technology: spaceranger, species: human, licence: CC-BY-4.0}\n"
            "studies:\n  - id: tenx\n    samples:\n      - id: V1_Human_Heart\n        sources:\n"
            f"          matrix: {base}/filtered_feature_bc_matrix.h5\n"
            f"          spatial: {base}/spatial/\n"
        )
        code = main(["fetch", str(manifest), "--cache", str(tmp_path / "cache"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    assert "1 of 2 sources ready" in captured.out and "1 failed" in captured.out
    (failure,) = [line for line in captured.err.splitlines() if line.startswith("FAILED")]
    assert failure.startswith("FAILED V1_Human_Heart/spatial:") and "HTML page (text/html" in failure
    assert "as an archive (.tar.gz, .zip) or file by file" in failure
    lock = read_lock(tmp_path / "listing.lock.json")
    assert [e["source"] for e in lock["sources"]] == ["matrix"] and lock["complete"] is False  # never pinned
    assert not list((tmp_path / "cache").rglob("*.partial"))
