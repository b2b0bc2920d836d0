"""Rows that share their first columns with their neighbours, as GRPO's and RLOO's samples of one prompt do: found
once here, so that prefill, scoring and training run each shared prefix once and copy what it left in the cache."""

from __future__ import annotations

import torch


def shared_prefix_runs(input_ids: torch.Tensor, attention_mask: torch.Tensor, cut: int) -> torch.Tensor | None:
    """Where neighbouring rows share their first `cut` columns (tokens and mask): each row's run index (B,), its runs
    numbered from 0; None when no two neighbours share them."""
    if cut < 1 or input_ids.shape[0] < 2:
        return None
    ids, mask = input_ids[:, :cut], attention_mask[:, :cut]
    same = (ids[1:] == ids[:-1]).all(1) & (mask[1:] == mask[:-1]).all(1)
    if not same.any():
        return None
    return torch.cat([same.new_zeros(1), ~same]).long().cumsum(0)


def run_firsts(runs: torch.Tensor) -> torch.Tensor:
    """The first row of every run (R,), in order, of shared_prefix_runs' run indices."""
    return torch.cat([runs.new_ones(1, dtype=torch.bool), runs[1:] != runs[:-1]]).nonzero().squeeze(1)
