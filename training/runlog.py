"""Run logging: one JSON object per line in ``<run>/log.jsonl``, and a short line on the console."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import TracebackType
from typing import Any

logger = logging.getLogger("stcorpus.training")


def _plain(value: Any) -> Any:
    """JSON-able numbers (NaN/inf as None: JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    """Appends records to a JSON-lines file (when ``path`` is given) and logs a summary line."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._handle = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Write one record (``kind``: ``train`` / ``eval`` / ``event``) and log its summary."""
        if self._handle is not None:
            self._handle.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
            self._handle.flush()
        logger.info(summary(record))

    def close(self) -> None:
        """Close the file."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def summary(record: dict[str, Any]) -> str:
    """One console line: ``step 120 | loss 2.31 (patch_spot 2.31) | lr 4.0e-04 | T 0.071 | 812 samples/s | data 3%``."""
    kind = record.get("kind", "train")
    step = record.get("step", "?")
    if kind == "train":
        terms = ", ".join(f"{k.removeprefix('loss/')} {v:.4g}" for k, v in record.items() if k.startswith("loss/"))
        return (
            f"step {step} | loss {record.get('loss', float('nan')):.4f} ({terms}) | lr {record.get('lr', 0.0):.2e} "
            f"| T {record.get('temperature', float('nan')):.4f} | {record.get('samples_per_s', 0.0):.0f} samples/s "
            f"| data {100 * record.get('data_wait_frac', 0.0):.1f}%"
        )
    if kind == "eval":
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float) and k not in ("step", "pool_size")
        )
        return f"eval step {step} | {shown}"
    return f"step {step} | {record.get('message', '')}"
