"""What the SFT and reward trainers share: the seeded batch order, the learning-rate schedule, the
DeepSpeed config they train under, and the progress bar."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from hybrid_engine.engine.training import load_ds_config
from hybrid_engine.rlhf.tokens import TokenConfig

SCHEDULES = ("constant", "linear")


def rank_and_world() -> tuple[int, int]:
    """(this rank, the world size); (0, 1) without torch.distributed."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


@dataclass
class StepConfig:
    """The training settings steps 1 and 2 share (DeepSpeed-Chat's defaults unless said otherwise); each
    step's config adds its own fields and learning rate."""

    epochs: int = 1
    """Passes over the training examples (DeepSpeed-Chat's num_train_epochs)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps, even mid-epoch; None: all epochs."""
    batch_size: int = 16
    """Examples (SFT rows, reward pairs) per optimizer step on each rank (DeepSpeed-Chat's
    per_device_train_batch_size)."""
    eval_batch_size: int = 32
    """Examples per forward pass when evaluating."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    warmup_steps: int = 0
    """Steps of linear warmup from lr / warmup_steps to lr."""
    schedule: str = "linear"
    """After warmup: "constant", or "linear" decay towards 0 at the last step (DeepSpeed-Chat decays by
    a cosine)."""
    max_grad_norm: float | None = 1.0
    """Clip the gradients' global L2 norm to this (DeepSpeed-Chat's gradient_clipping); None: no clipping."""
    eval_every: int = 0
    """Evaluate on the held-out split every this many steps as well as before and after; 0: only then."""
    seed: int = 1234
    """Seeds the data order and torch's global RNG (LoRA and value-head initialisation, dropout)."""
    tokens: TokenConfig = field(default_factory=TokenConfig)
    """Prompt and sequence lengths, and how prompts are formatted."""
    output_dir: str | None = None
    """Save the trained model and the tokenizer here; None: do not save."""
    checkpoint_every: int = 0
    """Write a checkpoint (weights, optimizer, RNG, data position; safetensors and JSON) to
    output_dir/checkpoints every this many steps, to resume from; 0: none."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    training_kernels: bool = True
    """Run the training forward and backward through hybrid_engine's fused ops patched into the HF modules
    (RMSNorm, rotary embedding, the gated MLP's activation; Llama, Qwen2, Mistral); False: HF's own code."""
    keep_freed_memory: bool = True
    """Keep freed memory in the process for the next step instead of giving it back (hybrid_engine.allocator:
    no page faults on each step's large tensors; the resident size stays at its peak); False: malloc's default."""

    def __post_init__(self):
        check_common(self)


def prepare_training(model: torch.nn.Module, config) -> torch.nn.Module:
    """`model` with the training kernels patched in when config.training_kernels (engine/train_kernels.py), and
    the allocator keeping freed memory when config.keep_freed_memory (hybrid_engine/allocator.py)."""
    if config.keep_freed_memory:
        from hybrid_engine.allocator import keep_freed_memory

        keep_freed_memory()
    if config.training_kernels:
        from hybrid_engine.engine.train_kernels import apply_training_kernels

        apply_training_kernels(model)
    return model


def check_common(config) -> None:
    """The checks every step's config shares (its fields epochs, max_steps, batch_size, ...)."""
    positive = {"epochs": config.epochs, "batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if config.max_steps is not None and (not isinstance(config.max_steps, int) or config.max_steps < 1):
        raise ValueError(f"max_steps must be a positive integer or None, got {config.max_steps!r}")
    if not isinstance(config.keep_checkpoints, int) or config.keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints must be a positive integer, got {config.keep_checkpoints!r}")
    for name in ("warmup_steps", "eval_every", "checkpoint_every"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if not config.lr > 0:
        raise ValueError(f"lr must be positive, got {config.lr!r}")
    if config.weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {config.weight_decay!r}")
    if config.max_grad_norm is not None and not config.max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive or None (no clipping), got {config.max_grad_norm!r}")
    if config.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {config.schedule!r}")


def total_steps(batches_per_epoch: int, config) -> int:
    """The optimizer steps of a run: every epoch's batches, or max_steps when that is fewer."""
    steps = batches_per_epoch * config.epochs
    return steps if config.max_steps is None else min(steps, config.max_steps)


def training_ds_config(ds_config, batch_size: int, max_grad_norm: float | None) -> dict | None:
    """The DeepSpeed config a step trains under: `ds_config` (dict or JSON path) with its micro batch set to
    batch_size and its gradient clipping to max_grad_norm. A ds_config that says otherwise, accumulates
    gradients or brings its own scheduler (the step's config owns the schedule) is refused."""
    if ds_config is None:
        return None
    config = load_ds_config(ds_config)  # checks the file and the ZeRO stage, copies
    given = ds_config if isinstance(ds_config, dict) else json.loads(Path(os.fspath(ds_config)).read_text())
    clip = 0.0 if max_grad_norm is None else float(max_grad_norm)
    wanted = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
              "gradient_clipping": clip}
    for key, value in wanted.items():
        if key in given and given[key] != value:
            raise ValueError(f"ds_config[{key!r}] is {given[key]!r} but the config says {value!r}: set it in the "
                             "step's config (batch_size, max_grad_norm; no gradient accumulation) and leave it out")
    if "scheduler" in given:
        raise ValueError("ds_config['scheduler']: the learning-rate schedule is the step config's (lr, warmup_steps, "
                         "schedule); remove the scheduler")
    config.update(wanted)
    return config


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over `total` steps, shown on rank 0 only, and not at all unless `enabled`."""
    return tqdm(total=total, desc=desc, disable=not enabled or rank_and_world()[0] != 0, dynamic_ncols=True)


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


def clip_gradients(module: torch.nn.Module, zero_stage: int | None, max_grad_norm: float | None) -> None:
    """Clips the global gradient norm of `module` in plain torch; DeepSpeed (zero_stage not None) clips inside
    its own step, by its gradient_clipping."""
    if max_grad_norm is not None and zero_stage is None:
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_grad_norm)


@dataclass
class LoopRecord:
    """What train_loop ran."""

    losses: list[float]
    """Every step's training loss."""
    evals: list[tuple[int, Any]]
    """(step, what evaluate returned) before training, every eval_every steps and after the last step."""
    steps: int
    """Optimizer steps taken."""
    train_s: float
    """Seconds in train_step calls."""


def train_loop(num_rows: int, config, optimizer, train_step: Callable[[list[int]], float],
               evaluate: Callable[[], Any], desc: str, progress: bool,
               show: Callable[[Any], dict] | None = None, trained=None, eval_type: type | None = None,
               resume: bool | str = False) -> LoopRecord:
    """The epochs of one step's training: for each of this rank's seeded batches (batch_order), set the
    scheduled learning rate on `optimizer`, then `train_step(row indices) -> loss` (forward, backward,
    clipping, optimizer step); `evaluate()` before, every config.eval_every steps and after. `show` turns an
    evaluation into progress-bar fields. `config` has the fields of check_common.

    trained: the (name, module, optimizer) list a checkpoint holds (checkpoint.Trained); with it, a
    checkpoint is written every config.checkpoint_every steps, and resume (True: the newest under
    config.output_dir, or a folder) continues one, to the bit. eval_type rebuilds a saved evaluation."""
    from hybrid_engine.rlhf import checkpoint

    rank, world = rank_and_world()
    total = total_steps(len(batch_order(num_rows, config.batch_size, config.seed, 0, rank, world)), config)
    if total < 1:
        raise ValueError(f"{num_rows} training rows make no batch of {config.batch_size} per rank on {world} ranks")
    record = LoopRecord(losses=[], evals=[], steps=0, train_s=0.0)
    if resume:
        _restore(checkpoint, config, trained, record, eval_type, resume)
    bar = progress_bar(total, desc, progress)
    bar.update(record.steps)

    def run_eval() -> None:
        result = evaluate()
        record.evals.append((record.steps, result))
        if result is not None and show is not None and record.losses:
            bar.set_postfix(loss=f"{record.losses[-1]:.3f}", **show(result))

    if not record.evals:
        run_eval()
    seen = 0
    for epoch in range(config.epochs):
        for rows in batch_order(num_rows, config.batch_size, config.seed, epoch, rank, world):
            seen += 1
            if seen <= record.steps:  # run before the checkpoint this run resumed from
                continue
            if record.steps == total:
                break
            set_lr(optimizer, config.lr * lr_scale(record.steps, total, config.warmup_steps, config.schedule))
            t0 = time.perf_counter()
            record.losses.append(train_step(rows))
            record.train_s += time.perf_counter() - t0
            record.steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{record.losses[-1]:.3f}")
            if config.eval_every and record.steps % config.eval_every == 0 and record.steps < total:
                run_eval()
            if trained and config.checkpoint_every and record.steps % config.checkpoint_every == 0 \
                    and record.steps < total:
                _save(checkpoint, config, trained, record)
    run_eval()
    bar.close()
    return record


def as_json(value):
    """A dataclass as its dict (for json.dumps); anything else as it is."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def evals_json(evals: list) -> list:
    """[(step, evaluation)] with every evaluation (a float, a dataclass or None) ready for json.dumps."""
    return [[step, as_json(e)] for step, e in evals]


def _save(checkpoint, config, trained, record: LoopRecord) -> None:
    tensors, optim_meta = checkpoint.training_tensors(trained)
    state = {"config": checkpoint.config_json(config), "optimizers": optim_meta, "losses": record.losses,
             "evals": evals_json(record.evals), "train_s": record.train_s}
    checkpoint.save_checkpoint(config.output_dir, record.steps, tensors, state, config.keep_checkpoints)


def _restore(checkpoint, config, trained, record: LoopRecord, eval_type, resume) -> None:
    if not trained:
        raise ValueError("resume needs the trained models (train_loop's `trained`)")
    tensors, state = checkpoint.load_checkpoint(checkpoint.resume_path(config, resume))
    checkpoint.check_same_config(state["config"], config)
    checkpoint.restore_training(trained, tensors, state["optimizers"])
    record.losses, record.train_s, record.steps = state["losses"], state["train_s"], state["step"]
    record.evals = [(step, eval_type(**e) if eval_type is not None and e is not None else e)
                    for step, e in state["evals"]]
