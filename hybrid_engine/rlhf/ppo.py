"""Step 3 of the RLHF pipeline: PPO (DeepSpeed-Chat's), and the critic-free GRPO and RLOO.

Four models take part:
- the actor, a HybridEngine: it trains under plain torch or DeepSpeed ZeRO 0-3 (with or without LoRA)
  and generates the rollouts in its generation mode;
- the critic (PPO only), a RewardModel initialised from the reward model, trained on the value loss;
- the frozen reference (the SFT policy) and the frozen reward model, both scored through the inference
  path (scoring.py).

Each step reads top to bottom (the numbered phases of train_step):
1. generate: a batch of prompts, num_generations samples each, from the actor;
2. score: old log-probs (from generation when its weights are fp32, since they then equal a training
   forward to ~1e-6; recomputed otherwise), reference log-probs, rewards, the critic's values;
3. targets: KL-penalised rewards and GAE (PPO), or group baselines (GRPO, RLOO);
4. optimise: ppo_epochs passes over minibatches of train_batch_size, an actor step (and a critic step,
   and a PTX step when pre-training data is given) on each;
5. after the step: the EMA of the actor, the KL controller.
A step whose scores or targets hold NaN or inf is skipped and counted, or stops the run (config.nonfinite).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers

from hybrid_engine.engine import HybridEngine
from hybrid_engine.engine.lora import base_model
from hybrid_engine.engine.settings import GenerationSettings
from hybrid_engine.engine.training import make_trainer
from hybrid_engine.rlhf import checkpoint, loop, ppo_state
from hybrid_engine.rlhf import experience as xp
from hybrid_engine.rlhf.data import StepData
from hybrid_engine.rlhf.ema import ActorEMA
from hybrid_engine.rlhf.losses import AdaptiveKLController, FixedKLController, policy_loss, value_loss
from hybrid_engine.rlhf.reward import RewardModel
from hybrid_engine.rlhf.reward_fn import load_reward_fn
from hybrid_engine.rlhf.scoring import FrozenPolicy, FrozenRewardModel
from hybrid_engine.rlhf.sft import sft_loss
from hybrid_engine.rlhf.tokens import TokenStats, collate_ppo, collate_sft, tokenize_ppo, tokenize_sft

ALGOS = ("ppo", "grpo", "rloo")


class NonFiniteError(FloatingPointError):
    """A step's rewards, targets or losses held NaN or inf and config.nonfinite is "stop"."""


