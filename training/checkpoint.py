"""Checkpoints: atomic writes, keep-last-N, and contents that ``torch.load(weights_only=True)`` accepts.

A checkpoint is a dict of tensors and plain containers only (no pickled classes)::

    format       "stcorpus-train-ckpt/2"
    step         optimiser steps done
    model        the unwrapped model's state_dict, less a frozen or LoRA-adapted image tower's base
                 weights (``stcorpus.training.model.trainable_state``)
    base         the image tower's base weights: preset, file, sha256, origin ({} if none)
    optimizer    the optimiser's state_dict
    scaler       the gradient scaler's state_dict ({} without one)
    config       the resolved run config as a JSON string
    world_size   processes of the run that wrote it
    rng          one dict per rank: torch CPU / CUDA generator states, numpy's and Python's
    data         one data-source state_dict per rank
    metrics      the last evaluation's metrics (floats)
    versions     torch and stcorpus versions

Files are ``<run>/checkpoints/step-00001000.pt``, written to a temporary name, fsynced, and
renamed into place, so that a crash never leaves a half-written checkpoint under a real name.
"""

from __future__ import annotations

import os
import pickle
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from stcorpus.training.errors import CheckpointError

CHECKPOINT_FORMAT: Final = "stcorpus-train-ckpt/2"
#: Formats :func:`load_checkpoint` reads: /1 held the whole model and no ``base``.
READABLE_FORMATS: Final = ("stcorpus-train-ckpt/1", CHECKPOINT_FORMAT)
_NAME: Final = re.compile(r"^step-(\d{8,})\.pt$")


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint after ``step`` optimiser steps."""
    return f"step-{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints in ``directory``, by step (temporary files ignored)."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint with the highest step in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: Mapping[str, Any], directory: Path, *, step: int, keep_last: int) -> Path:
    """Write ``state`` atomically as ``directory/step-<step>.pt``; delete all but the newest ``keep_last``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    try:
        with tmp.open("wb") as handle:
            torch.save(dict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(directory)
    for _, old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` onto the CPU and check its format."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; give a checkpoint file or 'latest'")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint ({exc}); resume from an earlier one") from exc
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (format {found!r})")
    return state


# ---------------------------------------------------------------------------------------------
# RNG states as plain containers
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The process's RNG states (torch CPU/CUDA, numpy's global, Python's) as tensors and lists."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy=True always gives the tuple form
    kind, keys, pos, has_gauss, gauss = np_state
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": [int(has_gauss), float(gauss)],
        "python": [int(py_version), list(py_internal), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            int(np_state["pos"]),
            int(has_gauss),
            float(gauss),
        )
    )
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
