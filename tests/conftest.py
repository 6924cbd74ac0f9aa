"""Shared fixtures: paths of the real data in tests/data and small helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

# The 127.0.0.1 test server (tests/httpserver.py) as the `http_server` fixture in every module.
pytest_plugins = ["tests.httpserver"]

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
