"""gae as a Triton kernel: each program scans a block of sequences backwards in time."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gae_kernel(rewards, values, mask, adv, ret, B, T, gamma, lam, BLOCK_B: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = rows < B
    next_value = tl.zeros([BLOCK_B], dtype=tl.float32)
    last_gae = tl.zeros([BLOCK_B], dtype=tl.float32)
    for i in range(0, T):
        t = T - 1 - i
        offs = rows * T + t
        m = tl.load(mask + offs, mask=live, other=0.0).to(tl.float32)
        v = tl.load(values + offs, mask=live, other=0.0).to(tl.float32)
        r = tl.load(rewards + offs, mask=live, other=0.0).to(tl.float32)
        delta = r + gamma * next_value - v
        last_gae = (delta + gamma * lam * last_gae) * m
        tl.store(adv + offs, last_gae, mask=live)
        tl.store(ret + offs, (last_gae + v) * m, mask=live)
        next_value = v * m


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton GAE with the contract of hybrid_engine.ops.gae."""
    if rewards.dim() != 2 or values.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError(
            f"gae: rewards, values and mask must all be [B, T], got {rewards.shape}, {values.shape}, {mask.shape}"
        )
    rewards, values, mask = rewards.contiguous(), values.contiguous(), mask.contiguous()
    B, T = rewards.shape
    adv = torch.empty(B, T, dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    BLOCK_B = 32
    _gae_kernel[(triton.cdiv(B, BLOCK_B),)](
        rewards, values, mask, adv, ret, B, T, float(gamma), float(lam), BLOCK_B=BLOCK_B
    )
    return adv, ret
