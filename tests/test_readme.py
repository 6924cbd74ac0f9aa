"""Every code block of README.md runs as written against the demo corpus (README "The README is a test").

Blocks run in README order in one work folder holding a copy of the session's demo corpus
(``demo-corpus``), ``manifests/demo.yaml`` and a link to ``tests/`` (the manifest's data), with
the virtual environment's ``bin`` first on ``PATH``. A block's kind is its fence's language, or the
HTML comment on the line before the fence, ``<!-- readme-test: KIND -->``:

- ``bash`` / ``sh``: one ``bash -euo pipefail`` script; ``python``: one ``python`` process;
- ``output``: illustrative output, never run; each of its lines (a trailing ``...`` ends it early)
  appears, in order, in the stdout of the block before it;
- ``layout``: a corpus folder listing; every path in its first column exists in the demo corpus;
- ``make``: ``make -n`` accepts each target; ``make demo`` is the session's build (its recipe must
  be ``tests.conftest.DEMO_BUILD``), ``make test`` is what CI runs;
- ``background``: a server, started and left running until the test ends;
- ``file NAME``: a file (a YAML config) the blocks after it use, written to the work folder as NAME;
- ``needs gpu|hub|cluster ...``: checked, not run (CI has no GPU, Hub access or cluster):
  pretraining commands resolve their config (``--print-config``), other stcorpus commands parse
  with their own parser, ``cp`` sources exist, and anything else is one of ``EXTERNAL``.

Placeholders are the only substitutions (``SUBSTITUTIONS``): ``<org>/<corpus>`` names a repository
of a Hub stand-in on 127.0.0.1 that serves the demo corpus, port ``8000`` a free port.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DEMO_BUILD, DemoCorpus
from tests.httpserver import HubRepo, LocalServer, serve

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: What a block's kind may be: a fence language, or a marker word.
RUN_KINDS = ("bash", "sh", "python")
MARKER_KINDS = ("output", "layout", "make", "background", "file", "needs")
NEEDS = ("gpu", "hub", "cluster")
#: Programs of checked (``needs ...``) blocks that are not ours: their arguments are their own.
EXTERNAL = ("pip", "huggingface-cli")
#: The Hub stand-in's repository standing for ``<org>/<corpus>``.
HUB_REPO = "demo/corpus"
_FENCE = re.compile(r"^```(\S*)\s*$")
_MARKER = re.compile(r"^<!-- readme-test: (?P<kind>[a-z]+)(?P<args>(?: [\w.-]+)*) -->$")
_PORT = re.compile(r"(?<!\d)8000(?!\d)")


class ReadmeError(AssertionError):
    """A README block that cannot be classified, or that does not do what it shows."""


@dataclass(frozen=True)
class Block:
    """A fenced code block: where it starts (1-based line of the fence), its kind and its text."""

    line: int
    kind: str
    args: tuple[str, ...]
    text: str

    def where(self) -> str:
        return f"README.md:{self.line} ({self.kind}{' ' + ' '.join(self.args) if self.args else ''})"


def extract(markdown: str) -> list[Block]:
    """Every fenced block of ``markdown``, with its kind; an unknown kind is a ReadmeError."""
    lines = markdown.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            if lines[i].startswith("<!-- readme-test") and not _MARKER.match(lines[i]):
                raise ReadmeError(f"README.md:{i + 1}: malformed marker {lines[i]!r}")
            i += 1
            continue
        start = i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        if end is None:
            raise ReadmeError(f"README.md:{start + 1}: a code block is never closed")
        marker = _MARKER.match(lines[start - 1]) if start > 0 else None
        if marker is not None:
            kind, args = marker["kind"], tuple(marker["args"].split())
            if kind not in MARKER_KINDS:
                raise ReadmeError(f"README.md:{start}: unknown block kind {kind!r} (known: {MARKER_KINDS})")
            if kind == "needs" and (not args or set(args) - set(NEEDS)):
                raise ReadmeError(f"README.md:{start}: 'needs' takes some of {NEEDS}, not {args}")
            if kind == "file" and (len(args) != 1 or args[0].startswith(".")):
                raise ReadmeError(f"README.md:{start}: 'file' takes one file name, not {args}")
        else:
            kind, args = fence[1], ()
            if kind not in RUN_KINDS:
                raise ReadmeError(
                    f"README.md:{start + 1}: a block of kind {kind or '(none)'!r}; run kinds are {RUN_KINDS}, "
                    f"other blocks need a marker <!-- readme-test: KIND --> with KIND one of {MARKER_KINDS}"
                )
        blocks.append(Block(line=start + 1, kind=kind, args=args, text="\n".join(lines[start + 1 : end]) + "\n"))
        i = end + 1
    return blocks


def commands(text: str) -> list[list[str]]:
    """The command lines of a shell block as argv lists (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def check_output(shown: str, printed: str, *, where: str) -> None:
    """Each line of ``shown`` is a line of ``printed``, in order; ``...`` at its end matches any rest."""
    real = printed.splitlines()
    at = 0
    for line in shown.splitlines():
        prefix = line.removesuffix("...").rstrip() if line.endswith("...") else None
        for j in range(at, len(real)):
            if real[j].startswith(prefix) if prefix is not None else real[j] == line:
                at = j + 1
                break
        else:
            raise ReadmeError(f"{where}: the real output has no line {line!r} (after line {at}):\n{printed}")


def check_layout(shown: str, corpus: Path, *, where: str) -> None:
    """Every path in the first column of ``shown`` exists in ``corpus`` (``<split>``, ``NNNNNN`` stand for any)."""
    for line in shown.splitlines():
        name = line.split()[0]
        pattern = name.replace("<split>", "*").replace("NNNNNN", "[0-9]" * 6)
        if not list(corpus.glob(pattern)):
            raise ReadmeError(f"{where}: the demo corpus has no {name}")


def substitute(text: str, *, port: int) -> str:
    """The placeholders (and nothing else) replaced by what the test serves."""
    return _PORT.sub(str(port), text.replace("<org>/<corpus>", HUB_REPO))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Runner:
    """Runs blocks in the work folder; keeps the last stdout and the background processes."""

    def __init__(self, work: Path, env: dict[str, str], demo: DemoCorpus) -> None:
        self.work, self.env, self.demo = work, env, demo
        self.last_output: str | None = None
        self.background: list[subprocess.Popen[bytes]] = []

    def run(self, block: Block, text: str) -> None:
        handler = getattr(self, f"_{block.kind}")
        handler(block, text)

    def _process(self, block: Block, argv: list[str]) -> None:
        done = subprocess.run(
            argv, check=False, cwd=self.work, env=self.env, capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise ReadmeError(f"{block.where()} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        self.last_output = done.stdout

    def _bash(self, block: Block, text: str) -> None:
        self._process(block, ["bash", "-euo", "pipefail", "-c", text])

    _sh = _bash

    def _python(self, block: Block, text: str) -> None:
        script = self.work / f"readme-{block.line}.py"
        script.write_text(text)
        self._process(block, [sys.executable, script.name])

    def _output(self, block: Block, text: str) -> None:
        if self.last_output is None:
            raise ReadmeError(f"{block.where()}: no block before it printed anything to compare with")
        check_output(text, self.last_output, where=block.where())

    def _layout(self, block: Block, text: str) -> None:
        check_layout(text, self.work / "demo-corpus", where=block.where())

    def _make(self, block: Block, text: str) -> None:
        for argv in commands(text):
            if argv[0] != "make" or len(argv) != 2:
                raise ReadmeError(f"{block.where()}: {shlex.join(argv)} is not `make TARGET`")
            out = str(self.work / "demo-out")  # `make -n`: named, never written
            # Under CI this test itself runs inside `make test`: the parent's MAKEFLAGS/MAKELEVEL would
            # make the child print "make[1]: Entering directory" lines around the recipe.
            env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
            dry = subprocess.run(
                ["make", "--no-print-directory", "-n", argv[1], f"DEMO_OUT={out}"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if dry.returncode != 0:
                raise ReadmeError(f"{block.where()}: make -n {argv[1]} failed:\n{dry.stderr}")
            if argv[1] == "demo":
                recipe = shlex.split(dry.stdout.splitlines()[-1])
                assert Path(recipe[0]).name == "curate", recipe
                assert recipe[1:] == [a.format(out=out) for a in DEMO_BUILD], (recipe, DEMO_BUILD)
                self.last_output = self.demo.summary

    def _background(self, block: Block, text: str) -> None:
        log = self.work / f"readme-{block.line}.log"
        with log.open("wb") as stderr:  # a file, not a pipe nobody reads: a server logs every request
            process = subprocess.Popen(
                ["bash", "-euo", "pipefail", "-c", text],
                cwd=self.work,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        self.background.append(process)
        port = int(m[1]) if (m := re.search(r"(?<!\d)(\d{4,5})(?!\d)", text)) else None
        deadline = time.monotonic() + 30
        while port is not None and time.monotonic() < deadline:
            if process.poll() is not None:
                raise ReadmeError(f"{block.where()} exited {process.returncode}: {log.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            time.sleep(0.1)
        if port is not None:
            raise ReadmeError(f"{block.where()}: nothing listens on port {port} after 30 s: {log.read_text()}")

    def _file(self, block: Block, text: str) -> None:
        (self.work / block.args[0]).write_text(text)

    def _needs(self, block: Block, text: str) -> None:
        for argv in commands(text):
            check_command(argv, where=f"{block.where()}: {shlex.join(argv)}")

    def stop(self) -> None:
        for process in self.background:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=10)


def check_command(argv: list[str], *, where: str) -> None:
    """What a command CI cannot run is checked for: see the module docstring."""
    if argv[0] == "torchrun":
        at = argv.index("-m")  # torchrun's own options come before the module
        argv = ["python", *argv[at:]]
    if argv[0] in EXTERNAL:
        return
    if argv[0] == "cp":
        if not (ROOT / argv[1]).is_file():
            raise ReadmeError(f"{where}: there is no {argv[1]} to copy")
        return
    if argv[0] == "curate":
        from stcorpus.curate.cli import build_parser

        parser, args = build_parser(), argv[1:]
    elif argv[:3] == ["python", "-m", "stcorpus.training.pretrain"]:
        from stcorpus.training.pretrain import main

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = main([*argv[3:], "--print-config"])
        if code != 0:
            raise ReadmeError(f"{where}: the config does not resolve (exit {code})")
        return
    elif argv[:3] == ["python", "-m", "stcorpus.training.hestbench"]:
        from stcorpus.training.hestbench import build_parser as hestbench_parser

        parser, args = hestbench_parser(), argv[3:]
    else:
        raise ReadmeError(f"{where}: not a command this test knows how to check (EXTERNAL: {EXTERNAL})")
    try:
        with contextlib.redirect_stderr(io.StringIO()) as errors:
            parser.parse_args(args)
    except SystemExit as exc:
        raise ReadmeError(f"{where}: {errors.getvalue()}") from exc


@pytest.fixture
def runner(tmp_path: Path, demo_corpus: DemoCorpus) -> Iterator[tuple[Runner, int, LocalServer]]:
    work = tmp_path / "work"
    shutil.copytree(demo_corpus.root, work / "demo-corpus")  # blocks must not touch the session's copy
    (work / "manifests").mkdir()
    shutil.copy(ROOT / "manifests" / "demo.yaml", work / "manifests")
    (work / "tests").symlink_to(ROOT / "tests")  # the manifest's ../tests/data
    with serve(tmp_path / "www") as hub:
        hub.add_repo(HUB_REPO, HubRepo(folder=work / "demo-corpus"))
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path / "hf"),
            "STCORPUS_CACHE": str(tmp_path / "cache"),  # curate fetch's cache
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": str(ROOT),
        }
        run = Runner(work, env, demo_corpus)
        try:
            yield run, free_port(), hub
        finally:
            run.stop()


# About 55 CPU seconds (most of it the 60 training steps); minutes of wall time on a loaded machine.
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_readme_block_runs_as_written(runner: tuple[Runner, int, LocalServer]) -> None:
    run, port, hub = runner
    blocks = extract(README.read_text())
    for block in blocks:
        run.run(block, substitute(block.text, port=port))
    # what the blocks made, beyond their exit status
    work = run.work
    assert (work / "HER2ST-B4.h5ad").stat().st_size > 0
    assert (work / "manifests" / "demo.lock.json").is_file()
    checkpoints = sorted(p.name for p in (work / "runs" / "cpu" / "checkpoints").glob("step-*.pt"))
    assert checkpoints == ["step-00000030.pt", "step-00000060.pt"], checkpoints
    # hf://datasets/<org>/<corpus> was read from the stand-in: the shard list and the train shard
    resolved = {re.sub(r"^.*/resolve/[^/]+/", "", r.path) for r in hub.requests if HUB_REPO in r.path}
    assert {"shards.parquet", "parquet/train/train-000000.parquet"} <= resolved, resolved


def test_the_extractor_finds_and_classifies_every_block() -> None:
    blocks = extract(README.read_text())
    kinds = {b.kind for b in blocks}
    assert len(blocks) >= 15 and kinds == {"bash", "python", *MARKER_KINDS}, (len(blocks), kinds)
    # every fence opens or closes a block the extractor returned: none is missed
    fences = [line for line in README.read_text().splitlines() if line.startswith("```")]
    assert len(fences) == 2 * len(blocks)
    # the blocks the brief names are run, not only checked
    runs = "".join(b.text for b in blocks if b.kind in RUN_KINDS)
    for needle in (
        'CorpusDataset("hf://datasets/<org>/<corpus>"',
        "--resume latest",
        'load_dataset("demo-corpus"',
        'load_dataset("webdataset", data_files=files',
        "curate validate",
        "curate fetch",
        "curate plan",
        "curate publish demo-corpus --repo ORG/NAME --offline",
        "curate export",
    ):
        assert needle in runs, needle


def test_unknown_or_unmarked_blocks_fail() -> None:
    with pytest.raises(ReadmeError, match="unknown block kind 'picture'"):
        extract("text\n<!-- readme-test: picture -->\n```\nx\n```\n")
    with pytest.raises(ReadmeError, match=r"kind '\(none\)'"):
        extract("```\nplain\n```\n")
    with pytest.raises(ReadmeError, match="kind 'yaml'"):
        extract("```yaml\na: 1\n```\n")
    with pytest.raises(ReadmeError, match="'needs' takes"):
        extract("<!-- readme-test: needs tpu -->\n```bash\nx\n```\n")
    with pytest.raises(ReadmeError, match="never closed"):
        extract("```bash\nls\n")
    with pytest.raises(ReadmeError, match="'file' takes one file name"):
        extract("<!-- readme-test: file -->\n```yaml\na: 1\n```\n")
    assert [b.kind for b in extract("<!-- readme-test: needs gpu hub -->\n```bash\nx\n```\n")] == ["needs"]
    assert [b.args for b in extract("<!-- readme-test: file my-run.yaml -->\n```yaml\na: 1\n```\n")] == [
        ("my-run.yaml",)
    ]


def test_output_and_layout_checks_catch_a_wrong_line(tmp_path: Path) -> None:
    printed = "slides: 3 built\nextra line\n  B4: built: train, 0.6878 um/px\n"
    check_output("slides: 3 built\n  B4: built: train, ...\n", printed, where="t")
    with pytest.raises(ReadmeError, match="no line"):
        check_output("slides: 4 built\n", printed, where="t")
    with pytest.raises(ReadmeError, match="no line"):  # order counts
        check_output("  B4: built: train, ...\nslides: 3 built\n", printed, where="t")
    (tmp_path / "wds" / "train").mkdir(parents=True)
    (tmp_path / "wds" / "train" / "train-000000.tar").write_bytes(b"")
    check_layout("wds/<split>/<split>-NNNNNN.tar   shards\n", tmp_path, where="t")
    with pytest.raises(ReadmeError, match=r"has no corpus\.json"):
        check_layout("corpus.json   provenance\n", tmp_path, where="t")


def test_checked_commands_fail_on_a_wrong_flag_or_key() -> None:
    check_command(shlex.split("curate build manifests/hest1k.yaml --out corpus --workers 8"), where="t")
    with pytest.raises(ReadmeError, match="unrecognized arguments"):
        check_command(shlex.split("curate build m.yaml --out corpus --wrokers 8"), where="t")
    with pytest.raises(ReadmeError, match="does not resolve"):
        check_command(
            shlex.split("python -m stcorpus.training.pretrain --config corpus-gpu --set optim.lrr=1"), where="t"
        )
    with pytest.raises(ReadmeError, match=r"no curate/missing\.yaml"):
        check_command(["cp", "curate/missing.yaml", "x.yaml"], where="t")
    with pytest.raises(ReadmeError, match="not a command"):
        check_command(["wget", "https://example.org"], where="t")
