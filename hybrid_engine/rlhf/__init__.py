"""The RL library: DeepSpeed-Chat's three steps as functions, usable from Python without the command line. SFT
(sft.py), the reward model (reward.py), and PPO, GRPO or RLOO (the ppo/ package), each trained by the one loop
(loop.py) with what the trainers share (trainer.py, step_config.py, schedule.py, distributed.py) and checkpoints
(checkpoint.py); the maths in losses.py; the data layer in data.py and tokens.py; the frozen models' scoring in
scoring.py; reward functions in reward_fn.py; the built-in demo task in demo.py."""

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
from hybrid_engine.rlhf.ppo import ModelSources, NonFiniteError, PolicyEval, PPOConfig, PPOResult, train_ppo
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
    "ModelSources",
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
