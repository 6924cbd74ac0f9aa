"""Importing the packages has no side effects: no network, no logging setup, no heavy imports.

How long an import takes is not asserted (timings belong in bench/); which modules it pulls in is."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PROBE = """
import logging, socket, sys
def no_network(*args, **kwargs):
    raise AssertionError("network access at import time")
socket.socket.connect = no_network
socket.create_connection = no_network
handlers_before = list(logging.getLogger().handlers)
import {module}
assert logging.getLogger().handlers == handlers_before, "logging configured at import"
assert logging.getLogger().level == logging.WARNING, "root log level changed at import"
heavy = sorted(m for m in ("torch", "h5py", "anndata", "datasets", "pyarrow", "tifffile", "polars") if m in sys.modules)
print(",".join(heavy))
"""


def probe(module: str) -> str:
    """The heavy modules that importing ``module`` in a fresh interpreter loads, comma-separated."""
    return subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_import_stcorpus_curate_is_light() -> None:
    heavy = probe("stcorpus.curate")
    assert heavy == "", f"import stcorpus.curate pulled in {heavy}"


def test_import_schema_and_cli_are_light() -> None:
    for module in (
        "stcorpus.schema",
        "stcorpus.curate.cli",
        "stcorpus.curate.manifest",
        "stcorpus.loaders",
        "stcorpus.training",
    ):
        heavy = probe(module)
        assert heavy == "", f"import {module} pulled in {heavy}"


WINGS = ("stcorpus.curate", "stcorpus.loaders", "stcorpus.training")
#: What each part of the package may import from stcorpus: training -> loaders -> base, curate -> base.
ALLOWED = {
    "stcorpus.training": {"stcorpus.training", "stcorpus.loaders", "base"},
    "stcorpus.loaders": {"stcorpus.loaders", "base"},
    "stcorpus.curate": {"stcorpus.curate", "base"},
    "base": {"base"},
}


def _part(module: str) -> str:
    return next((wing for wing in WINGS if module == wing or module.startswith(wing + ".")), "base")


def _stcorpus_imports(path: Path, module: str) -> set[str]:
    """The stcorpus modules one source file imports (absolute and relative, at any depth)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join([*base, *([node.module] if node.module else [])]))
            elif node.module:
                found.add(node.module)
    # importlib.import_module("stcorpus.x.{name}") strings count too
    text = path.read_text()
    found.update(m.rstrip(".") for m in re.findall(r"[\"'](stcorpus(?:\.\w+)+)", text))
    return {name for name in found if name == "stcorpus" or name.startswith("stcorpus.")}


def test_imports_run_one_way_between_the_wings() -> None:
    """training -> loaders -> base and curate -> base; the base imports no wing; no top-level wing."""
    root = Path(__file__).resolve().parents[1] / "stcorpus"
    crossings: list[str] = []
    walked = 0
    # rglob does not descend into the linked wing folders, so each is walked from its link
    wing_dirs = [root / wing.rpartition(".")[2] for wing in WINGS]
    paths = [*root.glob("*.py"), *(path for folder in wing_dirs for path in folder.rglob("*.py"))]
    for path in sorted(paths):
        relative = path.relative_to(root.parent).with_suffix("")
        module = ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)
        part = _part(module)
        walked += 1
        tree_text = path.read_text()
        for bare in re.findall(r"^\s*(?:from|import) (curate|loaders|training)\b", tree_text, flags=re.MULTILINE):
            crossings.append(f"{module} imports the top-level name {bare!r} (use stcorpus.{bare})")
        for imported in _stcorpus_imports(path, module):
            if _part(imported) not in ALLOWED[part]:
                crossings.append(f"{module} ({part}) imports {imported} ({_part(imported)})")
    assert walked > 60, f"only {walked} modules walked: are the stcorpus/curate, loaders, training links there?"
    assert crossings == []


def test_every_error_of_the_wings_is_a_stcorpus_error() -> None:
    """One ``except StcorpusError`` catches what any wing raises on purpose (issue 15.7)."""
    import importlib
    import inspect

    from stcorpus.errors import StcorpusError

    found: list[type[BaseException]] = []
    for name in ("stcorpus.errors", *(f"{wing}.errors" for wing in WINGS)):
        module = importlib.import_module(name)
        found += [
            cls
            for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, BaseException) and cls.__module__ == name
        ]
    assert len(found) > 20, f"only {len(found)} error classes found"
    assert [cls.__qualname__ for cls in found if not issubclass(cls, StcorpusError)] == []
