"""`curate build` end to end on real data: formats agree, builds are reproducible and resumable,
bad slides are quarantined with their reasons, licences are enforced."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from stcorpus import schema
from stcorpus.curate.build.pack import PackSettings
from stcorpus.curate.build.pipeline import BuildSettings, Selection, build
from stcorpus.curate.errors import BuildError
from tests.build_fixtures import bad_slides, good_slides, hest_entry, manifest
from tests.conftest import DemoCorpus

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "manifests" / "demo.yaml"
QUIET = BuildSettings(progress=False)


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file of a corpus; corpus.json without its one timestamp field."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or rel.parts[0] == ".work":
            continue
        data = path.read_bytes()
        if rel.name == schema.CORPUS_FILE:
            corpus = json.loads(data)
            assert isinstance(corpus.pop("built_at"), str)
            for generation in corpus.get("generations", []):
                assert isinstance(generation.pop("built_at"), str)
            data = json.dumps(corpus, sort_keys=True).encode()
        out[str(rel)] = hashlib.sha256(data).hexdigest()
    return out


def test_demo_end_to_end(demo_corpus: DemoCorpus) -> None:
    import datasets

    # built by the session fixture with what `make demo` runs (Makefile): --holdout none, because
    # the demo pins benchmark slides HER2ST-B4 and C2 to train and validation
    out, printed = demo_corpus.root, demo_corpus.summary
    assert "3 built, 2 quarantined" in printed and "image_too_coarse" in printed
    # the summary prints every split non-empty, and each built slide's split and um/px against HEST's
    assert re.search(r"samples written: 519 \(train 283, validation 187, test 49\)", printed)
    assert "HER2ST-B4: built: train, 0.6878 um/px (lattice); reference_mpp 0.6889 (-0.2%)\n" in printed
    assert "HER2ST-C2: built: validation, 0.6881 um/px (lattice); reference_mpp 0.6961 (-1.1%)\n" in printed
    assert "V1-Mouse-Brain-fullres-crop: built: test, 0.7267 um/px (manifest)\n" in printed
    assert "OFF BY" not in printed

    slides = pq.read_table(out / schema.SLIDES_FILE).to_pylist()
    built = {s["slide_id"]: s for s in slides if s["status"] == "built"}
    assert sorted(built) == ["HER2ST-B4", "HER2ST-C2", "V1-Mouse-Brain-fullres-crop"]
    assert {s["slide_id"]: s["reason"].split(":")[0] for s in slides if s["status"] == "quarantined"} == {
        "V1-Human-Heart-subset": "image_too_coarse",
        "V1-Mouse-Brain-Coronal-1-subset": "image_too_coarse",
    }
    n_written = sum(s["n_spots_written"] for s in built.values())
    # every in-tissue spot of the real crop (49) and of the legacy ST sections (283 + 187) is kept
    assert {slide_id: s["n_spots_written"] for slide_id, s in built.items()} == {
        "V1-Mouse-Brain-fullres-crop": 49,
        "HER2ST-B4": 283,
        "HER2ST-C2": 187,
    }
    crop = built["V1-Mouse-Brain-fullres-crop"]
    assert crop["mpp"] == pytest.approx(0.7267) and crop["measured_genes"]
    # legacy ST um/px from the spot lattice, within 2% of HEST's (SPA145 0.6889, SPA141 0.6961)
    assert built["HER2ST-B4"]["mpp"] == pytest.approx(0.6889, rel=0.02)
    assert built["HER2ST-C2"]["mpp"] == pytest.approx(0.6961, rel=0.02)
    assert {built[i]["patient"] for i in ("HER2ST-B4", "HER2ST-C2")} == {"B", "C"}
    # pinned by the manifest's `split:` key and recorded in slides.parquet
    assert {i: s["split"] for i, s in built.items()} == {
        "V1-Mouse-Brain-fullres-crop": "test",
        "HER2ST-B4": "train",
        "HER2ST-C2": "validation",
    }

    parquet = datasets.load_dataset(str(out), streaming=True)
    wds = datasets.load_dataset(str(out), data_dir="wds", streaming=True)
    assert set(parquet) == set(wds) and sum(1 for split in parquet for _ in parquet[split]) == n_written
    for split in parquet:
        rows_p, rows_w = list(parquet[split]), list(wds[split])
        assert [r["__key__"] for r in rows_p] == [r["__key__"] for r in rows_w]
        for rp, rw in zip(rows_p, rows_w, strict=True):
            assert rp["patch"].size == (224, 224) and rp["region"].size == (224, 224)
            assert np.array_equal(np.asarray(rp["patch"]), np.asarray(rw["patch.jpg"]))
            assert np.array_equal(np.asarray(rp["counts"]), rw["expr.npz"]["counts"])
            assert rp["neighbors"] == rw["json"]["neighbors"]
    corpus = json.loads((out / schema.CORPUS_FILE).read_text())
    per_split = {split: sum(1 for _ in parquet[split]) for split in parquet}
    assert corpus["schema"] == schema.SCHEMA_ID and corpus["splits"] == per_split
    assert corpus["counts_dtype"] == "float32"  # the squidpy values are normalised (declared in the manifest)
    import platform

    import pyarrow
    import simplejpeg

    software = corpus["software"]  # what decides the bytes, for whoever rebuilds the corpus
    assert software["python"] == platform.python_version() and software["pyarrow"] == pyarrow.__version__
    assert software["simplejpeg"] == simplejpeg.__version__ and "not installed" not in software.values()
    report = (out / "qc" / "index.html").read_text()
    assert "V1-Human-Heart-subset" in report and "image_too_coarse" in report
    assert (out / "qc" / "V1-Mouse-Brain-fullres-crop__spots.png").stat().st_size > 10_000


def test_builds_of_other_species_index_every_gene_alike(demo_corpus: DemoCorpus, tmp_path: Path) -> None:
    """The demo's human slides alone, its mouse slides alone and all of them: one vocabulary, measured apart."""
    import contextlib
    import io

    from stcorpus.curate.cli import main
    from tests.conftest import DEMO_BUILD, ROOT

    corpora = {"both": demo_corpus.root}
    for species in ("human", "mouse"):
        out = tmp_path / species
        argv = [str(ROOT / a) if a.endswith(".yaml") else a.format(out=out) for a in DEMO_BUILD]
        with contextlib.redirect_stdout(io.StringIO()):
            assert main([*argv, "--species", species, "--no-progress"]) == 0
        corpora[species] = out
    genes = {name: pq.read_table(root / schema.GENES_FILE) for name, root in corpora.items()}
    for name in ("human", "mouse"):
        for column in ("index", "ensembl_id", "species", "human_ortholog"):
            assert genes[name].column(column).equals(genes["both"].column(column)), (name, column)
    digests = {json.loads((root / schema.CORPUS_FILE).read_text())["vocabulary_sha256"] for root in corpora.values()}
    assert len(digests) == 1
    # `measured` is exactly the union of the built slides' measured genes (slides.parquet).
    measured: dict[str, np.ndarray] = {}
    for name, root in corpora.items():
        slides = [r for r in pq.read_table(root / schema.SLIDES_FILE).to_pylist() if r["status"] == "built"]
        union = sorted({g for r in slides for g in r["measured_genes"]})
        flags = np.asarray(genes[name].column("measured").to_pylist())
        assert np.flatnonzero(flags).tolist() == union and union
        slide_species = {r["species"] for r in slides}
        assert set(np.asarray(genes[name].column("species").to_pylist())[flags]) == slide_species
        measured[name] = flags
    assert np.array_equal(measured["human"] | measured["mouse"], measured["both"])
    assert not (measured["human"] & measured["mouse"]).any()

    # The same genes hold the same counts at the same index: a human slide's samples are alike in both corpora.
    def counts_of(root: Path, slide: str) -> dict[str, tuple[list[int], list[float]]]:
        out: dict[str, tuple[list[int], list[float]]] = {}
        for shard in pq.read_table(root / schema.SHARDS_FILE).to_pylist():
            if shard["format"] == "parquet" and slide in shard["slide_ids"]:
                table = pq.read_table(root / shard["path"], columns=["__key__", "slide_id", "genes", "counts"])
                out |= {r["__key__"]: (r["genes"], r["counts"]) for r in table.to_pylist() if r["slide_id"] == slide}
        return out

    assert counts_of(corpora["human"], "HER2ST-C2") == counts_of(corpora["both"], "HER2ST-C2")


