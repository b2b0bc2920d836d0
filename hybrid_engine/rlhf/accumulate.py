"""Gradient accumulation: one optimizer step over N micro-batches whose update equals the one of their union.

Every step's loss is a mean: SFT's, PPO's policy and value losses, GRPO's KL term and the PTX loss over tokens (the
pooled mean over the response tokens), the reward model's over pairs. The mean over a large batch is not the mean of
its micro-batches' means when they hold different numbers of tokens, so each micro-batch's loss is scaled by its
share of the step's count, w_i / sum_j w_j (transformers 5's Trainer does the same with num_items_in_batch): the sum
of the scaled losses, and of their gradients, is the large batch's mean, to fp32 rounding.

Plain torch backpropagates each micro-batch, then clips and steps once. Under DeepSpeed the config's
gradient_accumulation_steps is N (trainer.training_ds_config), backward does not divide by it again
(engine.training.DeepSpeedTrainer) and engine.step() after every micro-batch steps the optimizer at DeepSpeed's
accumulation boundary only."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from hybrid_engine.rlhf.distributed import all_finite
from hybrid_engine.rlhf.step_config import NonFiniteError


def micro_batches(rows: Sequence[int], n: int) -> list[list[int]]:
    """`rows` cut into n consecutive near-equal micro-batches (the first ones one longer), empty ones left out (a
    last batch of an epoch may hold fewer than n rows)."""
    return [part.tolist() for part in np.array_split(np.asarray(rows, dtype=np.int64), n) if len(part)]


RowName = str | Callable[[int], str]
"""How an over-budget row is named: a word put before its id ("training row 7"), or a function of its id (the data
file and its row there)."""


def budget_batches(rows: Sequence[int], lengths: Sequence[int], budget: int, what: RowName = "row"
                   ) -> list[list[int]]:
    """`rows` (lengths[i] tokens each) grouped into micro-batches of at most `budget` tokens: first-fit decreasing
    (each row, longest first, into the first micro-batch it fits in), each micro-batch's rows in their given order.
    A row longer than the budget is refused, named by `what`."""
    used: list[int] = []  # each micro-batch's tokens
    members: list[list[int]] = []  # each micro-batch's positions in rows
    for i in sorted(range(len(rows)), key=lambda i: -lengths[i]):
        if lengths[i] > budget:
            name = what(rows[i]) if callable(what) else f"{what} {rows[i]}"
            raise ValueError(f"{name} has {lengths[i]} tokens, more than max_tokens_per_batch={budget}: "
                             "raise the budget or shorten the rows (tokens.max_seq_len)")
        k = next((k for k, u in enumerate(used) if u + lengths[i] <= budget), len(used))
        if k == len(used):
            used.append(0)
            members.append([])
        used[k] += lengths[i]
        members[k].append(i)
    return [[rows[i] for i in sorted(part)] for part in members]


def step_batches(rows: Sequence[int], lengths: Sequence[int], config, what: RowName = "row") -> list[list[int]]:
    """An optimizer step's micro-batches: by config.max_tokens_per_batch (budget_batches) when set, else
    config.gradient_accumulation_steps near-equal row counts (micro_batches). lengths[i]: the tokens of rows[i]."""
    if config.max_tokens_per_batch is None:
        return micro_batches(rows, config.gradient_accumulation_steps)
    return budget_batches(rows, lengths, config.max_tokens_per_batch, what)


def accumulated_step(trainer, module: torch.nn.Module, losses: Sequence[Callable[[], torch.Tensor]],
                     weights: Sequence[float], n: int, max_grad_norm: float | None) -> float:
    """One optimizer step over micro-batches: losses[i]() is micro-batch i's mean loss (called one at a time, so only
    one graph is alive), weights[i] what it is a mean over (tokens, pairs). Returns the large batch's loss, or the
    NaN or inf of the first micro-batch whose loss is not finite on some rank: then nothing is stepped and the
    gradients of the micro-batches before it are discarded. `trainer` is a HybridEngine or a trainer of
    engine.training, `module` what it trains, n the accumulation DeepSpeed was configured with (the number of
    step() calls it counts per optimizer step)."""
    total = float(sum(weights))
    deepspeed = trainer.zero_stage is not None
    if deepspeed and len(losses) > n:
        raise ValueError(f"max_tokens_per_batch formed {len(losses)} micro-batches for one step, more than the "
                         f"gradient_accumulation_steps={n} DeepSpeed counts: raise gradient_accumulation_steps or "
                         "max_tokens_per_batch")
    for _ in range(n - len(losses) if deepspeed else 0):
        trainer.step()  # an empty micro-batch (a short last batch): DeepSpeed counts it, nothing to backpropagate
    value = 0.0
    for i, (loss_of, weight) in enumerate(zip(losses, weights)):
        loss = loss_of() * (weight / total if total else 0.0)
        if not all_finite(loss.detach()):
            _discard(trainer, i, deepspeed)
            here = float(loss.detach())
            return here if not math.isfinite(here) else math.nan  # finite here, not on another rank
        trainer.backward(loss)
        value += loss.item()
        if deepspeed and i < len(losses) - 1:
            trainer.step()  # DeepSpeed counts the micro-batch; it steps the optimizer at its boundary only
    if max_grad_norm is not None and not deepspeed:  # DeepSpeed clips inside its step, by its gradient_clipping
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_grad_norm)
    trainer.step()
    return value


def _discard(trainer, done: int, deepspeed: bool) -> None:
    """Drops the gradients of the `done` micro-batches already backpropagated, so that nothing is stepped."""
    if done == 0:
        return
    if deepspeed:
        raise NonFiniteError(f"micro-batch {done + 1} of an accumulated step has a NaN or inf loss after {done} "
                             "micro-batches were backpropagated: DeepSpeed cannot drop their gradients, so the update "
                             f"cannot be skipped; set gradient_accumulation_steps to 1, or nonfinite='stop'")
    trainer.optimizer.zero_grad(set_to_none=True)
