"""RLHF: the PPO maths of DeepSpeed-Chat's step 3 (losses, rewards, GAE, whitening, KL control, EMA, PTX)."""

from hybrid_engine.rlhf.losses import (
    AdaptiveKLController,
    FixedKLController,
    advantages_and_returns,
    ema_update,
    grpo_advantages,
    kl_penalized_rewards,
    policy_loss,
    ptx_loss,
    rloo_advantages,
    value_loss,
    whiten,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "advantages_and_returns",
    "ema_update",
    "grpo_advantages",
    "kl_penalized_rewards",
    "policy_loss",
    "ptx_loss",
    "rloo_advantages",
    "value_loss",
    "whiten",
]
