"""Gathering ZeRO-3 partitioned parameters for generation, and giving them back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 manages (partitioned across ranks)."""
    return hasattr(param, "ds_id")


def _not_resident(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return [p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE]


@contextlib.contextmanager
def gathered(params: Iterable[torch.nn.Parameter]) -> Iterator[int]:
    """Makes every ZeRO-3 parameter in `params` whole on this rank for the duration (read-only), then
    partitions again exactly those it gathered: parameters DeepSpeed already held resident stay as they
    were, so the next training step finds them as it left them. Yields the bytes this rank gathered (0
    when nothing had to be fetched). A no-op for ordinary parameters."""
    zero = [p for p in params if is_partitioned(p)]
    missing = _not_resident(zero) if zero else []
    if not missing:
        yield 0
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(missing, modifier_rank=None):
        yield sum(p.ds_numel * p.element_size() for p in missing)


def unique_params(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """The parameters of `modules` (recursively), each once, in order."""
    seen: dict[int, torch.nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def on_every_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every rank: partitioned ranks must take the same path through the same gathers (a
    collective each), whatever their own rows."""
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
