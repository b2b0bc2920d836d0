"""RLHF step 3: PPO, GRPO and RLOO. driver.py is the trainer (train_ppo, ppo_step); config.py the settings;
models.py the four models; experience.py phases 1-3 (generate, score, targets) over batch.py's tensors and maths;
update.py phase 4 (the actor, critic and pre-training steps); evaluate.py the held-out evaluation; ema.py the
actor's EMA; state.py a run's checkpoint."""

from hybrid_engine.rlhf.ppo.config import ALGOS, PolicyEval, PPOConfig
from hybrid_engine.rlhf.ppo.driver import PPOResult, PPORun, ppo_step, train_ppo
from hybrid_engine.rlhf.ppo.models import Models, ModelSources, build_models
from hybrid_engine.rlhf.step_config import NonFiniteError

__all__ = ["ALGOS", "Models", "ModelSources", "NonFiniteError", "PPOConfig", "PPOResult", "PPORun", "PolicyEval",
           "build_models", "ppo_step", "train_ppo"]
