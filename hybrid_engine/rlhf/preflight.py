"""The checks a run makes before any work, from what it knows at the start: each step's config, the model's config,
the tokenizer, the data and the DeepSpeed config. `hybrid-engine train` makes them for all three steps before the
first, so a setting that could only fail in PPO fails before SFT and the reward model have run.

- positions: the longest row a step trains on (SFT: prompt and response; reward: prompt and the longer answer) and
  the longest sequence PPO generates (its longest prompt plus max_new_tokens or eval_max_new_tokens) fit the
  model's positions, counted after tokenization and truncation as the trainers do them (the data is tokenized
  only when the configured bounds alone do not fit);
- vocabulary: every id of the tokenizer is inside the model's vocabulary;
- DeepSpeed's batch arithmetic: train_batch_size = micro batch x gradient accumulation x world size, with the
  step's optimizer batch (batch_size; PPO: train_batch_size) = micro batch x its gradient_accumulation_steps, and
  the rest of training_ds_config's checks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from hybrid_engine.engine.training import load_ds_config
from hybrid_engine.model.spec import spec_from_config
from hybrid_engine.rlhf.data import StepData
from hybrid_engine.rlhf.tokens import tokenize_ppo, tokenize_reward, tokenize_sft
from hybrid_engine.rlhf.trainer import check_vocab, training_ds_config

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")
"""Where a Hugging Face config keeps its positions, for the architectures hybrid_engine.generate does not read."""


def max_positions(model_config) -> int | None:
    """The most tokens (prompt and response) a model of this config takes; None when the config does not say."""
    try:
        return spec_from_config(model_config).max_positions
    except ValueError:  # a family the fast path does not read: its config says
        pass
    for name in POSITION_KEYS:
        if isinstance(getattr(model_config, name, None), int):
            return getattr(model_config, name)
    return None


def _longest_row(step: str, data: StepData, tokenizer, config) -> int:
    """The most tokens of a row of `step` (training and held-out) after tokenization and truncation."""
    rows = [data.train, data.eval]
    if step == "sft":
        return max((len(e["input_ids"]) for r in rows for e in tokenize_sft(r, tokenizer, config.tokens)[0]),
                   default=0)
    if step == "reward":
        return max((max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"]))
                    for r in rows for e in tokenize_reward(r, tokenizer, config.tokens)[0]), default=0)
    return max((len(e["input_ids"]) for r in rows for e in tokenize_ppo(r, tokenizer, config.tokens)[0]), default=0)


def check_positions(step: str, config, data: StepData, tokenizer, positions: int, where: str) -> None:
    """A ValueError when a row or a generated sequence of `step` would not fit `positions`."""
    new = max(config.max_new_tokens, config.eval_max_new_tokens or 0) if step == "ppo" else 0
    bound = config.tokens.max_prompt_len + new if step == "ppo" else config.tokens.max_seq_len
    if bound <= positions:
        return  # nothing the data holds can exceed it
    longest = _longest_row(step, data, tokenizer, config) + new
    if longest > positions:
        what = (f"its longest prompt ({longest - new} tokens) and up to {new} new tokens (max_new_tokens / "
                "eval_max_new_tokens)" if step == "ppo" else f"its longest row ({longest} tokens, after "
                f"truncation to max_seq_len {config.tokens.max_seq_len})")
        raise ValueError(f"{step}: {what} take {longest} positions but {where} has {positions}; lower "
                         + ("max_new_tokens or max_prompt_len" if step == "ppo" else "max_seq_len"))


def world_size() -> int:
    """The number of ranks the run will have: torchrun's and the deepspeed launcher's WORLD_SIZE, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_ds_batch(step: str, ds_config, batch: int, max_grad_norm: float | None, accumulation: int = 1) -> None:
    """training_ds_config's checks, and DeepSpeed's train_batch_size = micro x accumulation x world (the step's
    optimizer batch `batch` on each rank is micro x accumulation), before DeepSpeed makes them at its initialize."""
    if ds_config is None:
        return
    try:
        training_ds_config(ds_config, batch, max_grad_norm, accumulation=accumulation)
        given = load_ds_config(ds_config).get("train_batch_size")
    except ValueError as e:
        raise ValueError(f"{step}: {e}") from None
    world = world_size()
    if given is not None and given != batch * world:
        name = "train_batch_size" if step == "ppo" else "batch_size"
        raise ValueError(f"{step}: ds_config's train_batch_size {given} != micro batch {batch // accumulation} x "
                         f"gradient accumulation {accumulation} ({name} {batch}) x world size {world}; set it to "
                         f"{batch * world} or leave it out")


def check_step(step: str, config, data: StepData, tokenizer, model_configs: Sequence[tuple[str, object]],
               ds_config=None) -> None:
    """Every check of this module for one step; model_configs: (what to call it in errors, its HF config) of each
    model the step runs its rows through (the actor, and for PPO the reward model when it is another)."""
    for where, model_config in model_configs:
        vocab = getattr(model_config, "vocab_size", None)
        if isinstance(vocab, int):
            try:
                check_vocab(tokenizer, vocab)
            except ValueError as e:
                raise ValueError(f"{step}: {where}: {e}") from None
        positions = max_positions(model_config)
        if positions is not None:
            check_positions(step, config, data, tokenizer, positions, where)
    check_ds_batch(step, ds_config, config.train_batch_size if step == "ppo" else config.batch_size,
                   config.max_grad_norm, config.gradient_accumulation_steps)
