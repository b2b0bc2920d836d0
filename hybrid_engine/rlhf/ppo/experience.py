"""Phases 1-3 of an RLHF step for a batch of prompts (driver.ppo_step calls them in turn): 1. generate the rollouts
with the actor; 2. score them (the old log-probs, the reference's, the reward model's and the reward function's
scores); 3. the targets the optimisation trains on (the critic's values and GAE, or the group baselines: batch.py's
maths)."""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass

import torch

from hybrid_engine.engine import HybridEngine
from hybrid_engine.rlhf.ppo import batch as xp
from hybrid_engine.rlhf.ppo import rewards
from hybrid_engine.rlhf.ppo.config import PPOConfig
from hybrid_engine.rlhf.ppo.models import Models
from hybrid_engine.rlhf.tokens import TokenStats, collate_ppo, tokenize_ppo
from hybrid_engine.rlhf.trainer import eval_mode


@dataclass
class Prompts:
    """The tokenized prompts of one split, with their rows' other columns (every one, as the data holds them) for
    the reward and eval functions."""

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
def recompute_logprobs(engine: HybridEngine, ro: xp.Rollout, temperature: float, packed: bool = False
                       ) -> torch.Tensor:
    with eval_mode(engine):
        return engine.token_logprobs(ro.sequences, ro.attention_mask, ro.start, temperature, packed=packed)


def logprob_mismatch(generated: torch.Tensor, trained: torch.Tensor, mask: torch.Tensor) -> dict:
    """The mean and max |generation's log-prob - the training forward's| over the response tokens (mask 1)."""
    gap = (generated - trained).abs() * mask
    return {"logprob_mismatch_mean": float(gap.sum() / mask.sum().clamp(min=1)),
            "logprob_mismatch_max": float(gap.max())}


def old_logprobs(models: Models, ro: xp.Rollout, config: PPOConfig, check: bool) -> tuple[torch.Tensor, dict]:
    """The actor's log-probs of its own samples: from generation with fp32 weights (a training forward gives
    the same to ~1e-6), else recomputed by an eval-mode forward, with their mismatch to generation's
    (logprob_mismatch_mean/max, every step: the fast mode's precision contract); and figures saying which. With
    `check` (the first step) the generation's log-probs are also recomputed once, to record how far apart they are
    and what skipping the recompute saves per step."""
    if ratio_from_training_forward(config):
        return ro.logprobs, {"logprob_source": ON_POLICY}
    if config.inexact_logprobs:
        with training_precision(config):
            logprobs = recompute_logprobs(models.actor, ro, config.temperature, config.packing)
        return logprobs, {"logprob_source": "recomputed", **logprob_mismatch(ro.logprobs, logprobs, ro.mask)}
    figures = {"logprob_source": "generation"}
    if check:
        t0 = time.perf_counter()
        again = recompute_logprobs(models.actor, ro, config.temperature, config.packing)
        figures["recompute_s"] = time.perf_counter() - t0
        figures["logprob_mismatch"] = float(((again - ro.logprobs) * ro.mask).abs().max())
    return ro.logprobs, figures


@dataclass
class Scores:
    """A batch's sequence scores and what they came from."""

    scores: torch.Tensor  # (B,) fp32: the reward model's plus reward_fn_weight x the functions'; NaN where unscorable
    scorable: torch.Tensor | None  # (B,) bool: some reward applies; None: every row (a reward model scores all)
    figures: dict
    unscored: str = ""  # a reward function's value that is not finite, in words
    log: rewards.StepLog | None = None  # what the functions logged (log_metric, log_extra)


@torch.no_grad()
def sequence_scores(models: Models, ro: xp.Rollout, prompts: list, completions: list[str], extra: dict,
                    config: PPOConfig, state=None) -> Scores:
    """The reward model's score plus reward_fn_weight times the reward functions' weighted sum (rewards.py), their
    means (fn_score: the functions' part; fn_score/NAME: each function over the completions it applies to) and what
    the functions logged. `state`: the TrainerState the functions may read."""
    parts, figures = [], {}
    if models.reward is not None:
        rm = models.reward.score(ro.sequences, ro.attention_mask, ro.start).double()
        parts.append(rm)
        figures["rm_score"] = xp.mean(rm)
    if models.reward_fns is None:
        return Scores(torch.stack(parts).sum(0).float(), None, figures)
    fns = rewards.call_functions(models.reward_fns, prompts, completions, extra,
                                 xp.completion_ids(ro.sequences[:, ro.start:], ro.mask), state, config.reward_timeout,
                                 config.nonfinite)
    combined = fns.combined  # beside a reward model, a row no function applies to adds nothing
    parts.append(config.reward_fn_weight * (torch.where(fns.scorable, combined, 0.0) if parts else combined))
    figures["fn_score"] = xp.mean(combined[fns.scorable])
    if len(fns.names) > 1:
        figures.update({f"fn_score/{name}": value for name, value in fns.means().items()})
    scorable = None if models.reward is not None else fns.scorable
    unscored = rewards.first_bad(fns, prompts) or ""
    if scorable is not None:
        figures["unscorable"] = int((~scorable).sum())
        missing = rewards.first_unscorable(fns, prompts)
        if missing and config.algo == "ppo":  # PPO's critic needs a score for every rollout
            unscored = unscored or missing + ", and PPO has no reward model to score it"
        elif missing:
            warnings.warn(f"{missing}: such completions get advantage 0 and stay out of their group's baseline, as "
                          "in TRL (each step's record counts them: 'unscorable')", RuntimeWarning, stacklevel=2)
    scorable = None if config.algo == "ppo" else scorable
    return Scores(torch.stack(parts).sum(0).float(), scorable, figures, unscored, fns.log)


