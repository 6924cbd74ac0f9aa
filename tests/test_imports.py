"""Importing the packages has no side effects: no network, no logging setup, no heavy imports.

How long an import takes is not asserted (timings belong in bench/); which modules it pulls in is."""

from __future__ import annotations

import subprocess
import sys

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


def test_import_curate_is_light() -> None:
    heavy = probe("curate")
    assert heavy == "", f"import curate pulled in {heavy}"


def test_import_schema_and_cli_are_light() -> None:
    for module in ("stcorpus.schema", "curate.cli", "curate.manifest", "loaders", "training"):
        heavy = probe(module)
        assert heavy == "", f"import {module} pulled in {heavy}"
