"""Argument checks for generate() and its other callers (the hybrid engine, a patched HF generate).

Every check raises ValueError naming the offending argument, before any work starts; the one check
made during generation, check_finite_logits, raises NonFiniteLogitsError (a FloatingPointError).
"""

from __future__ import annotations

import itertools
import math
from numbers import Integral, Real
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hybrid_engine.model.spec import ModelSpec

PROMPT_DTYPES = (torch.int32, torch.int64)


class NonFiniteLogitsError(FloatingPointError):
    """The model produced NaN or inf logits: raised instead of sampling from them."""


def is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def check_model(model) -> None:
    """model: a Hugging Face causal LM (a torch.nn.Module with a config), its weights loaded (none on the meta
    device). Its architecture is spec_from_config's to check."""
    if not isinstance(model, torch.nn.Module) or getattr(model, "config", None) is None:
        raise ValueError(f"model must be a Hugging Face causal LM (an AutoModelForCausalLM, e.g. from_pretrained), "
                         f"got {type(model).__name__}")
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    meta = next((name for name, t in tensors if t.is_meta), None)
    if meta is not None:
        raise ValueError(f"model has tensors on the meta device (e.g. {meta}), without values to generate from: load "
                         "its weights first (from_pretrained, or to_empty() then load_state_dict)")


def check_token_id(name: str, value, vocab_size: int) -> None:
    if not is_int(value):
        raise ValueError(f"{name} must be an int token id, got {value!r}")
    if not 0 <= value < vocab_size:
        raise ValueError(f"{name}={value} is outside the vocabulary [0, {vocab_size})")


def check_sampling(do_sample: bool, temperature: float, top_k: int, top_p: float) -> None:
    """The sampling settings, as SamplingParams holds them."""
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be a bool, got {do_sample!r}")
    # Greedy decoding ignores temperature for the choice, but logprobs are taken under it.
    if not isinstance(temperature, Real) or not (0 < temperature < math.inf):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no top-k filter), got {top_k!r}")
    if not isinstance(top_p, Real) or not (0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] (1: no nucleus filter), got {top_p!r}")


def _check_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """input_ids: [B, T] int32/int64, B, T >= 1, every id (padding included) in [0, vocab_size)."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in PROMPT_DTYPES:
        raise ValueError(f"input_ids must be an integer tensor (torch.int64 or torch.int32), got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have at least one row and one column, got shape {tuple(input_ids.shape)}")
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bad.any():
        row, col = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"input_ids row {row} has token id {int(input_ids[row, col])} (column {col}), outside the "
            f"vocabulary [0, {vocab_size}); padding positions must hold valid ids too"
        )


def _check_mask_values(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> None:
    """attention_mask: bool or integer, input_ids' shape and device, only 0/1."""
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise ValueError(f"attention_mask must be an integer or bool tensor, got {attention_mask.dtype}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask is on {attention_mask.device}, input_ids on {input_ids.device}")
    if attention_mask.dtype != torch.bool:
        bad = (attention_mask != 0) & (attention_mask != 1)
        if bad.any():
            values = sorted(set(attention_mask[bad].tolist()))[:5]
            raise ValueError(f"attention_mask must hold only 0 and 1, got {values}")


def check_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int) -> None:
    """Left-padded prompts: input_ids [B, T] int32/int64, attention_mask [B, T] 0/1 (None: no padding)."""
    _check_ids(input_ids, vocab_size)
    if attention_mask is None:
        return
    _check_mask_values(attention_mask, input_ids)
    mask = attention_mask.long()
    lengths = mask.sum(1)
    if (lengths == 0).any():
        raise ValueError(f"attention_mask rows {torch.nonzero(lengths == 0)[:, 0].tolist()} are empty (all padding)")
    # Left padding: each row is 0...0 1...1, i.e. non-decreasing along the sequence.
    bad = (mask[:, 1:] < mask[:, :-1]).any(1)
    if bad.any():
        raise ValueError(
            f"attention_mask rows {torch.nonzero(bad)[:, 0].tolist()} are not left-padded: padding must come "
            "first (tokenizer.padding_side = 'left') and the prompt must be contiguous"
        )


def check_fits(spec: ModelSpec, prompt_length: int, max_new_tokens: int) -> None:
    """The longest prompt plus max_new_tokens fits the model's positions (and sliding window); dynamic NTK RoPE
    rescales beyond them, as in HF."""
    longest = prompt_length + max_new_tokens
    if longest > spec.max_positions and spec.dynamic_rope != "dynamic":
        raise ValueError(
            f"a prompt of {prompt_length} tokens plus max_new_tokens={max_new_tokens} needs "
            f"{longest} positions; the model has {spec.max_positions}. Shorten the prompt or "
            "max_new_tokens."
        )
    if spec.sliding_window is not None and longest > spec.sliding_window:
        raise ValueError(
            f"sequences of {longest} tokens exceed the model's sliding_window={spec.sliding_window}, "
            "which this release does not implement"
        )


def check_finite_logits(logits: torch.Tensor, step: int, rows: torch.Tensor | None = None) -> None:
    """logits [B, V]; rows [B]: the batch row of each logits row (None: the identity). Step 0 is the prefill.

    One aminmax per call (NaN propagates to both, an infinity shows in one): a single read of the logits, where
    isfinite().all() wrote a [B, V] mask first (1 ms of a 45 ms fp32 decode step at batch 16 on a Zen 4). The details
    are worked out only when it fails.
    """
    if logits.numel() == 0:
        return
    low, high = torch.aminmax(logits)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return
    rows = torch.arange(logits.shape[0]) if rows is None else rows.cpu()
    nan = torch.isnan(logits).any(1).cpu()
    inf = torch.isinf(logits).any(1).cpu()
    kinds = [f"{name} in rows {rows[hit].tolist()}" for name, hit in (("NaN", nan), ("inf", inf)) if hit.any()]
    raise NonFiniteLogitsError(
        f"non-finite logits at step {step} ({'prefill' if step == 0 else 'decode'}) in batch rows "
        f"{rows[nan | inf].tolist()} ({', '.join(kinds)}): the model's weights or activations hold NaN or inf; "
        "check the checkpoint"
    )
