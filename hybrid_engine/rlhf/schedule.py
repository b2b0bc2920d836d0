"""The order and pace of training: this rank's seeded batches of each epoch, the number of optimizer steps of a run,
and the learning rate's schedule over them."""

from __future__ import annotations

import numpy as np
import torch

SCHEDULES = ("constant", "linear")


def batch_order(num_rows: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                world: int = 1) -> list[list[int]]:
    """This rank's batches of one epoch, the same on every run with the same seed.

    One permutation of range(num_rows), drawn from numpy's generator seeded with (seed, epoch) and so the
    same on every rank, is cut into global batches of batch_size * world rows; rank r takes the r-th of
    `world` near-equal slices of each. Every rank gets the same number of batches (a last global batch of
    fewer than `world` rows is dropped), so the ranks' collectives stay in step."""
    if num_rows < 1 or batch_size < 1:
        raise ValueError(f"need num_rows >= 1 and batch_size >= 1, got {num_rows} and {batch_size}")
    order = np.random.default_rng((seed, 3, epoch)).permutation(num_rows)
    step = batch_size * world
    batches = []
    for start in range(0, num_rows, step):
        chunk = order[start:start + step]
        if len(chunk) < world:
            break
        batches.append(np.array_split(chunk, world)[rank].tolist())
    return batches


def lr_scale(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The learning rate's multiplier at optimizer step `step` (0-based) of `total_steps`: a linear warmup
    (step + 1) / warmup_steps over the first warmup_steps, then 1 ("constant") or a linear decay from 1
    that reaches 1 / (total_steps - warmup_steps) at the last step ("linear")."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return max(total_steps - step, 1) / max(total_steps - warmup_steps, 1)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's learning rate (DeepSpeed's ZeRO optimizers expose their groups too)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate the optimizer steps with now: its first parameter group's (set_lr sets them all alike)."""
    return float(optimizer.param_groups[0]["lr"])


def total_steps(batches_per_epoch: int, config) -> int:
    """The optimizer steps of a run: max_steps when only it is given (the batches cycle over as many epochs as it
    takes), every epoch's batches when only epochs is (None for both: one epoch), the fewer of the two when both
    are."""
    if config.epochs is None and config.max_steps is not None:
        return config.max_steps
    steps = batches_per_epoch * (config.epochs or 1)
    return steps if config.max_steps is None else min(steps, config.max_steps)


def stop_reason(batches_per_epoch: int, config) -> str:
    """Why a run of total_steps stops, in words: 'max_steps (40)', or 'epochs (1 epoch of 12 steps)' when the
    epochs run out first (or no max_steps is given)."""
    total = total_steps(batches_per_epoch, config)
    if config.max_steps is not None and total == config.max_steps:
        return f"max_steps ({config.max_steps})"
    epochs = config.epochs or 1
    return f"epochs ({epochs} epoch{'s' if epochs > 1 else ''} of {batches_per_epoch} steps)"
