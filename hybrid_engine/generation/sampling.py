"""Choosing the next token from logits: greedy, temperature, top-k and top-p, in Hugging Face's order
(temperature, then top-k, then top-p), reproducible under a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybrid_engine.generation.checks import check_sampling


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter

    def __post_init__(self):
        check_sampling(self.do_sample, self.temperature, self.top_k, self.top_p)


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Scaled logits [B, V] with the tokens outside top-k / top-p set to -inf."""
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop the low tail whose mass is at most 1 - top_p; always keep the most likely token.
        drop_sorted = cumulative <= 1 - cfg.top_p
        drop_sorted[:, -1] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B] int64, their log-probabilities [B] fp32 under the temperature-scaled distribution)."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits / cfg.temperature, dim=-1)
    if cfg.do_sample:
        probs = filter_logits(logits, cfg).softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    else:
        tokens = logits.argmax(-1)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]