@torch.no_grad()
def generate(models: Models, batch: Prompts, indices: list[int], tokenizer, config: PPOConfig) -> xp.Rollout:
    """Phase 1: config.num_generations samples of each prompt of `indices`, in a row, from the actor."""
    k = config.num_generations
    ids = collate_ppo([batch.examples[i] for i in indices for _ in range(k)], tokenizer.pad_token_id)
    sampling = config.sampling(tokenizer.eos_token_id, tokenizer.pad_token_id)
    return xp.rollout(models.actor, ids["input_ids"], ids["attention_mask"], sampling)


@torch.no_grad()
def score(models: Models, ro: xp.Rollout, batch: Prompts, indices: list[int], tokenizer, config: PPOConfig,
          check: bool = False, state=None) -> tuple[xp.Experience, dict]:
    """Phase 2: the old log-probs (`check`: see old_logprobs), the reference's, and the sequences' scores (`state`:
    the TrainerState the reward functions may read); the experience without targets yet, and its figures (the
    scores' means over the scorable rows, the KL to the reference, the responses' mean and longest length and the
    share cut off at max_new_tokens, config.log_samples of the rollouts, and what the reward functions logged)."""
    old, source = old_logprobs(models, ro, config, check)
    ref = models.reference.token_logprobs(ro.sequences, ro.attention_mask, ro.start, config.temperature)
    completions = tokenizer.batch_decode(ro.sequences[:, ro.start:], skip_special_tokens=True)
    prompts, extra = batch.fields(indices, config.num_generations)
    scored = sequence_scores(models, ro, prompts, completions, extra, config, state)
    figures = {**scored.figures, **source}
    exp = xp.Experience(sequences=ro.sequences, attention_mask=ro.attention_mask, start=ro.start, mask=ro.mask,
                        old_logprobs=old, ref_logprobs=ref, scores=scored.scores,
                        advantages=torch.zeros_like(ro.mask), completions=completions, scorable=scored.scorable,
                        unscored=scored.unscored)
    lengths = ro.mask.sum(1)  # (B,)
    figures.update(score=xp.mean(exp.scored()), kl=xp.mean(exp.kl), response_len=float(lengths.mean()),
                   response_len_max=int(lengths.max()),
                   truncated_frac=xp.mean(xp.truncated(ro.sequences, ro.mask, ro.start, tokenizer.eos_token_id)))
    if config.log_samples:
        figures["samples"] = xp.samples(prompts, completions, scored.scores, config.log_samples,
                                        scored.log.extra if scored.log else None)
    if scored.log is not None:
        figures.update(logged_metrics(scored.log.means(), figures))
    return exp, figures


def logged_metrics(metrics: dict[str, float], figures: dict, prefix: str = "") -> dict[str, float]:
    """The reward functions' log_metric means under their names (with `prefix`), refused in one line where a name
    is one of the record's own figures."""
    out = {prefix + name: value for name, value in metrics.items()}
    if clash := sorted(set(out) & set(figures)):
        raise ValueError(f"a reward function logged the metric {clash[0]!r} with log_metric, a name the step's own "
                         f"record uses ({', '.join(sorted(figures))}): give it another name")
    return out


@torch.no_grad()
def targets(models: Models, exp: xp.Experience, config: PPOConfig, kl_coef: float) -> xp.Experience:
    """Phase 3: PPO's critic values, KL-penalised rewards and GAE; or GRPO's and RLOO's group baselines."""
    if config.algo != "ppo":
        return xp.group_targets(exp, config.algo, config.num_generations, kl_coef, config.whiten_advantages)
    with eval_mode(models.critic), training_precision(config):
        values = xp.critic_values(models.critic.forward, exp.sequences, exp.attention_mask, exp.start)
    return xp.ppo_targets(exp, values, kl_coef, config.clip_reward, config.gamma, config.lam, config.whiten_advantages)
