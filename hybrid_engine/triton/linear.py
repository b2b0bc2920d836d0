"""decode_linear as a Triton kernel: each program computes a [BLOCK_M, BLOCK_N] tile of out, streaming its
BLOCK_N weight rows along K once; the weight is widened to fp32 in registers and the dot is full fp32 (no TF32)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_linear_kernel(
    x, w, b, out, M, N, K, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    # int64 row offsets: a large weight has more than 2^31 elements.
    w_rows = w + rn.to(tl.int64)[:, None] * K
    x_rows = x + rm.to(tl.int64)[:, None] * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        xt = tl.load(x_rows + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        wt = tl.load(w_rows + k[None, :], mask=(rn[:, None] < N) & (k[None, :] < K), other=0.0).to(tl.float32)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rm.to(tl.int64)[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton decode_linear with the contract of hybrid_engine.ops.decode_linear."""
    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"decode_linear: x must be fp32 [M, K], got {x.dtype} {list(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"decode_linear: weight must be [N, K={x.shape[1]}], got {list(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"decode_linear: bias must be [N={weight.shape[0]}], got {list(bias.shape)}")
    x, weight = x.contiguous(), weight.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return out
    # tl.dot needs every tile side >= 16; one M tile covers a whole decode batch.
    BLOCK_M = min(64, max(16, triton.next_power_of_2(M)))
    BLOCK_N, BLOCK_K = 32, 64
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(M, BLOCK_M))
    _decode_linear_kernel[grid](
        x,
        weight,
        out if bias is None else bias.contiguous(),
        out,
        M,
        N,
        K,
        HAS_BIAS=bias is not None,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )
    return out
