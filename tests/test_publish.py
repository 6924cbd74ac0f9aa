"""`curate publish`: validation refuses broken corpora, a local fsspec target streams with `datasets`,
re-publishing sends only what changed, the Hub dry run works offline without a socket, and the Hub
upload (real huggingface_hub client against a 127.0.0.1 write-API stand-in) commits in bounded,
resumable batches with the description files last."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from stcorpus import schema
from stcorpus.curate.build.card import card_for_repo
from stcorpus.curate.build.pipeline import BuildSettings, build
from stcorpus.curate.cli import main
from stcorpus.curate.errors import PublishError, TargetUnreachableError
from stcorpus.curate.publish import INDEX_FILE, CommitLimits, FsspecTarget, HubTarget, publish
from stcorpus.curate.publish.validate import check_corpus, scan_corpus, split_front_matter
from tests.build_fixtures import good_slides, manifest
from tests.hub_standin import GITATTRIBUTES, HubApiStandIn, serve_hub_api

TOKEN = "hf_TESTpublishTokenNeverPrinted987654321"
DESCRIPTION = [schema.GENES_FILE, schema.SLIDES_FILE, schema.SHARDS_FILE, schema.CORPUS_FILE, schema.CARD_FILE]


@pytest.fixture(scope="module")
def built_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real corpus: two real-data slides, built once for the module (tests work on copies)."""
    tmp = tmp_path_factory.mktemp("publish-build")
    path = manifest(tmp / "m", good_slides(tmp / "data", 2, integer=True))
    out = tmp / "corpus"
    build([path], out=out, settings=BuildSettings(progress=False, name="publish-test"))
    assert (out / ".work").is_dir()  # the work folder is there, and must never be published
    return out


@pytest.fixture
def corpus(built_corpus: Path, tmp_path: Path) -> Path:
    """A private copy of the built corpus (with its .work folder and a stray temporary file)."""
    copy = tmp_path / "corpus"
    shutil.copytree(built_corpus, copy)
    (copy / "wds" / "train" / ".train-000001.tar.partial").write_bytes(b"half a shard")
    return copy


def published(corpus: Path) -> list[str]:
    """The files a publish must send: everything but hidden and temporary paths."""
    return sorted(
        p.relative_to(corpus).as_posix()
        for p in corpus.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(corpus).parts)
    )


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file under ``folder``: a copied file gets a new inode."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["publish", *args, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------
# fsspec targets
# ---------------------------------------------------------------------------------------------


