"""Importing the packages has no side effects: no network, no logging setup, no heavy imports."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import logging, socket, sys, time
def no_network(*args, **kwargs):
    raise AssertionError("network access at import time")
socket.socket.connect = no_network
socket.create_connection = no_network
handlers_before = list(logging.getLogger().handlers)
start = time.perf_counter()
import {module}
elapsed = time.perf_counter() - start
assert logging.getLogger().handlers == handlers_before, "logging configured at import"
assert logging.getLogger().level == logging.WARNING, "root log level changed at import"
heavy = sorted(m for m in ("torch", "h5py", "anndata", "datasets", "pyarrow", "tifffile", "polars") if m in sys.modules)
print(elapsed, ",".join(heavy))
"""


def probe(module: str) -> tuple[float, str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)], check=True, capture_output=True, text=True
    ).stdout.split()
    return float(out[0]), (out[1] if len(out) > 1 else "")


def test_import_curate_is_light() -> None:
    elapsed, heavy = probe("curate")
    assert heavy == "", f"import curate pulled in {heavy}"
    assert elapsed < 1.0


def test_import_schema_and_cli_are_light() -> None:
    for module in ("stcorpus.schema", "curate.cli", "curate.manifest"):
        _, heavy = probe(module)
        assert heavy == "", f"import {module} pulled in {heavy}"
