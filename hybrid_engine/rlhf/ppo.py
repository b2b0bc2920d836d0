"""Step 3 of the RLHF pipeline: PPO (DeepSpeed-Chat's), and the critic-free GRPO and RLOO.

Four models take part:
- the actor, a HybridEngine: it trains under plain torch or DeepSpeed ZeRO 0-3 (with or without LoRA)
  and generates the rollouts in its generation mode;
- the critic (PPO only), a RewardModel initialised from the reward model, trained on the value loss;
- the frozen reference (the SFT policy) and the frozen reward model, both scored through the inference
  path (scoring.py).

This file is the driver (train_ppo, ppo_step); the settings are in ppo_config.py, the four models in
ppo_models.py and the phases in ppo_phases.py. Each step reads top to bottom (ppo_step):
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

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hybrid_engine.engine import HybridEngine
from hybrid_engine.engine.lora import base_model
from hybrid_engine.rlhf import checkpoint, loop, ppo_state
from hybrid_engine.rlhf import experience as xp
from hybrid_engine.rlhf.data import StepData
from hybrid_engine.rlhf.ema import ActorEMA
from hybrid_engine.rlhf.losses import AdaptiveKLController, FixedKLController
from hybrid_engine.rlhf.ppo_config import ALGOS, NonFiniteError, PolicyEval, PPOConfig  # noqa: F401
from hybrid_engine.rlhf.ppo_models import Critic, Models, build_models  # noqa: F401
from hybrid_engine.rlhf.ppo_phases import (  # noqa: F401
    ON_POLICY,
    EvalFn,
    Prompts,
    PTXBatches,
    eval_record,
    evaluate_policy,
    finite_or_skip,
    make_experience,
    optimise,
)
from hybrid_engine.rlhf.reward import RewardModel
from hybrid_engine.rlhf.tokens import TokenStats


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


# -- the trainer ------------------------------------------------------------------------------------------------------


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
    if finite_or_skip(xp.all_finite(exp.scores, exp.advantages, exp.returns), "the scores or advantages", step + 1,
                       config):
        record.update(optimise(models, exp, config, kl_ctl.value, step + 1, ptx_batch))
        if ema is not None:
            ema.update()
        kl_ctl.update(record["kl"], exp.sequences.shape[0])
    else:
        record.update(skipped=1)
    record["train_s"] = time.perf_counter() - t0
    return record
