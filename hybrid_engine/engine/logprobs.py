"""Training-mode log-probabilities of given tokens through the fused token_logprobs op.

The HF model runs its own forward (so DeepSpeed's ZeRO-3 hooks, peft's layers and gradient
checkpointing all act as in training), but its LM head computes token_logprobs on the final hidden
states instead of [B, T, V] logits: the head's forward is swapped for the duration of one call.

Rows that share their prompt with their neighbours (GRPO's and RLOO's samples of one prompt) run it once: the
prompt's columns once per run of such rows, their KV cache gathered to every row of the run, then each row's
response on that cache (the same arithmetic as one pass, less the repeated prompts').

With return_entropy, the entropy of the policy at every scored position comes out beside the log-probs, as an
observation only: the head takes the hidden states its forward already has (no second model forward) and runs the
fused op on the scored rows once more under no_grad, asking for the entropy (the op's blocks over the vocabulary
never hold [N, V] logits). The training op's call is unchanged, so the log-probs and their gradients are the same
to the bit; the price is one more LM-head GEMM over the response rows, without a backward.

A model whose forward transforms its logits after the LM head (Gemma 2's soft-cap, Granite's and Cohere's scales:
transforms_logits) keeps its head: its forward computes the logits of the scored columns, transform included, and
the log-probs and entropy are log_softmax of those (scoring_head), HF's own arithmetic at the memory of [B, R, V]
logits.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch

from hybrid_engine import ops
from hybrid_engine.engine.packing import packing_of
from hybrid_engine.model.prefix import run_firsts, shared_prefix_runs
from hybrid_engine.ops.logprobs import IGNORE_INDEX

LOGIT_TRANSFORMS = ("logits_scaling", "logit_scale", "final_logit_softcapping")
"""Config fields of families whose causal LM transforms its logits beyond the LM head's output (Granite divides,
Cohere multiplies, Gemma 2 and a Gemma 3 that sets it soft-cap): the fused op reads the head alone, so these models'
log-probs are read from the logits of their own forward (transforms_logits)."""


def transforms_logits(config) -> bool:
    """Whether a LOGIT_TRANSFORMS field of `config` is set (not None, not 1): token_logprobs then reads the model's
    own [B, T, V] logits (hf_logits) instead of running the fused op on the LM head."""
    return any(getattr(config, name, None) not in (None, 1) for name in LOGIT_TRANSFORMS)


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


@torch.no_grad()
def scored_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float
                   ) -> torch.Tensor:
    """fp32 [N]: the entropy of softmax(hidden @ weight.T / temperature) at each row whose target (of `targets` [N])
    is not the ignore index, 0 at the others; hidden [N, H], weight [V, H]. Only the scored rows reach the op."""
    rows = (targets != IGNORE_INDEX).nonzero().view(-1)
    out = hidden.new_zeros(targets.shape[0], dtype=torch.float32)
    if rows.numel():
        _, entropy = ops.token_logprobs(hidden[rows], weight, targets[rows], temperature, return_entropy=True)
        out[rows] = entropy.float()
    return out


@contextlib.contextmanager
def head_as_token_logprobs(lm_head: torch.nn.Module, targets: torch.Tensor, temperature: float,
                           entropy: list | None = None):
    """While active, lm_head(hidden [B, T, H]) returns token_logprobs [B, T] of `targets` [B, T]; with an `entropy`
    list, each call also appends scored_entropy's [B, T] of the same hidden states (an observation, no gradient)."""
    if type(lm_head) is not torch.nn.Linear or lm_head.bias is not None:
        raise ValueError("token_logprobs needs a bias-free torch.nn.Linear LM head (LoRA on lm_head is not supported)")

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        B, T, H = hidden.shape
        flat = hidden.reshape(B * T, H)
        weight = lm_head.weight
        if flat.dtype != weight.dtype:  # autocast
            flat = flat.to(weight.dtype)
        if entropy is not None:
            entropy.append(scored_entropy(flat, weight, targets.reshape(-1), temperature).view(B, T))
        return ops.token_logprobs(flat, weight, targets.reshape(-1), temperature).view(B, T)

    lm_head.forward = forward
    try:
        yield
    finally:
        del lm_head.forward


def logits_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                          entropy: list | None = None) -> torch.Tensor:
    """fp32 [B, T], differentiable: log_softmax(logits / temperature) at `targets` [B, T] from a model's own logits
    [B, T, V], 0 where the target is the ignore index; with an `entropy` list, also appends the entropy [B, T] of
    the same distributions (no gradient). Only the scored rows are upcast to fp32."""
    B, T, V = logits.shape
    flat = targets.reshape(-1)
    rows = (flat != IGNORE_INDEX).nonzero().view(-1)
    z = logits.reshape(B * T, V)[rows].float() / temperature  # (N, V)
    lse = torch.logsumexp(z, -1)
    picked = z.gather(1, flat[rows, None])[:, 0] - lse
    out = z.new_zeros(B * T).index_put((rows,), picked)
    if entropy is not None:
        with torch.no_grad():
            entropy.append(z.new_zeros(B * T).index_put((rows,), lse - (z.softmax(-1) * z).sum(-1)).view(B, T))
    return out.view(B, T)


@contextlib.contextmanager
def scoring_head(lm_head: torch.nn.Module, targets: torch.Tensor, temperature: float, entropy: list | None = None,
                 hf_logits: bool = False):
    """Yields `read`: while active, read(forward(...).logits) is token_logprobs [B, T] of `targets` [B, T] (and each
    forward appends its entropy to an `entropy` list, as head_as_token_logprobs). Plain models swap the head for the
    fused op (read returns its output); with hf_logits (transforms_logits) the head is left as it is and read takes
    log_softmax of the model's own logits, which carry its transform."""
    if hf_logits:
        yield lambda logits: logits_token_logprobs(logits, targets, temperature, entropy)
        return
    with head_as_token_logprobs(lm_head, targets, temperature, entropy):
        yield lambda logprobs: logprobs


