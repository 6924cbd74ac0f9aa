"""Shared fixtures: paths of the real data in tests/data and small helpers."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# The 127.0.0.1 test server (tests/httpserver.py) as the `http_server` fixture in every module.
pytest_plugins = ["tests.httpserver"]

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
HEART = DATA / "human-heart-sr1.0"
MOUSE_BRAIN = DATA / "mouse-brain-sr1.1"
FULLRES = DATA / "mouse-brain-fullres-h5ad"


def expected(folder: Path) -> dict[str, Any]:
    """The measured facts of a real fixture (its EXPECTED.json)."""
    result: dict[str, Any] = json.loads((folder / "EXPECTED.json").read_text())
    return result


@pytest.fixture(autouse=True)
def _own_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub's cache in tmp_path: the fetch layer reuses what it holds, never the user's own."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub-cache"))


@pytest.fixture
def write_manifest(tmp_path: Path):
    """Write manifest text to a file in tmp_path and return its path."""

    def write(text: str, name: str = "manifest.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


#: What `make demo` runs (the Makefile's `demo` recipe), relative to the repository root, with the
#: corpus folder after `--out` (tests/test_readme.py checks the two agree).
DEMO_BUILD = ("build", "manifests/demo.yaml", "--out", "{out}", "--holdout", "none")


@dataclass(frozen=True)
class DemoCorpus:
    """The demo corpus built once per test session: its folder (read-only) and what the build printed."""

    root: Path
    summary: str


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> DemoCorpus:
    """The demo corpus as `make demo` builds it. Tests must not write into it: copy it first."""
    from stcorpus.curate.cli import main

    out = tmp_path_factory.mktemp("demo") / "demo-corpus"
    argv = [str(ROOT / arg) if arg.endswith(".yaml") else arg.format(out=out) for arg in DEMO_BUILD]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main([*argv, "--no-progress"])
    assert code == 0, printed.getvalue()
    return DemoCorpus(root=out, summary=printed.getvalue())