def test_two_builds_are_byte_identical(tmp_path: Path) -> None:
    path = manifest(tmp_path / "m", good_slides(tmp_path / "data", 3, integer=True))
    settings = BuildSettings(progress=False, name="same")
    build([path], out=tmp_path / "a", settings=settings)
    build([path], out=tmp_path / "b", settings=settings)
    first, second = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert first == second
    assert any(name.startswith("wds/") for name in first) and any(name.startswith("parquet/") for name in first)
    corpus = json.loads((tmp_path / "a" / schema.CORPUS_FILE).read_text())
    assert corpus["counts_dtype"] == "int32"


def test_worker_processes_give_the_same_bytes(tmp_path: Path) -> None:
    path = manifest(tmp_path / "m", good_slides(tmp_path / "data", 3))
    build([path], out=tmp_path / "serial", settings=BuildSettings(progress=False, name="c"))
    build([path], out=tmp_path / "parallel", settings=BuildSettings(progress=False, name="c", workers=2))
    assert digests(tmp_path / "serial") == digests(tmp_path / "parallel")


def _complete_shards_only(out: Path) -> None:
    """Every shard under its final name reads to the end; temporary files are hidden."""
    for tar in out.glob("wds/*/*.tar"):
        with tarfile.open(tar) as archive:
            assert len(archive.getmembers()) % len(schema.Member) == 0
    for parquet in out.glob("parquet/*/*.parquet"):
        pq.read_table(parquet)


