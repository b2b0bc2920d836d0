"""The four models of RLHF step 3: the actor (a HybridEngine), the critic (a RewardModel that trains), and the
frozen reference and reward model (scored through the inference path, scoring.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers

from hybrid_engine.engine import HybridEngine
from hybrid_engine.engine.lora import base_model
from hybrid_engine.engine.packing import check_packable
from hybrid_engine.engine.training import adamw, make_trainer
from hybrid_engine.rlhf.ppo.config import PPOConfig
from hybrid_engine.rlhf.ppo.rewards import RewardFunctions
from hybrid_engine.rlhf.retokenize import RetokenizedRewardModel, for_policy, saved_tokenizer
from hybrid_engine.rlhf.reward import RewardModel
from hybrid_engine.rlhf.reward_fn import load_reward_fn
from hybrid_engine.rlhf.reward_format import CLASSIFIER
from hybrid_engine.rlhf.scoring import FrozenPolicy, FrozenRewardModel
from hybrid_engine.rlhf.trainer import disable_dropout, optimizer_lr, prepare_training, training_ds_config

# -- the four models -------------------------------------------------------------------------------------------


class Critic(torch.nn.Module):
    """A RewardModel whose forward gives per-position values (B, T), so DeepSpeed can wrap it as the critic."""

    def __init__(self, reward_model: RewardModel, packed: bool = False):
        super().__init__()
        self.reward_model, self.packed = reward_model, packed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.reward_model.values(input_ids, attention_mask, self.packed)


def _load_lm(model):
    if isinstance(model, str) or hasattr(model, "__fspath__"):
        return transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    return model


def _reference(actor, reference, autocast_dtype: torch.dtype | None, packed: bool,
               partition_config: dict | None) -> FrozenPolicy:
    """The frozen reference: given, or a copy of the actor before it trains."""
    if reference is None and isinstance(actor, HybridEngine):
        raise ValueError("the actor is already a HybridEngine: give the reference policy (the SFT model) too")
    source = actor if reference is None else reference
    model = copy.deepcopy(source) if isinstance(source, torch.nn.Module) else _load_lm(source)
    return FrozenPolicy(model, autocast_dtype=autocast_dtype, packed=packed, partition_config=partition_config)


def frozen_partition_config(ds: dict | None, config: PPOConfig) -> dict | None:
    """The DeepSpeed config the frozen models are partitioned under (FrozenPolicy's partition_config): the training
    config `ds` under ZeRO-3 with config.partition_frozen, else None (whole on every rank)."""
    if ds is None or ds["zero_optimization"]["stage"] != 3 or not config.partition_frozen:
        return None
    return ds


def _trained_reward_model(reward_model) -> RewardModel:
    """A RewardModel, a sequence classifier with one label, or either saved (reward_format.py); anything else would
    score with a random head."""
    if isinstance(reward_model, RewardModel):
        return reward_model
    if type(reward_model).__name__.endswith(CLASSIFIER):
        return RewardModel.from_classifier(reward_model)
    if isinstance(reward_model, torch.nn.Module):
        raise ValueError(f"reward_model must be a RewardModel, a sequence classifier or its folder, got "
                         f"{type(reward_model).__name__}: a plain model has no trained value head")
    return RewardModel.from_pretrained(reward_model)  # refuses a folder without a trained head


def _adamw(lr: float, weight_decay: float) -> Callable:
    return lambda params: adamw(params, lr=lr, weight_decay=weight_decay)


@dataclass
class ModelSources:
    """Where train_ppo builds its models from (build_models)."""

    actor: Any
    """The SFT policy to train: an HF causal LM (trained in place), its directory, or a HybridEngine."""
    reward_model: Any = None
    """The frozen reward model that scores the rollouts: a RewardModel, an HF sequence classifier with one label, or
    either's folder or local cache name (reward_format.py); None: reward_fn alone."""
    critic: Any = None
    """Where PPO's critic starts (the reward model's forms, or a causal LM with a new head); None: from the reward
    model."""
    reference: Any = None
    """The frozen policy of the KL term (an HF causal LM or its directory); None: a copy of the actor before training
    (which must then not be a HybridEngine)."""
    reward_fn: Any = None
    """A reward function ("module:function", "file.py:function", a dotted path or a callable fn(prompts, completions,
    **row fields) -> one number or None each: rewards.py), or a list of them weighted by config.reward_weights; their
    weighted sum is added to the reward model's score (times config.reward_fn_weight), or used alone."""
    eval_fn: Any = None
    """A held-out measure of the same form that no model trains on (the demo's rule_score); reported, never trained
    on."""
    ds_config: Any = None
    """A DeepSpeed config (dict or JSON path) the actor and critic train under; None: torch AdamW in one process."""
    lora: Any = None
    """A peft.LoraConfig for the actor; None: every weight trains."""
    reward_tokenizer: Any = None
    """The reward model's tokenizer; None: the one saved beside the reward model, else the policy's. One with another
    vocabulary than the policy's scores re-encoded rollouts (retokenize.py)."""


@dataclass
class Models:
    """The models of a run, built (build_models)."""

    actor: HybridEngine
    reference: FrozenPolicy
    reward: FrozenRewardModel | RetokenizedRewardModel | None
    critic: object | None  # the critic's trainer (make_trainer), PPO only
    critic_model: RewardModel | None
    reward_fns: RewardFunctions | None
    eval_fn: Callable | None = None


def _frozen_reward_model(sources: ModelSources, scoring_dtype, tokenizer, packed: bool,
                         partition_config: dict | None):
    """The frozen reward model, scoring through its own tokenizer where that differs from the policy's `tokenizer`."""
    frozen = FrozenRewardModel(copy.deepcopy(_trained_reward_model(sources.reward_model)), autocast_dtype=scoring_dtype,
                               packed=packed, partition_config=partition_config)
    own = sources.reward_tokenizer
    if own is None and not isinstance(sources.reward_model, torch.nn.Module):
        own = saved_tokenizer(sources.reward_model)
    return for_policy(frozen, own, tokenizer)


def build_models(sources: ModelSources, config: PPOConfig, tokenizer=None) -> Models:
    """The actor engine, the frozen reference and reward model, and (PPO) the critic's trainer. `tokenizer`, the
    policy's: where the reward model's own differs, the reward model scores re-encoded rollouts."""
    actor, reward_model, critic, reward_fn = sources.actor, sources.reward_model, sources.critic, sources.reward_fn
    ds_config, lora = sources.ds_config, sources.lora
    reward_fns = RewardFunctions.load(reward_fn, config.reward_weights)
    if reward_model is None and reward_fns is None:
        raise ValueError("PPO needs a reward: give a reward model, a reward function, or both")
    ds = training_ds_config(ds_config, config.train_batch_size, config.max_grad_norm,
                            accumulation=config.gradient_accumulation_steps)
    has_ds_optimizer = ds is not None and "optimizer" in ds
    scoring_dtype = torch.bfloat16 if config.bf16_autocast else None  # the frozen models score as training runs
    partition_config = frozen_partition_config(ds, config)
    frozen_ref = _reference(actor, sources.reference, scoring_dtype, config.packing, partition_config)
    frozen_rm = None if reward_model is None else _frozen_reward_model(sources, scoring_dtype, tokenizer,
                                                                        config.packing, partition_config)
    critic_model = critic_trainer = None
    if config.algo == "ppo":
        source = critic if critic is not None else reward_model
        if source is None:
            raise ValueError("PPO's critic starts from the reward model: give a reward model or a critic "
                             "(or use algo grpo or rloo)")
        critic_model = prepare_training(copy.deepcopy(RewardModel.load(source)), config)
        if config.disable_dropout:
            disable_dropout(critic_model)
        critic_trainer = make_trainer(Critic(critic_model, config.packing), optimizer_lr(ds, config.critic_lr),
                                      None if has_ds_optimizer else _adamw(config.critic_lr, config.weight_decay))
        critic_trainer.train(True)
    if isinstance(actor, HybridEngine):
        engine = actor
        if engine.settings != config.generation:
            raise ValueError(f"the actor engine generates with {engine.settings}, the config asks for "
                             f"{config.generation}: give the config the engine's settings (generation=engine.settings)"
                             " so that the old log-probs are recomputed where generation is not exact")
    else:
        engine = HybridEngine(_load_lm(actor), ds_config=optimizer_lr(ds, config.lr), lora=lora,
                              optimizer=None if has_ds_optimizer else _adamw(config.lr, config.weight_decay),
                              gradient_checkpointing=config.gradient_checkpointing,
                              generation=config.generation,
                              seed=config.seed)
    prepare_training(engine.module, config)
    if config.disable_dropout:
        disable_dropout(engine.module)
    if config.packing:
        scorer = getattr(frozen_rm, "reward", frozen_rm)  # a RetokenizedRewardModel's FrozenRewardModel
        for model in (base_model(engine.module), frozen_ref.model, critic_model, getattr(scorer, "model", None)):
            if model is not None:
                check_packable(model.config)
    return Models(actor=engine, reference=frozen_ref, reward=frozen_rm, critic=critic_trainer,
                  critic_model=critic_model, reward_fns=reward_fns,
                  eval_fn=None if sources.eval_fn is None else load_reward_fn(sources.eval_fn))


