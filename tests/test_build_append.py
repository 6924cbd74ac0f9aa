"""`curate build --append`: a corpus grows by a generation of new shards, every earlier shard stays
byte-identical, slides already in it are neither rebuilt nor duplicated, the loader reads all
generations as one corpus, a publish sends only the new files, and --reshuffle gives the bytes of a
fresh build. Real-data slides (tests/build_fixtures.py); the units are built once for the module."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stcorpus import schema
from stcorpus.curate.build.pack import PackSettings, pack
from stcorpus.curate.build.pipeline import BuildSettings, build
from stcorpus.curate.build.splits import SplitSettings
from stcorpus.curate.build.workdir import WorkDir
from stcorpus.curate.cli import main
from stcorpus.curate.errors import BuildError, GeneVocabularyError
from stcorpus.curate.genes import GeneIndex
from tests.build_fixtures import good_slides, hest_entry, manifest
from tests.test_build import ROOT, _complete_shards_only, digests
from tests.test_build_pack import fake_unit

#: Small shards so each split holds several and an append numbers on from the last one.
SETTINGS = BuildSettings(
    progress=False,
    name="grown",
    # Seed 4 puts one slide of each manifest in train and one in test: both splits grow.
    splits=SplitSettings(train=0.5, validation=0.0, test=0.5, seed=4),
    pack=PackSettings(samples_per_shard=16, seed=4),
)
APPEND = replace(SETTINGS, append=True)


@dataclass(frozen=True)
class Grown:
    """A corpus of manifest ``a`` (generation 0) and the same corpus after appending manifest ``b``."""

    a: Path
    b: Path
    data: Path
    base: Path
    appended: Path


def shard_sha256(root: Path) -> dict[str, str]:
    """sha256 of every shard file (both formats)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for sub in (schema.WDS_DIR, schema.PARQUET_DIR)
        for p in sorted((root / sub).rglob("*"))
        if p.is_file()
    }


def copy(corpus: Path, to: Path) -> Path:
    shutil.copytree(corpus, to)
    return to


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> Grown:
    tmp = tmp_path_factory.mktemp("append")
    entries = good_slides(tmp / "data", 4, integer=True)
    a = manifest(tmp / "m", entries[:2], name="first")
    b = manifest(tmp / "m", entries[2:], name="second")
    base = tmp / "base"
    build([a], out=base, settings=SETTINGS)
    appended = copy(base, tmp / "appended")
    build([a, b], out=appended, settings=APPEND)
    return Grown(a=a, b=b, data=tmp / "data", base=base, appended=appended)


def test_append_writes_a_new_generation_and_leaves_every_shard_byte_identical(grown: Grown) -> None:
    before, after = shard_sha256(grown.base), shard_sha256(grown.appended)
    assert before and {path: after[path] for path in before} == before
    shards = pq.read_table(grown.appended / schema.SHARDS_FILE).to_pylist()
    old = [s for s in shards if s["generation"] == 0]
    new = [s for s in shards if s["generation"] == 1]
    assert sorted(s["path"] for s in old) == sorted(before) and set(after) - set(before) == {s["path"] for s in new}
    assert {slide for s in new for slide in s["slide_ids"]} == {"GOOD-2", "GOOD-3"}
    assert {slide for s in old for slide in s["slide_ids"]} == {"GOOD-0", "GOOD-1"}
    assert {s["split"] for s in new} == {s["split"] for s in old} == {"train", "test"}
    for split in ("train", "test"):  # numbered on from the split's last earlier shard
        last_old = max((s["index"] for s in old if s["split"] == split and s["format"] == "wds"), default=-1)
        assert min(s["index"] for s in new if s["split"] == split) == last_old + 1

    slides = {r["slide_id"]: r for r in pq.read_table(grown.appended / schema.SLIDES_FILE).to_pylist()}
    assert {slide: r["status"] for slide, r in slides.items()} == dict.fromkeys(
        ["GOOD-0", "GOOD-1", "GOOD-2", "GOOD-3"], "built"
    )
    corpus = json.loads((grown.appended / schema.CORPUS_FILE).read_text())
    generations = corpus["generations"]
    assert [g["generation"] for g in generations] == [0, 1]
    assert sorted(generations[0]["slides"]) == ["GOOD-0", "GOOD-1"] and sorted(generations[1]["slides"]) == [
        "GOOD-2",
        "GOOD-3",
    ]
    assert [m["name"] for m in generations[1]["manifests"]] == ["first", "second"]
    assert [m["name"] for m in corpus["manifests"]] == ["first", "second"]
    parquet = [s for s in shards if s["format"] == "parquet"]
    assert sum(corpus["splits"].values()) == sum(s["n_samples"] for s in parquet)
    assert sum(corpus["splits"].values()) == sum(r["n_spots_written"] for r in slides.values())
    assert (
        sum(generations[1]["samples"].values())
        == slides["GOOD-2"]["n_spots_written"] + slides["GOOD-3"]["n_spots_written"]
    )
    assert corpus["slides"] == {"built": 4} and {s["slide_id"] for s in corpus["sources"]} == set(slides)
    # The vocabulary is the corpus's: genes.parquet is untouched.
    assert (grown.appended / schema.GENES_FILE).read_bytes() == (grown.base / schema.GENES_FILE).read_bytes()
    keys = [k for s in parquet for k in pq.read_table(grown.appended / s["path"]).column("__key__").to_pylist()]
    assert len(keys) == len(set(keys))

    card = (grown.appended / schema.CARD_FILE).read_text()
    assert "## Generations" in card
    assert "| 1 | first, second | 2 |" in card and "| 0 | first | 2 |" in card


