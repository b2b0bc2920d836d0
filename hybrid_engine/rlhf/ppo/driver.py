"""Step 3 of the RLHF pipeline: PPO (DeepSpeed-Chat's), and the critic-free GRPO and RLOO.

Four models take part (models.py): the actor, a HybridEngine that trains under plain torch or DeepSpeed ZeRO 0-3
(with or without LoRA) and generates the rollouts in its generation mode; the critic (PPO only), a RewardModel
initialised from the reward model and trained on the value loss; the frozen reference (the SFT policy) and the
frozen reward model, both scored through the inference path (scoring.py).

train_ppo runs the one training loop of the three trainers (loop.py) over ppo_step, which reads top to bottom:
1. generate: a batch of prompts, num_generations samples each, from the actor;
2. score: old log-probs (from generation when its weights are fp32, since they then equal a training forward to
   ~1e-6; recomputed otherwise), reference log-probs, rewards;
3. targets: the critic's values, KL-penalised rewards and GAE (PPO), or group baselines (GRPO, RLOO);
4. optimise: ppo_epochs passes over minibatches of train_batch_size, an actor step (and a critic step, and a PTX
   step when pre-training data is given) on each;
5. after the step: the EMA of the actor, the KL controller.
A step whose scores or targets hold NaN or inf is skipped and counted, or stops the run (config.nonfinite); a run
whose every update was skipped raises NonFiniteError and saves nothing.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hybrid_engine.engine import HybridEngine
from hybrid_engine.engine.lora import base_model
from hybrid_engine.rlhf import checkpoint, fingerprints
from hybrid_engine.rlhf.data import StepData
from hybrid_engine.rlhf.distributed import all_finite, rank_and_world
from hybrid_engine.rlhf.loop import Trainer, train_loop
from hybrid_engine.rlhf.losses import AdaptiveKLController, FixedKLController
from hybrid_engine.rlhf.ppo import rewards
from hybrid_engine.rlhf.ppo.config import PolicyEval, PPOConfig
from hybrid_engine.rlhf.ppo.ema import ActorEMA
from hybrid_engine.rlhf.ppo.evaluate import eval_record, evaluate_policy
from hybrid_engine.rlhf.ppo.experience import Prompts, generate, score, targets
from hybrid_engine.rlhf.ppo.models import Models, ModelSources, build_models
from hybrid_engine.rlhf.ppo.state import PPORunState
from hybrid_engine.rlhf.ppo.update import PTXBatches, finite_or_skip, optimise
from hybrid_engine.rlhf.retokenize import RetokenizedRewardModel
from hybrid_engine.rlhf.reward import RewardModel
from hybrid_engine.rlhf.schedule import current_lr, run_length
from hybrid_engine.rlhf.tokens import TokenStats
from hybrid_engine.rlhf.trainer import check_trained, check_vocab, pad_id_of


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
    stop_reason: str = ""
    """What ended the run: 'max_steps (N)' or 'epochs (...)' (loop.LoopRecord.stop_reason)."""
    rm_own_tokenizer: bool = False
    """Whether the reward model scored with its own tokenizer (the rollouts decoded and re-encoded for it)."""
    generation_path: str = "fast"
    """Which path generated the rollouts: "fast" (the inference transformer) or "hf" (transformers' generate on the
    gathered, LoRA-fused actor, for a family without a fast path: actor.hf_reason says why)."""


@dataclass
class PPORun:
    """What every step of a run uses beside its prompts: the models, the tokenizer, the settings and the state
    that carries from step to step (the KL controller, the actor's EMA, the pre-training batches)."""

    models: Models
    tokenizer: object
    config: PPOConfig
    kl_ctl: AdaptiveKLController | FixedKLController
    ema: ActorEMA | None
    ptx: PTXBatches | None
    length: tuple[int, int] = (0, 0)
    """(the steps of one epoch on this rank, the run's steps): schedule.run_length."""
    steps_done: int = 0
    """The steps finished so far (what the reward functions' trainer_state says)."""

    def trainer_state(self):
        """The TrainerState the reward and eval functions are given (TRL's trainer_state)."""
        return rewards.trainer_state(self.steps_done, self.length[1], self.length[0])


def train_ppo(models: ModelSources | Models, tokenizer, data: StepData, config: PPOConfig | None = None, *,
              ptx_data=None, progress: bool = True, log: Callable[[int, dict], None] | None = None,
              resume: bool | str = False) -> PPOResult:
    """RLHF step 3 on data.train's prompts, evaluated on data.eval's before, every config.eval_every steps and
    after.

    models: where to build the models from (ModelSources: the actor, reward model, critic, reference, reward and eval
    functions, DeepSpeed config, LoRA), or Models already built by build_models with this config. ptx_data:
    SFT-style rows (a StepData or rows) for the pre-training loss. log(step, figures) receives each step's record
    and each evaluation's (eval_record). Every rank calls this under DeepSpeed; rank 0 writes config.output_dir:
    the actor (merged), critic/ and ema/.

    With config.checkpoint_every, a checkpoint is written to output_dir/checkpoints every that many steps;
    resume=True (the newest there) or a checkpoint folder continues that run, with the same results to the bit
    as a run that never stopped (checkpoint.py)."""
    config = config or PPOConfig()
    t_start = time.perf_counter()
    pad_id_of(tokenizer)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: a response could never end")
    checkpoint.check_output(config, resume)
    torch.manual_seed(config.seed)
    models = models if isinstance(models, Models) else build_models(models, config, tokenizer)
    check_vocab(tokenizer, base_model(models.actor.module).config.vocab_size)
    train, held_out = Prompts.of(data.train, tokenizer, config), Prompts.of(data.eval, tokenizer, config)
    if not train.examples:
        raise ValueError("no PPO prompts left after tokenization (data.train is empty or every prompt was dropped)")
    run = PPORun(models=models, tokenizer=tokenizer, config=config, kl_ctl=_kl_controller(config),
                 ema=None if config.ema_beta is None else ActorEMA(models.actor.module, config.ema_beta),
                 ptx=None if ptx_data is None else PTXBatches(ptx_data, tokenizer, config),
                 length=run_length(len(train.examples), config))
    checkpoint.check_supported(config, resume)
    defines = None if not (config.checkpoint_every or resume) else _defines(models, data, ptx_data)
    models.actor.train()
    trainer = Trainer(
        step=lambda rows, step: ppo_step(run, train, rows, step),
        evaluate=lambda: evaluate_policy(models, held_out, tokenizer, config, models.eval_fn, run.trainer_state()),
        optimizers=[(models.actor.optimizer, config.lr)]
        + ([] if models.critic is None else [(models.critic.optimizer, config.critic_lr)]),
        postfix=lambda record: {"score": f"{record['score']:.3f}", "kl": f"{record['kl']:.2f}"},
        on_step=log, on_eval=None if log is None else functools.partial(_log_eval, log),
        state=PPORunState(run, defines))
    record = train_loop(len(train.examples), config, trainer, config.algo, progress, resume)
    check_trained(config.algo, record.steps, sum(not _trained(r) for r in record.history), config.output_dir)
    if config.output_dir is not None:
        checkpoint.save_final(config.output_dir, functools.partial(_save, run))
    history = record.history
    return PPOResult(history=history, before=record.evals[0][1], after=record.evals[-1][1], evals=record.evals,
                     steps=record.steps, skipped=sum(r["skipped"] for r in history),
                     logprob_source=history[-1]["logprob_source"] if history else "",
                     wall_s=time.perf_counter() - t_start, token_stats=train.stats, actor=models.actor,
                     critic=models.critic_model, ema=run.ema, stop_reason=record.stop_reason,
                     rm_own_tokenizer=isinstance(models.reward, RetokenizedRewardModel),
                     generation_path=models.actor.generation_path)


def _defines(models: Models, data: StepData, ptx_data) -> dict:
    """What a resume of this run must match beside its config (checkpoint.RUN_PARTS), taken before training."""
    fp = fingerprints.weights_fingerprint
    return {"data": fingerprints.rows_fingerprint(data.train, data.eval), "model": fp(models.actor.module),
            "reference": fp(models.reference.model), "reward_model": fp(None if models.reward is None
                                                                         else models.reward.model),
            "reward_fn": _functions_fingerprint(models),
            "eval_fn": fingerprints.function_fingerprint(models.eval_fn),
            "ptx": fingerprints.rows_fingerprint(ptx_data.train if isinstance(ptx_data, StepData) else ptx_data)}


def _functions_fingerprint(models: Models) -> str | list[str] | None:
    """The reward functions' fingerprints: one function's alone (as checkpoints of one function hold it)."""
    if models.reward_fns is None:
        return None
    prints = [fingerprints.function_fingerprint(fn) for fn in models.reward_fns.fns]
    return prints[0] if len(prints) == 1 else prints


def ppo_step(run: PPORun, prompts: Prompts, indices: list[int], step: int) -> dict:
    """One rollout step over the prompts `indices` (the step's 0-based index `step`), phases 1-5; its record."""
    models, config, kl_coef = run.models, run.config, run.kl_ctl.value
    run.steps_done = step
    ro = generate(models, prompts, indices, run.tokenizer, config)  # 1. generate
    t0 = time.perf_counter()
    exp, record = score(models, ro, prompts, indices, run.tokenizer, config, check=step == 0,
                        state=run.trainer_state())  # 2. score
    exp = targets(models, exp, config, kl_coef)  # 3. targets
    record.update(generate_s=ro.generate_s, experience_s=time.perf_counter() - t0, step=step + 1, kl_coef=kl_coef,
                  lr=current_lr(models.actor.optimizer))
    if models.critic is not None:
        record["critic_lr"] = current_lr(models.critic.optimizer)
    t0 = time.perf_counter()
    if finite_or_skip(all_finite(exp.scored(), exp.advantages, exp.returns), _what(exp), step + 1, config):
        record.update(optimise(models, exp, config, kl_coef, step + 1, run.ptx))  # 4. optimise
        if run.ema is not None:  # 5. after the step
            run.ema.update()
        run.kl_ctl.update(record["kl"], exp.sequences.shape[0])
    else:
        record.update(skipped=1, skip_reason=_what(exp))
    run.steps_done = step + 1
    record["train_s"] = time.perf_counter() - t0
    return record


def _what(exp) -> str:
    """What a step's non-finite scores or targets came from, in words."""
    return f"the scores ({exp.unscored})" if exp.unscored else "the scores or advantages"


def _trained(record: dict) -> bool:
    """Whether a step's record shows an update that was not skipped (a finite mean loss)."""
    return any(math.isfinite(record.get(k, math.nan)) for k in ("policy_loss", "value_loss", "ptx_loss"))


def _log_eval(log: Callable[[int, dict], None], step: int, figures: PolicyEval | None) -> None:
    """An evaluation as a metrics record (none for an empty eval split)."""
    if figures is not None:
        log(step, eval_record(figures))


def _kl_controller(config: PPOConfig) -> AdaptiveKLController | FixedKLController:
    if config.adaptive_kl:
        return AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
    return FixedKLController(config.kl_coef)


def _save(run: PPORun, output_dir: str) -> None:
    models = run.models
    models.actor.save_pretrained(output_dir)
    if models.critic_model is not None:
        models.critic_model.save_pretrained(os.path.join(output_dir, "critic"))
    if run.ema is not None:
        run.ema.save_pretrained(os.path.join(output_dir, "ema"))
    if rank_and_world()[0] == 0:
        run.tokenizer.save_pretrained(output_dir)
