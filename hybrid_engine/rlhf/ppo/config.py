"""The settings and results of RLHF step 3 (driver.py): PPOConfig, with DeepSpeed-Chat's step-3 defaults, the
held-out figures PolicyEval."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import InitVar, dataclass, field
from typing import ClassVar

import torch

from hybrid_engine.engine.settings import GenerationSettings
from hybrid_engine.generation.sampling import SamplingParams
from hybrid_engine.rlhf.step_config import StepConfig, config_dict

ALGOS = ("ppo", "grpo", "rloo")


@dataclass
class PPOConfig(StepConfig):
    """RLHF step 3 (DeepSpeed-Chat's step-3 defaults): the shared StepConfig fields (epochs are passes over the
    prompts, max_steps counts rollouts, batch_size is prompts per rollout on each rank, lr the actor's), plus
    these."""

    algo: str = "ppo"
    """"ppo" (actor and critic), or the critic-free "grpo" (group-normalised advantages) or "rloo"
    (leave-one-out baseline)."""
    lr: float = 9.65e-6
    """The actor's peak learning rate (DeepSpeed-Chat's actor_learning_rate)."""
    critic_lr: float = 5e-6
    """The critic's peak learning rate (DeepSpeed-Chat's critic_learning_rate)."""
    train_batch_size: int = 16
    """Sequences per optimisation minibatch on each rank (DeepSpeed-Chat's per_device_training_batch_size)."""
    ppo_epochs: int = 1
    """Passes of the optimisation phase over each rollout batch."""
    num_generations: int | None = None
    """Samples per prompt; None: 1 for ppo, 4 for grpo and rloo (which need at least 2)."""
    max_new_tokens: int = 256
    """The longest response generated (DeepSpeed-Chat's max_answer_seq_len)."""
    temperature: float = 1.0
    """Sampling temperature; the log-probs of the losses and of the KL are taken at it too."""
    kl_coef: float = 0.1
    """The KL penalty's coefficient (PPO: on the rewards; GRPO: on the loss; RLOO: on the scores); 0: none."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards kl_target (Ziegler et al.) instead of holding it fixed (PPO only)."""
    kl_target: float = 6.0
    """The adaptive controller's target KL per sequence."""
    kl_horizon: float = 10000.0
    """The adaptive controller's horizon, in sequences."""
    clip_reward: float = 5.0
    """Scores are clipped to [-clip_reward, clip_reward] (PPO)."""
    clip_range: float = 0.2
    """The policy ratio's clip range."""
    value_clip_range: float = 0.2
    """The value clip range."""
    gamma: float = 1.0
    """GAE's discount."""
    lam: float = 0.95
    """GAE's lambda."""
    whiten_advantages: bool = False
    """Whiten the advantages of each rollout batch (DeepSpeed-Chat does not)."""
    ptx_coef: float = 27.8
    """The pre-training loss's coefficient, used when pre-training rows are given (DeepSpeed-Chat's unsup_coef)."""
    ema_beta: float | None = None
    """Keep an EMA of the actor with this decay and save it beside it (DeepSpeed-Chat: 0.992 with
    --enable_ema); None: no EMA."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """How the actor generates (the engine's own settings): weight_dtype, kv_dtype and activation_dtype other than
    fp32 are faster and not exact, so the old log-probs are then recomputed by a training forward (their mismatch
    to generation's logged every step as logprob_mismatch_mean/max)."""
    reward_fn_weight: float = 1.0
    """The weight of the reward functions' weighted sum in the score, beside the reward model's."""
    reward_weights: tuple[float, ...] | None = None
    """One weight per reward function (TRL's reward_weights): their score is the sum of weight x value over the
    functions that apply to a completion; None: 1 each."""
    reward_timeout: float | None = 600.0
    """Seconds the reward and eval functions may take on one batch before the call is given up: the step's update is
    then skipped (nonfinite "skip", the function's values NaN) or the run stops with RewardTimeout ("stop"). The call
    left running finishes in a background thread, its result discarded. None: no limit."""
    eval_max_new_tokens: int | None = None
    """The longest response of an evaluation rollout; None: max_new_tokens."""
    disable_dropout: bool = True
    """Set the dropout of the actor and the critic to 0 (as TRL does): their training forwards then compute the
    log-probs and values of what generation sampled, without noise. False keeps the models' own dropout."""
    gradient_checkpointing: bool = False
    """Recompute the actor's activations in the backward pass (less memory, more time)."""
    bf16_autocast: bool = False
    """Run the actor's and the critic's training forwards under bf16 autocast (fp32 weights, optimizer and
    losses): faster where the CPU has bf16 units (0.42 s instead of 0.58 s for the training phase of the 10.8M
    GRPO case of bench/results/rlhf.json, on a Zen 4 with avx512_bf16). The ratio's old log-probs then come from
    a forward of the same precision (ratio_from_training_forward), not from generation, and the frozen reference and
    reward model score through their HF forwards under the same autocast (rlhf/scoring.py), as TRL scores its
    reference."""
    partition_frozen: bool = True
    """Under DeepSpeed ZeRO-3, partition the frozen reference and reward model across the ranks as the actor is
    (each rank keeps 1/world of their parameters and gathers one block at a time while scoring: engine/frozen.py),
    with scores equal to the whole models' to the bit; False: every rank holds both whole. No effect under ZeRO
    0-2 or without DeepSpeed."""
    log_samples: int = 2
    """The first this many rollouts of each step (prompt, completion and score, decoded) go into its metrics record
    under "samples", and to TensorBoard as text; 0: none."""
    generation_weight_dtype: InitVar[str | None] = None
    """The earlier spelling of generation.weight_dtype (warns)."""
    generation_kv_dtype: InitVar[str | None] = None
    """The earlier spelling of generation.kv_dtype (warns)."""

    INFINITE_OK: ClassVar[tuple[str, ...]] = StepConfig.INFINITE_OK + ("clip_reward", "clip_range", "value_clip_range")
    """The float settings that may be inf (no clipping); every other one must be finite."""
    OPTIMIZER_BATCH: ClassVar[str] = "train_batch_size"
    """gradient_accumulation_steps cuts each optimisation minibatch (not the rollout) into micro-batches."""
    RENAMED: ClassVar[dict[str, str]] = {"generation_weight_dtype": "weight_dtype", "generation_kv_dtype": "kv_dtype"}
    """Earlier flat names of settings, still read (with a warning) from flags and config files."""

    def __post_init__(self, generation_weight_dtype: str | None = None, generation_kv_dtype: str | None = None):
        super().__post_init__()
        self.generation = GenerationSettings.parse(self.generation)
        renamed = {}
        for old, value in (("generation_weight_dtype", generation_weight_dtype),
                           ("generation_kv_dtype", generation_kv_dtype)):
            if value is not None:
                renamed[self.RENAMED[old]] = value
                warnings.warn(f"PPOConfig({old}=...) is now PPOConfig(generation=GenerationSettings("
                              f"{self.RENAMED[old]}=...))", FutureWarning, stacklevel=3)
        if renamed:
            self.generation = dataclasses.replace(self.generation, **renamed)  # parsed and checked like the others
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.num_generations is None:
            self.num_generations = 1 if self.algo == "ppo" else 4
        if self.algo != "ppo" and self.num_generations < 2:
            raise ValueError(f"{self.algo} compares samples of one prompt: num_generations must be >= 2, "
                             f"got {self.num_generations}")
        if not isinstance(self.log_samples, int) or self.log_samples < 0:
            raise ValueError(f"log_samples must be a non-negative integer, got {self.log_samples!r}")
        for name in ("train_batch_size", "ppo_epochs", "num_generations"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.sampling(None, None)  # temperature and max_new_tokens: checked as generate checks them
        if self.eval_max_new_tokens is not None:
            self.sampling(None, None, max_new_tokens=self.eval_max_new_tokens)
        for name in ("critic_lr", "clip_reward", "clip_range", "value_clip_range", "kl_target",
                     "kl_horizon"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.kl_coef < 0 or self.ptx_coef < 0:
            raise ValueError(f"kl_coef and ptx_coef must be >= 0, got {self.kl_coef} and {self.ptx_coef}")
        if self.reward_weights is not None:
            self.reward_weights = _weights(self.reward_weights)
        if self.reward_timeout is not None and not self.reward_timeout > 0:
            raise ValueError(f"reward_timeout must be positive (seconds) or None, got {self.reward_timeout!r}")
        if self.ema_beta is not None and not 0 <= self.ema_beta <= 1:
            raise ValueError(f"ema_beta must be in [0, 1] or None, got {self.ema_beta!r}")

    def sampling(self, eos_token_id: int | None, pad_token_id: int | None, max_new_tokens: int | None = None,
                 seed: int | None = None) -> SamplingParams:
        """How the actor samples a rollout: at config.temperature, with no top-k or top-p filter (the losses' log-probs
        are of the whole temperature-scaled distribution), up to max_new_tokens (None: config.max_new_tokens)."""
        return SamplingParams(do_sample=True, temperature=self.temperature,
                              max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
                              eos_token_id=eos_token_id,
                              pad_token_id=pad_token_id, seed=seed)

    @property
    def inexact_logprobs(self) -> bool:
        """Whether generation's log-probs differ from a training forward's by more than ~1e-6 (bf16 generation
        weights or KV cache, or training under bf16 autocast)."""
        g = self.generation
        exact = g.weight_dtype is None and g.kv_dtype == torch.float32 and g.activation_dtype == torch.float32
        return not exact or self.bf16_autocast


def _weights(given) -> tuple[float, ...]:
    """reward_weights as a tuple of finite floats (from a list or tuple, or one number for one function)."""
    values = [given] if _number(given) else given
    if not (isinstance(values, (list, tuple)) and values and all(_number(w) and math.isfinite(w) for w in values)):
        raise ValueError(f"reward_weights must be a list of finite numbers, one per reward function, got {given!r}")
    return tuple(float(w) for w in values)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def saved_config(saved: dict) -> dict:
    """A PPOConfig as a checkpoint saved it (checkpoint.config_json), in today's layout: checkpoints written before
    the generation settings moved into `generation` hold them flat, and those written before a generation setting
    existed (activation_dtype) ran with its default."""
    if "generation" in saved:
        return {**saved, "generation": {**config_dict(GenerationSettings()), **saved["generation"]}}
    if not any(old in saved for old in PPOConfig.RENAMED):
        return saved
    saved = dict(saved)
    old = {new: saved.pop(old, None) for old, new in PPOConfig.RENAMED.items()}
    settings = GenerationSettings(**{k: v for k, v in old.items() if v is not None})
    return {**saved, "generation": config_dict(settings)}


@dataclass
class PolicyEval:
    """The actor on held-out prompts (one sampled response each, from a fixed seed)."""

    reward: float | None
    """The mean reward-model score; None without a reward model."""
    rule: float | None
    """The mean of eval_fn (the task's own measure, which no model sees); None without one."""
    kl: float
    """The mean over responses of sum(log p_actor - log p_ref): a sample of KL(actor || reference) per response."""
    response_len: float
    """The mean response length in tokens."""
    reward_fn: float | None = None
    """The mean of the reward functions' weighted sum (unweighted for one function) over the completions some
    function applies to; None without one. Without a reward model, this is the held-out reward."""
    reward_fns: dict[str, float] | None = None
    """With several reward functions, each one's mean over the completions it applies to."""