def test_local_target_streams_with_datasets_in_both_formats(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import datasets

    target = tmp_path / "target"
    code, out, _ = run(capsys, str(corpus), "--to", f"file://{target}", "--yes")
    assert code == 0, out
    assert sorted(p for p in tree(target) if p != INDEX_FILE) == published(corpus)
    assert not (target / ".work").exists() and not list(target.rglob("*.partial"))
    for path in published(corpus):
        assert (target / path).read_bytes() == (corpus / path).read_bytes()
    index = json.loads((target / INDEX_FILE).read_text())
    assert index["format"] == "stcorpus-publish/1" and sorted(index["files"]) == published(corpus)

    shards = pq.read_table(target / schema.SHARDS_FILE).to_pylist()
    n = sum(s["n_samples"] for s in shards if s["format"] == "parquet")
    parquet = datasets.load_dataset(str(target), streaming=True)
    wds = datasets.load_dataset(str(target), data_dir="wds", streaming=True)
    rows = [row for split in parquet for row in parquet[split]]
    tars = [row for split in wds for row in wds[split]]
    assert len(rows) == len(tars) == n > 0
    assert [r["__key__"] for r in rows] == [r["__key__"] for r in tars]
    assert rows[0]["patch"].size == (224, 224) and tars[0]["json"]["slide_id"] == rows[0]["slide_id"]


def test_dry_run_lists_every_file_with_its_status_and_sends_nothing(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "target"
    code, out, _ = run(capsys, str(corpus), "--to", str(target))
    assert code == 0 and not target.exists()
    listed = {line.split()[-1]: line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert listed == dict.fromkeys(published(corpus), "new")
    sizes = {
        line.split()[-1]: int(line.split()[1].replace(",", "")) for line in out.splitlines() if line.startswith("  ")
    }
    assert sizes == {p: (corpus / p).stat().st_size for p in published(corpus)}
    assert f"{len(published(corpus))} files" in out and "dry run: nothing was uploaded" in out
    assert ".work/" in out  # reported as never published


def test_republish_copies_only_the_changed_file(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "target"
    assert run(capsys, str(corpus), "--to", str(target), "--yes")[0] == 0
    before = tree(target)
    report = corpus / "qc" / "index.html"
    report.write_text(report.read_text() + "<!-- reviewed -->\n")

    code, out, _ = run(capsys, str(corpus), "--to", str(target))
    statuses = {line.split()[-1]: line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert statuses.pop("qc/index.html") == "changed" and set(statuses.values()) == {"unchanged"}

    code, out, _ = run(capsys, str(corpus), "--to", str(target), "--yes")
    assert code == 0 and "uploaded 1 file(s)" in out
    after = tree(target)
    changed = {p for p in after if after[p] != before.get(p)}
    assert changed == {"qc/index.html", INDEX_FILE}
    assert (target / "qc" / "index.html").read_bytes() == report.read_bytes()

    # Without the index, a local target is read back: still nothing to send.
    (target / INDEX_FILE).unlink()
    code, out, _ = run(capsys, str(corpus), "--to", str(target), "--yes")
    assert code == 0 and "is up to date" in out and tree(target).keys() - {INDEX_FILE} == after.keys() - {INDEX_FILE}


def test_interrupted_copy_resumes_with_the_rest(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = FsspecTarget(str(tmp_path / "target"))
    copied: list[str] = []
    real_copy = FsspecTarget._copy

    def flaky(self: FsspecTarget, root: Path, file: Any) -> None:
        if len(copied) == 5:
            raise OSError("No space left on device")
        real_copy(self, root, file)
        copied.append(file.path)

    monkeypatch.setattr(FsspecTarget, "_copy", flaky)
    with pytest.raises(PublishError, match="run the same command again"):
        publish(corpus, target, upload=True, limits=CommitLimits(max_files=2))
    index = json.loads((tmp_path / "target" / INDEX_FILE).read_text())["files"]
    assert sorted(index) == sorted(copied) and len(copied) == 5
    assert not (tmp_path / "target" / schema.CARD_FILE).exists()  # the description files go last
    monkeypatch.setattr(FsspecTarget, "_copy", real_copy)

    resumed = publish(corpus, FsspecTarget(str(tmp_path / "target")), upload=True)
    sent = {f.file.path for f in resumed.plan.uploads}
    assert sent == set(published(corpus)) - set(copied)


def test_files_gone_from_the_corpus_are_deleted_only_with_delete(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "target"
    assert run(capsys, str(corpus), "--to", str(target), "--yes")[0] == 0
    gone = next(p for p in published(corpus) if p.endswith("__spots.png"))
    (corpus / gone).unlink()
    (target / ".git").mkdir()  # hidden files at the target are not the corpus's: never listed or deleted
    (target / ".git" / "config").write_text("[core]\n")

    code, out, _ = run(capsys, str(corpus), "--to", str(target), "--yes")
    assert code == 0 and f"{gone}  (not in the corpus: keep)" in out and (target / gone).exists()
    code, out, _ = run(capsys, str(corpus), "--to", str(target), "--yes", "--delete")
    assert code == 0 and f"{gone}  (not in the corpus: delete)" in out and not (target / gone).exists()
    assert ".git" not in out and (target / ".git" / "config").exists()
    assert gone not in json.loads((target / INDEX_FILE).read_text())["files"]


def test_a_corrupted_shard_is_refused_and_nothing_is_uploaded(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shard = corpus / "wds" / "train" / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the middle of a sample: same size, another sha256
    shard.write_bytes(bytes(data))
    target = tmp_path / "target"
    code, out, err = run(capsys, str(corpus), "--to", str(target), "--yes")
    assert code == 1 and not target.exists()
    assert "shard wds/train/train-000000.tar: sha256" in err and "nothing was uploaded" in err
    assert "  new" not in out


def test_a_card_whose_counts_disagree_is_refused(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = corpus / schema.CARD_FILE
    front, body = split_front_matter(card.read_text())
    assert front is not None
    header = yaml.safe_load(front)
    header["dataset_info"]["splits"][0]["num_examples"] += 1
    card.write_text("---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n" + body)
    target = tmp_path / "target"
    code, _, err = run(capsys, str(corpus), "--to", str(target), "--yes")
    assert code == 1 and not target.exists()
    assert "dataset_info 'default' split train: num_examples" in err


def test_validation_lists_every_problem(corpus: Path) -> None:
    (corpus / schema.SLIDES_FILE).unlink()
    (corpus / "parquet" / "train" / "train-000007.parquet").write_bytes(b"PAR1 from another build")
    provenance = json.loads((corpus / schema.CORPUS_FILE).read_text())
    provenance["schema"] = "stcorpus/0"
    del provenance["sources"]
    (corpus / schema.CORPUS_FILE).write_text(json.dumps(provenance))
    card = (corpus / schema.CARD_FILE).read_text().replace("parquet/train/*.parquet", "parquet/training/*.parquet")
    (corpus / schema.CARD_FILE).write_text(card)
    work = corpus / "work" / "units" / "GOOD-0"  # a work folder under a visible name
    work.mkdir(parents=True)
    (work / "result.json").write_text("{}")
    problems = check_corpus(scan_corpus(corpus))
    expected = [
        "slides.parquet is missing",
        "parquet/train/train-000007.parquet is a shard file missing from shards.parquet",
        "corpus.json: schema 'stcorpus/0'",
        "corpus.json lacks the provenance keys sources",
        "data_files 'parquet/training/*.parquet' match no file",
        "work: a build work folder",
    ]
    for text in expected:
        assert any(text in problem for problem in problems), (text, problems)
    assert len(problems) == len(expected)


def test_a_clean_corpus_has_no_problem_and_skips_work_and_partial_files(corpus: Path) -> None:
    scan = scan_corpus(corpus)
    assert check_corpus(scan) == []
    assert sorted(scan.files) == published(corpus)
    assert ".work/" in scan.skipped and "wds/train/.train-000001.tar.partial" in scan.skipped
    card = scan.files[schema.CARD_FILE]
    data = (corpus / schema.CARD_FILE).read_bytes()
    assert card.sha256 == hashlib.sha256(data).hexdigest()
    assert card.git_oid == hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def test_publishing_a_corpus_into_itself_is_refused(corpus: Path) -> None:
    with pytest.raises(PublishError, match="inside it"):
        publish(corpus, FsspecTarget(str(corpus / "mirror")))


# ---------------------------------------------------------------------------------------------
# The Hub
# ---------------------------------------------------------------------------------------------


def test_hub_dry_run_offline_opens_no_socket(
    corpus: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        attempts.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    code, out, err = run(capsys, str(corpus), "--repo", "my-org/st-corpus", "--offline")
    assert code == 0, err
    assert attempts == []
    assert out.splitlines()[0] == f"publish {corpus} -> hf://datasets/my-org/st-corpus (dry run)"
    listed = {line.split()[-1]: line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert listed == dict.fromkeys(published(corpus), "unknown")
    assert "changed/unchanged status unknown: offline" in out

    # HF_HUB_OFFLINE (huggingface_hub's own switch) is honoured the same way.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, _ = run(capsys, str(corpus), "--repo", "my-org/st-corpus")
    assert code == 0 and attempts == [] and "status unknown: offline" in out
    code, _, err = run(capsys, str(corpus), "--repo", "my-org/st-corpus", "--yes")
    assert code == 2 and "cannot upload offline" in err and attempts == []


@pytest.fixture
def hub_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubApiStandIn]:
    """The write-API stand-in as HF_ENDPOINT, with the test's token (never a real one)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with serve_hub_api() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def test_hub_publish_commits_in_bounded_batches_with_the_description_last(
    corpus: Path, hub_api: HubApiStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = "my-org/st-corpus"
    code, out, err = run(capsys, str(corpus), "--repo", repo, "--yes", "--max-files-per-commit", "4")
    assert code == 0, err
    files = hub_api.files(repo)
    assert files.pop(".gitattributes") == GITATTRIBUTES
    assert sorted(files) == published(corpus)
    card = files.pop(schema.CARD_FILE)  # sent naming the repository in its examples
    assert (
        card.decode()
        == card_for_repo((corpus / schema.CARD_FILE).read_text(), repo)
        != (corpus / "README.md").read_text()
    )
    assert all(files[p] == (corpus / p).read_bytes() for p in files)
    commits = hub_api.commits(repo)
    data = [p for p in published(corpus) if p not in DESCRIPTION]
    assert [len(c["files"]) for c in commits[:-1]] == [4] * (len(data) // 4) + (
        [len(data) % 4] if len(data) % 4 else []
    )
    assert sorted(commits[-1]["files"]) == sorted(DESCRIPTION)  # one commit flips the card to the new shards
    assert commits[0]["files"][0].startswith(("parquet/", "wds/"))  # shards before anything else
    assert commits[-1]["summary"] == f"Publish corpus with stcorpus (part {len(commits)}/{len(commits)})"
    assert f"in {len(commits)} commit(s)" in out
    posts = [r for r in hub_api.requests if r.method == "POST" and "/commit/" in r.path]
    assert posts and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in posts)
    assert TOKEN not in out + err

    # Re-publish: nothing changed (LFS files compared by sha256, git files by blob id) -> no commit.
    code, out, _ = run(capsys, str(corpus), "--repo", repo, "--yes")
    assert code == 0 and "is up to date" in out and len(hub_api.commits(repo)) == len(commits)
    statuses = {line.split()[-1]: line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert set(statuses.values()) == {"unchanged"}

    # One changed file (kept in git on the Hub: compared by blob id) -> one commit with that file only.
    report = corpus / "qc" / "index.html"
    report.write_text(report.read_text() + "<!-- reviewed -->\n")
    code, out, _ = run(capsys, str(corpus), "--repo", repo, "--yes")
    assert code == 0 and "uploaded 1 file(s)" in out
    assert hub_api.commits(repo)[-1]["files"] == ["qc/index.html"] and len(hub_api.commits(repo)) == len(commits) + 1
    assert hub_api.files(repo)["qc/index.html"] == report.read_bytes()


def test_hub_publish_resumes_after_a_failed_commit_and_deletes_only_when_asked(
    corpus: Path, hub_api: HubApiStandIn
) -> None:
    repo = "my-org/resume"
    limits = CommitLimits(max_files=3)
    hub_api.fail_commits = {2}
    with pytest.raises(PublishError, match="run the same command again"):
        publish(corpus, HubTarget(repo), upload=True, limits=limits)
    (first,) = hub_api.commits(repo)
    assert len(first["files"]) == 3 and schema.CARD_FILE not in hub_api.files(repo)

    result = publish(corpus, HubTarget(repo), upload=True, limits=limits)
    sent = sorted(f.file.path for f in result.plan.uploads)
    assert sent == sorted(set(published(corpus)) - set(first["files"]))  # the first commit is not sent again
    assert sorted(p for p in hub_api.files(repo) if p != ".gitattributes") == published(corpus)

    gone = next(p for p in published(corpus) if p.endswith("__patches.png"))
    (corpus / gone).unlink()
    kept = publish(corpus, HubTarget(repo), upload=True)
    assert kept.plan.remote_only == [gone] and gone in hub_api.files(repo) and kept.commits == 0
    deleted = publish(corpus, HubTarget(repo), upload=True, delete=True)
    assert deleted.commits == 1 and hub_api.commits(repo)[-1]["deleted"] == [gone]
    assert gone not in hub_api.files(repo) and ".gitattributes" in hub_api.files(repo)


def test_hub_publish_to_a_new_branch_creates_it(corpus: Path, hub_api: HubApiStandIn) -> None:
    repo = "my-org/branched"
    result = publish(corpus, HubTarget(repo, revision="v2"), upload=True)
    assert result.commits == 2 and {f.status for f in result.plan.files} == {"new"}  # data, then description
    assert hub_api.files(repo, "main") == {".gitattributes": GITATTRIBUTES}
    assert sorted(p for p in hub_api.files(repo, "v2") if p != ".gitattributes") == published(corpus)
    assert {c["branch"] for c in hub_api.commits(repo)} == {"v2"}
    again = publish(corpus, HubTarget(repo, revision="v2"))
    assert {f.status for f in again.plan.files} == {"unchanged"}


def test_an_unreachable_hub_fails_fast_in_a_dry_run_and_an_upload(corpus: Path) -> None:
    import httpx2

    class Down:
        endpoint = "http://127.0.0.1:9"

        def list_repo_tree(self, *args: Any, **kwargs: Any) -> Any:
            raise httpx2.ConnectError("[Errno 111] Connection refused")

    target = HubTarget("my-org/st-corpus", api_factory=Down)
    for upload in (False, True):
        with pytest.raises(TargetUnreachableError, match=r"cannot be reached \(\[Errno 111\].*Add --offline"):
            publish(corpus, target, upload=upload)


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9", "http://stcorpus-no-such-host.invalid"])
def test_a_dry_run_without_the_hub_fails_at_once_with_one_message_naming_offline(
    corpus: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    endpoint: str,
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)  # nothing listens there / the name does not resolve
    code, out, err = run(capsys, str(corpus), "--repo", "my-org/st-corpus")
    assert code == 2 and out.splitlines() == [f"publish {corpus} -> hf://datasets/my-org/st-corpus (dry run)"]
    (message,) = err.splitlines()
    assert message.startswith(f"curate publish: error: the Hub at {endpoint} cannot be reached ([Errno ")
    assert "Add --offline for a dry run that does not contact the Hub" in message
    assert not [r for r in caplog.records if "Retry" in r.getMessage()], "huggingface_hub's retries never start"


def test_huggingface_hub_warnings_are_printed_once(corpus: Path) -> None:
    import subprocess
    import sys

    script = (
        "import logging\n"
        "from stcorpus.curate.cli import main\n"
        f"code = main(['publish', {str(corpus)!r}, '--repo', 'o/n', '--offline', '--no-progress'])\n"
        "import huggingface_hub.utils.logging  # as a real publish does: its logger gets its own handler\n"
        "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')\n"
        "raise SystemExit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("Retrying in 1s [Retry 1/5].") == 1, done.stderr


def test_publish_to_s3_then_the_loader_streams_it(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`curate publish --to s3://...` against an S3-compatible server on 127.0.0.1, read back by the loader."""
    import fsspec

    from stcorpus.loaders import CorpusDataset, CorpusLoader, LoaderSettings
    from tests.s3_standin import serve_s3

    with serve_s3():
        fsspec.filesystem("s3").mkdir("pub")
        code, out, err = run(capsys, str(corpus), "--to", "s3://pub/corpus", "--yes")
        assert code == 0, err
        assert "testing" not in out + err  # credentials come from the AWS configuration, never printed
        settings = LoaderSettings(split=("train",), batch_size=8, drop_last=False)
        remote = list(CorpusLoader(CorpusDataset("s3://pub/corpus", settings)))
        index = fsspec.filesystem("s3").cat_file("pub/corpus/.stcorpus-publish.json").decode()
        assert "testing" not in index
    local = list(CorpusLoader(CorpusDataset(corpus, settings)))
    assert [b["key"] for b in remote] == [b["key"] for b in local] and remote
    assert all(x["patch"].equal(y["patch"]) for x, y in zip(remote, local, strict=True))


def test_the_published_card_names_the_repository_and_its_examples_run_as_written(
    corpus: Path, hub_api: HubApiStandIn, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`curate publish --repo` sends a card whose usage examples name the repository and whose dataset_info
    carries the features; each of its code blocks then runs as written against the stand-in (HF_ENDPOINT)."""
    import os
    import re
    import subprocess
    import sys

    from datasets import Features

    repo = "my-org/st-corpus"
    local_card = (corpus / schema.CARD_FILE).read_text()
    assert 'load_dataset("<org>/<name>", streaming=True)' in local_card
    code, out, err = run(capsys, str(corpus), "--repo", repo, "--yes")
    assert code == 0, err
    assert f'ds = load_dataset("{repo}", streaming=True)' in out
    assert f'dataset = CorpusDataset("hf://datasets/{repo}", LoaderSettings(split=' in out
    card = hub_api.files(repo)[schema.CARD_FILE].decode()
    assert "<org>/<name>" not in card and f'load_dataset("{repo}", streaming=True)' in card
    assert f'CorpusDataset("hf://datasets/{repo}", settings)' in card
    assert (corpus / schema.CARD_FILE).read_text() == local_card, "the folder's own card is left as it is"
    header, _ = split_front_matter(card)
    assert header is not None
    features = Features._from_yaml_list(yaml.safe_load(header)["dataset_info"]["features"])
    shard = next(corpus.glob(f"{schema.PARQUET_DIR}/*/*.parquet"))
    assert features == Features.from_arrow_schema(pq.read_schema(shard))
    # A re-publish finds the card it sent unchanged.
    code, out, _ = run(capsys, str(corpus), "--repo", repo, "--yes")
    assert code == 0 and "is up to date" in out

    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 2
    env = {
        **os.environ,
        "HF_ENDPOINT": hub_api.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_HUB_OFFLINE", None)
    keys = {row["slide_id"] for row in pq.read_table(corpus / schema.SLIDES_FILE).to_pylist()}
    for block in blocks:
        done = subprocess.run(
            [sys.executable, "-c", block],
            check=False,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{block}\n{done.stderr[-3000:]}"
        printed = done.stdout.strip().splitlines()[-1]
        assert any(f"{slide}__" in printed for slide in keys), printed
    assert any(r.path.startswith(f"/datasets/{repo}/resolve/") for r in hub_api.requests)
