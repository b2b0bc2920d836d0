"""A reward model with its own tokenizer scoring the policy's rollouts (TRL's `reward_processing_classes`).

When the tokenizer saved beside the reward model has another vocabulary than the policy's, each rollout row is
decoded with the policy's tokenizer, its prompt and its completion apart (skipping special tokens, as the PPO
completions are decoded for reward functions), and re-encoded for the reward model as its training rows were
(tokens.encode_prompts without a chat template, tokens.encode_responses): the prompt text with the tokenizer's own
special tokens, then the completion's tokens, then EOS when the completion ended with the policy's EOS. The prompt
text is the policy's formatted prompt (its chat template's text included), as TRL scores a plain-text prompt plus
its completion. The rows are right-padded, the form transformers' sequence classifiers read (reward_format.py).
"""

from __future__ import annotations

import os

import torch
import transformers

from hybrid_engine.rlhf.scoring import FrozenRewardModel
from hybrid_engine.rlhf.tokens import pad


def saved_tokenizer(name: str | os.PathLike):
    """The tokenizer saved beside a reward model (its folder or local Hugging Face cache name); None when there is
    none."""
    try:
        return transformers.AutoTokenizer.from_pretrained(str(name), local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None


def same_vocab(a, b) -> bool:
    """Whether two tokenizers map every token, and EOS, to the same ids."""
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def _row(ids: torch.Tensor, mask: torch.Tensor, start: int, policy, reward) -> list[int]:
    """One rollout row (its mask-1 tokens) as the reward tokenizer's tokens."""
    prompt = ids[:start][mask[:start].bool()].tolist()
    completion = ids[start:][mask[start:].bool()].tolist()
    ended = policy.eos_token_id in completion
    if ended:
        completion = completion[: completion.index(policy.eos_token_id)]
    out = reward(policy.decode(prompt, skip_special_tokens=True), add_special_tokens=True)["input_ids"]
    out = out + reward(policy.decode(completion, skip_special_tokens=True), add_special_tokens=False)["input_ids"]
    return out + ([reward.eos_token_id] if ended and reward.eos_token_id is not None else [])


def reencode(input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int, policy,
             reward) -> tuple[torch.Tensor, torch.Tensor]:
    """Rollout rows (B, T), responses from column `start`, in the policy tokenizer's ids -> right-padded input_ids
    and attention_mask (B, T') in the reward tokenizer's ids (at least 2 columns, as FrozenRewardModel.score reads)."""
    rows = [_row(i, m, start, policy, reward) for i, m in zip(input_ids, attention_mask)]
    empty = [n for n, r in enumerate(rows) if not r]
    if empty:
        raise ValueError(f"rollout rows {empty} re-encode to no tokens of the reward model's tokenizer")
    width = max(2, max(len(r) for r in rows))
    pad_id = reward.pad_token_id if reward.pad_token_id is not None else 0
    return pad(rows, pad_id, length=width), pad([[1] * len(r) for r in rows], 0, length=width)


class RetokenizedRewardModel:
    """A FrozenRewardModel scoring rows of the policy's tokens through its own tokenizer (FrozenRewardModel.score's
    contract)."""

    def __init__(self, reward: FrozenRewardModel, tokenizer, policy_tokenizer):
        self.reward = reward
        self.tokenizer = tokenizer
        self.policy_tokenizer = policy_tokenizer

    @property
    def model(self):
        """The reward model itself (FrozenRewardModel.model)."""
        return self.reward.model

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int = 1) -> torch.Tensor:
        """fp32 [B]: each row's reward, read on its re-encoded tokens."""
        ids, mask = reencode(input_ids, attention_mask, start, self.policy_tokenizer, self.tokenizer)
        return self.reward.score(ids.to(input_ids.device), mask.to(input_ids.device))


def for_policy(reward: FrozenRewardModel, tokenizer, policy_tokenizer) -> FrozenRewardModel | RetokenizedRewardModel:
    """`reward` itself when it has no tokenizer of its own or shares the policy's vocabulary; else wrapped to
    re-encode the rollouts for it."""
    if tokenizer is None or policy_tokenizer is None or same_vocab(tokenizer, policy_tokenizer):
        return reward
    return RetokenizedRewardModel(reward, tokenizer, policy_tokenizer)
