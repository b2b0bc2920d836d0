"""rms_norm as Triton kernels: one program per row forward; the backward gives each program a block
of rows and a private fp32 row of grad_weight partials, added up on the host."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybrid_engine.triton._rounding import to_storage


@triton.jit
def _rms_norm_fwd_kernel(
    x, residual, new_residual, w, out, rstd, H, eps, HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    m = cols < H
    xv = tl.load(x + row * H + cols, mask=m, other=0.0)
    if HAS_RESIDUAL:
        # The norm is taken of the sum as stored (rounded to x's dtype), like HF's decoder layer.
        xv = to_storage(xv.to(tl.float32) + tl.load(residual + row * H + cols, mask=m, other=0.0), x.dtype.element_ty)
        tl.store(new_residual + row * H + cols, xv, mask=m)
    h = xv.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / H + eps)
    tl.store(rstd + row, r)
    wv = tl.load(w + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out + row * H + cols, to_storage(h * r * wv, out.dtype.element_ty), mask=m)


@triton.jit
def _rms_norm_bwd_kernel(g, x, w, rstd, gx, gw_partial, N, H, rows_per_program, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    m = cols < H
    wv = tl.load(w + cols, mask=m, other=0.0).to(tl.float32)
    gw = tl.zeros([BLOCK_H], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 rows: N * H may pass 2^31
    for row in range(row_start, min(row_start + rows_per_program, N)):
        offs = row * H + cols
        gv = tl.load(g + offs, mask=m, other=0.0).to(tl.float32)
        xhat = tl.load(x + offs, mask=m, other=0.0).to(tl.float32) * tl.load(rstd + row)
        dot = tl.sum(gv * wv * xhat, axis=0)
        grad = (gv * wv - xhat * (dot / H)) * tl.load(rstd + row)
        tl.store(gx + offs, to_storage(grad, gx.dtype.element_ty), mask=m)
        gw += gv * xhat
    tl.store(gw_partial + pid * H + cols, gw, mask=m)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] == 0 or weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: x must be [..., H] with H > 0 and weight [H], got {x.shape} and {weight.shape}")


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """out, new_residual (None without residual), rstd fp32 [...]: the contract of the rms_norm ops."""
    _check(x, weight)
    H = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    new_residual = torch.empty_like(x) if residual is not None else None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"rms_norm: residual must match x ({x.shape}, {x.dtype})")
        residual = residual.contiguous()
    N = x.numel() // H
    if N:
        _rms_norm_fwd_kernel[(N,)](
            x, residual, new_residual, weight.contiguous(), out, rstd, H, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK_H=triton.next_power_of_2(H),
        )  # fmt: skip
    return out, new_residual, rstd


def rms_norm_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_x (x's dtype) and grad_weight (weight's dtype) for out = rms_norm(x) * weight."""
    H = x.shape[-1]
    x, grad_out, rstd = x.contiguous(), grad_out.contiguous(), rstd.contiguous()
    N = x.numel() // H
    grad_x = torch.empty_like(x)
    # Enough programs to fill the device; each owns a row of partial grad_weight sums.
    programs = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    programs = max(1, min(N, programs))
    rows_per_program = triton.cdiv(N, programs)
    partial = torch.zeros(programs, H, dtype=torch.float32, device=x.device)
    if N:
        _rms_norm_bwd_kernel[(programs,)](
            grad_out, x, weight.contiguous(), rstd, grad_x, partial, N, H, rows_per_program,
            BLOCK_H=triton.next_power_of_2(H),
        )  # fmt: skip
    return grad_x, partial.sum(0).to(weight.dtype)
