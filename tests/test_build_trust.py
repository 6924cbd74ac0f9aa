"""`curate build` on real data gives no silent wrong results (issue 14): stale units are rebuilt, another
corpus is not replaced, the default holdout list always applies, count kinds and every dropped spot are
recorded, the QC report's numbers are the units', one validation for validate/plan/build, and one bad
slide never stops a build."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from stcorpus import schema
from stcorpus.curate.build.pipeline import EXIT_ERROR, EXIT_SLIDES_FAILED, BuildSettings, build
from stcorpus.curate.build.splits import resolve_holdout
from stcorpus.curate.build.workdir import BuildRecord, UnitResult, WorkDir
from stcorpus.curate.cli import main
from stcorpus.curate.errors import BuildError, ManifestError, SettingsError
from stcorpus.curate.plan import Selection
from stcorpus.curate.slide import SpotDrop
from tests.build_fixtures import IMAGE, bad_slides, good_slides, hest_entry, manifest, spaceranger_entry, variant_h5ad
from tests.conftest import HEART

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "manifests" / "demo.yaml"
QUIET = BuildSettings(progress=False)


def slides(out: Path) -> dict[str, dict[str, Any]]:
    return {r["slide_id"]: r for r in pq.read_table(out / schema.SLIDES_FILE).to_pylist()}


def corpus(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / schema.CORPUS_FILE).read_text())
    return data


def sources(out: Path, slide_id: str) -> dict[str, tuple[str, str]]:
    return {s["name"]: (s["url"], s["sha256"]) for s in corpus(out)["sources"] if s["slide_id"] == slide_id}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# 1. Stale units: a unit's identity is its settings, its manifest entry and its input bytes
# ---------------------------------------------------------------------------------------------


def test_changed_inputs_rebuild_that_slide_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    entries = good_slides(data, 3)
    path = manifest(tmp_path / "m", entries)
    out = tmp_path / "out"
    first = build([path], out=out, settings=QUIET)
    assert first.reused_units == 0 and first.slides == {"built": 3}
    written = {k: r["n_spots_written"] for k, r in slides(out).items()}

    # New bytes under the same path (GOOD-1), a new URL with other bytes (GOOD-2).
    variant_h5ad(data, "good1", drop=5)
    other = variant_h5ad(data, "elsewhere", drop=6)
    path.write_text(path.read_text().replace(str(data / "good2.h5ad"), str(other)))
    second = build([path], out=out, settings=QUIET)
    assert second.reused_units == 1  # GOOD-0 only
    assert sources(out, "GOOD-1")["st"] == (str(data / "good1.h5ad"), sha256(data / "good1.h5ad"))
    assert sources(out, "GOOD-2")["st"] == (str(other), sha256(other))  # never the old URL with the new digest
    assert slides(out)["GOOD-0"]["n_spots_written"] == written["GOOD-0"]

    # A metadata change of one entry rebuilds it, and its samples carry the new value.
    path.write_text(path.read_text().replace("patient: P0", "patient: P0\n        organ: cerebellum"))
    third = build([path], out=out, settings=QUIET)
    assert third.reused_units == 2
    assert slides(out)["GOOD-0"]["organ"] == "cerebellum"
    metas = [m for split in ("train", "validation", "test") for m in _parquet_meta(out, split)]
    assert {m["organ"] for m in metas if m["slide_id"] == "GOOD-0"} == {"cerebellum"}

    # Reader options and build settings are part of the identity too.
    path.write_text(path.read_text().replace("patient: P1", "patient: P1\n        reader: {spatial_key: spatial}"))
    assert build([path], out=out, settings=QUIET).reused_units == 2
    tiles = dataclasses.replace(QUIET.unit.tiles, jpeg_quality=80)
    changed = dataclasses.replace(QUIET, unit=dataclasses.replace(QUIET.unit, tiles=tiles))
    assert build([path], out=out, settings=changed).reused_units == 0
    assert build([path], out=out, settings=changed).reused_units == 3


def _parquet_meta(out: Path, split: str) -> Iterator[dict[str, Any]]:
    for shard in sorted((out / "parquet" / split).glob("*.parquet")) if (out / "parquet" / split).is_dir() else []:
        yield from pq.read_table(shard, columns=["slide_id", "organ"]).to_pylist()


def test_quarantined_slide_is_retried_once_its_input_is_fixed(tmp_path: Path) -> None:
    from PIL import Image

    wsi = tmp_path / "data" / "slide.png"
    wsi.parent.mkdir(parents=True)
    Image.new("RGB", Image.open(IMAGE).size, (255, 255, 255)).save(wsi)  # blank: quarantined
    path = manifest(tmp_path / "m", [hest_entry("FIXED", wsi=wsi)])
    with pytest.raises(BuildError, match="blank_image"):
        build([path], out=tmp_path / "out", settings=QUIET)
    Image.open(IMAGE).save(wsi)  # the real H&E under the same name
    summary = build([path], out=tmp_path / "out", settings=QUIET)
    assert summary.slides == {"built": 1} and summary.reused_units == 0
    assert sources(tmp_path / "out", "FIXED")["wsi"][1] == sha256(wsi)


# ---------------------------------------------------------------------------------------------
# 2. --out holding a corpus of other manifests
# ---------------------------------------------------------------------------------------------


def test_other_manifests_are_refused_unless_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entries = good_slides(tmp_path / "data", 2)
    first = manifest(tmp_path / "a", entries[:1], name="first")
    second = manifest(tmp_path / "b", entries[1:], name="second")
    out = tmp_path / "out"
    build([first], out=out, settings=QUIET)
    assert build([first], out=out, settings=QUIET).reused_units == 1  # the same build resumes
    with pytest.raises(
        BuildError, match=r"holds a corpus built from manifest\(s\) first, not from second.*--overwrite"
    ):
        build([second], out=out, settings=QUIET)
    assert set(slides(out)) == {"GOOD-0"}  # untouched

    code = main(["-q", "build", str(second), "--out", str(out), "--no-progress", "--overwrite"])
    assert code == 0, capsys.readouterr().err
    assert set(slides(out)) == {"GOOD-1"} and [m["name"] for m in corpus(out)["manifests"]] == ["second"]
    assert [u.slide_id for u in WorkDir(out / ".work").results()] == ["GOOD-1"]


def test_a_killed_build_of_other_manifests_is_refused_too(tmp_path: Path) -> None:
    out = tmp_path / "out"
    WorkDir(out / ".work").write_record(BuildRecord(name=None, manifests=("someone-else",)))
    path = manifest(tmp_path / "m", good_slides(tmp_path / "data", 1))
    with pytest.raises(BuildError, match="someone-else"):
        build([path], out=out, settings=QUIET)


# ---------------------------------------------------------------------------------------------
# 3. The holdout list ships inside the package
# ---------------------------------------------------------------------------------------------

HELD_OUT_ID = "GSE175540_GSM5924030"  # an id of the shipped list (a copy of HEST-Benchmark's INT24)


def test_the_package_holdout_list_is_the_generated_one(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_catalogue import _load_script

    shipped = resolve_holdout()
    assert shipped.path is not None and shipped.path.read_bytes() == (ROOT / "manifests" / "holdout.yaml").read_bytes()
    assert HELD_OUT_ID in shipped.slides and len(shipped.slides) == 226
    script = _load_script()
    assert script.PACKAGE_COPIES["holdout.yaml"].resolve() == shipped.path.resolve()
    assert script.main(["--check"]) == 0, capsys.readouterr().err  # the script writes (and checks) both copies


def test_a_manifest_copied_anywhere_keeps_the_holdout_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entries = good_slides(tmp_path / "data", 2)
    entries[0] = entries[0].replace("id: GOOD-0", f"id: {HELD_OUT_ID}")
    path = manifest(tmp_path / "elsewhere", entries)  # no holdout.yaml beside it
    settings = BuildSettings(progress=False, splits=dataclasses.replace(QUIET.splits, train=1.0, validation=0, test=0))

    assert main(["plan", str(path), "--allow-local"]) == 0
    planned = capsys.readouterr().out
    assert "holdout list: default (the benchmark list shipped with stcorpus, 226 slides" in planned
    assert "1 of the selected slides held out (built into test)" in planned

    summary = build([path], out=tmp_path / "out", settings=settings)
    assert "holdout list: default" in summary.holdout and "1 of the selected slides held out" in summary.holdout
    assert any(line.startswith("holdout list: default") for line in summary.lines())
    rows = slides(tmp_path / "out")
    assert rows[HELD_OUT_ID]["split"] == "test" and rows["GOOD-1"]["split"] == "train"
    shipped = resolve_holdout()
    recorded = corpus(tmp_path / "out")["holdout"]
    assert recorded["name"] == "default" and recorded["sha256"] == shipped.sha256 and recorded["held_out"] == 1
    card = (tmp_path / "out" / schema.CARD_FILE).read_text()
    assert f"holdout list `default` (226 slides, sha256 `{shipped.sha256}`) held out 1" in card

    none = build([path], out=tmp_path / "none", settings=dataclasses.replace(settings, holdout="none"))
    assert "none (--holdout none" in none.holdout
    assert slides(tmp_path / "none")[HELD_OUT_ID]["split"] == "train"
    assert corpus(tmp_path / "none")["holdout"]["name"] == "none"
    assert "no holdout list was applied (`--holdout none`)" in (tmp_path / "none" / schema.CARD_FILE).read_text()


# ---------------------------------------------------------------------------------------------
# 4. Count kinds, 5. QC report numbers, 6. every dropped spot
# ---------------------------------------------------------------------------------------------


class _Tables(HTMLParser):
    """The report's tables: heading text -> rows of cell text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.heading = ""
        self._in: str | None = None
        self._text = ""
        self._row: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("h2", "h3", "td", "th"):
            self._in, self._text = tag, ""
        elif tag == "tr":
            self._row = []

    def handle_data(self, data: str) -> None:
        if self._in:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h2", "h3") and self._in == tag:
            self.heading, self._in = self._text, None
        elif tag in ("td", "th") and self._row is not None:
            self._row.append(self._text)
            self._in = None
        elif tag == "tr" and self._row is not None:
            self.tables.setdefault(self.heading, []).append(self._row)
            self._row = None


