"""The held-out evaluation of an RLHF run: one sampled response per held-out prompt, scored by the reward model
and the eval function, with its KL to the reference and its length."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hybrid_engine.rlhf.ppo import batch as xp
from hybrid_engine.rlhf.ppo import rewards
from hybrid_engine.rlhf.ppo.config import PolicyEval, PPOConfig
from hybrid_engine.rlhf.ppo.experience import Prompts
from hybrid_engine.rlhf.ppo.models import Models
from hybrid_engine.rlhf.tokens import collate_ppo

EvalFn = Callable[..., "list[float]"]


@torch.no_grad()
def evaluate_policy(models: Models, held_out: Prompts, tokenizer, config: PPOConfig,
                    eval_fn: EvalFn | None, state=None) -> PolicyEval | None:
    """One sampled response per held-out prompt, from a generator seeded afresh (the same draws at every
    evaluation, and the training stream untouched); every rank evaluates the whole split. `state`: the TrainerState
    the reward and eval functions may read."""
    n = len(held_out.examples)
    if n == 0:
        return None
    measures = {"reward": models.reward_fns, "rule": rewards.RewardFunctions.load(eval_fn)}
    rm, kl, lengths, scored = [], [], [], {k: [] for k, m in measures.items() if m is not None}
    max_new = config.eval_max_new_tokens or config.max_new_tokens
    for lo in range(0, n, config.eval_batch_size):
        indices = list(range(lo, min(lo + config.eval_batch_size, n)))
        ids = collate_ppo([held_out.examples[i] for i in indices], tokenizer.pad_token_id)
        sampling = config.sampling(tokenizer.eos_token_id, tokenizer.pad_token_id, max_new, seed=config.seed + 1 + lo)
        out = models.actor.generate(ids["input_ids"], ids["attention_mask"], sampling)
        seq_mask = torch.cat([ids["attention_mask"], out.response_mask], 1)
        start = ids["input_ids"].shape[1]
        ref = models.reference.token_logprobs(out.sequences, seq_mask, start, config.temperature)
        kl.append(((out.logprobs - ref) * out.response_mask).sum(1).double())
        lengths.append(out.response_mask.sum(1).double())
        if models.reward is not None:
            rm.append(models.reward.score(out.sequences, seq_mask, start).double())
        if scored:
            prompts, extra = held_out.fields(indices, 1)
            completions = tokenizer.batch_decode(out.sequences[:, start:], skip_special_tokens=True)
            ids_list = xp.completion_ids(out.sequences[:, start:], out.response_mask)
            for key in scored:
                scored[key].append(rewards.call_functions(measures[key], prompts, completions, extra, ids_list, state,
                                                          config.reward_timeout, config.nonfinite))
    fn, rule = (rewards.FunctionScores.cat(scored[k]) if k in scored else None for k in ("reward", "rule"))
    return PolicyEval(reward=_mean(rm), rule=None if rule is None else _scored_mean(rule),
                      kl=xp.mean(torch.cat(kl)), response_len=xp.mean(torch.cat(lengths)),
                      reward_fn=None if fn is None else _scored_mean(fn),
                      reward_fns=fn.means() if fn is not None and len(fn.names) > 1 else None)


def _mean(parts: list[torch.Tensor]) -> float | None:
    return xp.mean(torch.cat(parts)) if parts else None


def _scored_mean(scores: rewards.FunctionScores) -> float:
    """The mean of the weighted sum over the completions some function applies to."""
    return xp.mean(scores.combined[scores.scorable])


def eval_record(figures: PolicyEval) -> dict:
    """An evaluation as a metrics record (keys apart from the training records')."""
    record = {"eval": True, "eval_kl": figures.kl, "eval_response_len": figures.response_len}
    if figures.reward is not None:
        record["eval_reward"] = figures.reward
    if figures.rule is not None:
        record["rule"] = figures.rule
    if figures.reward_fn is not None:
        record["eval_reward_fn"] = figures.reward_fn
    for name, value in (figures.reward_fns or {}).items():
        record[f"eval_reward_fn/{name}"] = value
    return record

