"""The phases of one RLHF step (ppo.py's ppo_step): 1-3, the experience (rollout, scores, targets); 4, the
optimisation (actor, critic and pre-training updates over minibatches); and the held-out evaluation."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hybrid_engine.engine import HybridEngine
from hybrid_engine.rlhf import experience as xp
from hybrid_engine.rlhf import loop
from hybrid_engine.rlhf.data import StepData
from hybrid_engine.rlhf.losses import policy_loss, value_loss
from hybrid_engine.rlhf.ppo_config import NonFiniteError, PolicyEval, PPOConfig
from hybrid_engine.rlhf.ppo_models import Models
from hybrid_engine.rlhf.sft import sft_loss
from hybrid_engine.rlhf.tokens import TokenStats, collate_ppo, collate_sft, tokenize_ppo, tokenize_sft

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
    if config.inexact_logprobs:
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

    With bf16 generation weights or KV cache, or bf16 autocast, generation's log-probs differ from a training forward's
    by ~1e-2. When each rollout batch is optimised once, in one minibatch, the old policy is the current one, so the
    ratio is exactly 1 without the recompute's extra forward; generation's log-probs still give the KL."""
    one_pass = config.ppo_epochs == 1 and config.train_batch_size >= config.batch_size * config.num_generations
    return config.inexact_logprobs and one_pass


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
        rm = models.reward.score(ro.sequences, ro.attention_mask, ro.start).double()
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


def finite_or_skip(ok: bool, what: str, step: int, config: PPOConfig) -> bool:
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
                if finite_or_skip(loss is not None, f"the {name} loss", step, config):
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
            rm.append(models.reward.score(out.sequences, seq_mask, start).double())
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


class PTXBatches:
    """The pre-training batches (train_batch_size rows, a seeded order per pass, cycling); callable."""

    def __init__(self, ptx_data, tokenizer, config: PPOConfig):
        rows = ptx_data.train if isinstance(ptx_data, StepData) else ptx_data
        self.examples, _ = tokenize_sft(rows, tokenizer, config.tokens)
        if not self.examples:
            raise ValueError("the pre-training (PTX) data has no rows left after tokenization")
        self.pad_id, self.size, self.seed = tokenizer.pad_token_id, config.train_batch_size, config.seed + 7
        self.epoch, self.taken = 0, 0  # the position, saved in checkpoints
        self._order: tuple[int, list[list[int]]] | None = None  # (epoch, its batches), drawn once per pass

    def _batches(self) -> list[list[int]]:
        if self._order is None or self._order[0] != self.epoch:
            rank, world = loop.rank_and_world()
            self._order = (self.epoch, loop.batch_order(len(self.examples), self.size, self.seed, self.epoch, rank,
                                                        world))
        return self._order[1]

    def __call__(self) -> dict:
        if self.taken == len(self._batches()):
            self.epoch, self.taken = self.epoch + 1, 0
        batches = self._batches()
        self.taken += 1
        return collate_sft([self.examples[i] for i in batches[self.taken - 1]], self.pad_id)


