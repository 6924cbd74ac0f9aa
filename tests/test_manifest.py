"""The manifest model: inheritance, and errors that name the file, the entry and the field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from stcorpus.curate.cli import main
from stcorpus.curate.errors import ManifestError
from stcorpus.curate.manifest import TECHNOLOGIES, load_manifest, load_manifests

GOOD = """
manifest: stcorpus-manifest/1
name: t
allow_local: true
defaults: {source: 10x, technology: spaceranger, licence: CC-BY-4.0, reader: {matrix: filtered}}
studies:
  - id: study-a
    defaults: {species: human, organ: heart, citation: "doi:10.1/x"}
    samples:
      - id: A1
        sources: {matrix: a.h5, spatial: sp, positions: {url: "https://example.org/p.csv", sha256: %s, size: 10}}
      - id: A2
        organ: lung
        licence: CC-BY-NC-4.0
        sources: {outs: outs.tar.gz}
  - id: study-b
    defaults: {species: mouse, technology: hest, assay: xenium}
    samples:
      - id: B1
        patient: P1
        sources: {st: "hf://datasets/MahmoodLab/hest/st/B1.h5ad", wsi: "hf://datasets/MahmoodLab/hest/wsis/B1.tif"}
""" % ("ab" * 32)


def test_defaults_inherit_and_samples_win(write_manifest) -> None:
    manifest = load_manifest(write_manifest(GOOD))
    a1, a2, b1 = manifest.samples
    assert (a1.study_id, a1.species, a1.organ, a1.licence, a1.assay) == (
        "study-a",
        "human",
        "heart",
        "CC-BY-4.0",
        "visium",
    )
    assert (a2.organ, a2.licence) == ("lung", "CC-BY-NC-4.0")
    assert (b1.technology, b1.assay, b1.species, b1.patient, b1.citation) == (
        "hest",
        "xenium",
        "mouse",
        "P1",
        None,
    )
    assert a1.sources["positions"].sha256 == "ab" * 32 and a1.sources["positions"].size == 10
    assert a1.sources["matrix"].url == "a.h5" and a1.sources["matrix"].is_local
    assert a1.reader == {"matrix": "filtered"} and a1.counts == "raw" and a1.source_id == "A1"
    assert len(manifest.sha256) == 64


def error_of(write_manifest, text: str) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(write_manifest(textwrap.dedent(text)))
    return str(info.value)


def test_unknown_key_names_file_entry_and_field(write_manifest) -> None:
    message = error_of(write_manifest, GOOD.replace("patient: P1", "patiant: P1"))
    assert "manifest.yaml" in message
    assert "unknown key(s) in studies[1] (id 'study-b').samples[0] (id 'B1'): patiant" in message
    assert "(did you mean 'patient'?); known: source, source_id," in message


def test_missing_id(write_manifest) -> None:
    message = error_of(write_manifest, GOOD.replace("- id: A2", "- organ_: x\n        ").replace("organ_: x", ""))
    assert "studies[0] (id 'study-a').samples[1].id is missing (it is required)" in message


def test_missing_required_inherited_field(write_manifest) -> None:
    message = error_of(write_manifest, GOOD.replace("species: mouse, ", ""))
    assert "(id 'B1')" in message and "missing required field 'species'" in message


def test_duplicate_sample_id(write_manifest) -> None:
    message = error_of(write_manifest, GOOD.replace("- id: B1", "- id: A1"))
    assert "duplicate sample id 'A1'" in message and "studies[0].samples[0]" in message


def test_duplicate_id_across_manifests(write_manifest) -> None:
    first = write_manifest(GOOD, "one.yaml")
    second = write_manifest(GOOD, "two.yaml")
    with pytest.raises(ManifestError, match=r"two.yaml: sample id 'A1' is also used in .*one.yaml"):
        load_manifests([first, second])


def test_unknown_technology_lists_valid_ones(write_manifest) -> None:
    message = error_of(write_manifest, GOOD.replace("technology: hest", "technology: visium9"))
    assert "studies[1] (id 'study-b').defaults.technology must be one of 'spaceranger'" in message
    assert message.endswith(", not 'visium9'")
    assert all(t in message for t in TECHNOLOGIES)


def test_ftp_url_refused(write_manifest) -> None:
    message = error_of(write_manifest, GOOD.replace("https://example.org/p.csv", "ftp://example.org/p.csv"))
    assert "samples[0] (id 'A1').sources.positions.url: unsupported URL scheme" in message
    assert "unsupported URL scheme ftp://" in message and "https://" in message


def test_local_paths_need_allow_local(write_manifest) -> None:
    message = error_of(write_manifest, GOOD.replace("allow_local: true", "allow_local: false"))
    assert "(id 'A1')" in message and "allow_local: true" in message


def test_bad_licence_and_sha(write_manifest) -> None:
    assert "LicenseRef-" in error_of(write_manifest, GOOD.replace("CC-BY-NC-4.0", "CC BY NC"))
    assert "64 hexadecimal" in error_of(write_manifest, GOOD.replace("ab" * 32, "abc"))


def test_duplicate_yaml_key_refused(write_manifest) -> None:
    message = error_of(write_manifest, GOOD.replace("patient: P1", "patient: P1\n        patient: P2"))
    assert "duplicate key 'patient'" in message


def test_not_a_manifest(write_manifest) -> None:
    assert "stcorpus-manifest/1" in error_of(write_manifest, "name: x\nstudies: []\n")
    assert "not valid YAML" in error_of(write_manifest, "manifest: [\n")


def _local_sources(folder: Path) -> None:
    """The local files GOOD names (validate checks that local sources exist)."""
    (folder / "a.h5").touch()
    (folder / "sp").mkdir(exist_ok=True)
    (folder / "outs.tar.gz").touch()


def test_validate_command(write_manifest, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _local_sources(tmp_path)
    good = write_manifest(GOOD.replace("reader: {matrix: filtered}", "reader: {}"), "good.yaml")
    bad = write_manifest(GOOD.replace("technology: hest", "technology: visium9"), "bad.yaml")
    assert main(["validate", str(bad)]) == 1
    assert "visium9" in capsys.readouterr().err
    code = main(["validate", str(good)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "ok: 3 samples in 2 studies" in out


def test_allow_local_override(write_manifest) -> None:
    path = write_manifest(GOOD.replace("allow_local: true", "allow_local: false"))
    manifest = load_manifest(path, allow_local=True)
    assert manifest.allow_local and all(s.allow_local for s in manifest.samples)


def test_validate_checks_holdout_ids(write_manifest, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _local_sources(tmp_path)
    good = write_manifest(GOOD.replace("reader: {matrix: filtered}", "reader: {}"), "good.yaml")
    holdout = write_manifest("holdout: stcorpus-holdout/1\nslides:\n  - {id: A1, reason: benchmark}\n", "holdout.yaml")
    assert main(["validate", str(good), str(holdout)]) == 0
    assert "holdout list of 1 slides (every id is in the manifests given)" in capsys.readouterr().out
    holdout.write_text("holdout: stcorpus-holdout/1\nslides:\n  - {id: ZZ9, reason: benchmark}\n")
    assert main(["validate", str(good), str(holdout)]) == 1
    assert "ZZ9" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # pydantic's lax mode read these as false, true, true: a manifest says true or false
        (("allow_local: true", "allow_local: 'no'"), "manifest.yaml: allow_local must be true or false, not 'no'"),
        (("allow_local: true", "allow_local: 1"), "manifest.yaml: allow_local must be true or false, not 1"),
        (
            ("size: 10}", "size: 10, unpack: 'yes'}"),
            "studies[0] (id 'study-a').samples[0] (id 'A1').sources.positions.unpack must be true or false, not 'yes'",
        ),
        (("size: 10}", "size: '10'}"), "sources.positions.size must be an integer, not '10'"),
        (("organ: lung", "organ: 3"), "samples[1] (id 'A2').organ must be a string, not 3"),
        (
            ("reader: {matrix: filtered}", "reader: {matrix: [a]}"),
            "defaults.reader.matrix must be a string, an integer, a number or true or false, not ['a']",
        ),
    ],
)
def test_values_are_strict(write_manifest, change: tuple[str, str], expected: str) -> None:
    assert GOOD.count(change[0]) == 1
    assert expected in error_of(write_manifest, GOOD.replace(*change))


def test_numbers_in_yaml_12_form_are_numbers(write_manifest) -> None:
    """``1e-4`` is a number (PyYAML alone reads it as a string, which strict fields would refuse)."""
    manifest = load_manifest(write_manifest(GOOD.replace("patient: P1", "patient: P1\n        mpp: 5e-1")))
    assert manifest.sample("B1").mpp == 0.5
