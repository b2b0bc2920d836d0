"""RLHF, DeepSpeed-Chat's three steps: SFT (sft.py), the reward model (reward.py) and PPO, GRPO or RLOO (ppo.py,
over experience.py, scoring.py and the maths of losses.py); data.py, tokens.py and demo.py hold the data layer and
the built-in demo task; checkpoint.py the checkpoints; commands.py, ppo_command.py, pipeline.py and chat.py the
`hybrid-engine` commands."""

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
from hybrid_engine.rlhf.ppo import NonFiniteError, PolicyEval, PPOConfig, PPOResult, train_ppo
from hybrid_engine.rlhf.reward import (
    RewardConfig,
    RewardEval,
    RewardModel,
    RewardResult,
    evaluate_reward,
    last_token_index,
    pairwise_loss,
    train_reward,
)
from hybrid_engine.rlhf.sft import SFTConfig, SFTResult, perplexity, sft_loss, train_sft

__all__ = [
    "NonFiniteError",
    "PPOConfig",
    "PPOResult",
    "PolicyEval",
    "train_ppo",
    "RewardConfig",
    "RewardEval",
    "RewardModel",
    "RewardResult",
    "SFTConfig",
    "SFTResult",
    "evaluate_reward",
    "last_token_index",
    "pairwise_loss",
    "perplexity",
    "sft_loss",
    "train_reward",
    "train_sft",
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
