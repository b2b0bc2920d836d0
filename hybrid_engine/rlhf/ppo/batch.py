"""Phases 1-3 of an RLHF step: generate rollouts with the actor, score them, and turn the scores into the
per-token targets the optimisation phase trains on.

Shapes: B sequences (prompts x samples per prompt), P the left-padded prompt width, R the longest response.
Every [B, R] tensor is response-aligned as in losses.py: column t is response token t, `mask` marks the
generated tokens (EOS included), padding after them. A sequence is its prompt's P columns then R columns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from hybrid_engine.generation.sampling import SamplingParams
from hybrid_engine.rlhf import losses


@dataclass
class Experience:
    """One rollout batch, scored, with what the optimisation phase needs."""

    sequences: torch.Tensor  # (B, P + R) prompt then response tokens
    attention_mask: torch.Tensor  # (B, P + R)
    start: int  # P: the first response column of `sequences`
    mask: torch.Tensor  # (B, R) fp32, 1 on response tokens
    old_logprobs: torch.Tensor  # (B, R) the actor's at generation time
    ref_logprobs: torch.Tensor  # (B, R) the frozen reference's
    scores: torch.Tensor  # (B,) the sequence reward (reward model and/or reward functions); NaN where unscorable
    advantages: torch.Tensor  # (B, R)
    old_values: torch.Tensor | None = None  # (B, R) the critic's (PPO only)
    returns: torch.Tensor | None = None  # (B, R) the critic's targets (PPO only)
    rewards: torch.Tensor | None = None  # (B, R) KL-penalised per-token rewards (PPO only)
    completions: list[str] = field(default_factory=list)
    scorable: torch.Tensor | None = None  # (B,) bool: False where no reward applies (GRPO, RLOO); None: every row
    unscored: str = ""  # why a score is not finite, in words (a reward function's bad value), for the skip or stop

    def scored(self) -> torch.Tensor:
        """The scores of the scorable rows."""
        return self.scores if self.scorable is None else self.scores[self.scorable]

    @property
    def kl(self) -> torch.Tensor:
        """(B,): each sequence's sum over its response of old - ref log-probs, a sample of KL(actor || ref)."""
        return ((self.old_logprobs - self.ref_logprobs) * self.mask).sum(1)

    def select(self, rows: Sequence[int]) -> Experience:
        """The experience of `rows`, its response columns cut to the longest response among them."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        R = max(int(self.mask[index].sum(1).max()), 1)
        cut = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value[index]
                if value.dim() == 2:
                    value = value[:, : self.start + R] if f.name in ("sequences", "attention_mask") else value[:, :R]
            elif f.name == "completions":
                value = [value[i] for i in index.tolist()]
            cut[f.name] = value
        return replace(self, **cut)


# -- 1. generate ----------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """What the actor generated for a batch of prompts."""

    sequences: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    start: int  # P
    mask: torch.Tensor  # (B, R) fp32
    logprobs: torch.Tensor  # (B, R) under the temperature-scaled distribution
    generate_s: float


def rollout(actor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingParams) -> Rollout:
    """Samples one response per prompt row (left-padded prompt_ids [B, P]) from the actor (a HybridEngine),
    in its generation mode."""
    t0 = time.perf_counter()
    out = actor.generate(prompt_ids, prompt_mask, sampling)
    mask = out.response_mask.float()
    attention_mask = torch.cat([prompt_mask.long(), out.response_mask.long()], 1)
    return Rollout(sequences=out.sequences, attention_mask=attention_mask, start=prompt_ids.shape[1], mask=mask,
                   logprobs=out.logprobs, generate_s=time.perf_counter() - t0)


# -- 2. score ---------------------------------------------------------------------------------------------------


def critic_values(critic, sequences: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
    """(B, R): the critic's value of the state before each response token, read at the position that
    predicts it (DeepSpeed-Chat's values[:, start - 1 : -1]). `critic(input_ids, attention_mask)` returns
    per-position values (B, P + R)."""
    values = critic(sequences, attention_mask)  # (B, P + R)
    return values[:, start - 1 : -1].float()


def completion_ids(responses: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each response's token ids (responses [B, R], mask [B, R]): its tokens up to and with its EOS, no padding, as
    TRL's reward functions receive them."""
    return [row[keep.bool()].tolist() for row, keep in zip(responses, mask)]


def truncated(sequences: torch.Tensor, mask: torch.Tensor, start: int, eos_token_id: int) -> torch.Tensor:
    """(B,) bool: the responses (sequences [B, P + R] from column `start`, `mask` [B, R]) that hold no EOS, so
    generation cut them off at max_new_tokens."""
    eos = (sequences[:, start:] == eos_token_id) & mask.bool()
    return ~eos.any(1)


def samples(prompts: list[str], completions: list[str], scores: torch.Tensor, n: int,
            extra: dict[str, list] | None = None) -> list[dict]:
    """The first `n` rollouts as {prompt, completion, score} (the texts decoded, the score a float), with the
    `extra` columns a reward function logged (TRL's log_extra), one value per rollout."""
    out = [{"prompt": p, "completion": c, "score": float(s)} for p, c, s in zip(prompts[:n], completions[:n],
                                                                               scores[:n].tolist())]
    for column, values in (extra or {}).items():
        for sample, value in zip(out, values):
            sample.setdefault(column, value)
    return out


# -- 3. targets ---------------------------------------------------------------------------------------------------


def ppo_targets(exp: Experience, values: torch.Tensor, kl_coef: float, clip_reward: float, gamma: float, lam: float,
                whiten_advantages: bool) -> Experience:
    """PPO (DeepSpeed-Chat): KL-penalised per-token rewards, GAE advantages and returns over the critic's values."""
    rewards = losses.kl_penalized_rewards(exp.old_logprobs, exp.ref_logprobs, exp.scores, exp.mask, kl_coef,
                                          clip_reward)
    advantages, returns = losses.advantages_and_returns(rewards, values, exp.mask, gamma, lam)
    if whiten_advantages and int(exp.mask.sum()) >= 2:
        advantages = losses.whiten(advantages, exp.mask)
    return replace(exp, rewards=rewards, old_values=values, advantages=advantages, returns=returns)


def group_targets(exp: Experience, algo: str, num_generations: int, kl_coef: float, whiten_advantages: bool
                  ) -> Experience:
    """GRPO or RLOO: one advantage per sequence from its group of num_generations samples, on every response
    token. RLOO folds the KL into the scores first (score - kl_coef * KL, as TRL's RLOOTrainer); GRPO keeps it
    as a loss term (group_kl_loss). An unscorable sequence (NaN score) gets advantage 0 and stays out of its
    group's baseline and of the whitening, as in TRL."""
    scores = exp.scores.double()
    if algo == "rloo":
        scores = scores - kl_coef * exp.kl.double()
        per_sequence = losses.rloo_advantages(scores, num_generations)
    else:
        per_sequence = losses.grpo_advantages(scores, num_generations)
    advantages = per_sequence.float()[:, None] * exp.mask  # (B, R)
    scored = exp.mask if exp.scorable is None else exp.mask * exp.scorable[:, None]
    if whiten_advantages and int(scored.sum()) >= 2:
        advantages = losses.whiten(advantages, scored)
    return replace(exp, advantages=advantages)


def group_kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO's KL term, the pooled mean of the k3 estimator exp(ref - lp) - (ref - lp) - 1 (DeepSeekMath; TRL)."""
    m = mask.bool()
    delta = torch.where(m, ref_logprobs - logprobs, 0)
    return (torch.where(m, delta.exp() - delta - 1, 0)).sum() / m.sum().clamp(min=1)


def mean(x: torch.Tensor) -> float:
    """A tensor's mean as a float (nan for an empty one)."""
    return float(x.double().mean()) if x.numel() else math.nan
