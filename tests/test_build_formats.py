"""`curate build --formats`: a corpus of one shard format (issue 17, disk budget).

Real builds of the demo manifest (the real data bundled in tests/data): a Parquet-only and a
WebDataset-only corpus hold exactly the shards of that format a default build writes, say so in
shards.parquet, corpus.json and the card, read through the loader, `datasets` and publish
validation; an append or a rerun in other formats is refused; a corpus.json written before the
key reads as both formats.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from stcorpus import schema
from stcorpus.curate.build.pack import PackSettings
from stcorpus.curate.build.pipeline import BuildSettings, build
from stcorpus.curate.cli import main
from stcorpus.curate.errors import BuildError, SettingsError
from stcorpus.curate.publish.validate import check_corpus, scan_corpus, split_front_matter
from stcorpus.loaders import CorpusDataset, LoaderSettings
from stcorpus.loaders.errors import LoaderSettingsError
from tests.conftest import DEMO_BUILD, ROOT, DemoCorpus
from tests.test_build_append import shard_sha256

DEMO = ROOT / "manifests" / "demo.yaml"
#: What `make demo` builds with (conftest.DEMO_BUILD), as settings.
DEMO_SETTINGS = BuildSettings(progress=False, holdout="none")
FROZEN_2 = ROOT / "tests" / "data" / "corpus-stcorpus-2"


def demo_argv(out: Path, *extra: str) -> list[str]:
    argv = [str(ROOT / a) if a.endswith(".yaml") else a.format(out=out) for a in DEMO_BUILD]
    return [*argv, "--no-progress", *extra]


def card_header(root: Path) -> dict:
    front, _ = split_front_matter((root / schema.CARD_FILE).read_text())
    assert front is not None
    header: dict = yaml.safe_load(front)
    return header


@pytest.fixture(scope="module")
def parquet_only(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The demo built with `--formats parquet` through the CLI, and what it printed."""
    out = tmp_path_factory.mktemp("formats") / "parquet-only"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(demo_argv(out, "--formats", "parquet")) == 0, printed.getvalue()
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def wds_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("formats") / "wds-only"
    build([DEMO], out=out, settings=replace(DEMO_SETTINGS, pack=PackSettings(formats=("wds",))))
    return out


def test_parquet_only_build_holds_the_default_builds_parquet_shards_and_says_so(
    parquet_only: tuple[Path, str], demo_corpus: DemoCorpus
) -> None:
    out, printed = parquet_only
    assert not (out / schema.WDS_DIR).exists()
    default = shard_sha256(demo_corpus.root)
    assert shard_sha256(out) == {k: v for k, v in default.items() if k.startswith(f"{schema.PARQUET_DIR}/")}
    rows = pq.read_table(out / schema.SHARDS_FILE).to_pylist()
    assert rows and {r["format"] for r in rows} == {"parquet"}
    corpus = json.loads((out / schema.CORPUS_FILE).read_text())
    assert corpus[schema.CorpusKey.FORMATS.value] == ["parquet"] and schema.corpus_formats(corpus) == ("parquet",)
    assert corpus["settings"]["pack"]["formats"] == ["parquet"]
    assert corpus["splits"] == json.loads((demo_corpus.root / schema.CORPUS_FILE).read_text())["splits"]
    assert "(parquet only)" in printed and "shard bytes" in printed

    header = card_header(out)
    paths = [f["path"] for c in header["configs"] for f in c["data_files"]]
    assert paths and all(p.startswith(f"{schema.PARQUET_DIR}/") and p.endswith(".parquet") for p in paths)
    card = (out / schema.CARD_FILE).read_text()
    assert 'data_dir="wds"' not in card and "Parquet shards only" in card
    assert check_corpus(scan_corpus(out)) == []


def test_parquet_only_corpus_reads_through_the_loader_and_datasets(parquet_only: tuple[Path, str]) -> None:
    import datasets

    out, _ = parquet_only
    splits = json.loads((out / schema.CORPUS_FILE).read_text())["splits"]
    loader = CorpusDataset(out, LoaderSettings(split=("train",), batch_size=64, drop_last=False))
    assert sum(len(batch["key"]) for batch in loader) == splits["train"]
    rows = datasets.load_dataset(str(out), streaming=True)
    assert {split: sum(1 for _ in rows[split]) for split in rows} == splits

    with pytest.raises(LoaderSettingsError, match=r"holds only parquet shards.*LoaderSettings\(format='parquet'\)"):
        CorpusDataset(out, LoaderSettings(split=("train",), format="wds"))


