"""`curate plan`: totals and duplicate candidates from manifests alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from stcorpus.curate.build.splits import Holdout, HoldoutList
from stcorpus.curate.cli import main
from stcorpus.curate.manifest import Manifest, Sample, parse_manifest
from stcorpus.curate.plan import Selection, duplicate_candidates, make_plan

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = [ROOT / "manifests" / name for name in ("hest1k.yaml", "stimage1k4m.yaml", "10x-visium.yaml")]

TEXT = """
manifest: stcorpus-manifest/1
name: t
defaults: {technology: hest, assay: visium, species: human, licence: CC-BY-4.0, organ: breast}
studies:
  - id: hest-a
    defaults: {source: hest, citation: "PMID:1"}
    samples:
      - {id: H1, spots: 2279, image_size: [75250, 48740], sources: {st: "https://x/1", wsi: "https://x/1t"}}
      - {id: H2, spots: 2281, image_size: [75250, 48740], sources: {st: "https://x/2", wsi: "https://x/2t"}}
      - {id: H3, spots: 700, sources: {st: "https://x/3", wsi: "https://x/3t"}}
      - {id: H4, spots: 800, sources: {st: "https://x/4", wsi: "https://x/4t"}}
      - {id: H5, spots: 4992, sources: {st: "https://x/5", wsi: "https://x/5t"}}
  - id: stimage-a
    defaults: {source: stimage, technology: stimage, licence: LicenseRef-unknown}
    samples:
      - {id: S3, spots: 700, sources: {counts: "https://y/3", coords: "https://y/3c", image: "https://y/3i"}}
      - {id: S4, spots: 800, sources: {counts: "https://y/4", coords: "https://y/4c", image: "https://y/4i"}}
      - {id: S5, spots: 4992, sources: {counts: "https://y/5", coords: "https://y/5c", image: "https://y/5i"}}
      - id: S6
        spots: 2281
        species: mouse
        citation: "PMID:1"
        sources: {counts: "https://y/6", coords: "https://y/6c", image: "https://y/6i"}
"""


def manifest() -> Manifest:
    return parse_manifest(TEXT, path=Path("t.yaml"))


def samples() -> tuple[Sample, ...]:
    return manifest().samples


def test_duplicate_rules() -> None:
    found = {(c.first, c.second): c.rule for c in duplicate_candidates(samples())}
    assert found[("H1", "H2")] == "image+spots"  # TENX128/TENX155-like pair
    assert found[("H3", "S3")] == found[("H4", "S4")] == "study-pair"  # one-to-one, twice between two studies
    assert ("H5", "S5") not in found  # a full 4,992-spot array says nothing
    assert not any("S6" in pair for pair in found)  # same citation and count, but another species


def test_plan_licences_and_holdouts() -> None:
    holdout = HoldoutList(name="t", slides={"H3": Holdout("H3", "HEST-Benchmark")})
    plan = make_plan([manifest()], selection=Selection(licences=frozenset({"CC-BY-4.0"})), holdout=holdout)
    assert set(plan.excluded) == {"S3", "S4", "S5", "S6"} and set(plan.held_out) == {"H3"}
    text = "\n".join(plan.lines())
    assert "slides: 9 in the manifests, 5 to build, 4 excluded" in text and "licence 4" in text


def test_plan_on_the_real_manifests(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *map(str, MANIFESTS)]) == 0
    out = capsys.readouterr().out
    assert "slides: 2,406 in the manifests, 2,406 to build, 0 excluded" in out
    assert "expected spots under tissue: 6,412,089 (known for 2,374 of 2,406 slides)" in out
    assert "by assay: visium 1,624" in out and "distribution licences: CC-BY-NC-SA-4.0 1,229" in out
    assert "held out of train (built into test): 226 slides" in out
    assert main(["plan", str(MANIFESTS[0]), "--candidates", "-1"]) == 0
    listed = capsys.readouterr().out
    for pair in ("TENX128 ~ TENX155", "MEND41 ~ NCBI535", "MEND45 ~ NCBI536", "MEND47 ~ NCBI534", "MEND51 ~ NCBI537"):
        assert pair in listed  # the byte-identical HEST pairs the issue names
