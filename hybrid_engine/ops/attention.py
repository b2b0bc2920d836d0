"""attention: decode attention against a KV cache and causal prefill attention over left-padded prompts.

decode_attention: one new query token per sequence attends to the first seq_lens[b] positions of its
(compacted) KV cache. prefill_attention: causal self-attention over a left-padded prompt batch,
sequence b occupying positions [T - seq_lens[b], T); padded query rows are zero. Both handle
grouped-query attention with the Hugging Face repeat_kv convention (query head h reads kv head
h // (Hq // Hkv)), fp32, bf16 and fp16 inputs, fp32 accumulation, and return q's dtype.

Inference only: neither op has a backward (generation never differentiates through attention).

Measurements (2-core Xeon Sapphire Rapids with AMX, torch 2.13, other jobs sharing the cores, so
+-30%; bench/bench_attention.py re-measures):

- decode, B=16, Hq=16, D=128, context ~512 (T_max 576): the op reads each cached row once per
  KV group; the eager reference repeats kv heads and upcasts bf16 caches, 6-150x slower, except
  for fp32 with Hkv = Hq, where the reference is two batched matrix-vector products that also
  stream K and V once (plus the unused T_max - L slots). Both are then at the memory limit, and
  the ratio stays near 1.4-1.7x (3.7 ms vs 5.0 ms on a quiet machine): torch is already close to
  the memory bound there.
- prefill, B=4, T=512, Hq=16, Hkv=4, D=128, lengths 400-512, against torch's
  scaled_dot_product_attention with the explicit boolean mask: fp32 16.2 ms (ours) vs 37.8 ms
  (SDPA); fp16 83 ms vs 111 ms; bf16 15.7 ms vs 8.2 ms. SDPA computes all B*T^2 positions but runs
  bf16 GEMMs on AMX tiles about 4x faster than our fp32-FMA tiles, which compute only the causal,
  unpadded sum(L^2)/2. So the CPU op hands bf16 to at::scaled_dot_product_attention (mask built
  in the op, padded rows zeroed) when AMX is present and 2 * sum(L^2) >= B * T^2, and runs its own
  tiles otherwise.
"""

from __future__ import annotations

import torch

from hybrid_engine.ops import _backend, dispatch
from hybrid_engine.ops._library import fake, kernels


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * groups, T, D], query head h reading kv head h // groups."""
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def decode_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Pure-torch decode attention in fp32 (repeat kv heads, masked softmax). The test oracle."""
    B, Hq, D = q.shape
    Hkv, T_max = k_cache.shape[1], k_cache.shape[2]
    k = _repeat_kv(k_cache.float(), Hq // Hkv)  # (B, Hq, T_max, D)
    v = _repeat_kv(v_cache.float(), Hq // Hkv)
    scores = torch.einsum("bhd,bhtd->bht", q.float(), k) * scale
    valid = torch.arange(T_max, device=q.device)[None] < seq_lens.to(q.device)[:, None]  # (B, T_max)
    scores = scores.masked_fill(~valid[:, None], float("-inf"))
    # An empty sequence has no key at all: its softmax row is NaN and its output is defined as 0.
    probs = torch.softmax(scores, dim=-1).masked_fill(~valid.any(-1)[:, None, None], 0.0)
    return torch.einsum("bht,bhtd->bhd", probs, v).to(q.dtype)


def prefill_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Pure-torch causal attention over a left-padded batch in fp32 (repeat kv heads, masked softmax).
    The test oracle."""
    B, Hq, T, D = q.shape
    groups = Hq // k.shape[1]
    pos = torch.arange(T, device=q.device)
    real = pos[None] >= (T - seq_lens.to(q.device))[:, None]  # (B, T): the sequence's own tokens
    mask = real[:, None, :] & (pos[:, None] >= pos[None, :])[None]  # (B, Tq, Tk)
    scores = q.float() @ _repeat_kv(k.float(), groups).transpose(-1, -2) * scale  # (B, Hq, T, T)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    # Padded query rows see no key (NaN softmax rows): their output is defined as 0.
    probs = torch.softmax(scores, dim=-1).masked_fill(~real[:, None, :, None], 0.0)
    return (probs @ _repeat_kv(v.float(), groups)).to(q.dtype)


@fake("hybrid_engine::decode_attention")
def _decode_attention_fake(q, k_cache, v_cache, seq_lens, scale):
    return q.new_empty(q.shape)


@fake("hybrid_engine::prefill_attention")
def _prefill_attention_fake(q, k, v, seq_lens, scale):
    return q.new_empty(q.shape)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention output [B, Hq, D] (q's dtype) of the query tokens q [B, Hq, D] over the first
    seq_lens[b] positions of k_cache, v_cache [B, Hkv, T_max, D]; zero rows where seq_lens[b] == 0."""
    backend = _backend.get_backend()
    if backend == "reference":
        return decode_attention_reference(q, k_cache, v_cache, seq_lens, scale)
    if backend == "triton":
        from hybrid_engine.triton.attention import decode_attention as decode_attention_triton

        return decode_attention_triton(q, k_cache, v_cache, seq_lens, scale)
    return kernels().decode_attention(q, k_cache, v_cache, seq_lens, float(scale))


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention output [B, Hq, T, D] (contiguous, q's dtype) of q [B, Hq, T, D] over k, v
    [B, Hkv, T, D] for a left-padded batch holding seq_lens[b] real tokens each; padded rows are zero."""
    backend = _backend.get_backend()
    if backend == "reference":
        return prefill_attention_reference(q, k, v, seq_lens, scale)
    if backend == "triton":
        from hybrid_engine.triton.attention import prefill_attention as prefill_attention_triton

        return prefill_attention_triton(q, k, v, seq_lens, scale)
    if q.device.type == "cpu":
        dispatch.ensure()  # bf16's route to torch's flash attention, measured on this machine (dispatch.py)
    return kernels().prefill_attention(q, k, v, seq_lens, float(scale))
