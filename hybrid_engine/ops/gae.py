"""gae: generalised advantage estimation (Schulman et al. 2016) over masked response tokens.

rewards, values, mask [B, T]: mask marks each sequence's response tokens; the value after a
sequence's last masked token is 0 (no bootstrap); masked-out positions get 0 in both outputs;
returns = advantages + values.
"""

from __future__ import annotations

import torch

from hybrid_engine.ops import _backend
from hybrid_engine.ops._library import fake, kernels


def gae_reference(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch GAE: a backward loop over time, vectorised over the batch. The test oracle."""
    rewards, values, mask = rewards.float(), values.float(), mask.float()
    B, T = rewards.shape
    advantages = torch.zeros(B, T, dtype=torch.float32, device=rewards.device)
    next_value = torch.zeros(B, dtype=torch.float32, device=rewards.device)
    last_gae = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * m
        advantages[:, t] = last_gae
        next_value = values[:, t] * m
    return advantages, (advantages + values) * mask


@fake("hybrid_engine::gae")
def _gae_fake(rewards, values, mask, gamma, lam):
    return rewards.new_empty(rewards.shape, dtype=torch.float32), rewards.new_empty(rewards.shape, dtype=torch.float32)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, both fp32 [B, T], for rewards, values and mask [B, T]."""
    backend = _backend.get_backend()
    if backend == "reference":
        return gae_reference(rewards, values, mask, gamma, lam)
    if backend == "triton":
        from hybrid_engine.triton.gae import gae as gae_triton

        return gae_triton(rewards, values, mask, gamma, lam)
    return kernels().gae(rewards, values, mask, float(gamma), float(lam))