def test_killed_build_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    path = manifest(tmp_path / "m", good_slides(tmp_path / "data", 4))
    reference = tmp_path / "reference"
    build([path], out=reference, settings=BuildSettings(progress=False, name="c"))
    out = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "stcorpus.curate",
        "-q",
        "build",
        str(path),
        "--out",
        str(out),
        "--name",
        "c",
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for finished_units in (1, 3):  # kill after some units; the second run reuses them and is killed again
        process = subprocess.Popen(command, env=env, cwd=ROOT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            units = out / ".work" / "units"
            done = [p for p in units.glob("*") if not p.name.startswith(".")] if units.is_dir() else []
            if len(done) >= finished_units:
                break
            time.sleep(0.02)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
        _complete_shards_only(out)
    finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    assert finished.returncode == 0, finished.stderr
    assert digests(out) == digests(reference)
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial") or p.name.endswith(".tmp")]


def test_the_pack_streams_releases_units_and_a_killed_build_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    """Shards are written while slides still build; a packed slide's samples leave the work folder."""
    path = manifest(tmp_path / "m", good_slides(tmp_path / "data", 4))
    options = ["--shuffle-window", "2", "--samples-per-shard", "7"]
    reference = tmp_path / "reference"
    command = [sys.executable, "-m", "stcorpus.curate", "-q", "build", str(path), "--name", "c", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([*command, "--out", str(reference), *options], env=env, cwd=ROOT, check=False)
    assert done.returncode == 0
    kept = sorted(p.parent.name for p in (reference / ".work" / "units").glob("*/samples.arrow"))
    assert len(kept) == 4  # kept by default
    options.append("--release-units")
    out = tmp_path / "streamed"
    process = subprocess.Popen([*command, "--out", str(out), *options], env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    released: list[Path] = []
    while time.monotonic() < deadline and process.poll() is None:
        released = list((out / ".work" / "units").glob("*/stats.arrow"))
        if released:
            break  # a slide was packed and released while the others still build
        time.sleep(0.02)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()
    assert released, "no slide was released before the build ended"
    _complete_shards_only(out)
    finished = subprocess.run([*command, "--out", str(out), *options], env=env, cwd=ROOT, check=False)
    assert finished.returncode == 0
    assert digests(out) == digests(reference)
    assert not list((out / ".work" / "units").glob("*/samples.arrow"))
    # A finished build run again reuses every slide (none is rebuilt although their samples are gone).
    settings = BuildSettings(
        progress=False, name="c", pack=PackSettings(window=2, samples_per_shard=7), release_units=True
    )
    summary = build([path], out=out, settings=settings)
    assert summary.reused_units == 4 and digests(out) == digests(reference)


def test_bad_slides_are_quarantined_with_reasons(tmp_path: Path) -> None:
    bad = bad_slides(tmp_path / "bad")
    entries = good_slides(tmp_path / "good", 2) + [entry for entry, _ in bad.values()]
    path = manifest(tmp_path / "m", entries)
    summary = build([path], out=tmp_path / "out", settings=QUIET)
    assert summary.slides == {"built": 2, "quarantined": len(bad)}
    reasons = {slide: reason.split(":")[0] for slide, _, reason in summary.bad}
    assert reasons == {slide: code for slide, (_, code) in bad.items()}
    rows = {r["slide_id"]: r for r in pq.read_table(tmp_path / "out" / schema.SLIDES_FILE).to_pylist()}
    for slide, (_, code) in bad.items():
        assert rows[slide]["status"] == "quarantined" and rows[slide]["reason"].startswith(code)
        assert rows[slide]["n_spots_written"] == 0
    report = (tmp_path / "out" / "qc" / "index.html").read_text()
    assert all(slide in report and code in report for slide, (_, code) in bad.items())
    assert "\n".join(summary.lines()).count("quarantined") >= len(bad)

    # on_bad_sample=error: the first bad slide (in the order slides run: the pack's, by source and id) stops
    # the build with its reason.
    with pytest.raises(BuildError, match=r"BAD-blank quarantined: blank_image"):
        build([path], out=tmp_path / "strict", settings=BuildSettings(progress=False, on_bad_sample="error"))


def test_licence_allow_list(tmp_path: Path) -> None:
    goods = good_slides(tmp_path / "data", 2)
    entries = [goods[0], goods[1].replace("licence: CC-BY-4.0", "licence: CC-BY-NC-4.0")]
    path = manifest(tmp_path / "m", entries)
    settings = BuildSettings(progress=False, selection=Selection(licences=frozenset({"CC-BY-4.0"})))
    summary = build([path], out=tmp_path / "out", settings=settings)
    assert summary.slides == {"built": 1, "excluded": 1}
    rows = {r["slide_id"]: r for r in pq.read_table(tmp_path / "out" / schema.SLIDES_FILE).to_pylist()}
    assert rows["GOOD-1"]["status"] == "excluded" and "CC-BY-NC-4.0" in rows["GOOD-1"]["reason"]
    assert "GOOD-1" not in {
        s for f in pq.read_table(tmp_path / "out" / schema.SHARDS_FILE).column("slide_ids").to_pylist() for s in f
    }


def test_nothing_to_build_says_why_for_every_slide(tmp_path: Path) -> None:
    path = manifest(tmp_path / "m", good_slides(tmp_path / "data", 2))
    settings = BuildSettings(progress=False, selection=Selection(licences=frozenset({"CC0-1.0"})))
    with pytest.raises(BuildError) as caught:
        build([path], out=tmp_path / "out", settings=settings)
    message = str(caught.value)
    assert "2 excluded" in message and "GOOD-0: licence: CC-BY-4.0 is not on the allow-list" in message
    assert "GOOD-1: licence" in message and "Widen the licence allow-list" in message
    statuses = pq.read_table(tmp_path / "out" / schema.SLIDES_FILE).column("status").to_pylist()
    assert statuses == ["excluded", "excluded"]


def test_same_data_under_two_sources_is_built_once(tmp_path: Path) -> None:
    entries = [hest_entry("COPY-hest", source="hest"), hest_entry("COPY-10x", source="10x", patient="P9")]
    summary = build([manifest(tmp_path / "m", entries)], out=tmp_path / "out", settings=QUIET)
    assert summary.slides == {"built": 1, "duplicate": 1}
    rows = {r["slide_id"]: r for r in pq.read_table(tmp_path / "out" / schema.SLIDES_FILE).to_pylist()}
    # The original release (10x) is kept over its re-distribution (HEST).
    assert rows["COPY-10x"]["status"] == "built"
    assert rows["COPY-hest"]["status"] == "duplicate" and rows["COPY-hest"]["duplicate_of"] == "COPY-10x"


def test_refuses_foreign_output_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="not an stcorpus build"):
        build([DEMO], out=tmp_path, settings=QUIET)


def test_summary_lines_name_rejection_reasons_only_when_there_are_some() -> None:
    from collections import Counter

    from stcorpus.curate.build.pipeline import BuildSummary

    clean = BuildSummary(slides=Counter(built=1), samples={"test": 49})
    assert clean.lines()[1] == "samples written: 49 (test 49); spots rejected: 0"
    rejected = BuildSummary(
        slides=Counter(built=2), samples={"train": 90, "test": 10}, spots_rejected=Counter(background=3, outside=1)
    )
    assert (
        rejected.lines()[1] == "samples written: 100 (train 90, test 10); spots rejected: 4 (background 3, outside 1)"
    )
