"""The reward functions of a run, with TRL's GRPOTrainer contract as a superset: one or several functions, each
called once per rollout batch with keyword arguments and weighted (PPOConfig.reward_weights, TRL's reward_weights).

Each function gets prompts=, completions= and every other column of the prompt rows (one list each, aligned with
the completions); and, when it takes them (a parameter of that name or **kwargs), TRL's completion_ids (each
completion's tokens), trainer_state (a transformers TrainerState: global_step, max_steps, epoch), log_metric(name,
value) (a scalar in the step's metrics record, averaged over the step's calls) and log_extra(column, values) (a
column of the step's logged samples). Conversational prompts come with completions as one assistant message each;
an `async def` function is awaited. It returns one number per completion, or None where it does not apply.

A completion's score from the functions is the sum, over the functions that apply to it, of weight x value (TRL's
nansum); one that no function applies to is unscorable, NaN in `combined` and False in `scorable`. A value that is
NaN or inf, a string, or the wrong count is the function's error, named with the function and the completion.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Real

import torch
from transformers import TrainerState

from hybrid_engine.rlhf.data import REWARD_EXTRAS
from hybrid_engine.rlhf.reward_fn import RewardTimeout, call_with_timeout, load_reward_fn, takes


@dataclass(frozen=True)
class RewardFunctions:
    """A run's reward functions, their names (unique: TRL's reward_func_names, a repeated name numbered) and
    weights."""

    fns: tuple[Callable, ...]
    names: tuple[str, ...]
    weights: tuple[float, ...]

    @classmethod
    def load(cls, specs, weights: Sequence[float] | None = None) -> RewardFunctions | None:
        """The functions of `specs` (None; one "module:function", "file.py:function", dotted path or callable; or a
        list of them) with `weights`, one each (None: 1.0 each); None for no function."""
        if specs is None or (isinstance(specs, (list, tuple)) and not specs):
            return None
        fns = tuple(load_reward_fn(s) for s in (specs if isinstance(specs, (list, tuple)) else [specs]))
        if weights is None:
            weights = (1.0,) * len(fns)
        if len(weights) != len(fns):
            raise ValueError(f"reward_weights gives {len(weights)} weights for {len(fns)} reward functions "
                             f"({', '.join(unique_names(fns))}): give one weight per function")
        return cls(fns=fns, names=unique_names(fns), weights=tuple(float(w) for w in weights))


def unique_names(fns: Sequence[Callable]) -> tuple[str, ...]:
    """Each function's __name__, a name that repeats numbered from its second use (score, score_2)."""
    names: list[str] = []
    for fn in fns:
        base = getattr(fn, "__name__", type(fn).__name__)
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return tuple(names)


@dataclass
class StepLog:
    """What the functions of one batch logged through log_metric and log_extra."""

    metrics: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list] = field(default_factory=dict)

    def log_metric(self, name: str, value: float) -> None:
        self.metrics.setdefault(str(name), []).append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        self.extra.setdefault(str(column), []).extend(values)

    def means(self) -> dict[str, float]:
        return {name: sum(v) / len(v) for name, v in self.metrics.items()}


@dataclass
class FunctionScores:
    """The functions' values for a batch of B completions."""

    values: torch.Tensor  # (B, F) fp64, NaN where a function returned None
    applies: torch.Tensor  # (B, F) bool: the function returned a number
    weights: tuple[float, ...]
    names: tuple[str, ...]
    log: StepLog

    @property
    def scorable(self) -> torch.Tensor:
        """(B,) bool: some function applies to the completion."""
        return self.applies.any(1)

    @property
    def combined(self) -> torch.Tensor:
        """(B,) fp64: the weighted sum over the functions that apply; NaN where none does."""
        w = torch.tensor(self.weights, dtype=torch.float64)
        total = torch.where(self.applies, self.values * w, 0.0).sum(1)
        return torch.where(self.scorable, total, math.nan)

    @staticmethod
    def cat(parts: list[FunctionScores]) -> FunctionScores:
        """The scores of several batches as one (the first batch's logs)."""
        first = parts[0]
        return FunctionScores(values=torch.cat([p.values for p in parts]),
                              applies=torch.cat([p.applies for p in parts]), weights=first.weights, names=first.names,
                              log=first.log)

    def means(self) -> dict[str, float]:
        """Each function's mean over the completions it applies to (NaN where it applies to none)."""
        out = {}
        for j, name in enumerate(self.names):
            hit = self.values[self.applies[:, j], j]
            out[name] = float(hit.mean()) if hit.numel() else math.nan
        return out