@contextlib.contextmanager
def head_skipped(lm_head: torch.nn.Module):
    """While active, lm_head(hidden [B, T, H]) returns an empty [B, T, 0]: a pass whose outputs are only its cache."""
    lm_head.forward = lambda hidden: hidden[..., :0]
    try:
        yield
    finally:
        del lm_head.forward


Scored = tuple[torch.Tensor, torch.Tensor | None]
"""(log-probs [B, R], their positions' entropy [B, R] or None): what the passes below return."""


def _columns(logits: torch.Tensor, entropy: list | None, cols: slice) -> Scored:
    """The head's output columns `cols`, and those of the entropy it recorded (None when not asked)."""
    return logits[:, cols], None if entropy is None else entropy[-1][:, cols]


def _shared_prefix_logprobs(forward: Callable, lm_head: torch.nn.Module, score: Callable, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor, start: int, runs: torch.Tensor,
                            entropy: list | None = None) -> Scored | None:
    """token_logprobs' result in two passes: the first start - 1 columns once per run of rows sharing them, their
    KV cache gathered to every row of the run, then the rest of every row on that cache (`score(targets)`: the
    scoring_head of its targets). The same arithmetic as one pass over all rows, less the repeated prefixes'; None
    where the model returned no cache."""
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
    with score(shifted_targets(input_ids, attention_mask, start)[:, cut:]) as read:
        out = forward(input_ids=input_ids[:, cut:], attention_mask=attention_mask, position_ids=pos[:, cut:],
                      cache=cache, use_cache=True)
    return _columns(read(out.logits), entropy, slice(0, T - start))


def _one_pass_logprobs(forward: Callable, score: Callable, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       start: int, entropy: list | None, hf_logits: bool) -> Scored:
    """token_logprobs' result in one pass over all rows; with hf_logits the model computes only the logits of the
    scored columns start - 1 .. T - 1 (HF's logits_to_keep)."""
    T = input_ids.shape[1]
    targets, cols, keep = shifted_targets(input_ids, attention_mask, start), slice(start - 1, T - 1), {}
    if hf_logits:
        targets, cols, keep = targets[:, start - 1:], slice(0, T - start), {"logits_to_keep": T - start + 1}
    with score(targets) as read:
        out = forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                      use_cache=False, **keep)
    return _columns(read(out.logits), entropy, cols)


def _packed_logprobs(forward: Callable, score: Callable, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     start: int, entropy: list | None) -> Scored:
    """token_logprobs' result in one pass over the packed row of the real tokens (engine/packing.py): each row's
    targets stop at its own last token, so no target crosses into the next row."""
    packing, T = packing_of(attention_mask), input_ids.shape[1]
    targets = packing.pack(shifted_targets(input_ids, attention_mask, start))  # (1, N)
    with score(targets) as read:
        out = forward(**packing.kwargs(input_ids))
    logprobs = packing.unpack(read(out.logits))  # (B, T)
    scored = None if entropy is None else [packing.unpack(entropy[-1])]
    return _columns(logprobs, scored, slice(start - 1, T - 1))


def token_logprobs(
    forward: Callable, lm_head: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
    temperature: float = 1.0, share_prefix: bool = True, return_entropy: bool = False, hf_logits: bool = False,
    packed: bool = False, agree: Callable[[bool], bool] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 [B, T - start]: log p(input_ids[:, t] | input_ids[:, :t]) for t >= start, 0 where the mask is 0; with
    return_entropy, also the fp32 [B, T - start] entropy of the distribution each was drawn from (0 where the mask
    is 0; no gradient).

    `forward(**kwargs)` runs the HF causal LM (the DeepSpeed engine, or the model itself); `lm_head` is that
    model's output projection. With `share_prefix`, neighbouring rows whose first start - 1 columns are the same
    run them once (_shared_prefix_logprobs); not for a model that trains with gradient checkpointing, which keeps no
    cache. `agree(shares)`: whether every rank's rows share their prefixes, given whether this rank's do
    (engine/zero.py's on_every_rank: partitioned ranks must run as many forwards); None: this rank's rows decide.
    `hf_logits` (transforms_logits of the model's config): read the model's own logits of the scored columns
    (scoring_head) instead of the fused op's. `packed`: one forward over the rows' real tokens end to end
    (_packed_logprobs; no prefix sharing), the same log-probs without computing padding."""
    B, T = input_ids.shape
    if not 1 <= start < T:
        raise ValueError(f"start must be in [1, {T}) for input_ids of length {T}, got {start}")
    entropy = [] if return_entropy else None
    score = functools.partial(scoring_head, lm_head, temperature=temperature, entropy=entropy, hf_logits=hf_logits)
    if packed:
        out = _packed_logprobs(forward, score, input_ids, attention_mask, start, entropy)
        return out if return_entropy else out[0]
    runs = shared_prefix_runs(input_ids, attention_mask, start - 1) if share_prefix else None
    if share_prefix and agree is not None and not agree(runs is not None):
        runs = None
    out = None
    if runs is not None:
        out = _shared_prefix_logprobs(forward, lm_head, score, input_ids, attention_mask, start, runs, entropy)
    if out is None:
        out = _one_pass_logprobs(forward, score, input_ids, attention_mask, start, entropy, hf_logits)
    return out if return_entropy else out[0]
