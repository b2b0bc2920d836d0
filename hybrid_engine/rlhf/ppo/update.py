"""Phase 4 of an RLHF step: ppo_epochs passes over minibatches of the rollout batch, an actor step (the clipped
policy loss, plus GRPO's KL term) on each, a critic step (PPO) and a pre-training step (with PTX data)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from hybrid_engine.engine.router_loss import router_aux_loss
from hybrid_engine.rlhf.accumulate import accumulated_step, step_batches
from hybrid_engine.rlhf.data import StepData
from hybrid_engine.rlhf.distributed import rank_and_world
from hybrid_engine.rlhf.losses import approx_kl, clip_fraction, policy_loss, token_mean, value_loss
from hybrid_engine.rlhf.ppo import batch as xp
from hybrid_engine.rlhf.ppo.config import PPOConfig
from hybrid_engine.rlhf.ppo.experience import logprob_mismatch, ratio_from_training_forward, training_precision
from hybrid_engine.rlhf.ppo.models import Models
from hybrid_engine.rlhf.schedule import batch_order
from hybrid_engine.rlhf.sft import response_tokens, sft_loss
from hybrid_engine.rlhf.step_config import NonFiniteError
from hybrid_engine.rlhf.tokens import collate_sft, tokenize_sft


def finite_or_skip(ok: bool, what: str, step: int, config: PPOConfig) -> bool:
    if not ok and config.nonfinite == "stop":
        raise NonFiniteError(f"PPO step {step}: {what} hold NaN or inf; nothing was trained on them. Set "
                             "nonfinite='skip' to skip such updates and go on")
    return ok


def _step_on(trainer, module: torch.nn.Module, losses: list[Callable[[], torch.Tensor]], weights: list[float],
             config: PPOConfig) -> float | None:
    """One optimizer step over a minibatch's micro-batches (accumulate.accumulated_step) when their losses are finite
    on every rank; None (nothing stepped) otherwise. `trainer` is the HybridEngine or the critic's trainer, `module`
    what it trains."""
    loss = accumulated_step(trainer, module, losses, weights, config.gradient_accumulation_steps, config.max_grad_norm)
    return loss if math.isfinite(loss) else None


def micro_experiences(mb: xp.Experience, config: PPOConfig) -> tuple[list[xp.Experience], list[float]]:
    """A minibatch cut into micro-batches (config.gradient_accumulation_steps of them, or by the token budget
    config.max_tokens_per_batch), and each one's response tokens (the count its losses' pooled means are over)."""
    lengths = mb.attention_mask.sum(1).tolist()
    rows = step_batches(list(range(mb.sequences.shape[0])), lengths, config, "minibatch row")
    parts = [mb.select(part) for part in rows]
    return parts, [float(part.mask.sum()) for part in parts]


def _actor_loss(engine, mb: xp.Experience, config: PPOConfig, kl_coef: float, observed: list[dict]) -> torch.Tensor:
    """The actor's loss on a micro-batch (the clipped policy loss, plus GRPO's KL term); its policy_figures go to
    `observed` (with a Mixture-of-Experts actor, its router's load-balancing loss as `router_aux_loss`: observed, not
    added to the loss)."""
    with training_precision(config), router_aux_loss(engine.module) as aux:
        logprobs, entropy = engine.token_logprobs(mb.sequences, mb.attention_mask, mb.start, config.temperature,
                                                  return_entropy=True, packed=config.packing)
    old = logprobs.detach() if ratio_from_training_forward(config) else mb.old_logprobs
    loss = policy_loss(logprobs, old, mb.advantages, mb.mask, config.clip_range)
    if config.algo == "grpo" and kl_coef > 0:
        loss = loss + kl_coef * xp.group_kl_loss(logprobs, mb.ref_logprobs, mb.mask)
    figures = policy_figures(logprobs.detach(), old, entropy, mb, config)
    if ratio_from_training_forward(config):  # generation's log-probs (mb.old_logprobs) against this forward's
        figures.update(logprob_mismatch(mb.old_logprobs, logprobs.detach(), mb.mask))
    observed.append({**figures, "router_aux_loss": aux[0]} if aux else figures)
    return loss


def actor_update(models: Models, mb: xp.Experience, config: PPOConfig, kl_coef: float
                 ) -> tuple[float | None, dict[str, float]]:
    """One actor step on a minibatch (the clipped policy loss, plus GRPO's KL term): its loss (None when not finite)
    and policy_figures of its forward (token-weighted over its micro-batches; router_aux_loss too, where observed)."""
    parts, tokens = micro_experiences(mb, config)
    observed: list[dict] = []
    losses = [functools.partial(_actor_loss, models.actor, part, config, kl_coef, observed) for part in parts]
    loss = _step_on(models.actor, models.actor.module, losses, tokens, config)
    weights = tokens[:len(observed)]
    figures = {k: sum(w * o[k] for w, o in zip(weights, observed)) / sum(weights) for k in observed[0]}
    if "logprob_mismatch_max" in figures:  # a max over the micro-batches, not their mean
        figures["logprob_mismatch_max"] = max(o["logprob_mismatch_max"] for o in observed)
    return loss, figures


POLICY_FIGURES = ("entropy", "approx_kl", "clip_frac")
"""The keys of policy_figures, each averaged over a step's actor updates in its record."""


def policy_figures(logprobs: torch.Tensor, old: torch.Tensor, entropy: torch.Tensor, mb: xp.Experience,
                   config: PPOConfig) -> dict[str, float]:
    """What an actor forward shows of the policy before its step (observations, no gradient): the mean entropy of
    its distribution at the response tokens, the approximate KL from the ratio's old policy, and the share of
    tokens whose ratio the loss clipped."""
    return {"entropy": float(token_mean(entropy, mb.mask)), "approx_kl": float(approx_kl(logprobs, old, mb.mask)),
            "clip_frac": float(clip_fraction(logprobs, old, mb.advantages, mb.mask, config.clip_range))}


def _kept(update: tuple[float | None, dict], observed: list[dict]) -> float | None:
    """An actor update's loss; its figures go to `observed` when it stepped."""
    loss, figures = update
    if loss is not None:
        observed.append(figures)
    return loss


def _critic_loss(models: Models, mb: xp.Experience, config: PPOConfig) -> torch.Tensor:
    with training_precision(config):
        values = xp.critic_values(models.critic.forward, mb.sequences, mb.attention_mask, mb.start)
    return value_loss(values, mb.old_values, mb.returns, mb.mask, config.value_clip_range)


def critic_update(models: Models, mb: xp.Experience, config: PPOConfig) -> float | None:
    """One critic step on a minibatch (the clipped value loss); None when not finite."""
    parts, tokens = micro_experiences(mb, config)
    losses = [functools.partial(_critic_loss, models, part, config) for part in parts]
    return _step_on(models.critic, models.critic_model, losses, tokens, config)


def _ptx_loss(models: Models, batch: dict, config: PPOConfig) -> torch.Tensor:
    with training_precision(config):
        return config.ptx_coef * sft_loss(models.actor, batch, config.packing)


def ptx_update(models: Models, batch: dict, config: PPOConfig) -> float | None:
    """One actor step on the pre-training mixture: ptx_coef times the LM loss (DeepSpeed-Chat's
    train_unsupervised); None when not finite."""
    rows = step_batches(list(range(batch["input_ids"].shape[0])), batch["attention_mask"].sum(1).tolist(), config,
                        "pre-training row")
    parts = [{k: v[part] for k, v in batch.items()} for part in rows]
    losses = [functools.partial(_ptx_loss, models, part, config) for part in parts]
    return _step_on(models.actor, models.actor.module, losses, [response_tokens(p) for p in parts], config)


def optimise(models: Models, exp: xp.Experience, config: PPOConfig, kl_coef: float, step: int,
             ptx_batch: Callable[[], dict] | None) -> dict:
    """Phase 4: ppo_epochs passes over minibatches of the rollout batch; the mean losses, the skips and the mean
    policy_figures of the actor updates that stepped."""
    B = exp.sequences.shape[0]
    actor_losses, critic_losses, ptx_losses, skipped, observed = [], [], [], 0, []
    for _ in range(config.ppo_epochs):
        for lo in range(0, B, config.train_batch_size):
            mb = exp.select(range(lo, min(lo + config.train_batch_size, B)))
            updates = [("actor", actor_losses, lambda: _kept(actor_update(models, mb, config, kl_coef), observed))]
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
    figures = {"policy_loss": _mean(actor_losses), "skipped": skipped,
               **{k: _mean([o[k] for o in observed]) for k in POLICY_FIGURES}}
    if any("router_aux_loss" in o for o in observed):  # a Mixture-of-Experts actor
        figures["router_aux_loss"] = _mean([o["router_aux_loss"] for o in observed])
    if any("logprob_mismatch_max" in o for o in observed):  # one on-policy pass: measured by the update's forward
        figures["logprob_mismatch_mean"] = _mean([o["logprob_mismatch_mean"] for o in observed])
        figures["logprob_mismatch_max"] = max(o["logprob_mismatch_max"] for o in observed)
    if models.critic is not None:
        figures["value_loss"] = _mean(critic_losses)
    if ptx_losses:
        figures["ptx_loss"] = _mean(ptx_losses)
    return figures


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


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
            rank, world = rank_and_world()
            self._order = (self.epoch, batch_order(len(self.examples), self.size, self.seed, self.epoch, rank,
                                                        world))
        return self._order[1]

    def __call__(self) -> dict:
        if self.taken == len(self._batches()):
            self.epoch, self.taken = self.epoch + 1, 0
        batches = self._batches()
        self.taken += 1
        return collate_sft([self.examples[i] for i in batches[self.taken - 1]], self.pad_id)

