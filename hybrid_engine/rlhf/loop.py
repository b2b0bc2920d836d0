"""The one training loop of the three trainers (SFT, the reward model, PPO): for each of this rank's seeded batches
of every epoch, set the scheduled learning rates, run the trainer's step, evaluate before, every eval_every steps
and after, write a checkpoint every checkpoint_every steps, and resume from one. What a trainer does in a step,
how it evaluates and what its checkpoint holds, it plugs in (Trainer)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from hybrid_engine.rlhf.distributed import rank_and_world
from hybrid_engine.rlhf.schedule import batch_order, lr_scale, run_length, set_lr, stop_reason


@dataclass
class LoopRecord:
    """What train_loop ran."""

    history: list = field(default_factory=list)
    """Every step's record, as the trainer's step returned it: its loss (SFT, reward) or its figures (PPO)."""
    evals: list[tuple[int, Any]] = field(default_factory=list)
    """(step, what evaluate returned) before training, every eval_every steps and after the last step."""
    steps: int = 0
    """Optimizer steps (PPO: rollout steps) taken."""
    train_s: float = 0.0
    """Seconds in the trainer's step calls."""
    stop_reason: str = ""
    """What ended the run (schedule.stop_reason): 'max_steps (40)' or 'epochs (1 epoch of 12 steps)'."""
    lrs: list[float] = field(default_factory=list)
    """The learning rate the loop set on the first optimizer at every step (the schedule's, steps before a resume
    included)."""


class RunState(Protocol):
    """A run's checkpoint: what a trainer writes every checkpoint_every steps and reads back to resume."""

    def save(self, record: LoopRecord) -> None: ...

    def restore(self, resume: bool | str, record: LoopRecord) -> None: ...


@dataclass
class Trainer:
    """What one trainer plugs into train_loop."""

    step: Callable[[list[int], int], Any]
    """(this rank's row indices, the step's 0-based index) -> the step's record (LoopRecord.history)."""
    evaluate: Callable[[], Any]
    """The held-out evaluation; what it returns goes to LoopRecord.evals."""
    optimizers: list[tuple[torch.optim.Optimizer, float]]
    """Each optimizer and its peak learning rate: the loop sets the scheduled rate before every step."""
    postfix: Callable[[Any], dict]
    """A step's record as progress-bar fields."""
    show_eval: Callable[[Any], dict] | None = None
    """An evaluation as progress-bar fields (beside the last step's)."""
    on_step: Callable[[int, Any], None] | None = None
    """Called with (steps taken, the step's record) after every step."""
    on_eval: Callable[[int, Any], None] | None = None
    """Called with (steps taken, the evaluation) after every evaluation."""
    state: RunState | None = None
    """The run's checkpoint; None: no checkpoints and no resume."""


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over `total` steps, shown on rank 0 only, and not at all unless `enabled`."""
    return tqdm(total=total, desc=desc, disable=not enabled or rank_and_world()[0] != 0, dynamic_ncols=True)


def train_loop(num_rows: int, config, trainer: Trainer, desc: str, progress: bool,
               resume: bool | str = False) -> LoopRecord:
    """The epochs of one step's training over `num_rows` rows (`config` has the StepConfig fields; schedule.total_steps
    says how many steps they make, cycling the rows when max_steps is given alone): for each of this rank's seeded
    batches (batch_order), the scheduled learning rates, then trainer.step; trainer.evaluate
    before, every config.eval_every steps and after; trainer.state written every config.checkpoint_every steps.
    resume (True: the newest checkpoint under config.output_dir, or a folder) continues a run, to the bit."""
    rank, world = rank_and_world()
    per_epoch, total = run_length(num_rows, config)
    if per_epoch < 1:
        raise ValueError(f"{num_rows} training rows make no batch of {config.batch_size} per rank on {world} ranks")
    record = LoopRecord()
    if resume:
        if trainer.state is None:
            raise ValueError("resume needs the run's checkpoint state (Trainer.state)")
        trainer.state.restore(resume, record)
    bar = progress_bar(total, desc, progress)
    bar.update(record.steps)
    if not record.evals:
        _evaluate(trainer, record, bar)
    seen = 0
    for epoch in range(math.ceil(total / per_epoch)):  # max_steps alone: as many epochs as it takes
        for rows in batch_order(num_rows, config.batch_size, config.seed, epoch, rank, world):
            seen += 1
            if seen <= record.steps:  # run before the checkpoint this run resumed from
                continue
            if record.steps == total:
                break
            for optimizer, peak in trainer.optimizers:
                set_lr(optimizer, scheduled_lr(peak, record.steps, total, config))
            t0 = time.perf_counter()
            item = trainer.step(rows, record.steps)
            record.train_s += time.perf_counter() - t0
            record.history.append(item)
            record.steps += 1
            if trainer.on_step is not None:
                trainer.on_step(record.steps, item)
            bar.update(1)
            bar.set_postfix(**trainer.postfix(item))
            if config.eval_every and record.steps % config.eval_every == 0 and record.steps < total:
                _evaluate(trainer, record, bar)
            if trainer.state is not None and config.checkpoint_every and \
                    record.steps % config.checkpoint_every == 0 and record.steps < total:
                trainer.state.save(record)
    _evaluate(trainer, record, bar)
    bar.close()
    record.stop_reason = stop_reason(per_epoch, config)
    if trainer.optimizers:
        record.lrs = [scheduled_lr(trainer.optimizers[0][1], i, total, config) for i in range(record.steps)]
    return record


def scheduled_lr(peak: float, step: int, total: int, config) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total`: `peak` scaled by config's schedule."""
    return peak * lr_scale(step, total, config.warmup_steps, config.schedule, config.min_lr_rate, config.decay_steps)


def _evaluate(trainer: Trainer, record: LoopRecord, bar) -> None:
    result = trainer.evaluate()
    record.evals.append((record.steps, result))
    if trainer.on_eval is not None:
        trainer.on_eval(record.steps, result)
    if result is not None and trainer.show_eval is not None and record.history:
        bar.set_postfix(**trainer.postfix(record.history[-1]), **trainer.show_eval(result))


def as_json(value):
    """A dataclass as its dict (for json.dumps); anything else as it is."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def evals_json(evals: list) -> list:
    """[(step, evaluation)] with every evaluation (a float, a dataclass or None) ready for json.dumps."""
    return [[step, as_json(e)] for step, e in evals]
