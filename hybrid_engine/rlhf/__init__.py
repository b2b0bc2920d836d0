"""RLHF, DeepSpeed-Chat's three steps: SFT (sft.py), the reward model (reward.py) and the PPO maths of step 3
(losses.py: losses, rewards, GAE, whitening, KL control, GRPO/RLOO baselines, EMA, PTX); data.py, tokens.py and
demo.py hold the data layer and the built-in demo task. The PPO trainer and the commands come next."""

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
