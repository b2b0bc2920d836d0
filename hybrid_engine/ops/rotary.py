"""rotary_append_kv: rotary position embedding of q and k fused with the append of k and v to the
KV cache, in place; and rotary_tables, the cos/sin tables of a Hugging Face model.

q [B, S, Hq, D], k/v [B, S, Hkv, D] (views into a fused QKV projection are fine: only the last dim
must be contiguous), k_cache/v_cache [B, Hkv, T_max, D], positions int [B, S], cos/sin fp32
[P, R/2]. Every token with position p >= 0 has the first R dims of its q and k rotated at p (HF's
rotate_half convention) and its k, v written to cache slot p; tokens with p < 0 (left padding)
are left alone. Without cos/sin (GPT-2, OPT) it only appends. S = 1 is a decode step; a prefill
passes positions = cumsum(attention_mask) - 1, which is -1 on the pads.
"""

from __future__ import annotations

import torch

from hybrid_engine.ops import _backend
from hybrid_engine.ops._library import fake, kernels


def rotary_tables(
    inv_freq: torch.Tensor, max_positions: int, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin fp32 [max_positions, R/2] with the values of HF's rotary embedding for a model whose
    `rotary_emb.inv_freq` is `inv_freq` [R/2] (and whose rope type scales cos/sin by `attention_scaling`)."""
    positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = positions[:, None] * inv_freq.float()[None, :]
    return freqs.cos() * attention_scaling, freqs.sin() * attention_scaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_append_kv_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> None:
    """Plain torch (HF's rotate_half in fp32, index_put into the caches): the oracle and eager baseline."""
    pos = positions.long()
    b, s = torch.nonzero(pos >= 0, as_tuple=True)
    p = pos[b, s]
    if p.numel() and int(p.max()) >= k_cache.shape[2]:
        raise ValueError(f"positions must be < T_max = {k_cache.shape[2]}, got {int(p.max())}")
    if cos is not None:
        c = torch.cat((cos[p], cos[p]), dim=-1)[:, None, :]  # [n, 1, R], HF's cat(c, c)
        sn = torch.cat((sin[p], sin[p]), dim=-1)[:, None, :]
        R = c.shape[-1]
        for x in (q, k):
            xr = x[b, s, :, :R].float()  # [n, H, R]
            x[b, s, :, :R] = (xr * c + _rotate_half(xr) * sn).to(x.dtype)
    k_cache[b, :, p] = k[b, s].to(k_cache.dtype)  # [n, Hkv, D]; rounded once into a bf16/fp16 cache
    v_cache[b, :, p] = v[b, s].to(v_cache.dtype)


@fake("hybrid_engine::rotary_append_kv")
def _rotary_append_kv_fake(q, k, v, k_cache, v_cache, positions, cos, sin):
    return None


def rotary_append_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> None:
    """Rotates q and k in place at their positions and writes k, v into the caches' slots (see module doc)."""
    backend = _backend.get_backend()
    if backend == "reference":
        return rotary_append_kv_reference(q, k, v, k_cache, v_cache, positions, cos, sin)
    if backend == "triton":
        from hybrid_engine.triton.rotary import rotary_append_kv as rotary_append_kv_triton

        return rotary_append_kv_triton(q, k, v, k_cache, v_cache, positions, cos, sin)
    kernels().rotary_append_kv(q, k, v, k_cache, v_cache, positions, cos, sin)
