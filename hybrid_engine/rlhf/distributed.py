"""Which rank this process is: the one place the RL library asks torch.distributed (or the launcher's
environment) about the world it runs in."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(this rank, the world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_rank() -> bool:
    """Whether this process prints and writes: rank 0 of torch.distributed, or of $RANK before the process group
    exists (torchrun and the deepspeed launcher set it), or the only process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def all_finite(*tensors: torch.Tensor | None) -> bool:
    """Whether every given tensor is finite on every rank (all ranks get the same answer)."""
    ok = all(t is None or bool(torch.isfinite(t).all()) for t in tensors)
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([0.0 if ok else 1.0])
        dist.all_reduce(flag)
        ok = float(flag) == 0.0
    return ok
