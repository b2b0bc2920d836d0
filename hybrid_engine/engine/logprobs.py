"""Training-mode log-probabilities of given tokens through the fused token_logprobs op.

The HF model runs its own forward (so DeepSpeed's ZeRO-3 hooks, peft's layers and gradient
checkpointing all act as in training), but its LM head computes token_logprobs on the final hidden
states instead of [B, T, V] logits: the head's forward is swapped for the duration of one call.

Rows that share their prompt with their neighbours (GRPO's and RLOO's samples of one prompt) run it once: the
prompt's columns once per run of such rows, their KV cache gathered to every row of the run, then each row's
response on that cache (the same arithmetic as one pass, less the repeated prompts').
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from hybrid_engine import ops
from hybrid_engine.model.prefix import run_firsts, shared_prefix_runs
from hybrid_engine.ops.logprobs import IGNORE_INDEX


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded (and right-padded) rows: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def shifted_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
    """targets[b, t] = the token at t + 1 when t + 1 >= start and it is not padding, else the ignore index."""
    B, T = input_ids.shape
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    keep = attention_mask[:, 1:].bool()
    keep[:, : max(start - 1, 0)] = False
    targets[:, :-1] = torch.where(keep, input_ids[:, 1:].long(), IGNORE_INDEX)
    return targets


@contextlib.contextmanager
def head_as_token_logprobs(lm_head: torch.nn.Module, targets: torch.Tensor, temperature: float):
    """While active, lm_head(hidden [B, T, H]) returns token_logprobs [B, T] of `targets` [B, T]."""
    if type(lm_head) is not torch.nn.Linear or lm_head.bias is not None:
        raise ValueError("token_logprobs needs a bias-free torch.nn.Linear LM head (LoRA on lm_head is not supported)")

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        B, T, H = hidden.shape
        flat = hidden.reshape(B * T, H)
        weight = lm_head.weight
        if flat.dtype != weight.dtype:  # autocast
            flat = flat.to(weight.dtype)
        return ops.token_logprobs(flat, weight, targets.reshape(-1), temperature).view(B, T)

    lm_head.forward = forward
    try:
        yield
    finally:
        del lm_head.forward


@contextlib.contextmanager
def head_skipped(lm_head: torch.nn.Module):
    """While active, lm_head(hidden [B, T, H]) returns an empty [B, T, 0]: a pass whose outputs are only its cache."""
    lm_head.forward = lambda hidden: hidden[..., :0]
    try:
        yield
    finally:
        del lm_head.forward


def _shared_prefix_logprobs(forward: Callable, lm_head: torch.nn.Module, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor, start: int, temperature: float,
                            runs: torch.Tensor) -> torch.Tensor | None:
    """token_logprobs' result in two passes: the first start - 1 columns once per run of rows sharing them, their
    KV cache gathered to every row of the run, then the rest of every row on that cache. The same arithmetic as
    one pass over all rows, less the repeated prefixes'; None where the model returned no cache."""
    cut, T = start - 1, input_ids.shape[1]
    firsts = run_firsts(runs)
    pos = positions(attention_mask)
    with head_skipped(lm_head):
        prefix = forward(input_ids=input_ids[firsts, :cut], attention_mask=attention_mask[firsts, :cut],
                         position_ids=pos[firsts, :cut], use_cache=True)
    cache = getattr(prefix, "cache", None) or getattr(prefix, "past_key_values", None)
    if cache is None or cache.get_seq_length() != cut:
        return None
    cache.batch_select_indices(runs)
    targets = shifted_targets(input_ids, attention_mask, start)[:, cut:]
    with head_as_token_logprobs(lm_head, targets, temperature):
        out = forward(input_ids=input_ids[:, cut:], attention_mask=attention_mask, position_ids=pos[:, cut:],
                      cache=cache, use_cache=True)
    return out.logits[:, : T - start]


def token_logprobs(
    forward: Callable, lm_head: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
    temperature: float = 1.0, share_prefix: bool = True,
) -> torch.Tensor:
    """fp32 [B, T - start]: log p(input_ids[:, t] | input_ids[:, :t]) for t >= start, 0 where the mask is 0.

    `forward(**kwargs)` runs the HF causal LM (the DeepSpeed engine, or the model itself); `lm_head` is that
    model's output projection. With `share_prefix`, neighbouring rows whose first start - 1 columns are the same
    run them once (_shared_prefix_logprobs); not for a model that trains with gradient checkpointing, which keeps no
    cache."""
    B, T = input_ids.shape
    if not 1 <= start < T:
        raise ValueError(f"start must be in [1, {T}) for input_ids of length {T}, got {start}")
    runs = shared_prefix_runs(input_ids, attention_mask, start - 1) if share_prefix else None
    if runs is not None:
        out = _shared_prefix_logprobs(forward, lm_head, input_ids, attention_mask, start, temperature, runs)
        if out is not None:
            return out
    targets = shifted_targets(input_ids, attention_mask, start)
    with head_as_token_logprobs(lm_head, targets, temperature):
        out = forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                      use_cache=False)
    return out.logits[:, start - 1 : T - 1]