def report_tables(out: Path) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed((out / "qc" / "index.html").read_text())
    return parser.tables


def test_count_kinds_are_recorded_and_the_card_never_calls_normalised_values_raw(tmp_path: Path) -> None:
    raw = good_slides(tmp_path / "raw", 1, integer=True)
    normalised = [e.replace("GOOD-0", "NORM-0").replace("P0", "P9") for e in good_slides(tmp_path / "norm", 1)]
    out = tmp_path / "out"
    build([manifest(tmp_path / "m", raw + normalised)], out=out, settings=QUIET)
    rows = slides(out)
    assert rows["GOOD-0"]["count_kind"] == "raw" and rows["NORM-0"]["count_kind"] == "normalized"
    assert corpus(out)["count_kinds"] == {"normalized": ["NORM-0"], "raw": ["GOOD-0"]}
    card = (out / schema.CARD_FILE).read_text()
    assert "## Count kinds" in card and "| NORM-0 | normalized |" in card
    assert "Counts are raw" not in card and "the spot's raw counts on one" not in card

    only = tmp_path / "only-normalised"
    build([manifest(tmp_path / "n", normalised)], out=only, settings=QUIET)
    card = (only / schema.CARD_FILE).read_text()
    assert "normalised values, not raw counts" in card and "Counts are raw" not in card