def test_append_again_adds_nothing_and_rebuilds_nothing(grown: Grown, tmp_path: Path) -> None:
    again = copy(grown.appended, tmp_path / "again")
    before = shard_sha256(again)
    summary = build([grown.a, grown.b], out=again, settings=APPEND)
    assert summary.slides == {} and summary.reused_units == 0
    assert "nothing to append" in "\n".join(summary.lines())
    assert shard_sha256(again) == before
    assert [g["generation"] for g in json.loads((again / schema.CORPUS_FILE).read_text())["generations"]] == [0, 1]


def test_the_loader_reads_all_generations_as_one_corpus_and_resumes(grown: Grown) -> None:
    from stcorpus.loaders import CorpusDataset, CorpusLoader, LoaderSettings

    corpus = json.loads((grown.appended / schema.CORPUS_FILE).read_text())
    split = max(corpus["splits"], key=lambda s: corpus["splits"][s])
    shards = pq.read_table(grown.appended / schema.SHARDS_FILE).to_pylist()
    in_split = [s for s in shards if s["format"] == "parquet" and s["split"] == split]
    assert {s["generation"] for s in in_split} == {0, 1}, "the fixture's split must hold both generations"
    expected = sorted(
        k for s in in_split for k in pq.read_table(grown.appended / s["path"]).column("__key__").to_pylist()
    )

    def make() -> CorpusDataset:
        options = {"split": split, "batch_size": 5, "shuffle_window": 7, "drop_last": False, "views": ["patch"]}
        return CorpusDataset(grown.appended, LoaderSettings.from_dict(options | {"genes": {"transform": "none"}}))

    assert make().n_samples == corpus["splits"][split] == len(expected)
    full = [tuple(b["key"]) for b in CorpusLoader(make(), num_workers=0)]
    assert sorted(k for batch in full for k in batch) == expected
    loader = CorpusLoader(make(), num_workers=0)
    it = iter(loader)
    before = [tuple(next(it)["key"]) for _ in range(3)]
    it.close()  # type: ignore[attr-defined]
    resumed = CorpusLoader(make(), num_workers=0)
    resumed.load_state_dict(loader.state_dict())
    assert before + [tuple(b["key"]) for b in resumed] == full


