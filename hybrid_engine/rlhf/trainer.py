"""What the three trainers (SFT, the reward model, PPO's actor and critic) share around their models: the DeepSpeed
config they train under, the model made ready for training, the tokenizer checks, one optimizer step, and eval
mode for a while."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from hybrid_engine.allocator import keep_freed_memory
from hybrid_engine.engine.train_kernels import apply_training_kernels
from hybrid_engine.engine.training import load_ds_config
from hybrid_engine.rlhf.accumulate import accumulated_step
from hybrid_engine.rlhf.step_config import NonFiniteError


def prepare_training(model: torch.nn.Module, config) -> torch.nn.Module:
    """`model` with the training kernels patched in when config.training_kernels (engine/train_kernels.py), and
    the allocator keeping freed memory when config.keep_freed_memory (hybrid_engine/allocator.py)."""
    if config.keep_freed_memory:
        keep_freed_memory()
    if config.training_kernels:
        apply_training_kernels(model)
    return model


def disable_dropout(model: torch.nn.Module) -> int:
    """Sets every dropout probability of `model` to 0, as TRL's disable_dropout does for RL (a training forward
    then computes the log-probs generation sampled from): its nn.Dropout modules and the attention dropout rates
    HF attention modules keep as a float. A LoRA adapter's own dropout (peft's lora_dropout, asked for with it) is
    left alone. Returns how many were non-zero."""
    changed = 0
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(module, torch.nn.Dropout):
            changed += module.p != 0
            module.p = 0.0
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float):
            changed += rate != 0
            module.attention_dropout = 0.0
    return changed


def training_ds_config(ds_config, batch_size: int, max_grad_norm: float | None, lr: float | None = None,
                       accumulation: int = 1) -> dict | None:
    """The DeepSpeed config a step trains under: `ds_config` (dict or JSON path) with its micro batch set to
    batch_size / accumulation, its gradient_accumulation_steps to `accumulation` (batch_size rows per optimizer step
    on each rank, in that many micro-batches: accumulate.py), its gradient clipping to max_grad_norm and, when it
    brings an optimizer and `lr` is given, that optimizer's lr to `lr` (optimizer_lr). A ds_config that says
    otherwise about these or brings its own scheduler (the step's config owns the schedule) is refused."""
    if ds_config is None:
        return None
    config = load_ds_config(ds_config)  # checks the file and the ZeRO stage, copies
    given = ds_config if isinstance(ds_config, dict) else json.loads(Path(os.fspath(ds_config)).read_text())
    clip = 0.0 if max_grad_norm is None else float(max_grad_norm)
    wanted = {"train_micro_batch_size_per_gpu": batch_size // accumulation, "gradient_accumulation_steps": accumulation,
              "gradient_clipping": clip}
    for key, value in wanted.items():
        if key in given and given[key] != value:
            raise ValueError(f"ds_config[{key!r}] is {given[key]!r} but the config says {value!r}: set it in the "
                             "step's config (batch_size, gradient_accumulation_steps, max_grad_norm) and leave it out")
    if "scheduler" in given:
        raise ValueError("ds_config['scheduler']: the learning-rate schedule is the step config's (lr, warmup_steps, "
                         "schedule); remove the scheduler")
    config.update(wanted)
    return config if lr is None else optimizer_lr(config, lr)


def optimizer_lr(ds_config: dict | None, lr: float) -> dict | None:
    """A copy of `ds_config` (None for None) whose optimizer, when it brings one, has optimizer.params.lr = lr:
    the step config's lr is the peak the schedule scales every step (loop.train_loop), so the optimizer DeepSpeed
    builds starts from it too. The command line takes a ds_config's lr into the step config unless the lr is given
    (commands/ds_lr.py)."""
    if ds_config is None:
        return None
    config = json.loads(json.dumps(ds_config))
    if "optimizer" in config:
        config["optimizer"].setdefault("params", {})["lr"] = lr
    return config


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id; a clear error when it has none (batches are padded with it)."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token: set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
    return pad_id


def check_vocab(tokenizer, vocab_size: int) -> None:
    """Refuses a tokenizer whose ids do not all fit the model's vocabulary."""
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {vocab_size}")


def finite_step(trainer, module: torch.nn.Module, losses: Sequence[Callable[[], torch.Tensor]],
                weights: Sequence[float], config, what: str, step: int) -> float:
    """accumulate.accumulated_step over a step's micro-batches (config.gradient_accumulation_steps of them) when
    every micro-batch's loss is finite on every rank; otherwise nothing is stepped and NaN comes back
    (config.nonfinite "skip", counted by skipped()), or NonFiniteError is raised ("stop"). `what` and `step`
    (1-based) name the step in the error."""
    loss = accumulated_step(trainer, module, losses, weights, config.gradient_accumulation_steps,
                            config.max_grad_norm)
    if math.isfinite(loss):
        return loss
    if config.nonfinite == "stop":
        raise NonFiniteError(f"{what} step {step}: the loss is {loss}; nothing was trained on it. Set "
                             "nonfinite='skip' to skip such updates and go on")
    return loss


def skipped(losses: list[float]) -> int:
    """How many of a run's steps finite_step skipped: those whose loss is NaN or inf."""
    return sum(not math.isfinite(loss) for loss in losses)


def check_trained(what: str, steps: int, skipped_steps: int, output_dir: str | None) -> None:
    """Refuses a run whose every update was skipped for NaN or inf: its model is not saved as if it trained."""
    if steps and skipped_steps == steps:
        where = f"; nothing was saved to {output_dir}" if output_dir is not None else ""
        raise NonFiniteError(f"{what}: the update of every one of its {steps} steps was skipped for NaN or inf (does "
                             f"the input model hold NaN or inf? is the learning rate too high?){where}")


@contextlib.contextmanager
def eval_mode(model):
    """`model` (an nn.Module, a HybridEngine or a trainer) in eval mode inside the block, back in the mode it was in
    after it, even on an exception."""
    was_training = getattr(model, "module", model).training
    model.train(False)
    try:
        yield model
    finally:
        model.train(was_training)
