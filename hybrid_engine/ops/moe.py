"""moe_experts: the expert MLPs of a Mixture-of-Experts layer (Qwen3-MoE, Mixtral), each token through the experts
its router chose, weighted and summed.

x fp32 [M, H] (M tokens), expert_ids int64 [M, k] (distinct per row), routing_weights fp32 [M, k], gate_up [E, 2I, H]
(each expert's gate rows then up rows, as transformers 5 stores them fused), down [E, H, I], fp32, bf16 or fp16
-> fp32 [M, H]:
    out[m] = sum over j of routing_weights[m, j] * down[e] @ (silu(gate[e] @ x[m]) * (up[e] @ x[m])),
    e = expert_ids[m, j],
summed in ascending expert order, as Hugging Face's loop adds them. Products and sums are fp32.

The kernels run the tokens grouped by expert: each selected expert's matrices are streamed once for all the tokens
that chose it (a GEMM over them), and an expert no token chose is not read at all; a decode step of B tokens reads
the experts its router selected, not all E.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybrid_engine.ops import _backend, dispatch
from hybrid_engine.ops._library import fake, kernels


def moe_experts_reference(x: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor,
                          gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Pure-torch moe_experts in fp32, Hugging Face's loop over the selected experts: the test oracle."""
    x = x.float()
    out = torch.zeros_like(x)
    for e in torch.unique(expert_ids).tolist():  # ascending
        token, slot = torch.where(expert_ids == e)
        gate, up = F.linear(x[token], gate_up[e].float()).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e].float()) * routing_weights[token, slot, None].float()
        out.index_add_(0, token, y)
    return out


@fake("hybrid_engine::moe_experts")
def _moe_experts_fake(x, expert_ids, routing_weights, gate_up, down):
    torch._check(x.dim() == 2 and gate_up.dim() == 3 and down.dim() == 3 and x.shape[1] == gate_up.shape[2])
    torch._check(expert_ids.shape == routing_weights.shape and expert_ids.shape[0] == x.shape[0])
    return x.new_empty(x.shape, dtype=torch.float32)


def moe_experts(x: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """fp32 [M, H]: each token of x [M, H] through its experts expert_ids [M, k], weighted by routing_weights."""
    backend = _backend.get_backend()
    if backend == "reference":
        return moe_experts_reference(x, expert_ids, routing_weights, gate_up, down)
    if backend == "triton":
        from hybrid_engine.triton.moe import moe_experts as moe_experts_triton

        return moe_experts_triton(x, expert_ids, routing_weights, gate_up, down)
    if x.device.type == "cpu":
        dispatch.ensure()  # the experts' GEMMs are decode_linear's, with its measured routes
    return kernels().moe_experts(x, expert_ids, routing_weights, gate_up, down)