@dataclass
class PPOConfig(loop.StepConfig):
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
    generation_weight_dtype: str | None = None
    """"bf16" generates from bf16 copies of the weights (the old log-probs are then recomputed); None: fp32."""
    reward_fn_weight: float = 1.0
    """The weight of the reward function's values in the score, when one is given beside the reward model."""
    eval_max_new_tokens: int | None = None
    """The longest response of an evaluation rollout; None: max_new_tokens."""
    nonfinite: str = "skip"
    """NaN or inf in a step's scores, targets or losses: "skip" the update (counted) or "stop" the run."""
    gradient_checkpointing: bool = False
    """Recompute the actor's activations in the backward pass (less memory, more time)."""
    bf16_autocast: bool = False
    """Run the actor's and the critic's training forwards under bf16 autocast (fp32 weights, optimizer and
    losses): faster where the CPU has bf16 units (1.35x on the training step of a 10M Llama on a Zen 4). The
    ratio's old log-probs then come from a forward of the same precision (ratio_from_training_forward), not from
    generation."""

    def __post_init__(self):
        super().__post_init__()
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.num_generations is None:
            self.num_generations = 1 if self.algo == "ppo" else 4
        if self.algo != "ppo" and self.num_generations < 2:
            raise ValueError(f"{self.algo} compares samples of one prompt: num_generations must be >= 2, "
                             f"got {self.num_generations}")
        for name in ("train_batch_size", "ppo_epochs", "num_generations", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("critic_lr", "temperature", "clip_reward", "clip_range", "value_clip_range", "kl_target",
                     "kl_horizon"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.kl_coef < 0 or self.ptx_coef < 0:
            raise ValueError(f"kl_coef and ptx_coef must be >= 0, got {self.kl_coef} and {self.ptx_coef}")
        if self.generation_weight_dtype not in (None, "bf16"):
            raise ValueError(f"generation_weight_dtype must be None or 'bf16', got {self.generation_weight_dtype!r}")
        if self.nonfinite not in ("skip", "stop"):
            raise ValueError(f"nonfinite must be 'skip' or 'stop', got {self.nonfinite!r}")
        if self.ema_beta is not None and not 0 <= self.ema_beta <= 1:
            raise ValueError(f"ema_beta must be in [0, 1] or None, got {self.ema_beta!r}")


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


@dataclass
class PPOResult:
    """What a train_ppo run did."""

    history: list[dict]
    """One record per rollout step: scores, KL, losses, lengths and phase times."""
    before: PolicyEval | None
    """Held-out figures before training (None when the eval split is empty)."""
    after: PolicyEval | None
    """Held-out figures after training."""
    evals: list[tuple[int, PolicyEval | None]]
    """(step, held-out figures) of every evaluation."""
    steps: int
    """Rollout steps run (skipped ones included)."""
    skipped: int
    """Updates skipped for NaN or inf (whole steps and single minibatches)."""
    logprob_source: str
    """Where the old log-probs came from: "generation" or "recomputed"."""
    wall_s: float
    token_stats: TokenStats
    actor: HybridEngine = field(repr=False)
    critic: RewardModel | None = field(repr=False, default=None)
    ema: ActorEMA | None = field(repr=False, default=None)


# -- the four models -------------------------------------------------------------------------------------------


class Critic(torch.nn.Module):
    """A RewardModel whose forward gives per-position values (B, T), so DeepSpeed can wrap it as the critic."""

    def __init__(self, reward_model: RewardModel):
        super().__init__()
        self.reward_model = reward_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.reward_model.values(input_ids, attention_mask)


def _load_lm(model):
    if isinstance(model, str) or hasattr(model, "__fspath__"):
        return transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    return model


def _reference(actor, reference) -> FrozenPolicy:
    """The frozen reference: given, or a copy of the actor before it trains."""
    if reference is not None:
        return FrozenPolicy(copy.deepcopy(_load_lm(reference)) if isinstance(reference, torch.nn.Module)
                            else _load_lm(reference))
    if isinstance(actor, HybridEngine):
        raise ValueError("the actor is already a HybridEngine: give the reference policy (the SFT model) too")
    return FrozenPolicy(copy.deepcopy(_load_lm(actor)))


def _trained_reward_model(reward_model) -> RewardModel:
    """A RewardModel, or one saved with its value head; anything else would score with a random head."""
    if isinstance(reward_model, RewardModel):
        return reward_model
    if isinstance(reward_model, torch.nn.Module):
        raise ValueError(f"reward_model must be a RewardModel or its directory, got {type(reward_model).__name__}: "
                         "a plain model has no trained value head")
    return RewardModel.from_pretrained(reward_model)  # refuses a directory without value_head.safetensors


def _adamw(lr: float, weight_decay: float) -> Callable:
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@dataclass
class Models:
    actor: HybridEngine
    reference: FrozenPolicy
    reward: FrozenRewardModel | None
    critic: object | None  # the critic's trainer (make_trainer), PPO only
    critic_model: RewardModel | None
    reward_fn: Callable | None


def build_models(actor, reward_model, critic, reference, reward_fn, config: PPOConfig, ds_config, lora) -> Models:
    """The actor engine, the frozen reference and reward model, and (PPO) the critic's trainer."""
    if reward_model is None and reward_fn is None:
        raise ValueError("PPO needs a reward: give a reward model, a reward function, or both")
    ds = loop.training_ds_config(ds_config, config.train_batch_size, config.max_grad_norm)
    has_ds_optimizer = ds is not None and "optimizer" in ds
    frozen_ref = _reference(actor, reference)
    frozen_rm = None if reward_model is None else FrozenRewardModel(copy.deepcopy(_trained_reward_model(reward_model)))
    critic_model = critic_trainer = None
    if config.algo == "ppo":
        source = critic if critic is not None else reward_model
        if source is None:
            raise ValueError("PPO's critic starts from the reward model: give a reward model or a critic "
                             "(or use algo grpo or rloo)")
        critic_model = copy.deepcopy(RewardModel.load(source))
        critic_trainer = make_trainer(Critic(critic_model), copy.deepcopy(ds),
                                      None if has_ds_optimizer else _adamw(config.critic_lr, config.weight_decay))
        critic_trainer.train(True)
    if isinstance(actor, HybridEngine):
        engine = actor
    else:
        dtype = torch.bfloat16 if config.generation_weight_dtype == "bf16" else None
        engine = HybridEngine(_load_lm(actor), ds_config=copy.deepcopy(ds), lora=lora,
                              optimizer=None if has_ds_optimizer else _adamw(config.lr, config.weight_decay),
                              gradient_checkpointing=config.gradient_checkpointing,
                              generation=GenerationSettings(weight_dtype=dtype), seed=config.seed)
    return Models(actor=engine, reference=frozen_ref, reward=frozen_rm, critic=critic_trainer,
                  critic_model=critic_model, reward_fn=None if reward_fn is None else load_reward_fn(reward_fn))


# -- phases 1-3: experience -------------------------------------------------------------------------------------


@dataclass
class Prompts:
    """The tokenized prompts of one split, with their rows' text fields for the reward function."""

    examples: list[dict]
    rows: object  # the datasets.Dataset (or list of mappings) the examples index into
    stats: TokenStats

    @classmethod
    def of(cls, rows, tokenizer, config: PPOConfig) -> Prompts:
        examples, stats = tokenize_ppo(rows, tokenizer, config.tokens)
        return cls(examples=examples, rows=rows, stats=stats)

    def fields(self, indices: list[int], repeat: int) -> tuple[list[str], dict[str, list]]:
        """(prompts, other fields) of examples `indices`, each repeated `repeat` times in a row."""
        rows = [self.rows[self.examples[i]["row"]] for i in indices for _ in range(repeat)]
        names = [k for k in rows[0] if k != "prompt"] if rows else []
        return [r["prompt"] for r in rows], {k: [r[k] for r in rows] for k in names}


def old_logprobs(models: Models, ro: xp.Rollout, config: PPOConfig, check: bool) -> tuple[torch.Tensor, dict]:
    """The actor's log-probs of its own samples: from generation with fp32 weights (a training forward gives
    the same to ~1e-6), else recomputed by an eval-mode forward; and figures saying which. With `check` (the
    first step) the generation's log-probs are also recomputed once, to record how far apart they are and
    what skipping the recompute saves per step."""
    if ratio_from_training_forward(config):
        return ro.logprobs, {"logprob_source": ON_POLICY}
    if config.generation_weight_dtype is not None or config.bf16_autocast:
        with training_precision(config):
            logprobs = recompute_logprobs(models.actor, ro, config.temperature)
        return logprobs, {"logprob_source": "recomputed"}
    figures = {"logprob_source": "generation"}
    if check:
        t0 = time.perf_counter()
        again = recompute_logprobs(models.actor, ro, config.temperature)
        figures["recompute_s"] = time.perf_counter() - t0
        figures["logprob_mismatch"] = float(((again - ro.logprobs) * ro.mask).abs().max())
    return ro.logprobs, figures


ON_POLICY = "the training forward itself (one on-policy pass; generation's for the KL)"


def ratio_from_training_forward(config: PPOConfig) -> bool:
    """Whether the ratio's old log-probs are the training forward's own, detached (TRL's num_iterations=1).

    With bf16 generation weights or bf16 autocast, generation's log-probs differ from a training forward's by
    ~1e-2. When each rollout batch is optimised once, in one minibatch, the old policy is the current one, so the
    ratio is exactly 1 without the recompute's extra forward; generation's log-probs still give the KL."""
    mixed = config.generation_weight_dtype is not None or config.bf16_autocast
    one_pass = config.ppo_epochs == 1 and config.train_batch_size >= config.batch_size * config.num_generations
    return mixed and one_pass


def training_precision(config: PPOConfig):
    """The context the training forwards run in: bf16 autocast, or nothing (fp32)."""
    if config.bf16_autocast:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def recompute_logprobs(engine: HybridEngine, ro: xp.Rollout, temperature: float) -> torch.Tensor:
    was_training = engine.module.training
    engine.eval()
    try:
        return engine.token_logprobs(ro.sequences, ro.attention_mask, ro.start, temperature)
    finally:
        engine.train(was_training)


@torch.no_grad()
def sequence_scores(models: Models, ro: xp.Rollout, prompts: list[str], completions: list[str], extra: dict,
                    config: PPOConfig) -> tuple[torch.Tensor, dict]:
    """(B,) scores: the reward model's, plus reward_fn_weight times the reward function's; and their means."""
    parts, figures = [], {}
    if models.reward is not None:
        rm = models.reward.score(ro.sequences, ro.attention_mask).double()
        parts.append(rm)
        figures["rm_score"] = xp.mean(rm)
    if models.reward_fn is not None:
        fn = xp.call_reward_fn(models.reward_fn, prompts, completions, extra)
        parts.append(config.reward_fn_weight * fn)
        figures["fn_score"] = xp.mean(fn)
    return torch.stack(parts).sum(0).float(), figures


@torch.no_grad()
def make_experience(models: Models, batch: Prompts, indices: list[int], tokenizer, config: PPOConfig,
                    kl_coef: float, check: bool = False) -> tuple[xp.Experience, dict]:
    """Phases 1-3 for the prompts `indices`: rollout, scores, targets; and the step's figures so far
    (`check`: see old_logprobs)."""
    k = config.num_generations
    ids = collate_ppo([batch.examples[i] for i in indices for _ in range(k)], tokenizer.pad_token_id)
    ro = xp.rollout(models.actor, ids["input_ids"], ids["attention_mask"], config.max_new_tokens, config.temperature,
                    tokenizer.eos_token_id, tokenizer.pad_token_id)  # 1. generate
    t0 = time.perf_counter()
    old, source = old_logprobs(models, ro, config, check)  # 2. score
    ref = models.reference.token_logprobs(ro.sequences, ro.attention_mask, ro.start, config.temperature)
    completions = tokenizer.batch_decode(ro.sequences[:, ro.start:], skip_special_tokens=True)
    prompts, extra = batch.fields(indices, k)
    scores, figures = sequence_scores(models, ro, prompts, completions, extra, config)
    figures.update(source)
    exp = xp.Experience(sequences=ro.sequences, attention_mask=ro.attention_mask, start=ro.start, mask=ro.mask,
                        old_logprobs=old, ref_logprobs=ref, scores=scores, advantages=torch.zeros_like(ro.mask),
                        completions=completions)
    if config.algo == "ppo":  # 3. targets
        models.critic.train(False)
        with training_precision(config):
            values = xp.critic_values(models.critic.forward, ro.sequences, ro.attention_mask, ro.start)
        models.critic.train(True)
        exp = xp.ppo_targets(exp, values, kl_coef, config.clip_reward, config.gamma, config.lam,
                             config.whiten_advantages)
    else:
        exp = xp.group_targets(exp, config.algo, k, kl_coef, config.whiten_advantages)
    figures.update(score=xp.mean(scores), kl=xp.mean(exp.kl), response_len=float(ro.mask.sum(1).mean()),
                   generate_s=ro.generate_s, experience_s=time.perf_counter() - t0)
    return exp, figures


# -- phase 4: optimise -------------------------------------------------------------------------------------------


def _finite_or_skip(ok: bool, what: str, step: int, config: PPOConfig) -> bool:
    if not ok and config.nonfinite == "stop":
        raise NonFiniteError(f"PPO step {step}: {what} hold NaN or inf; nothing was trained on them. Set "
                             "nonfinite='skip' to skip such updates and go on")
    return ok


def _step_on(trainer, module: torch.nn.Module, loss: torch.Tensor, config: PPOConfig) -> float | None:
    """Backward, clipping and an optimizer step on a loss that is finite on every rank; None (nothing stepped)
    otherwise. `trainer` is the HybridEngine or the critic's trainer, `module` what it trains."""
    if not xp.all_finite(loss.detach()):
        return None
    trainer.backward(loss)
    loop.clip_gradients(module, trainer.zero_stage, config.max_grad_norm)
    trainer.step()
    return loss.item()


def actor_update(models: Models, mb: xp.Experience, config: PPOConfig, kl_coef: float) -> float | None:
    """One actor step on a minibatch (the clipped policy loss, plus GRPO's KL term); None when not finite."""
    engine = models.actor
    with training_precision(config):
        logprobs = engine.token_logprobs(mb.sequences, mb.attention_mask, mb.start, config.temperature)
    old = logprobs.detach() if ratio_from_training_forward(config) else mb.old_logprobs
    loss = policy_loss(logprobs, old, mb.advantages, mb.mask, config.clip_range)
    if config.algo == "grpo" and kl_coef > 0:
        loss = loss + kl_coef * xp.group_kl_loss(logprobs, mb.ref_logprobs, mb.mask)
    return _step_on(engine, engine.module, loss, config)


def critic_update(models: Models, mb: xp.Experience, config: PPOConfig) -> float | None:
    """One critic step on a minibatch (the clipped value loss); None when not finite."""
    with training_precision(config):
        values = xp.critic_values(models.critic.forward, mb.sequences, mb.attention_mask, mb.start)
    loss = value_loss(values, mb.old_values, mb.returns, mb.mask, config.value_clip_range)
    return _step_on(models.critic, models.critic_model, loss, config)


def ptx_update(models: Models, batch: dict, config: PPOConfig) -> float | None:
    """One actor step on the pre-training mixture: ptx_coef times the LM loss (DeepSpeed-Chat's
    train_unsupervised); None when not finite."""
    with training_precision(config):
        loss = config.ptx_coef * sft_loss(models.actor, batch)
    return _step_on(models.actor, models.actor.module, loss, config)


def optimise(models: Models, exp: xp.Experience, config: PPOConfig, kl_coef: float, step: int,
             ptx_batch: Callable[[], dict] | None) -> dict:
    """Phase 4: ppo_epochs passes over minibatches of the rollout batch; the mean losses and skips."""
    B = exp.sequences.shape[0]
    actor_losses, critic_losses, ptx_losses, skipped = [], [], [], 0
    for _ in range(config.ppo_epochs):
        for lo in range(0, B, config.train_batch_size):
            mb = exp.select(range(lo, min(lo + config.train_batch_size, B)))
            updates = [("actor", actor_losses, lambda: actor_update(models, mb, config, kl_coef))]
            if models.critic is not None:
                updates.append(("critic", critic_losses, lambda: critic_update(models, mb, config)))
            if ptx_batch is not None and config.ptx_coef > 0:
                updates.append(("ptx", ptx_losses, lambda: ptx_update(models, ptx_batch(), config)))
            for name, record, update in updates:
                loss = update()
                if _finite_or_skip(loss is not None, f"the {name} loss", step, config):
                    record.append(loss)
                else:
                    skipped += 1
    figures = {"policy_loss": _mean(actor_losses), "skipped": skipped}
    if models.critic is not None:
        figures["value_loss"] = _mean(critic_losses)
    if ptx_losses:
        figures["ptx_loss"] = _mean(ptx_losses)
    return figures


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# -- evaluation -----------------------------------------------------------------------------------------------------


EvalFn = Callable[..., "list[float]"]


@torch.no_grad()
def evaluate_policy(models: Models, held_out: Prompts, tokenizer, config: PPOConfig,
                    eval_fn: EvalFn | None) -> PolicyEval | None:
    """One sampled response per held-out prompt, from a generator seeded afresh (the same draws at every
    evaluation, and the training stream untouched); every rank evaluates the whole split."""
    n = len(held_out.examples)
    if n == 0:
        return None
    rm, rule, kl, lengths = [], [], [], []
    max_new = config.eval_max_new_tokens or config.max_new_tokens
    for lo in range(0, n, config.eval_batch_size):
        indices = list(range(lo, min(lo + config.eval_batch_size, n)))
        ids = collate_ppo([held_out.examples[i] for i in indices], tokenizer.pad_token_id)
        out = models.actor.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=max_new, do_sample=True,
                                    temperature=config.temperature, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id, seed=config.seed + 1 + lo)
        seq_mask = torch.cat([ids["attention_mask"], out.response_mask], 1)
        start = ids["input_ids"].shape[1]
        ref = models.reference.token_logprobs(out.sequences, seq_mask, start, config.temperature)
        kl.append(((out.logprobs - ref) * out.response_mask).sum(1).double())
        lengths.append(out.response_mask.sum(1).double())
        if models.reward is not None:
            rm.append(models.reward.score(out.sequences, seq_mask).double())
        if eval_fn is not None:
            prompts, extra = held_out.fields(indices, 1)
            completions = tokenizer.batch_decode(out.sequences[:, start:], skip_special_tokens=True)
            rule.append(xp.call_reward_fn(eval_fn, prompts, completions, extra))
    return PolicyEval(reward=xp.mean(torch.cat(rm)) if rm else None, rule=xp.mean(torch.cat(rule)) if rule else None,
                      kl=xp.mean(torch.cat(kl)), response_len=xp.mean(torch.cat(lengths)))


def eval_record(figures: PolicyEval) -> dict:
    """An evaluation as a metrics record (keys apart from the training records')."""
    record = {"eval": True, "eval_kl": figures.kl, "eval_response_len": figures.response_len}
    if figures.reward is not None:
        record["eval_reward"] = figures.reward
    if figures.rule is not None:
        record["rule"] = figures.rule
    return record


# -- the trainer ------------------------------------------------------------------------------------------------------


class PTXBatches:
    """The pre-training batches (train_batch_size rows, a seeded order per pass, cycling); callable."""

    def __init__(self, ptx_data, tokenizer, config: PPOConfig):
        rows = ptx_data.train if isinstance(ptx_data, StepData) else ptx_data
        self.examples, _ = tokenize_sft(rows, tokenizer, config.tokens)
        if not self.examples:
            raise ValueError("the pre-training (PTX) data has no rows left after tokenization")
        self.pad_id, self.size, self.seed = tokenizer.pad_token_id, config.train_batch_size, config.seed + 7
        self.epoch, self.taken = 0, 0  # the position, saved in checkpoints

    def __call__(self) -> dict:
        rank, world = loop.rank_and_world()
        batches = loop.batch_order(len(self.examples), self.size, self.seed, self.epoch, rank, world)
        if self.taken == len(batches):
            self.epoch, self.taken = self.epoch + 1, 0
            batches = loop.batch_order(len(self.examples), self.size, self.seed, self.epoch, rank, world)
        self.taken += 1
        return collate_sft([self.examples[i] for i in batches[self.taken - 1]], self.pad_id)


def _kl_controller(config: PPOConfig):
    if config.adaptive_kl:
        return AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
    return FixedKLController(config.kl_coef)


def _save(models: Models, ema: ActorEMA | None, tokenizer, output_dir: str) -> None:
    import os

    models.actor.save_pretrained(output_dir)
    if models.critic_model is not None:
        models.critic_model.save_pretrained(os.path.join(output_dir, "critic"))
    if ema is not None:
        ema.save_pretrained(os.path.join(output_dir, "ema"))
    if loop.rank_and_world()[0] == 0:
        tokenizer.save_pretrained(output_dir)


def train_ppo(actor, tokenizer, data: StepData, config: PPOConfig | None = None, reward_model=None, critic=None,
              reference=None, reward_fn=None, eval_fn: EvalFn | None = None, ptx_data=None, ds_config=None,
              lora=None, progress: bool = True, log: Callable[[int, dict], None] | None = None,
              resume: bool | str = False) -> PPOResult:
    """RLHF step 3 on data.train's prompts, evaluated on data.eval's before, every config.eval_every steps and
    after.

    actor: the SFT model (an HF causal LM or its directory), trained in place, or a HybridEngine.
    reward_model: a RewardModel or its directory (frozen; it scores the rollouts). critic (PPO): where the
    critic starts, by default the reward model. reference: the frozen policy of the KL term, by default a
    copy of the actor before training. reward_fn: a rule ("module:function" or a callable
    fn(prompts, completions, **fields) -> one number each) added to the reward model's score, or used alone.
    eval_fn: a held-out measure of the same form that no model trains on (the demo's rule_score).
    ptx_data: SFT-style rows (a StepData or rows) for the pre-training loss. ds_config, lora: as train_sft.
    log(step, figures) receives each step's record and each evaluation's (eval_record). Every rank calls this
    under DeepSpeed; rank 0 writes config.output_dir: the actor (merged), critic/ and ema/.

    With config.checkpoint_every, a checkpoint is written to output_dir/checkpoints every that many steps;
    resume=True (the newest there) or a checkpoint folder continues that run, with the same results to the bit
    as a run that never stopped (checkpoint.py)."""
    config = config or PPOConfig()
    t_start = time.perf_counter()
    loop.pad_id_of(tokenizer)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: a response could never end")
    torch.manual_seed(config.seed)
    models = build_models(actor, reward_model, critic, reference, reward_fn, config, ds_config, lora)
    loop.check_vocab(tokenizer, base_model(models.actor.module).config.vocab_size)
    train, held_out = Prompts.of(data.train, tokenizer, config), Prompts.of(data.eval, tokenizer, config)
    if not train.examples:
        raise ValueError("no PPO prompts left after tokenization (data.train is empty or every prompt was dropped)")
    ptx_batch = None if ptx_data is None else PTXBatches(ptx_data, tokenizer, config)
    ema = None if config.ema_beta is None else ActorEMA(models.actor.module, config.ema_beta)
    kl_ctl = _kl_controller(config)
    rank, world = loop.rank_and_world()
    per_epoch = len(loop.batch_order(len(train.examples), config.batch_size, config.seed, 0, rank, world))
    total = loop.total_steps(per_epoch, config)
    if total < 1:
        raise ValueError(f"{len(train.examples)} prompts make no batch of {config.batch_size} per rank on {world} "
                         "ranks")
    checkpoint.check_supported(config, models.actor.zero_stage, resume)
    models.actor.train()
    result = PPOResult(history=[], before=None, after=None, evals=[], steps=0, skipped=0, logprob_source="",
                       wall_s=0.0, token_stats=train.stats, actor=models.actor, critic=models.critic_model, ema=ema)
    if resume:
        ppo_state.restore_run(checkpoint.resume_path(config, resume), config, models, ema, kl_ctl, ptx_batch,
                              result, PolicyEval)

    def evaluate() -> None:
        figures = evaluate_policy(models, held_out, tokenizer, config, eval_fn)
        result.evals.append((result.steps, figures))
        if log is not None and figures is not None:
            log(result.steps, eval_record(figures))

    bar = loop.progress_bar(total, config.algo, progress)
    bar.update(result.steps)
    if not result.evals:
        evaluate()
    seen = 0
    for epoch in range(config.epochs):
        for indices in loop.batch_order(len(train.examples), config.batch_size, config.seed, epoch, rank, world):
            seen += 1
            if seen <= result.steps:  # run before the checkpoint this run resumed from
                continue
            if result.steps == total:
                break
            record = ppo_step(models, train, indices, tokenizer, config, kl_ctl, ema, ptx_batch, result.steps, total)
            result.history.append(record)
            result.skipped += record["skipped"]
            result.logprob_source = record["logprob_source"]
            result.steps += 1
            if log is not None:
                log(result.steps, record)
            bar.update(1)
            bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{record['kl']:.2f}")
            if config.eval_every and result.steps % config.eval_every == 0 and result.steps < total:
                evaluate()
            if config.checkpoint_every and result.steps % config.checkpoint_every == 0 and result.steps < total:
                ppo_state.save_run(config, models, ema, kl_ctl, ptx_batch, result)
    evaluate()
    bar.close()
    result.before, result.after = result.evals[0][1], result.evals[-1][1]
    if config.output_dir is not None:
        _save(models, ema, tokenizer, config.output_dir)
    result.wall_s = time.perf_counter() - t_start
    return result


def ppo_step(models: Models, train: Prompts, indices: list[int], tokenizer, config: PPOConfig, kl_ctl, ema,
             ptx_batch, step: int, total: int) -> dict:
    """One rollout step (phases 1-5); its record."""
    scale = loop.lr_scale(step, total, config.warmup_steps, config.schedule)
    loop.set_lr(models.actor.optimizer, config.lr * scale)
    if models.critic is not None:
        loop.set_lr(models.critic.optimizer, config.critic_lr * scale)
    exp, record = make_experience(models, train, indices, tokenizer, config, kl_ctl.value, check=step == 0)
    record.update(step=step + 1, kl_coef=kl_ctl.value)
    t0 = time.perf_counter()
    if _finite_or_skip(xp.all_finite(exp.scores, exp.advantages, exp.returns), "the scores or advantages", step + 1,
                       config):
        record.update(optimise(models, exp, config, kl_ctl.value, step + 1, ptx_batch))
        if ema is not None:
            ema.update()
        kl_ctl.update(record["kl"], exp.sequences.shape[0])
    else:
        record.update(skipped=1)
    record["train_s"] = time.perf_counter() - t0
    return record
