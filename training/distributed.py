"""Process-group set-up for ``torchrun``: gloo on CPU, NCCL on CUDA; nothing without ``WORLD_SIZE``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from stcorpus.training.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    #: A gloo group for small host-side exchanges (batch sizes) on NCCL runs, so that they never
    #: wait for the GPU; None means the default group (already gloo on CPU) or no group at all.
    cpu_group: Any = None

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the one that writes checkpoints, logs and evaluates)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is in use."""
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

    ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``. The backend follows the
    device: NCCL for CUDA, gloo for CPU. A single process (no ``WORLD_SIZE`` or 1) creates no group.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but this torch build sees no CUDA device; use run.device=cpu or auto")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    cpu_group = None
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        if dist.get_backend() != "gloo":
            cpu_group = dist.new_group(backend="gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=where, cpu_group=cpu_group)


def cleanup_distributed(*, synchronize: bool = True) -> None:
    """Leave the process group, if one was joined.

    ``synchronize`` waits at a barrier first, so that no rank tears down its connections while a
    peer is still finishing a collective (gloo then aborts the peer at exit with "terminate called
    without an active exception"). Pass False after a failure: a barrier could wait forever on a
    rank that is gone.
    """
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
