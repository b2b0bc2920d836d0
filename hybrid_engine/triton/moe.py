"""moe_experts as Triton kernels: one grouped GEMM, run twice (gate|up, then down), over the (token, slot)
assignments sorted by expert. Each program takes one expert, a tile of BLOCK_M of its rows and BLOCK_N of its output
features, and streams that expert's weight tile along K once for all of those rows; an expert without rows has no
program that reads it. Full fp32 dots (no TF32); a bf16 weight is widened in registers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def group_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): order int64 [M k] lists the flat (token, slot) assignments by ascending expert, tokens in
    order within one; offsets int64 [E + 1], expert e's assignments are order[offsets[e]:offsets[e + 1]]."""
    flat = expert_ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    return order, F.pad(torch.cumsum(counts, 0), (1, 0))


@triton.jit
def _grouped_linear_kernel(x, offsets, w, out, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    e = tl.program_id(0)
    start, end = tl.load(offsets + e), tl.load(offsets + e + 1)
    rm = start + tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    if start + tl.program_id(2) * BLOCK_M < end:
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        w_rows = w + e.to(tl.int64) * N * K + rn.to(tl.int64)[:, None] * K
        x_rows = x + rm.to(tl.int64)[:, None] * K
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            xt = tl.load(x_rows + k[None, :], mask=(rm[:, None] < end) & (k[None, :] < K), other=0.0)
            wt = tl.load(w_rows + k[None, :], mask=(rn[:, None] < N) & (k[None, :] < K), other=0.0).to(tl.float32)
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
        tl.store(out + rm.to(tl.int64)[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < end) & (rn[None, :] < N))


def grouped_linear(x: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor, max_rows: int) -> torch.Tensor:
    """fp32 [A, N]: rows offsets[e]:offsets[e + 1] of x fp32 [A, K] times w[e].T ([E, N, K]); max_rows, the most rows
    of one expert, sizes the grid."""
    A, K = x.shape
    E, N, _ = w.shape
    out = torch.empty(A, N, dtype=torch.float32, device=x.device)
    if A == 0:
        return out
    BLOCK_M = min(64, max(16, triton.next_power_of_2(max_rows)))  # tl.dot needs every tile side >= 16
    BLOCK_N, BLOCK_K = 32, 64
    grid = (E, triton.cdiv(N, BLOCK_N), triton.cdiv(max_rows, BLOCK_M))
    _grouped_linear_kernel[grid](x, offsets, w, out, N, K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out


def moe_experts(x: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """Triton moe_experts with the contract of hybrid_engine.ops.moe_experts."""
    if x.dim() != 2 or x.dtype != torch.float32 or gate_up.dim() != 3 or gate_up.shape[2] != x.shape[1]:
        raise ValueError(f"moe_experts: x must be fp32 [M, H] and gate_up [E, 2I, H], got {x.dtype} {list(x.shape)} "
                         f"and {list(gate_up.shape)}")
    E, inter = gate_up.shape[0], gate_up.shape[1] // 2
    order, offsets = group_by_expert(expert_ids, E)
    k = expert_ids.shape[1]
    token = order // k
    max_rows = int((offsets[1:] - offsets[:-1]).max()) if order.numel() else 0
    h = grouped_linear(x[token].contiguous(), offsets, gate_up.contiguous(), max_rows)  # [A, 2I]
    act = (F.silu(h[:, :inter]) * h[:, inter:]).contiguous()
    y = grouped_linear(act, offsets, down.contiguous(), max_rows)  # [A, H]
    y = y * routing_weights.reshape(-1)[order, None].float()
    return torch.zeros_like(x).index_add_(0, token, y)  # ascending expert order: the order of `order`