def trainer_state(step: int, max_steps: int, steps_per_epoch: int) -> TrainerState:
    """The TrainerState a TRL reward function reads: the optimizer steps done before this batch, of `max_steps`."""
    return TrainerState(global_step=step, max_steps=max_steps, epoch=step / max(steps_per_epoch, 1),
                        num_train_epochs=math.ceil(max_steps / max(steps_per_epoch, 1)))


def call_functions(funcs: RewardFunctions, prompts: list, completions: list[str], fields: dict[str, list],
                   ids: list[list[int]] | None = None, state: TrainerState | None = None,
                   timeout: float | None = None, nonfinite: str = "stop") -> FunctionScores:
    """Every function of `funcs` on the batch (module docstring), in turn."""
    if prompts and isinstance(prompts[0], list):  # conversational: each completion one assistant message
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    log = StepLog()
    offered = dict(zip(REWARD_EXTRAS, (ids, state, log.log_metric, log.log_extra)))
    columns = []
    for fn, name in zip(funcs.fns, funcs.names):
        extras = {k: v for k, v in offered.items() if v is not None and takes(fn, k)}
        columns.append(call_one(fn, name, dict(prompts=prompts, completions=completions, **extras, **fields),
                                len(completions), timeout, nonfinite, prompts))
    applies = torch.tensor([[v is not None for v in row] for row in zip(*columns)], dtype=torch.bool)
    values = torch.tensor([[math.nan if v is None else v for v in row] for row in zip(*columns)], dtype=torch.float64)
    return FunctionScores(values=values.reshape(len(completions), len(columns)),
                          applies=applies.reshape(len(completions), len(columns)), weights=funcs.weights,
                          names=funcs.names, log=log)


def call_one(fn: Callable, name: str, kwargs: dict, n: int, timeout: float | None, nonfinite: str,
             prompts: list) -> list[float | None]:
    """fn(**kwargs) checked to be n numbers or None. A call that has not returned after `timeout` seconds raises
    RewardTimeout (nonfinite "stop") or, with a warning, gives NaN for every completion ("skip"): numbers that are not
    finite, so that the step's update is skipped."""
    try:
        out = call_with_timeout(fn, timeout, kwargs)
    except RewardTimeout as e:
        if nonfinite == "stop":
            raise
        warnings.warn(f"{e}: its values are NaN for this batch (nonfinite='skip')", RuntimeWarning, stacklevel=2)
        return [math.nan] * n
    return _numbers(out, name, n, prompts)


def _numbers(out, name: str, n: int, prompts: list) -> list[float | None]:
    """The function's output as n floats or None, or a one-line ValueError naming the function and the completion."""
    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
        raise ValueError(f"reward function {name}: must return a list of one number (or None) per completion, got "
                         f"{type(out).__name__} {out!r:.80}")
    if len(out) != n:
        raise ValueError(f"reward function {name}: returned {len(out)} values for {n} completions")
    values = []
    for i, v in enumerate(out):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if v is not None and not isinstance(v, Real):
            raise ValueError(f"reward function {name}: completion {i} (prompt {_short(prompts[i])}) got "
                             f"{type(v).__name__} {v!r:.60}, not a number or None")
        values.append(None if v is None else float(v))
    return values


def _short(prompt) -> str:
    text = prompt if isinstance(prompt, str) else str(prompt[-1].get("content", "")) if prompt else ""
    return repr(text if len(text) <= 40 else text[:37] + "...")


def first_bad(scores: FunctionScores, prompts: list) -> str | None:
    """Which function gave which completion a value that is not finite, in words; None when all are finite."""
    bad = scores.applies & ~torch.isfinite(scores.values)
    if not bad.any():
        return None
    i, j = (int(x) for x in bad.nonzero()[0])
    return (f"reward function {scores.names[j]} returned {float(scores.values[i, j])} for completion {i} (prompt "
            f"{_short(prompts[i])})")


def first_unscorable(scores: FunctionScores, prompts: list) -> str | None:
    """The first completion that no function applies to, in words; None when there is none."""
    if scores.scorable.all():
        return None
    i = int((~scores.scorable).nonzero()[0])
    return f"no reward function applies to completion {i} (prompt {_short(prompts[i])}): each returned None"
