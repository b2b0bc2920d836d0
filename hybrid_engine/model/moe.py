"""The Mixture-of-Experts MLP of the generation-mode transformer: the router, then the experts (ops.moe_experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybrid_engine import ops
from hybrid_engine.model.spec import ModelSpec
from hybrid_engine.model.weights import Experts


def route(x: torch.Tensor, router: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert_ids int64 [M, k], routing_weights fp32 [M, k]) of tokens x fp32 [M, H]: Hugging Face's TopKRouter
    (Qwen3-MoE, Mixtral) computed the same way, so that equal fp32 logits break ties as torch.topk does there:
    F.linear logits, an fp32 softmax over every expert, the top k probabilities, renormalised to sum 1 when
    spec.norm_topk_prob."""
    logits = F.linear(x, router)  # [M, E]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    top, ids = torch.topk(probs, spec.experts_per_token, dim=-1)
    if spec.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return ids, top


def moe_mlp(x: torch.Tensor, experts: Experts, spec: ModelSpec) -> torch.Tensor:
    """A MoE layer's MLP output fp32 [M, H] for its input x fp32 [M, H]."""
    ids, weights = route(x, experts.router, spec)
    return ops.moe_experts(x, ids, weights, experts.gate_up, experts.down)
