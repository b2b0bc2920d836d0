"""The training forward's elementwise ops, differentiable: rotary_embed and silu_mul.

rotary_embed(q, k, cos, sin): Hugging Face's apply_rotary_pos_emb (rotate_half convention, full head dim) for
q [B, Hq, T, D] and k [B, Hkv, T, D] (views of the projections are fine: only the last dim must be contiguous)
with cos/sin [B or 1, T, D], the rotary embedding module's output. Returns contiguous (q_embed, k_embed) in q's
dtype. Its backward is the same kernel applied transposed.

silu_mul(gate, up): silu(gate) * up, the gated MLP's activation (HF's act_fn(gate_proj(x)) * up_proj(x) with
hidden_act "silu"), gate and up of one shape and dtype.

Both compute in fp32 and round once to the inputs' dtype (HF rounds every intermediate under bf16 autocast).
Eager PyTorch spends several passes and temporaries on each (rotate_half's slices, negation and cat, then two
products and a sum; silu, then a product, and four passes backward); each kernel here is one pass forward and
one backward. The CPU kernels are in hybrid_engine/csrc/cpu/rotary.cpp and hybrid_engine/csrc/cpu/swiglu.cpp; on
other devices, and with use_backend("reference") or ("triton"), the pure-torch reference runs (no GPU kernels yet).
"""

from __future__ import annotations

import torch

from hybrid_engine.ops import _backend
from hybrid_engine.ops._library import autograd, fake, kernels
from hybrid_engine.ops.rotary import _rotate_half


def rotary_embed_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's apply_rotary_pos_emb in fp32, rounded once to q's dtype: the oracle."""
    c, s = cos.float()[:, None], sin.float()[:, None]
    return tuple((xf * c + _rotate_half(xf) * s).to(x.dtype) for x, xf in ((q, q.float()), (k, k.float())))


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in fp32, rounded once to gate's dtype: the oracle."""
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


@fake("hybrid_engine::rotary_embed")
def _rotary_embed_fake(q, k, cos, sin, backward):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@fake("hybrid_engine::silu_mul")
def _silu_mul_fake(gate, up):
    return gate.new_empty(gate.shape)


@fake("hybrid_engine::silu_mul_backward")
def _silu_mul_backward_fake(grad, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup_rotary(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], inputs[3])


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x itself where its last dim is contiguous (the kernel's only layout requirement), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _rotary_backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    gq, gk = kernels().rotary_embed(_rows(grad_q), _rows(grad_k), cos, sin, True)
    return gq, gk, None, None, None


def _setup_silu_mul(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _silu_mul_backward(ctx, grad):
    gate, up = ctx.saved_tensors
    return kernels().silu_mul_backward(grad.to(gate.dtype), gate, up)


autograd("hybrid_engine::rotary_embed", _rotary_backward, setup_context=_setup_rotary)
autograd("hybrid_engine::silu_mul", _silu_mul_backward, setup_context=_setup_silu_mul)


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the CPU kernels take a and b (else the reference runs: other devices, dtypes and mixtures)."""
    return (_backend.get_backend() == "kernels" and a.device.type == b.device.type == "cpu"
            and a.dtype == b.dtype and a.dtype in KERNEL_DTYPES)


def rotary_embed(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_embed, k_embed) = HF's apply_rotary_pos_emb(q, k, cos, sin), differentiable in q and k."""
    if not _kernel(q, k) or cos.device.type != "cpu":
        return rotary_embed_reference(q, k, cos, sin)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()  # [B or 1, T, D]: small
    return kernels().rotary_embed(_rows(q), _rows(k), cos, sin, False)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, differentiable in both."""
    if not _kernel(gate, up):
        return silu_mul_reference(gate, up)
    return kernels().silu_mul(gate, up)
