"""rms_norm: RMSNorm with Hugging Face LlamaRMSNorm semantics, optionally fused with the decoder
layer's residual add, differentiable in x, residual and weight.

x [..., H], weight [H] (x's dtype or fp32). out = weight * x / sqrt(mean(x^2) + eps), in x's dtype.
With a residual, new_residual = x + residual in x's dtype (what HF's decoder layer carries to the
next layer) and out is the norm of new_residual. The kernels compute in fp32 and round once, where
HF rounds the normalised x to x's dtype before multiplying by the weight.
"""

from __future__ import annotations

import torch

from hybrid_engine.ops import _backend
from hybrid_engine.ops._library import autograd, fake, kernels


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HF LlamaRMSNorm (after HF's residual add when `residual` is given) in plain torch: the oracle."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = (weight * h.to(x.dtype)).to(x.dtype)
    return out if residual is None else (out, x)


@fake("hybrid_engine::rms_norm")
def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@fake("hybrid_engine::rms_norm_residual")
def _rms_norm_residual_fake(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@fake("hybrid_engine::rms_norm_backward")
def _rms_norm_backward_fake(grad_out, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_rms_norm(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(ctx, grad_out, grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_weight = kernels().rms_norm_backward(grad_out, x, weight, rstd)
    return grad_x, grad_weight, None


def _setup_rms_norm_residual(ctx, inputs, output):
    # The norm's input is the sum, so the backward needs new_residual, not x and residual.
    ctx.save_for_backward(output[1], inputs[2], output[2])


def _rms_norm_residual_backward(ctx, grad_out, grad_new_residual, grad_rstd):
    new_residual, weight, rstd = ctx.saved_tensors
    grad, grad_weight = kernels().rms_norm_backward(grad_out, new_residual, weight, rstd)
    if grad_new_residual is not None:
        grad.add_(grad_new_residual)  # in place: grad is ours, and a new [N, H] tensor costs its page faults
    # new_residual = x + residual: both inputs receive the same gradient.
    return grad, grad, grad_weight, None


autograd("hybrid_engine::rms_norm", _rms_norm_backward, setup_context=_setup_rms_norm)
autograd(
    "hybrid_engine::rms_norm_residual", _rms_norm_residual_backward, setup_context=_setup_rms_norm_residual
)


class _TritonRMSNorm(torch.autograd.Function):
    """The Triton backend's forward and backward, with the same gradients as the registered ops."""

    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        from hybrid_engine.triton import norm

        out, new_residual, rstd = norm.rms_norm_forward(x, weight, eps, residual)
        ctx.save_for_backward(x if residual is None else new_residual, weight, rstd)
        ctx.has_residual = residual is not None
        return out, new_residual

    @staticmethod
    def backward(ctx, grad_out, grad_new_residual):
        from hybrid_engine.triton import norm

        x, weight, rstd = ctx.saved_tensors
        grad, grad_weight = norm.rms_norm_backward(grad_out, x, weight, rstd)
        if not ctx.has_residual:
            return grad, grad_weight, None, None
        if grad_new_residual is not None:
            grad.add_(grad_new_residual)
        return grad, grad_weight, None, grad


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [..., H] scaled by weight [H], in x's dtype. With `residual` (x's shape and dtype),
    normalises x + residual and returns (out, x + residual)."""
    backend = _backend.get_backend()
    if backend == "reference":
        return rms_norm_reference(x, weight, eps, residual)
    if backend == "triton":
        out, new_residual = _TritonRMSNorm.apply(x, weight, float(eps), residual)
        return out if residual is None else (out, new_residual)
    if residual is None:
        return kernels().rms_norm(x, weight, float(eps))[0]
    out, new_residual, _ = kernels().rms_norm_residual(x, residual, weight, float(eps))
    return out, new_residual
