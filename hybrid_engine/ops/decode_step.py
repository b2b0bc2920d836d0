"""decode_step: one decode step of a whole decoder-only model with the per-layer loop in C++.

A composite of the other ops (decode_linear, rms_norm, rotary_append_kv, decode_attention), not a
kernel of its own: it exists so that a CPU decode step pays no Python overhead per layer. Its
reference is the Python loop `InferenceTransformer.decode_python` in hybrid_engine/model/transformer.py.
On a GPU the Python loop is used instead (its launch overhead is what a CUDA graph removes).
"""

from __future__ import annotations

import torch

from hybrid_engine.ops import dispatch
from hybrid_engine.ops._library import fake, kernels

ACTIVATIONS = {"silu": 0, "relu": 1, "gelu_new": 2, "gelu_pytorch_tanh": 2, "gelu": 3, "gelu_pytorch_tanh_gated": 4}
GATED = {"silu", "gelu_pytorch_tanh_gated"}  # act(gate) * up over a fused gate|up projection
QK_NORMS = {None: 0, "head": 1, "proj": 2}  # ModelSpec.qk_norm -> the op's qk_norm


@fake("hybrid_engine::decode_step")
def _decode_step_fake(x, weights, k_cache, v_cache, lengths, cos, sin, num_heads, num_kv_heads, head_dim, rms_norm,
                      activation, eps, scales, qk_norm=0, post_norm=False, nope_layers=(), local_cos=None,
                      local_sin=None, local_layers=(), bf16_activations=False):
    return x.new_empty(x.shape[0], weights[-2].shape[0], dtype=torch.float32)


def decode_step(
    x: torch.Tensor,
    weights: list[torch.Tensor | None],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    rms_norm: bool,
    activation: str,
    eps: float,
    scales: list[float],
    qk_norm: str | None = None,
    post_norm: bool = False,
    nope_layers: list[int] | None = None,
    local_cos: torch.Tensor | None = None,
    local_sin: torch.Tensor | None = None,
    local_layers: list[int] | None = None,
    bf16_activations: bool = False,
) -> torch.Tensor:
    """Logits fp32 [B, V] for embedded tokens x fp32 [B, H]; appends to the caches and increments lengths.
    qk_norm: each layer's q_norm/k_norm weights (slots 12, 13) normalise q and k before RoPE, "head" per head over D
    (weights [D]), "proj" over the whole projection (weights [Hq D], [Hkv D]). post_norm: the attention and MLP
    norms (slots 0, 6) act on the sublayers' outputs before the residual add (OLMo 2), not on their inputs.
    nope_layers: the layers whose q and k take no RoPE (SmolLM3's NoPE layers): their k, v are appended as they are.
    Slots 14, 15 (Gemma 3): norms of the attention's and the MLP's outputs before the residual add, where a block also
    has the pre-norms of slots 0, 6. local_layers take their RoPE from local_cos, local_sin (Gemma 3's sliding layers,
    whose base differs from the global layers'). bf16_activations: the linear layers (the LM head too) are
    decode_linear_bf16's, the fast mode (bf16 weights only), else decode_linear's."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"decode_step: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if qk_norm not in QK_NORMS:
        raise ValueError(f"decode_step: qk_norm must be one of {list(QK_NORMS)}, got {qk_norm!r}")
    dispatch.ensure()  # its linear layers follow decode_linear's measured routes
    return kernels().decode_step(x, weights, k_cache, v_cache, lengths, cos, sin, num_heads,
                                               num_kv_heads, head_dim, rms_norm, ACTIVATIONS[activation], eps,
                                               scales, QK_NORMS[qk_norm], post_norm, list(nope_layers or []),
                                               local_cos, local_sin, list(local_layers or []), bf16_activations)
