"""Padding-free (packed) batches against padded ones (engine/packing.py): tokens/s of an SFT step (response NLL,
backward, AdamW) and of PPO's training forward and backward (the actor's log-probs through token_logprobs and the
clipped policy loss), on one batch of rows whose lengths are drawn uniformly from 16..512 (seeded), in fp32 with the
training kernels (apply_training_kernels), on a Llama made from a config (~10M: bench_train.py's).

- `padded`: the rows padded to the longest, one forward;
- `packed`: the same rows end to end in one row with per-row positions, one forward;
- `packed-budget`: micro-batches of at most LONGEST tokens (max_tokens_per_batch: accumulate.budget_batches), each
  packed, their losses scaled by their token share (as the trainers do).

transformers' sdpa runs a packed row of N tokens with an N x N block-diagonal mask, so its attention computes N^2
scores where the padded batch computes B x T^2: `packed` saves the linear layers' padding and can lose it again in
attention on long rows, which the budget bounds. Tokens counted are the rows' real tokens, the same for every
provider, so `vs padded` is the ratio of their times; the roofline is 6 x real tokens x the matmul parameters over the
run's fp32 matmul rate (attention's FLOPs left out).

    pytest bench/bench_packing.py --benchmark-only --sweeps --benchmark-json=bench/results/packing.json

(about 3 minutes on 2 cores; without --sweeps, the SFT step alone). BENCH_PACKING_SMOKE=1 runs the same code on a
tiny model and rows of 16..64 tokens, a check that it runs, not a measurement.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from harness import record, representative, run_benchmark

from hybrid_engine import apply_training_kernels, unapply_training_kernels
from hybrid_engine.engine.logprobs import token_logprobs
from hybrid_engine.engine.training import adamw
from hybrid_engine.rlhf.accumulate import budget_batches
from hybrid_engine.rlhf.losses import policy_loss
from hybrid_engine.rlhf.sft import sft_loss
from hybrid_engine.rlhf.tokens import IGNORE_INDEX

SMOKE = os.environ.get("BENCH_PACKING_SMOKE") == "1"
MODEL = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=512) if SMOKE else
         dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
              intermediate_size=1024, vocab_size=4096))
ROWS, SHORTEST, LONGEST = (4, 16, 64) if SMOKE else (12, 16, 512)
PROMPT = 16  # PPO: every prompt's width (left-padded), responses after it


def make_model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(max_position_embeddings=LONGEST, tie_word_embeddings=False, **MODEL)
    return apply_training_kernels(transformers.LlamaForCausalLM(config).train())


def lengths() -> list[int]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(SHORTEST, LONGEST + 1, (ROWS,), generator=g).tolist()


def sft_batch(vocab: int) -> dict[str, torch.Tensor]:
    """Right-padded rows, the first quarter of each its prompt (IGNORE_INDEX labels)."""
    lens = lengths()
    ids = torch.randint(3, vocab, (ROWS, max(lens)), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(max(lens))[None] < torch.tensor(lens)[:, None]).long()
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    for b, n in enumerate(lens):
        labels[b, : n // 4] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def ppo_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of up to PROMPT tokens left-padded, then responses right-padded: each row lengths()[b] tokens."""
    lens = lengths()
    T = PROMPT + max(n - min(n // 4, PROMPT) for n in lens)
    ids = torch.randint(3, vocab, (ROWS, T), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lens):
        p = min(n // 4, PROMPT)
        mask[b, PROMPT - p: PROMPT + n - p] = 1
    return ids, mask


def micro_batches(mask: torch.Tensor, provider: str) -> list[list[int]]:
    """The rows of each forward: all at once, or by the token budget LONGEST (packed-budget)."""
    rows = list(range(mask.shape[0]))
    return budget_batches(rows, mask.sum(1).tolist(), LONGEST) if provider == "packed-budget" else [rows]


def sft_step(model, provider: str):
    """One SFT step: the token-mean response NLL of the batch (token-share scaled over micro-batches), backward,
    AdamW."""
    batch, optimizer = sft_batch(model.config.vocab_size), adamw(model.parameters(), lr=1e-6)
    parts = [{k: v[rows] for k, v in batch.items()} for rows in micro_batches(batch["attention_mask"], provider)]
    counts = [int((p["labels"][:, 1:] != IGNORE_INDEX).sum()) for p in parts]

    def step():
        for part, count in zip(parts, counts):
            (sft_loss(model, part, provider != "padded") * (count / sum(counts))).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, batch["attention_mask"]


def ppo_step(model, provider: str):
    """PPO's actor forward and backward: the clipped policy loss on the log-probs (no optimizer step)."""
    ids, mask = ppo_batch(model.config.vocab_size)
    old = torch.zeros(ids.shape[0], ids.shape[1] - PROMPT)
    advantages = torch.randn(old.shape, generator=torch.Generator().manual_seed(2))
    parts = micro_batches(mask, provider)
    counts = [int(mask[rows, PROMPT:].sum()) for rows in parts]

    def step():
        for rows, count in zip(parts, counts):
            logprobs = token_logprobs(model, model.get_output_embeddings(), ids[rows], mask[rows], PROMPT,
                                      share_prefix=False, packed=provider != "padded")
            loss = policy_loss(logprobs, old[rows], advantages[rows], mask[rows, PROMPT:], 0.2)
            (loss * (count / sum(counts))).backward()
        model.zero_grad(set_to_none=True)

    return step, mask


# The providers of one case run next to each other (provider varies fastest): all see the same spell of the VM.
@pytest.mark.parametrize("provider", ["padded", "packed", "packed-budget"])
@pytest.mark.parametrize("case", representative(["sft", "ppo"], "sft"))
def test_packing(benchmark, provider, case, machine, roofline):
    model = make_model()
    try:
        step, mask = (sft_step if case == "sft" else ppo_step)(model, provider)
        benchmark.group = f"{case} {'smoke ' if SMOKE else ''}rows={ROWS} lengths {SHORTEST}..{LONGEST}"
        run_benchmark(benchmark, step, rounds=3)
    finally:
        unapply_training_kernels(model)
    tokens = int(mask.sum())
    matmul_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    record(benchmark, provider=provider, machine=machine, roofline=roofline, flops=6 * matmul_params * tokens,
           baseline_provider="padded", tokens_per_s=round(tokens / benchmark.stats.stats.median, 1), tokens=tokens,
           padding_fraction=round(1 - tokens / mask.numel(), 3), micro_batches=len(micro_batches(mask, provider)))