def _dropping_reader(monkeypatch: pytest.MonkeyPatch, drops: dict[str, dict[str, int]]) -> None:
    """The real HEST reader, then drop the first in-tissue spots of the given slides with the given reasons,
    as a reader does for barcodes missing from the positions or NaN coordinates."""
    import stcorpus.curate.readers.hest as hest

    original = hest.read

    def read(*, sample: Any, files: Any, images: Any) -> Any:
        slide = original(sample=sample, files=files, images=images)
        reasons = drops.get(sample.id)
        if not reasons:
            return slide
        n = sum(reasons.values())
        keep = np.ones(len(slide.spots), dtype=bool)
        keep[np.flatnonzero(slide.spots.in_tissue)[:n]] = False
        return dataclasses.replace(
            slide, counts=slide.counts[keep], spots=slide.spots.subset(keep), dropped_spots=dict(reasons)
        )

    monkeypatch.setattr(hest, "read", read)


def test_report_numbers_and_every_dropped_spot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drops = {SpotDrop.NOT_IN_POSITIONS: 3, SpotDrop.NAN_COORDINATES: 2}
    _dropping_reader(monkeypatch, {"GOOD-0": drops})
    out = tmp_path / "out"
    summary = build([manifest(tmp_path / "m", good_slides(tmp_path / "data", 2))], out=out, settings=QUIET)

    # Summary, slides.parquet and report show every dropped spot with its reason.
    assert (
        summary.spots_rejected[SpotDrop.NOT_IN_POSITIONS] == 3 and summary.spots_rejected[SpotDrop.NAN_COORDINATES] == 2
    )
    line = summary.lines()[1]
    assert f"{SpotDrop.NAN_COORDINATES} 2" in line and f"{SpotDrop.NOT_IN_POSITIONS} 3" in line
    assert re.search(r"spots rejected: ([0-9]+)", line) and int(line.split("spots rejected: ")[1].split()[0]) >= 5
    rows = slides(out)
    assert dict(rows["GOOD-0"]["spots_rejected"]) == drops and dict(rows["GOOD-1"]["spots_rejected"]) == {}
    tables = report_tables(out)
    not_written = {(r[0], r[4]): r[5] for r in tables["Spots not written"][1:]}
    assert not_written == {("GOOD-0", reason): str(n) for reason, n in drops.items()}

    # The gene-mapping table holds the units' numbers.
    mapping = {r[0]: r for r in tables["Gene mapping"][1:]}
    assert set(mapping) == {"GOOD-0", "GOOD-1"}
    for slide_id, row in mapping.items():
        unit = UnitResult.from_json((out / ".work" / "units" / slide_id / "result.json").read_text())
        report = unit.mapping
        expected = [
            report["n_features"],
            report["by_id"],
            report["mapped"] - report["by_id"],
            report["ambiguous"],
            report["unmapped"],
            report["merged"],
            report["outside_panel"],
            report["n_genes"],
        ]
        assert row[1:9] == [str(v) for v in expected]
        assert row[9] == f"{report['lost_fraction']:.4f}"
        assert report["n_features"] > 0 and report["mapped"] - report["by_id"] > 0  # symbols: not empty columns
    assert any(float(r[9]) > 0 for r in mapping.values())  # some counts are lost (unmapped symbols)


