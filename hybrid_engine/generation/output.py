"""GenerationOutput: what generate returns, on the fast path and on the HF path alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # int64 [B, T + n]: prompt (as given) + generated, pad_token_id after eos
    logprobs: torch.Tensor  # fp32 [B, n]: log-prob of each generated token, 0 where masked out
    response_mask: torch.Tensor  # int64 [B, n]: 1 for generated tokens (eos included), 0 after
