"""StepConfig: the training settings every RLHF step's config shares (SFTConfig, RewardConfig, PPOConfig), and
their checks."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from hybrid_engine.model.dtypes import dtype_name
from hybrid_engine.rlhf.schedule import check_schedule
from hybrid_engine.rlhf.tokens import TokenConfig

NONFINITE = ("skip", "stop")


class NonFiniteError(FloatingPointError):
    """A step's loss (PPO: also its scores or targets) held NaN or inf and config.nonfinite is "stop", or every
    update of a run was skipped for NaN or inf."""


@dataclass
class StepConfig:
    """The training settings steps 1 and 2 share (DeepSpeed-Chat's defaults unless said otherwise); each
    step's config adds its own fields and learning rate."""

    epochs: int | None = None
    """Passes over the training examples (DeepSpeed-Chat's num_train_epochs); None: 1, or, when max_steps is
    given, as many as max_steps needs (the examples cycle). With both given, whichever is reached first stops the
    run, and the result says which (LoopRecord.stop_reason)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps, even mid-epoch; None: after the epochs."""
    batch_size: int = 16
    """Examples (SFT rows, reward pairs) per optimizer step on each rank (DeepSpeed-Chat's
    per_device_train_batch_size)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step: each step's batch is cut into this many, backpropagated one after the other
    (less memory, the same update: each micro-batch's mean loss is scaled by its share of the step's tokens or
    pairs); it must divide the batch (batch_size; PPO: train_batch_size)."""
    packing: bool = False
    """Run each micro-batch padding-free: its rows' tokens end to end in one row, each row's positions from 0 and its
    attention bounded to itself (transformers reads the packed rows from the position ids), log-probs, values and
    rewards read back per row. The same losses and gradients as padded rows (to fp32 rounding), without computing
    the padding; evaluation packs too."""
    max_tokens_per_batch: int | None = None
    """With packing: form each optimizer step's micro-batches (PPO: each minibatch's) by this token budget, the rows
    longest first, each into the first micro-batch it fits in (a reward pair counts both its sequences), instead of
    cutting it into gradient_accumulation_steps equal row counts; the loss is still the whole batch's (token-share
    scaling). A row longer than the budget is an error. Under DeepSpeed the budget may form at most
    gradient_accumulation_steps micro-batches. None: by row count."""
    eval_batch_size: int = 32
    """Examples per forward pass when evaluating."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    warmup_steps: float = 0
    """Steps of warmup, rising from 0 at step 0 to lr (transformers' warmup; "constant" has none); a number below 1 is
    a fraction of the run's steps, rounded up (transformers 5's warmup_steps, TRL's warmup_ratio)."""
    schedule: str = "linear"
    """The learning rate's schedule, by transformers' name (get_scheduler): "linear" decay towards 0 at the last
    step, "cosine" (DeepSpeed-Chat's), "cosine_with_restarts", "constant", "constant_with_warmup", "inverse_sqrt",
    "cosine_with_min_lr", "cosine_warmup_with_min_lr" or "warmup_stable_decay" (WSD)."""
    min_lr_rate: float = 0.0
    """Where cosine_with_min_lr, cosine_warmup_with_min_lr and warmup_stable_decay end, as a fraction of lr."""
    decay_steps: int | None = None
    """warmup_stable_decay's final decay, in steps (needed by it, unused by the others)."""
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
    save_adapters_only: bool = False
    """With LoRA, checkpoints keep only the adapters (and their optimizer state), not the frozen weights, which a
    resume takes from the starting model; without LoRA it changes nothing."""
    training_kernels: bool = True
    """Run the training forward and backward through hybrid_engine's fused ops patched into the HF modules
    (RMSNorm, rotary embedding, the gated MLP's activation; Llama, Qwen2, Mistral, Qwen3, OLMo 2,
    SmolLM3, Phi-3); False: HF's own code."""
    nonfinite: str = "skip"
    """NaN or inf in a step's loss (PPO: also in its scores or targets): "skip" the update (counted in the result
    and the summary) or "stop" the run with NonFiniteError. A run whose every update was skipped fails either way,
    without saving its model."""
    keep_freed_memory: bool = True
    """Keep freed memory in the process for the next step instead of giving it back (hybrid_engine.allocator:
    no page faults on each step's large tensors; the resident size stays at its peak); False: malloc's default."""


    INFINITE_OK: ClassVar[tuple[str, ...]] = ("max_grad_norm",)
    """The float settings that may be inf (meaning no limit); every other one must be finite."""

    OPTIMIZER_BATCH: ClassVar[str] = "batch_size"
    """The field that counts the rows of an optimizer step on each rank, which gradient_accumulation_steps divides."""

    def __post_init__(self):
        check_common(self)


def check_common(config) -> None:
    """The checks every step's config shares (its fields epochs, max_steps, batch_size, ...)."""
    check_finite(config)
    positive = {"batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in ("epochs", "max_steps"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if not isinstance(config.seed, int) or isinstance(config.seed, bool) or not 0 <= config.seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {config.seed!r}")
    if not isinstance(config.keep_checkpoints, int) or config.keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints must be a positive integer, got {config.keep_checkpoints!r}")
    config.warmup_steps = _warmup(config.warmup_steps)
    for name in ("eval_every", "checkpoint_every"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if not config.lr > 0:
        raise ValueError(f"lr must be positive, got {config.lr!r}")
    if config.weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {config.weight_decay!r}")
    if config.max_grad_norm is not None and not config.max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive or None (no clipping), got {config.max_grad_norm!r}")
    if not 0 <= config.min_lr_rate <= 1:
        raise ValueError(f"min_lr_rate must be in [0, 1], got {config.min_lr_rate!r}")
    if config.decay_steps is not None and (not isinstance(config.decay_steps, int) or config.decay_steps < 1):
        raise ValueError(f"decay_steps must be a positive integer or None, got {config.decay_steps!r}")
    check_schedule(config.schedule, config.warmup_steps, config.decay_steps)
    check_packing(config.packing, config.max_tokens_per_batch)
    batch = config.OPTIMIZER_BATCH
    check_accumulation(config.gradient_accumulation_steps, getattr(config, batch), batch)
    if config.nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be 'skip' or 'stop', got {config.nonfinite!r}")


def check_accumulation(steps, batch, batch_name: str) -> None:
    """Refuses an accumulation that is not a positive integer or does not divide the optimizer batch `batch` (checked
    only when `batch` is a positive integer: its own check says what is wrong with it)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be a positive integer, got {steps!r}")
    if isinstance(batch, int) and batch > 0 and batch % steps:
        raise ValueError(f"gradient_accumulation_steps {steps} must divide {batch_name} {batch} (the rows of an "
                         f"optimizer step on each rank, cut into {steps} micro-batches)")


def check_packing(packing, budget) -> None:
    """Refuses a token budget that is not a positive integer or None, or one without packing."""
    if not isinstance(packing, bool):
        raise ValueError(f"packing must be true or false, got {packing!r}")
    if budget is None:
        return
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"max_tokens_per_batch must be a positive integer or None, got {budget!r}")
    if not packing:
        raise ValueError(f"max_tokens_per_batch {budget} needs packing: set packing to true")


def check_finite(config) -> None:
    """Refuses a NaN in any float setting of `config`, and inf in any but those of config.INFINITE_OK."""
    allowed = getattr(config, "INFINITE_OK", ())
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value) and not (math.isinf(value) and f.name in allowed):
            raise ValueError(f"{f.name} must be a finite number, got {value!r}")


def _warmup(value) -> int | float:
    """warmup_steps checked: a whole number of steps (as an int), or a fraction in [0, 1) of the run's steps."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    if not ok or (value >= 1 and value != int(value)):
        raise ValueError(f"warmup_steps must be a whole number of steps, or a fraction in [0, 1) of the run's steps, "
                         f"got {value!r}")
    return int(value) if value >= 1 or value == 0 else float(value)


def _json_ready(pairs: list[tuple[str, object]]) -> dict:
    return {k: dtype_name(v) if isinstance(v, torch.dtype) else v for k, v in pairs}


def config_dict(config) -> dict:
    """A step config as a JSON-ready dict: nested dataclasses as dicts, dtypes by their names ("bf16")."""
    return dataclasses.asdict(config, dict_factory=_json_ready)