def test_publish_after_an_append_uploads_only_the_new_generation_and_the_metadata(
    grown: Grown, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stcorpus.curate.publish import INDEX_FILE

    target = tmp_path / "target"
    assert main(["publish", str(grown.base), "--to", str(target), "--yes", "--no-progress"]) == 0
    before = {p.relative_to(target).as_posix(): p.stat().st_mtime_ns for p in target.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["publish", str(grown.appended), "--to", str(target), "--yes", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    after = {p.relative_to(target).as_posix(): p.stat().st_mtime_ns for p in target.rglob("*") if p.is_file()}
    sent = {p for p in after if after[p] != before.get(p)}
    new_shards = set(shard_sha256(grown.appended)) - set(shard_sha256(grown.base))
    description = {schema.SLIDES_FILE, schema.SHARDS_FILE, schema.CORPUS_FILE, schema.CARD_FILE, INDEX_FILE}
    assert new_shards <= sent, "every shard of the new generation is uploaded"
    assert sent - new_shards - description <= {p for p in sent if p.startswith(f"{schema.QC_DIR}/")}
    assert not sent & set(shard_sha256(grown.base)), "no earlier shard is uploaded again"
    assert f"uploaded {len(sent - {INDEX_FILE})} file(s)" in printed


def test_reshuffle_gives_the_bytes_of_a_fresh_build_of_all_manifests(grown: Grown, tmp_path: Path) -> None:
    reshuffled = copy(grown.appended, tmp_path / "reshuffled")
    # A corpus grown by appends is not silently repacked by a plain build.
    with pytest.raises(BuildError, match=r"--append .* --reshuffle"):
        build([grown.a, grown.b], out=reshuffled, settings=SETTINGS)
    summary = build([grown.a, grown.b], out=reshuffled, settings=replace(SETTINGS, reshuffle=True))
    assert summary.reused_units == 4  # the repack reads the finished slides, none is rebuilt
    # A fresh build of both manifests (its units copied in, as they are deterministic: test_build.py).
    fresh = tmp_path / "fresh"
    shutil.copytree(grown.appended / ".work", fresh / ".work")
    build([grown.a, grown.b], out=fresh, settings=SETTINGS)
    assert digests(reshuffled) == digests(fresh)
    # The append decided the new slides' splits as the fresh build of all manifests did.
    split_of = {
        corpus: {r["slide_id"]: r["split"] for r in pq.read_table(corpus / schema.SLIDES_FILE).to_pylist()}
        for corpus in (grown.appended, fresh)
    }
    assert split_of[grown.appended] == split_of[fresh]
    shards = pq.read_table(reshuffled / schema.SHARDS_FILE)
    assert set(shards.column("generation").to_pylist()) == {0}
    assert [g["generation"] for g in json.loads((reshuffled / schema.CORPUS_FILE).read_text())["generations"]] == [0]


def test_append_refuses_changed_slides_other_settings_and_a_missing_corpus(grown: Grown, tmp_path: Path) -> None:
    corpus = copy(grown.appended, tmp_path / "corpus")
    before = shard_sha256(corpus)
    # GOOD-0 now points at other counts: an append cannot rewrite its samples.
    other = hest_entry("GOOD-0", st=grown.data / "good1.h5ad", patient="P0", counts="raw")
    changed = manifest(tmp_path / "m", [other], name="first")
    with pytest.raises(BuildError, match=r"GOOD-0 \(manifest entry or settings\).*--reshuffle.*--overwrite"):
        build([changed], out=corpus, settings=APPEND)
    # Options that change a sample's bytes must be the corpus's.
    with pytest.raises(BuildError, match=r"settings pack differ.*--reshuffle"):
        build([grown.a], out=corpus, settings=replace(APPEND, pack=PackSettings(samples_per_shard=7)))
    assert shard_sha256(corpus) == before
    (corpus / next(iter(before))).unlink()  # as a killed --reshuffle leaves it
    with pytest.raises(BuildError, match=r"1 shard\(s\) .* missing .*--reshuffle"):
        build([grown.a], out=corpus, settings=APPEND)
    with pytest.raises(BuildError, match=r"holds no built corpus.*without --append"):
        build([grown.a], out=tmp_path / "empty", settings=APPEND)
    with pytest.raises(SystemExit):
        main(["build", str(grown.a), "--out", str(corpus), "--append", "--reshuffle"])


def test_a_new_copy_of_a_slide_in_the_corpus_is_recorded_as_its_duplicate(grown: Grown, tmp_path: Path) -> None:
    corpus = copy(grown.base, tmp_path / "corpus")
    before = shard_sha256(corpus)
    # The same files under another id and the source the pipeline prefers: the corpus's copy is still kept.
    twin = hest_entry("TWIN-0", st=grown.data / "good0.h5ad", source="10x", patient="P0", counts="raw")
    summary = build([grown.a, manifest(tmp_path / "m", [twin], name="twins")], out=corpus, settings=APPEND)
    assert summary.slides == {"duplicate": 1}
    rows = {r["slide_id"]: r for r in pq.read_table(corpus / schema.SLIDES_FILE).to_pylist()}
    assert rows["TWIN-0"]["status"] == "duplicate" and rows["TWIN-0"]["duplicate_of"] == "GOOD-0"
    assert shard_sha256(corpus) == before  # nothing new to pack: no generation written
    assert [g["generation"] for g in json.loads((corpus / schema.CORPUS_FILE).read_text())["generations"]] == [0]


def _leftovers_of_a_killed_append(corpus: Path, base: Path) -> None:
    """What a kill -9 after the new shards, shards.parquet and slides.parquet, before corpus.json, leaves."""
    shutil.copy(base / schema.CORPUS_FILE, corpus / schema.CORPUS_FILE)  # commits generation 0 only
    new = sorted(set(shard_sha256(corpus)) - set(shard_sha256(base)))
    half = corpus / new[-1]
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])  # a shard cut short
    (half.parent / f".{half.name}.partial").write_bytes(b"half")  # and a temporary file


def test_the_leftovers_of_a_killed_append_are_redone_to_the_same_bytes(grown: Grown, tmp_path: Path) -> None:
    # Deterministic leftovers: new shards on disk and in shards.parquet that corpus.json does not list.
    corpus = copy(grown.appended, tmp_path / "leftovers")
    _leftovers_of_a_killed_append(corpus, grown.base)
    build([grown.a, grown.b], out=corpus, settings=APPEND)
    assert digests(corpus) == digests(grown.appended)


def test_a_corpus_without_recorded_generations_is_generation_0(grown: Grown, tmp_path: Path) -> None:
    # A corpus written before generations were recorded: generation 0 is read from its files and units.
    legacy = copy(grown.base, tmp_path / "legacy")
    info = json.loads((legacy / schema.CORPUS_FILE).read_text())
    del info["generations"]
    (legacy / schema.CORPUS_FILE).write_text(json.dumps(info))
    shutil.copytree(grown.appended / ".work" / "units", legacy / ".work" / "units", dirs_exist_ok=True)
    build([grown.a, grown.b], out=legacy, settings=APPEND)
    assert shard_sha256(legacy) == shard_sha256(grown.appended)
    generations = json.loads((legacy / schema.CORPUS_FILE).read_text())["generations"]
    assert [sorted(g["slides"]) for g in generations] == [["GOOD-0", "GOOD-1"], ["GOOD-2", "GOOD-3"]]


def test_an_append_killed_while_it_packs_reruns_to_the_same_bytes(grown: Grown, tmp_path: Path) -> None:
    # A real kill -9 while the append packs (its units are done, so the pack starts at once).
    killed = copy(grown.base, tmp_path / "killed")
    shutil.copytree(grown.appended / ".work" / "units", killed / ".work" / "units", dirs_exist_ok=True)
    command = [
        sys.executable, "-m", "stcorpus.curate", "-q", "build", str(grown.a), str(grown.b), "--out", str(killed),
        "--name", "grown", "--splits", "0.5,0,0.5", "--seed", "4", "--samples-per-shard", "16", "--no-progress",
        "--append",
    ]  # fmt: skip
    old = set(shard_sha256(grown.base))
    process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if any(p.relative_to(killed).as_posix() not in old for p in killed.glob("*/*/*") if p.is_file()):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    _complete_shards_only(killed)  # every shard under its final name is whole
    if process.returncode == -signal.SIGKILL:  # (else the append finished between two looks)
        corpus = json.loads((killed / schema.CORPUS_FILE).read_text())
        assert corpus["generations"] == json.loads((grown.base / schema.CORPUS_FILE).read_text())["generations"]
    finished = subprocess.run(command, env=os.environ, cwd=ROOT, capture_output=True, text=True, check=False)
    assert finished.returncode == 0, finished.stderr
    assert digests(killed) == digests(grown.appended)
    assert not [p for p in killed.rglob("*") if p.name.endswith(".partial") and ".work" not in p.parts]


def test_genes_outside_the_vocabulary_are_dropped_and_counted(tmp_path: Path) -> None:
    from stcorpus.curate.build.append import genes_outside

    genes = ["ENSG00000000003", "ENSG00000000005", "ENSG00000000419", "ENSG00000000457"]
    work = WorkDir(tmp_path / "work")
    work.prepare()
    unit = fake_unit(work, "NEW", 12, genes)
    vocabulary = GeneIndex(genes[1:])  # the corpus never measured ENSG00000000003 (local index 0)
    import pyarrow as pa

    assert genes_outside([unit], pa.table({"ensembl_id": genes[1:]})) == {"NEW": ["ENSG00000000003"]}
    out = tmp_path / "corpus"
    packed = pack(
        out,
        work=work,
        units=[unit],
        splits={"NEW": "train"},
        gene_index=vocabulary,
        settings=PackSettings(samples_per_shard=100),
        generation=1,
        first_index={"train": 0},
        drop_outside_vocabulary=True,
    )
    table = pq.read_table(out / next(s.path for s in packed.shards if s.format == "parquet"))
    source = {r["key"]: r for r in work.samples("NEW").select(["key", "genes", "counts"]).to_pylist()}
    dropped = 0
    for row in table.to_pylist():
        local, counts = source[row["__key__"]]["genes"], source[row["__key__"]]["counts"]
        keep = [i for i, g in enumerate(local) if g != 0]
        dropped += len(local) - len(keep)
        assert row["genes"] == [local[i] - 1 for i in keep] and row["counts"] == [counts[i] for i in keep]
        assert row["n_genes"] == len(keep) and row["total_counts"] == float(np.sum([counts[i] for i in keep]))
    assert dropped > 0, "the fixture's slide measured the dropped gene"
    with pytest.raises(GeneVocabularyError, match="not in the vocabulary"):
        pack(
            tmp_path / "strict",
            work=work,
            units=[unit],
            splits={"NEW": "train"},
            gene_index=vocabulary,
            settings=PackSettings(samples_per_shard=100),
        )


def _subset_corpus(grown: Grown, tmp_path: Path) -> tuple[Path, Path, Any]:
    """A corpus of one slide that measured all but the last 40 genes of the fixture's, with the grown units."""
    import anndata

    full = anndata.read_h5ad(grown.data / "good0.h5ad")
    subset = tmp_path / "subset.h5ad"
    full[:, : full.n_vars - 40].copy().write_h5ad(subset)
    first = manifest(tmp_path / "m", [hest_entry("SUBSET-0", st=subset, patient="P0", counts="raw")], name="subset")
    corpus = tmp_path / "corpus"
    build([first], out=corpus, settings=SETTINGS)
    shutil.copytree(grown.appended / ".work" / "units", corpus / ".work" / "units", dirs_exist_ok=True)
    return corpus, first, full


def _new_generation_rows(corpus: Path) -> list[dict]:
    new = [
        s["path"]
        for s in pq.read_table(corpus / schema.SHARDS_FILE).to_pylist()
        if s["generation"] == 1 and s["format"] == "parquet"
    ]
    return [
        row for path in new for row in pq.read_table(corpus / path, columns=["slide_id", "genes", "counts"]).to_pylist()
    ]


def test_an_append_keeps_every_count_of_genes_the_corpus_had_not_measured(grown: Grown, tmp_path: Path) -> None:
    corpus, first, full = _subset_corpus(grown, tmp_path)
    genes_before = pq.read_table(corpus / schema.GENES_FILE)
    digest_before = json.loads((corpus / schema.CORPUS_FILE).read_text())["vocabulary_sha256"]
    before = shard_sha256(corpus)

    summary = build([first, grown.b], out=corpus, settings=APPEND)
    printed = "\n".join(summary.lines())
    assert "outside the corpus's vocabulary" not in printed and "marks them measured" in printed
    assert {p: h for p, h in shard_sha256(corpus).items() if p in before} == before
    record = json.loads((corpus / schema.CORPUS_FILE).read_text())
    assert record["generations"][1]["genes_outside_vocabulary"] == {}
    # The indices are the corpus's (the digest names them); only `measured` grew, by (some of) the 40 genes.
    genes_after = pq.read_table(corpus / schema.GENES_FILE)
    assert record["vocabulary_sha256"] == digest_before
    for name in ("index", "ensembl_id", "human_ortholog"):
        assert genes_after.column(name).equals(genes_before.column(name))
    measured_before = np.asarray(genes_before.column("measured").to_pylist())
    measured_after = np.asarray(genes_after.column("measured").to_pylist())
    assert (measured_before <= measured_after).all() and 0 < int(measured_after.sum() - measured_before.sum()) <= 40
    slides = {r["slide_id"]: r["measured_genes"] for r in pq.read_table(corpus / schema.SLIDES_FILE).to_pylist()}
    assert np.flatnonzero(measured_after).tolist() == sorted({g for ids in slides.values() for g in ids})
    # Every count of the appended slides is in their samples: the source's mapped counts, whole.
    rows = _new_generation_rows(corpus)
    work = WorkDir(corpus / ".work")
    for slide in ("GOOD-2", "GOOD-3"):
        source = work.samples(slide).column("counts").to_pylist()
        written = [c for r in rows if r["slide_id"] == slide for c in r["counts"]]
        assert written and sum(written) == sum(c for counts in source for c in counts)
    index = GeneIndex(genes_after)
    unit = work.result("GOOD-2")
    assert unit is not None and len(slides["GOOD-2"]) == len(unit.gene_ids)
    assert slides["GOOD-2"] == index.indices(np.asarray(unit.gene_ids)).tolist()

    # The bytes of a slide's input change under the same path: the append names the slide and the input.
    subset = tmp_path / "subset.h5ad"
    full[:-1, : full.n_vars - 40].copy().write_h5ad(subset)
    with pytest.raises(BuildError, match=r"SUBSET-0 \(input files: st\).*--reshuffle"):
        build([first, grown.b], out=corpus, settings=APPEND)


def test_an_append_to_a_union_vocabulary_corpus_drops_and_counts_the_genes_outside(
    grown: Grown, tmp_path: Path
) -> None:
    """A corpus written before the vocabulary was the references' (no `measured`: the union of its slides)."""
    corpus, first, _ = _subset_corpus(grown, tmp_path)
    reference = pq.read_table(corpus / schema.GENES_FILE)
    union = reference.filter(reference.column("measured")).drop_columns(["measured"])
    union = union.set_column(0, "index", pa.array(np.arange(union.num_rows, dtype=np.int32)))
    pq.write_table(union, corpus / schema.GENES_FILE)  # the shards' indices do not matter to what is tested
    genes_before = (corpus / schema.GENES_FILE).read_bytes()
    before = shard_sha256(corpus)

    summary = build([first, grown.b], out=corpus, settings=APPEND)
    printed = "\n".join(summary.lines())
    assert "2 appended slide(s) measured" in printed
    assert f"outside the corpus's vocabulary of {union.num_rows:,} (it is the union" in printed
    assert (corpus / schema.GENES_FILE).read_bytes() == genes_before
    assert {p: h for p, h in shard_sha256(corpus).items() if p in before} == before
    dropped = json.loads((corpus / schema.CORPUS_FILE).read_text())["generations"][1]["genes_outside_vocabulary"]
    assert sorted(dropped) == ["GOOD-2", "GOOD-3"] and all(0 < n <= 40 for n in dropped.values())
    genes = [g for row in _new_generation_rows(corpus) for g in row["genes"]]
    assert genes and max(genes) < union.num_rows
    measured = {r["slide_id"]: r["measured_genes"] for r in pq.read_table(corpus / schema.SLIDES_FILE).to_pylist()}
    assert max(measured["GOOD-2"]) < union.num_rows
