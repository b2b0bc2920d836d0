"""TRL's names for our settings and flags: `--learning_rate 1e-5` and a TRL YAML config (its SFTConfig, RewardConfig,
GRPOConfig or RLOOConfig keys) work where the name has a meaning here, under our name; one that has none is refused,
saying why, never ignored.

    learning_rate: 1.0e-5          # = lr
    per_device_train_batch_size: 8 # x gradient_accumulation_steps = batch_size (sft, reward); = train_batch_size
                                   # (ppo: sequences per minibatch): TRL's is the micro-batch, ours the optimizer's
    max_completion_length: 64      # = max_new_tokens
    padding_free: true             # = packing (sft, reward)
    beta: 0.04                     # = kl_coef
    gradient_accumulation_steps: 2 # ours too: micro-batches per optimizer step
    report_to: [wandb, tensorboard] # = report_to (--report-to, trackers.py), as is run_name: TRL's names are ours
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

STEP = {
    "learning_rate": "lr", "per_device_train_batch_size": "batch_size", "per_device_eval_batch_size": "eval_batch_size",
    "num_train_epochs": "epochs", "lr_scheduler_type": "schedule", "eval_steps": "eval_every",
    "save_steps": "checkpoint_every", "save_total_limit": "keep_checkpoints", "max_length": "max_seq_len",
    "padding_free": "packing",
}
"""TRL's (TrainingArguments' and SFTConfig's) name: ours, for the SFT and reward steps. TRL's padding_free (its rows
flattened into one sequence, each attending to itself) is our packing."""
RL = {
    **{k: v for k, v in STEP.items() if k not in ("max_length", "padding_free")},
    "per_device_train_batch_size": "train_batch_size", "max_prompt_length": "max_prompt_len",
    "max_completion_length": "max_new_tokens", "beta": "kl_coef", "epsilon": "clip_range",
    "num_iterations": "ppo_epochs", "bf16": "bf16_autocast",
}
"""TRL's GRPOConfig and RLOOConfig names: ours, for PPO, GRPO and RLOO. TRL's per_device_train_batch_size counts
completions per optimizer step: our train_batch_size; our batch_size counts prompts per rollout (TRL's
generation_batch_size divided by num_generations)."""

FIXED = {
    "steps_per_generation": (1, "each rollout is trained on at once: set batch_size (prompts per rollout) instead"),
    "logging_steps": (1, "every step is logged (metrics.jsonl and the --report-to trackers)"),
}
"""TRL settings whose value is fixed here: (the value we run with, accepted; why another is refused)."""
NO_MEANING = {
    "generation_batch_size": "set batch_size, the prompts per rollout (TRL's generation_batch_size / num_generations)",
    "use_vllm": "generation runs on the hybrid engine itself",
    "warmup_ratio": "give warmup_steps: a number of steps, or a fraction below 1 of the run's steps (transformers 5)",
    "gradient_checkpointing_kwargs": "gradient_checkpointing takes no options here",
    "lr_scheduler_kwargs": "give min_lr_rate and decay_steps",
}
"""TRL settings with no meaning here, and what to do instead."""

RUN = {"model_name_or_path": "model", "dataset_name": "data", "reward_funcs": "reward_fn",
       "reward_model_name_or_path": "reward_model"}
"""TRL's script arguments: our run settings (config file keys and flags)."""
RUN_FLAGS = {**RUN, "output_dir": "output"}
"""TRL's names of our run flags: `--output_dir` is --output (in a config file, output_dir is ours too)."""


MICRO_BATCH = "per_device_train_batch_size"
"""TRL's micro-batch: its optimizer step takes gradient_accumulation_steps of them, where our batch_size (PPO:
train_batch_size) counts the optimizer step's rows; given under TRL's name, it is multiplied (micro_batch_keys)."""


def micro_batch_keys(mapping: Mapping) -> dict:
    """`mapping` (a config file's keys) with TRL's per_device_train_batch_size times the gradient_accumulation_steps
    given beside it, so that it counts the optimizer step's rows as our batch sizes do."""
    out = dict(mapping)
    accumulation = out.get("gradient_accumulation_steps", out.get("gradient-accumulation-steps", 1))
    for key in (MICRO_BATCH, MICRO_BATCH.replace("_", "-")):
        if key in out and isinstance(out[key], int) and isinstance(accumulation, int):
            out[key] = out[key] * accumulation
    return out


def flags(ours: str) -> list[str]:
    """TRL's spellings of our run flag `ours` ("model": ["--model_name_or_path"])."""
    return ["--" + trl for trl, name in RUN_FLAGS.items() if name == ours]


def aliases(leaves: Iterable[str]) -> dict[str, str]:
    """{TRL name: our name} for a config whose settings are `leaves` (an RL step's when it has num_generations)."""
    leaves = set(leaves)
    names = RL if "num_generations" in leaves else STEP
    return {trl: ours for trl, ours in names.items() if ours in leaves and trl not in leaves}


def refusal(name: str, value: object) -> str | None:
    """Why TRL setting `name` with `value` cannot be taken here; None when it can (an alias or our fixed value), or
    when `name` is none of TRL's names this module knows."""
    if name in FIXED:
        fixed, why = FIXED[name]
        return None if str(value) == str(fixed) else f"{name} {value} (TRL's): {why}"  # a flag's value is text
    if name in NO_MEANING:
        return f"{name} (TRL's) has no meaning here: {NO_MEANING[name]}"
    return None


def take_fixed(mapping: Mapping, where: str) -> dict:
    """`mapping` without TRL's FIXED and NO_MEANING keys: a fixed one at our value is dropped, any other refused."""
    out = {}
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if name in FIXED or name in NO_MEANING:
            why = refusal(name, value)
            if why is not None:
                raise ValueError(f"{where}: {why}")
            continue
        out[key] = value
    return out