# ---------------------------------------------------------------------------------------------
# 7. One validation, 12. filters checked
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "fault"),
    [
        ("reader: {image_fallback: 'no'}", "reader.image_fallback must be true or false, not 'no'"),
        ("reader: {image_fallback: no}", "reader.image_fallback must be true or false, not 'no'"),
        ("reader: {image_fallback: 0}", "reader.image_fallback must be true or false, not 0"),
        ("reader: {matrx: raw}", "unknown key(s) in reader: matrx (did you mean 'matrix'?); known: "),
    ],
)
def test_validate_plan_and_build_run_one_validation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str, fault: str
) -> None:
    entry = spaceranger_entry("SR", matrix=HEART / "filtered_feature_bc_matrix.h5", spatial=HEART / "spatial")
    path = manifest(tmp_path / "m", [entry + "\n  " + change])
    assert main(["validate", str(path)]) == 1
    assert fault in capsys.readouterr().err
    assert main(["plan", str(path)]) == EXIT_ERROR
    assert fault in capsys.readouterr().err
    assert main(["build", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == EXIT_ERROR
    assert fault in capsys.readouterr().err
    with pytest.raises(ManifestError, match=re.escape(fault)):
        build([path], out=tmp_path / "out", settings=QUIET)


def test_every_fault_of_one_sample_is_reported_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A sample with three faults (a misspelt source, a string for a bool, an unknown option) is refused
    with all three in one run of each command, so fixing a manifest takes one edit, not three runs."""
    entry = spaceranger_entry("SR", matrix=HEART / "filtered_feature_bc_matrix.h5", spatial=HEART / "spatial")
    entry = entry.replace("spatial:", "spatail:") + "\n  reader: {image_fallback: 'no', matrx: raw}"
    path = manifest(tmp_path / "m", [entry])
    faults = (
        "unknown source name(s) spatail",
        "reader.image_fallback must be true or false, not 'no'",
        "unknown key(s) in reader: matrx",
    )
    for command in (["validate"], ["plan"], ["build", "--out", str(tmp_path / "out"), "--no-progress"]):
        assert main([command[0], str(path), *command[1:]]) != 0
        err = capsys.readouterr().err
        assert [f for f in faults if f not in err] == [], (command[0], err)


def test_misspelt_source_name_is_refused_by_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entry = spaceranger_entry("SR", matrix=HEART / "filtered_feature_bc_matrix.h5", spatial=HEART / "spatial")
    path = manifest(tmp_path / "m", [entry.replace("spatial:", "spatail:")])
    assert main(["plan", str(path)]) == EXIT_ERROR
    assert "unknown source name(s) spatail" in capsys.readouterr().err


def test_filters_are_checked_against_the_manifests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = manifest(tmp_path / "m", [hest_entry("A"), hest_entry("B", patient="P2")])
    for flag, value, expected in (
        ("--species", "mosue", "--species mosue: no slide of the manifests has this value; they hold: mouse"),
        (
            "--technology",
            "spaceranger",
            "--technology spaceranger: no slide of the manifests has this value; they hold: hest",
        ),
        ("--organ", "brian", "they hold: brain"),
        ("--licence", "CC-BY-4", "--licence CC-BY-4: not an SPDX id curate knows; valid: CC0-1.0,"),
        ("--ids", "AA", "--ids AA: no slide of the manifests has this id (did you mean A?)"),
    ):
        assert main(["plan", str(path), flag, value]) == EXIT_ERROR
        assert expected in capsys.readouterr().err, flag
    assert main(["plan", str(path), "--organ", "BRAIN", "--licence", "CC-BY-4.0,LicenseRef-mine"]) == 0
    capsys.readouterr()
    with pytest.raises(SettingsError, match="mosue"):
        build(
            [path],
            out=tmp_path / "out",
            settings=BuildSettings(progress=False, selection=Selection(species=frozenset({"mosue"}))),
        )


# ---------------------------------------------------------------------------------------------
# 8. Quarantine records, 9. nothing built, 10. hints that work
# ---------------------------------------------------------------------------------------------


def _shifted_spatial(folder: Path) -> Path:
    """The real heart spatial folder with every spot moved far outside the image."""
    spatial = folder / "spatial"
    shutil.copytree(HEART / "spatial", spatial)
    positions = spatial / "tissue_positions_list.csv"
    rows = list(csv.reader(positions.open()))
    for row in rows:
        row[4], row[5] = str(int(row[4]) + 10**6), str(int(row[5]) + 10**6)
    with positions.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return spatial


def test_quarantine_records_what_was_read_and_every_failed_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    matrix = HEART / "filtered_feature_bc_matrix.h5"
    entries = [
        spaceranger_entry("COARSE", matrix=matrix, spatial=HEART / "spatial"),
        spaceranger_entry("COARSE-AND-OUTSIDE", matrix=matrix, spatial=_shifted_spatial(tmp_path)),
    ]
    out = tmp_path / "out"
    path = manifest(tmp_path / "m", entries)
    # 9: nothing is built, yet slides.parquet and the QC report are written and say why.
    assert main(["build", str(path), "--out", str(out), "--no-progress"]) == EXIT_ERROR
    assert "no slide could be built" in capsys.readouterr().err
    rows = slides(out)
    assert rows["COARSE"]["n_spots"] == 100  # every barcode of the real matrix is in tissue
    assert rows["COARSE"]["reason_codes"] == ["image_too_coarse"]
    both = rows["COARSE-AND-OUTSIDE"]
    assert both["n_spots"] == 100 and both["mpp"] == pytest.approx(rows["COARSE"]["mpp"])
    assert both["reason_codes"] == ["image_too_coarse", "spots_outside_image"]
    assert "image_too_coarse: " in both["reason"] and "; also spots_outside_image: 100 of 100" in both["reason"]
    not_built = {r[0]: r for r in report_tables(out)["Slides not built"][1:]}
    assert not_built["COARSE-AND-OUTSIDE"][2] == "image_too_coarse, spots_outside_image"
    assert not_built["COARSE"][3] == "100"

    # 10: the hint names a flag that exists, and the flag does what it says.
    assert "`curate build --max-mpp`" in rows["COARSE"]["reason"]
    main(["build", str(path), "--out", str(out), "--no-progress", "--max-mpp", "20"])
    capsys.readouterr()
    reason = slides(out)["COARSE"]["reason"]
    assert reason.startswith("image_too_coarse: ") and "--max-upsample" in reason and "--patch-mpp" in reason


def _string_constants() -> Iterator[tuple[Path, str]]:
    import ast

    for path in sorted((ROOT / "curate").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                yield path, node.value


def test_messages_name_flags_and_keys_that_exist() -> None:
    """No message points at a Python settings object, and every `--flag` a message names is a real option."""
    from stcorpus.curate.cli import build_parser

    parser = build_parser()
    options = {option for action in parser._actions for option in action.option_strings}
    for sub in parser._subparsers._group_actions[0].choices.values():  # type: ignore[union-attr]
        options |= {option for action in sub._actions for option in action.option_strings}
    # LoaderSettings is the loader's public API: the card's and publish's usage examples construct it.
    internal = re.compile(r"\b(?!LoaderSettings)[A-Z][A-Za-z]*Settings[.(]")
    offenders = [f"{p.name}: {text!r}" for p, text in _string_constants() if internal.search(text)]
    assert offenders == []
    flags = {flag for _, text in _string_constants() for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]+", text)}
    # `dask worker --nthreads 1` (the Dask executor's hint); `vips tiffsave --tile --pyramid --compression`
    # (how the image-budget refusal says to make a tiled pyramid)
    other_tools = {"--nthreads", "--tile", "--pyramid", "--compression"}
    assert sorted(flags - options - other_tools) == []


# ---------------------------------------------------------------------------------------------
# 11. One slide never stops a build
# ---------------------------------------------------------------------------------------------

CRASHES: dict[str, BaseException] = {
    "EOF": EOFError("Compressed file ended before the end-of-stream marker was reached"),
    "UTF": UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte"),
    "VALUE": ValueError("indices and data should have the same size"),
    "MEMORY": MemoryError(),
}


def test_any_exception_fails_one_slide_and_the_build_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import stcorpus.curate.readers.hest as hest

    original = hest.read

    def read(*, sample: Any, files: Any, images: Any) -> Any:
        if sample.id in CRASHES:
            raise CRASHES[sample.id]
        return original(sample=sample, files=files, images=images)

    monkeypatch.setattr(hest, "read", read)
    entries = good_slides(tmp_path / "data", 1) + [hest_entry(slide_id) for slide_id in CRASHES]
    path = manifest(tmp_path / "m", entries)
    out = tmp_path / "out"
    assert main(["build", str(path), "--out", str(out), "--no-progress"]) == EXIT_SLIDES_FAILED
    printed = capsys.readouterr().out
    assert "1 built, 4 failed" in printed and "run the same command again" in printed
    rows = slides(out)
    assert rows["GOOD-0"]["status"] == "built"
    for slide_id, exc in CRASHES.items():
        row = rows[slide_id]
        assert row["status"] == "failed" and row["reason_codes"] == ["error"]
        assert row["reason"].startswith(f"error: {type(exc).__name__}") and "while reading" in row["reason"]
        assert str(IMAGE) in row["reason"]  # the files it was reading
        assert f"{slide_id}: failed: error: {type(exc).__name__}" in printed
    assert "more memory" in rows["MEMORY"]["reason"]
    not_built = {r[0]: r[1] for r in report_tables(out)["Slides not built"][1:]}
    assert not_built == dict.fromkeys(CRASHES, "failed")

    # Failed slides are retried by the next run; the built one is reused.
    monkeypatch.setattr(hest, "read", original)
    assert main(["build", str(path), "--out", str(out), "--no-progress"]) == 0
    assert "(1 slides reused from an earlier run)" in capsys.readouterr().out


def test_real_crafted_files_do_not_stop_a_build(tmp_path: Path) -> None:
    """A truncated features.tsv.gz, a non-UTF-8 features file, an h5 whose data and indices differ in length."""
    import gzip

    import h5py

    from tests.conftest import MOUSE_BRAIN

    outs = {}
    for name in ("truncated", "latin1"):
        folder = tmp_path / name / "outs"
        shutil.copytree(MOUSE_BRAIN / "outs", folder)
        (folder / "raw_feature_bc_matrix.h5").unlink()
        features = folder / "raw_feature_bc_matrix" / "features.tsv"
        text = features.read_bytes()
        if name == "truncated":
            packed = gzip.compress(text)
            features.with_suffix(".tsv.gz").write_bytes(packed[: len(packed) // 2])
            features.unlink()
        else:
            lines = text.split(b"\n")
            lines[3] = lines[3].replace(b"\t", b"\xe9\t", 1)
            features.write_bytes(b"\n".join(lines))
        outs[name] = folder
    mismatch = tmp_path / "mismatch.h5"
    shutil.copyfile(HEART / "filtered_feature_bc_matrix.h5", mismatch)
    with h5py.File(mismatch, "r+") as f:
        data = f["matrix/data"][:]
        del f["matrix/data"]
        f["matrix/data"] = data[:-5]
    entries = [
        *good_slides(tmp_path / "good", 1),
        *(
            f"- {{id: {name.upper()}, technology: spaceranger, reader: {{matrix: raw}}, sources: {{outs: '{folder}'}}}}"
            for name, folder in outs.items()
        ),
        spaceranger_entry("MISMATCH", matrix=mismatch, spatial=HEART / "spatial"),
    ]
    settings = dataclasses.replace(
        QUIET, unit=dataclasses.replace(QUIET.unit, qc=dataclasses.replace(QUIET.unit.qc, max_mpp=100))
    )
    summary = build([manifest(tmp_path / "m", entries)], out=tmp_path / "out", settings=settings)
    rows = slides(tmp_path / "out")
    assert rows["GOOD-0"]["status"] == "built"
    for slide_id in ("TRUNCATED", "LATIN1", "MISMATCH"):
        assert rows[slide_id]["status"] in ("failed", "quarantined"), slide_id
        assert rows[slide_id]["reason"], slide_id
    assert summary.slides["built"] == 1


# ---------------------------------------------------------------------------------------------
# 13. Outputs are as readable as the shards
# ---------------------------------------------------------------------------------------------


def test_atomic_files_follow_the_umask(tmp_path: Path) -> None:
    from stcorpus.curate.atomic import write_atomic

    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640


def test_card_and_provenance_are_readable_like_the_shards(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        build([manifest(tmp_path / "m", good_slides(tmp_path / "data", 1))], out=out, settings=QUIET)
    finally:
        os.umask(old)
    shard = next(out.glob("wds/*/*.tar"))
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (out / schema.CARD_FILE, out / schema.CORPUS_FILE, shard)}
    modes |= {p.name: stat.S_IMODE(p.stat().st_mode) for p in (out / schema.SLIDES_FILE, out / "qc" / "index.html")}
    assert set(modes.values()) == {0o644}, modes


def test_bad_slides_fixture_still_quarantines(tmp_path: Path) -> None:
    """The crafted bad slides of the other build tests keep their reasons with the new records."""
    bad = bad_slides(tmp_path / "bad")
    out = tmp_path / "out"
    build(
        [manifest(tmp_path / "m", good_slides(tmp_path / "good", 1) + [e for e, _ in bad.values()])],
        out=out,
        settings=QUIET,
    )
    rows = slides(out)
    for slide_id, (_, code) in bad.items():
        assert rows[slide_id]["reason_codes"][0] == code, slide_id


# ---------------------------------------------------------------------------------------------
# Issue 15 item 5: the unit as a stage line, its work format in workdir.py
# ---------------------------------------------------------------------------------------------


def test_unit_stages_on_a_real_slide(tmp_path: Path) -> None:
    from collections import Counter

    from stcorpus.curate.build import workdir
    from stcorpus.curate.build.unit import choose_sites, columns, neighbours, site_tiles
    from stcorpus.curate.genes import map_slide_genes
    from stcorpus.curate.manifest import load_manifest
    from stcorpus.curate.readers import read_slide
    from stcorpus.curate.tiles import TileSettings

    sample = load_manifest(DEMO).sample("V1-Mouse-Brain-fullres-crop")
    files = {name: (DEMO.parent / src.url).resolve() for name, src in sample.sources.items()}
    slide = read_slide(sample, files)
    try:
        genes = map_slide_genes(slide.features, slide.counts, species="mouse", slide_id=sample.id)
        rejected: Counter[str] = Counter()
        sites = choose_sites(slide, genes.counts, rejected=rejected)
        order = list(zip(slide.spots.array_row[sites.spots], slide.spots.array_col[sites.spots], strict=True))
        assert order == sorted(order) and len(sites.keys) == sites.counts.shape[0] == 49
        niche = neighbours(slide, sites)
        for i, keys in enumerate(niche.keys):  # in-tissue lattice neighbours are mutual
            assert len(keys) == niche.n_neighbors[i]
            assert all(sites.keys[i] in niche.keys[sites.keys.index(k)] for k in keys)
        tiles, stats = site_tiles(slide, sites, settings=TileSettings(), rejected=rejected)
        assert stats["n_accepted"] == len(tiles) == 49
        table, n_bytes = columns(slide, sites, niche, tiles)
    finally:
        slide.image.close()
    assert table.schema == workdir.unit_sample_schema("float32") and table.num_rows == 49 and n_bytes > 0
    assert table.column("n_neighbors").to_pylist() == niche.n_neighbors.tolist()
    import stcorpus.curate.build.pack as pack

    assert not hasattr(pack, "unit_sample_schema")  # the work format lives in workdir.py only


_DIE_HOOK = """
import os
import time
from pathlib import Path

if os.environ.get("STCORPUS_TEST_DIE_ON"):  # set by test_a_worker_process_that_dies_...
    import stcorpus.curate.readers.hest as hest
    from stcorpus.curate.build.workdir import WorkDir

    _read = hest.read
    _commit = WorkDir.commit
    _after = os.environ.get("STCORPUS_TEST_DIE_AFTER")  # a slide that commits its unit, then dawdles
    _flag = Path(os.environ.get("STCORPUS_TEST_FLAG", "-"))

    def read(*, sample, files, images):
        if sample.id == os.environ["STCORPUS_TEST_DIE_ON"]:
            for _ in range(600):
                if not _after or _flag.exists():
                    break
                time.sleep(0.1)
            os._exit(9)  # the worker process dies, as the kernel's OOM killer makes it
        return _read(sample=sample, files=files, images=images)

    def commit(self, tmp, result):
        final = _commit(self, tmp, result)
        if result.slide_id == _after:
            _flag.touch()
            time.sleep(30)  # its result never reaches the build: the pool breaks (and kills it) first
        return final

    hest.read = read
    WorkDir.commit = commit
"""


@pytest.mark.parametrize("after", [None, "GOOD-1"], ids=["any", "one-committed-its-unit-first"])
def test_a_worker_process_that_dies_fails_its_slides_not_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: str | None
) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_DIE_HOOK)  # runs in every spawned worker process, not here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("STCORPUS_TEST_DIE_ON", "GOOD-2")
    monkeypatch.setenv("STCORPUS_TEST_FLAG", str(tmp_path / "committed"))
    if after is not None:
        monkeypatch.setenv("STCORPUS_TEST_DIE_AFTER", after)
    path = manifest(tmp_path / "m", good_slides(tmp_path / "data", 3))
    out = tmp_path / "out"
    summary = build([path], out=out, settings=BuildSettings(progress=False, workers=2))
    rows = slides(out)
    assert rows["GOOD-2"]["status"] == "failed" and rows["GOOD-2"]["reason"].startswith("worker_lost: ")
    assert summary.exit_code == EXIT_SLIDES_FAILED
    for row in rows.values():  # a slide in flight with it fails too; none is lost without a word
        assert row["status"] == "built" or row["reason_codes"] == ["worker_lost"]
    if after is not None:
        # killed with the pool after its commit, before its result was sent: its unit is its result
        assert (tmp_path / "committed").exists() and rows[after]["status"] == "built"
        assert summary.slides == {"built": 2, "failed": 1} and summary.samples == {"train": 84}
    built = summary.slides["built"]

    monkeypatch.delenv("STCORPUS_TEST_DIE_ON")
    again = build([path], out=out, settings=BuildSettings(progress=False, workers=2))
    assert again.slides == {"built": 3} and again.reused_units == built


def test_a_lost_slide_keeps_only_the_unit_committed_after_it_was_handed_out(tmp_path: Path) -> None:
    from stcorpus.curate.build.unit import UnitSettings, lost_unit
    from stcorpus.curate.fetch import FetchSettings
    from stcorpus.curate.manifest import load_manifest
    from stcorpus.curate.tiles import TileSettings

    path = manifest(tmp_path / "m", good_slides(tmp_path / "data", 1))
    settings = BuildSettings(progress=False, workers=1)
    build([path], out=tmp_path / "out", settings=settings)
    work, fetch = WorkDir(tmp_path / "out" / ".work"), FetchSettings(allow_local=True)
    (sample,) = load_manifest(path).samples
    stamp = work.stamp(sample.id)
    assert stamp is not None

    def lost(before: tuple[int, int] | None, unit: UnitSettings = settings.unit) -> UnitResult:
        return lost_unit(sample, work=work, settings=unit, fetch=fetch, before=before, detail="gone")

    assert lost(None).status == "built" and lost(None).n_samples == 42  # committed since it was handed out
    assert lost(stamp).failures == ["worker_lost"]  # an earlier run's unit, untouched: not this run's result
    other = dataclasses.replace(settings.unit, tiles=TileSettings(patch_size=112))
    assert lost(None, other).failures == ["worker_lost"]  # a unit of other settings is not this one's
    assert work.stamp("NO-SUCH-SLIDE") is None


# ---------------------------------------------------------------------------------------------
# The demo's pinned splits: `split:` is checked by the one validation (validate, plan and build)
# ---------------------------------------------------------------------------------------------


def test_pinned_split_of_a_benchmark_slide_needs_holdout_none() -> None:
    from stcorpus.curate.manifest import load_manifest
    from stcorpus.curate.plan import make_plan

    demo = load_manifest(DEMO)
    plan = make_plan([demo], holdout=resolve_holdout("none"), candidates=False)
    assert {i: plan.splits[i] for i in ("V1-Mouse-Brain-fullres-crop", "HER2ST-B4", "HER2ST-C2")} == {
        "V1-Mouse-Brain-fullres-crop": "test",
        "HER2ST-B4": "train",
        "HER2ST-C2": "validation",
    }
    # B4 under an id the shipped holdout list names (HER2ST section A1, STimage's copy)
    listed = "Human_Breast_Andersson_10142021_ST_A1"
    b4 = dataclasses.replace(demo.sample("HER2ST-B4"), id=listed)
    held = dataclasses.replace(demo, samples=(b4,))
    with pytest.raises(ManifestError, match=listed + r".*'train'.*holdout list.*--holdout none"):
        make_plan([held], candidates=False)
    assert make_plan([held], holdout=resolve_holdout("none"), candidates=False).splits == {listed: "train"}
    # a held-out slide pinned to test is fine; unpinned slides of its patient follow the pin
    sibling = dataclasses.replace(b4, id="HER2ST-B5", split=None)
    pinned_test = dataclasses.replace(demo, samples=(dataclasses.replace(b4, split="test"), sibling))
    assert make_plan([pinned_test], candidates=False).splits == {listed: "test", "HER2ST-B5": "test"}


def test_one_patient_pinned_to_two_splits_is_refused_by_validate_plan_and_build(tmp_path: Path) -> None:
    import yaml

    from stcorpus.curate.manifest import load_manifest
    from stcorpus.curate.validation import check_manifests

    demo = load_manifest(DEMO)
    b4 = demo.sample("HER2ST-B4")
    leak = dataclasses.replace(b4, id="HER2ST-B5", split="validation")
    problems = check_manifests([dataclasses.replace(demo, samples=(b4, leak))]).problems
    assert len(problems) == 1 and re.search(r"HER2ST-B5.*'validation'.*'HER2ST-B4'.*'train'.*alike", problems[0])

    # the same through the CLI, from a manifest file: validate exits 1, build refuses before starting
    raw = yaml.safe_load(DEMO.read_text())
    her2st = next(s for s in raw["studies"] if s["id"] == "her2st-legacy-st")
    her2st["samples"][1]["patient"] = "B"  # C2 now claims patient B, pinned to validation; B4 is in train
    for sample in her2st["samples"]:
        sample["sources"] = {k: str((DEMO.parent / v).resolve()) for k, v in sample["sources"].items()}
    raw["studies"] = [her2st]
    path = tmp_path / "leak.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 1
    assert main(["build", str(path), "--out", str(tmp_path / "out"), "--holdout", "none", "--no-progress"]) != 0
    assert not (tmp_path / "out" / schema.SLIDES_FILE).exists()


def test_split_key_takes_only_the_three_splits(tmp_path: Path) -> None:
    import yaml

    from stcorpus.curate.manifest import load_manifest

    raw = yaml.safe_load(DEMO.read_text())
    raw["studies"][0]["samples"][0]["split"] = "val"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ManifestError, match=r"split.*(train|validation|test)"):
        load_manifest(path)
