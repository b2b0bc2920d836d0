"""The wall clock around an RLHF step, the same span for every provider of bench/rlhf_worker.py: from the step's
first call to the end of its optimizer step, measured apart from the phase timers reported beside it.

- ours, ours-reference, deepspeed (train_ppo): every call of the driver's ppo_step (rollout, scoring, targets,
  optimisation, EMA and KL controller), clocked from outside by clock_calls;
- trl, trl-patched (a transformers Trainer): from on_step_begin, before the step's training_step, to on_step_end,
  after optimizer.step(), the scheduler and zero_grad (TrainerClock);
- hf (hybrid_engine.benchmarks.hf_ppo): around train_step, by that module itself.

The phases are timed by their own clocks (generate, experience, train), so their sum is at most the wall time and
short of it by the work between them (setting the learning rate, collating the prompts, the trainer's callbacks,
the scheduler): untimed_s, above zero for a wall time measured on its own (tests/test_step_clock.py checks it), and
zero for one made by adding up the phases.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import transformers

PHASES = ("generate_s", "experience_s", "train_s")
"""The phase timers of a step record, each measured on its own."""

Span = tuple[float, float]
"""(start, end) of one call, time.perf_counter() seconds."""


def timed(fn: Callable, spans: list[Span]) -> Callable:
    """fn, appending the (start, end) of every call to `spans` (also when it raises)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spans.append((start, time.perf_counter()))

    return wrapper


@contextmanager
def clock_calls(owner, name: str) -> Iterator[list[Span]]:
    """Inside the block, owner.name (a module's function, or an object's method) records the span of every call into
    the list yielded; restored on the way out, even on an exception. Patch the module whose globals the caller looks
    the function up in, and compare the count of spans with the steps run: a patch of the wrong module counts none."""
    original = getattr(owner, name)
    spans: list[Span] = []
    setattr(owner, name, timed(original, spans))
    try:
        yield spans
    finally:
        setattr(owner, name, original)


class TrainerClock(transformers.TrainerCallback):
    """The timestamps of every optimizer step of a transformers Trainer: begins (on_step_begin, before the step's
    first training_step), optimizer_ends (on_optimizer_step, after gradient clipping and optimizer.step()) and ends
    (on_step_end, after the scheduler and zero_grad)."""

    def __init__(self):
        self.begins: list[float] = []
        self.optimizer_ends: list[float] = []
        self.ends: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.begins.append(time.perf_counter())

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_ends.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def _within(spans: list[Span], start: float, end: float) -> list[Span]:
    return [s for s in spans if start <= s[0] and s[1] <= end]


def trainer_steps(clock: TrainerClock, generate: list[Span], experience: list[Span]) -> list[dict]:
    """Every step's wall time and phases from a TrainerClock and the spans of the trainer's generation call
    (`generate`) and of its whole rollout and scoring (`experience`, which holds `generate`'s): time_s, end minus
    begin; generate_s, its generation calls; experience_s, its rollout-and-scoring calls less the generation in them;
    train_s, from the end of its last rollout-and-scoring call to the end of its optimizer step (the loss's forward
    and backward, clipping, optimizer.step())."""
    if not len(clock.begins) == len(clock.optimizer_ends) == len(clock.ends):
        raise ValueError(f"unpaired step callbacks: {len(clock.begins)} begins, {len(clock.optimizer_ends)} "
                         f"optimizer steps, {len(clock.ends)} ends")
    steps = []
    for begin, optimized, end in zip(clock.begins, clock.optimizer_ends, clock.ends):
        made = _within(experience, begin, end)
        if not made:
            raise ValueError(f"a step ({end - begin:.3f} s) without a rollout: the experience clock missed it")
        generate_s = sum(b - a for a, b in _within(generate, begin, end))
        steps.append({"time_s": end - begin, "generate_s": generate_s,
                      "experience_s": sum(b - a for a, b in made) - generate_s,
                      "train_s": optimized - max(b for _, b in made)})
    return steps


def untimed_s(step: dict) -> float:
    """The step's wall time less its phases: the work no phase timer covers."""
    return step["time_s"] - sum(step[p] for p in PHASES)