def test_wds_only_build(wds_only: Path, demo_corpus: DemoCorpus) -> None:
    import datasets

    out = wds_only
    assert not (out / schema.PARQUET_DIR).exists()
    default = shard_sha256(demo_corpus.root)
    assert shard_sha256(out) == {k: v for k, v in default.items() if k.startswith(f"{schema.WDS_DIR}/")}
    assert {r["format"] for r in pq.read_table(out / schema.SHARDS_FILE).to_pylist()} == {"wds"}
    corpus = json.loads((out / schema.CORPUS_FILE).read_text())
    assert corpus[schema.CorpusKey.FORMATS.value] == ["wds"]
    header = card_header(out)
    paths = [f["path"] for c in header["configs"] for f in c["data_files"]]
    assert paths and all(p.startswith(f"{schema.WDS_DIR}/") and p.endswith(".tar") for p in paths)
    assert "features" not in header["dataset_info"]  # the Parquet rows' features are not the tars'
    assert check_corpus(scan_corpus(out)) == []

    rows = datasets.load_dataset(str(out), streaming=True)
    keys = {split: [r["__key__"] for r in rows[split]] for split in rows}
    parquet = datasets.load_dataset(str(demo_corpus.root), streaming=True)
    assert keys == {split: [r["__key__"] for r in parquet[split]] for split in parquet}
    loader = CorpusDataset(out, LoaderSettings(split=("train",), format="wds", batch_size=64, drop_last=False))
    assert sum(len(batch["key"]) for batch in loader) == corpus["splits"]["train"]
    with pytest.raises(LoaderSettingsError, match=r"holds only wds shards.*LoaderSettings\(format='wds'\)"):
        CorpusDataset(out, LoaderSettings(split=("train",)))


def test_default_build_records_both_formats(demo_corpus: DemoCorpus) -> None:
    corpus = json.loads((demo_corpus.root / schema.CORPUS_FILE).read_text())
    assert corpus[schema.CorpusKey.FORMATS.value] == list(schema.FORMATS)
    rows = pq.read_table(demo_corpus.root / schema.SHARDS_FILE).to_pylist()
    assert {r["format"] for r in rows} == set(schema.FORMATS)
    assert 'data_dir="wds"' in (demo_corpus.root / schema.CARD_FILE).read_text()


def test_append_or_rerun_in_other_formats_is_refused(parquet_only: tuple[Path, str], tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    shutil.copytree(parquet_only[0], out)
    before = shard_sha256(out)
    with pytest.raises(BuildError, match=rf"--append: the corpus in {out} holds parquet shards .*--formats parquet"):
        build([DEMO], out=out, settings=replace(DEMO_SETTINGS, append=True))
    with pytest.raises(BuildError, match=rf"--out {out}: the corpus in {out} holds parquet shards .*--formats parquet"):
        build([DEMO], out=out, settings=DEMO_SETTINGS)
    assert shard_sha256(out) == before

    # the same formats resume (and append nothing new) without a complaint
    build([DEMO], out=out, settings=replace(DEMO_SETTINGS, pack=PackSettings(formats=("parquet",))))
    assert shard_sha256(out) == before


def test_overwrite_rebuilds_every_shard_in_the_formats_asked_for(
    parquet_only: tuple[Path, str], demo_corpus: DemoCorpus, tmp_path: Path
) -> None:
    out = tmp_path / "corpus"
    shutil.copytree(parquet_only[0], out)
    build([DEMO], out=out, settings=replace(DEMO_SETTINGS, overwrite=True))
    assert shard_sha256(out) == shard_sha256(demo_corpus.root)
    assert json.loads((out / schema.CORPUS_FILE).read_text())["formats"] == list(schema.FORMATS)


def test_bad_formats_are_refused_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "corpus"
    assert main(demo_argv(out, "--formats", "parquet,tar")) == 2
    err = capsys.readouterr().err
    assert "--formats must name one or more of parquet, wds" in err and "'parquet,tar'" in err
    assert not out.exists()
    with pytest.raises(SettingsError, match="--formats"):
        PackSettings(formats=())
    assert PackSettings(formats=("wds", "parquet")).formats == schema.FORMATS


def test_a_corpus_json_without_formats_holds_both(tmp_path: Path) -> None:
    from stcorpus.curate.build.append import Existing, check_formats, check_settings
    from stcorpus.loaders.corpus import Corpus
    from stcorpus.loaders.source import open_source

    frozen = json.loads((FROZEN_2 / schema.CORPUS_FILE).read_text())
    assert schema.CorpusKey.FORMATS.value not in frozen  # written before the key
    assert schema.corpus_formats(frozen) == schema.FORMATS
    assert Corpus(open_source(FROZEN_2)).formats == schema.FORMATS
    assert check_corpus(scan_corpus(FROZEN_2)) == []
    with pytest.raises(ValueError, match="formats must be a non-empty list"):
        schema.corpus_formats({"formats": ["tar"]})

    # an append to such a corpus: its recorded settings lack pack.formats, and it holds both
    check_formats(tmp_path, {}, schema.FORMATS, growing=True)
    with pytest.raises(BuildError, match="holds parquet and wds shards"):
        check_formats(tmp_path, {}, ("parquet",), growing=True)
    settings = DEMO_SETTINGS.to_dict()
    recorded = json.loads(json.dumps(settings))
    del recorded["pack"]["formats"]
    existing = Existing(out=tmp_path, info={"settings": recorded}, generations=[], shards=[], rows={}, vocabulary=None)
    check_settings(existing, settings)
    with pytest.raises(BuildError, match=r"--append: the corpus .* holds parquet and wds shards"):
        check_settings(existing, replace(DEMO_SETTINGS, pack=PackSettings(formats=("wds",))).to_dict())
