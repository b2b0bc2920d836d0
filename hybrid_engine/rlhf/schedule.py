"""The order and pace of training: this rank's seeded batches of each epoch, the number of optimizer steps of a run,
and the learning rate's schedule over them."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from transformers import get_scheduler

from hybrid_engine.rlhf.distributed import rank_and_world

SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "constant", "constant_with_warmup", "inverse_sqrt",
             "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
"""transformers' learning-rate schedules (`get_scheduler`'s names) that are a function of the step alone, with its
meanings (a warmup rises from 0 at step 0). Not reduce_lr_on_plateau or greedy, which follow a metric (a resumed run
could not recompute them), nor polynomial, whose end is an absolute learning rate (one per optimizer: PPO has two)."""
MIN_LR_SCHEDULES = ("cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
"""The schedules that end at min_lr_rate * lr instead of 0."""


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


def lr_scale(step: int, total_steps: int, warmup_steps: float, schedule: str, min_lr_rate: float = 0.0,
             decay_steps: int | None = None) -> float:
    """The learning rate's multiplier at optimizer step `step` (0-based) of `total_steps`: transformers' schedule
    `schedule` (get_scheduler) with `warmup_steps` of warmup, read as a pure function of the step, so a resumed run
    continues it exactly. min_lr_rate: where the MIN_LR_SCHEDULES end, as a fraction of lr; decay_steps: the final
    decay of warmup_stable_decay."""
    check_schedule(schedule, warmup_steps, decay_steps)
    return _multiplier(schedule, total_steps, warmup_count(warmup_steps, total_steps), min_lr_rate, decay_steps)(step)


def warmup_count(warmup_steps: float, total_steps: int) -> int:
    """The warmup's steps: warmup_steps itself, or, below 1, that fraction of total_steps rounded up (transformers'
    TrainingArguments.get_warmup_steps)."""
    return int(warmup_steps) if warmup_steps >= 1 else math.ceil(total_steps * warmup_steps)


def check_schedule(schedule: str, warmup_steps: int, decay_steps: int | None) -> None:
    """Refuses a schedule transformers would run otherwise than asked: an unknown name, a warmup for "constant" (which
    has none: "constant_with_warmup" does), warmup_stable_decay without decay_steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "constant" and warmup_steps:
        raise ValueError(f"schedule 'constant' has no warmup (transformers' meaning), got warmup_steps {warmup_steps}: "
                         "use 'constant_with_warmup'")
    if schedule == "warmup_stable_decay" and not decay_steps:
        raise ValueError("schedule 'warmup_stable_decay' needs decay_steps (the steps of its final decay)")


@functools.lru_cache(maxsize=32)
def _multiplier(schedule: str, total_steps: int, warmup_steps: int, min_lr_rate: float,
                decay_steps: int | None) -> Callable[[int], float]:
    """transformers' multiplier function of the step (its LambdaLR's lr_lambda), built on a probe optimizer."""
    options = {}
    if schedule in MIN_LR_SCHEDULES:
        options = {"min_lr_ratio": min_lr_rate} if schedule == "warmup_stable_decay" else {"min_lr_rate": min_lr_rate}
    if schedule == "warmup_stable_decay":
        options["num_decay_steps"] = decay_steps
    probe = torch.optim.SGD([torch.zeros(1)], lr=1.0)
    scheduler = get_scheduler(schedule, probe, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                              scheduler_specific_kwargs=options)
    return scheduler.lr_lambdas[0]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's learning rate (DeepSpeed's ZeRO optimizers expose their groups too)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate the optimizer steps with now: its first parameter group's (set_lr sets them all alike)."""
    return float(optimizer.param_groups[0]["lr"])


def run_length(num_rows: int, config) -> tuple[int, int]:
    """(this rank's batches of one epoch over `num_rows` rows, the run's steps: total_steps)."""
    rank, world = rank_and_world()
    per_epoch = len(batch_order(num_rows, config.batch_size, config.seed, 0, rank, world))
    return per_epoch, total_steps(per_epoch, config)


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
