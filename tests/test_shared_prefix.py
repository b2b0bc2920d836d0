"""Training-mode log-probs of rows that share their prompt (GRPO's and RLOO's samples of one prompt): the prompt
once per run of rows, its KV cache gathered to the run's rows, then every row's response on that cache
(engine/logprobs.py). Held to the one-pass forward, values and gradients, for every family, with and without LoRA,
with gradient checkpointing (which falls back to one pass) and under bf16 autocast."""

from __future__ import annotations

import contextlib

import pytest
import torch
from models import VOCAB, left_padded_prompts
from test_engine import FAMILIES, engine

from hybrid_engine.engine.logprobs import shared_prefix_runs

START = 8  # the prompts' width: every response begins at column 8
RUNS = [2, 3, 1]  # rows per prompt: runs of different lengths, and one row that shares nothing


def grouped_rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [6, 14]: 3 left-padded prompts repeated RUNS times, each row followed by its own
    random response of 6, 4, 1, 6, 3 or 5 tokens, then right padding."""
    ids, mask = left_padded_prompts([5, 8, 3], seed=seed)
    owner = torch.repeat_interleave(torch.arange(3), torch.tensor(RUNS))
    g = torch.Generator().manual_seed(seed + 1)
    response = torch.randint(2, VOCAB, (6, 6), generator=g)
    response_mask = (torch.arange(6)[None] < torch.tensor([6, 4, 1, 6, 3, 5])[:, None]).long()
    return (torch.cat([ids[owner], response.masked_fill(response_mask == 0, 0)], 1),
            torch.cat([mask[owner], response_mask], 1))


def passes(eng) -> list[int]:
    """The rows of every forward the engine runs from now on."""
    rows, forward = [], eng._trainer.forward

    def counted(*args, **kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    eng._trainer.forward = counted
    return rows


def logprobs_and_grads(eng, ids, mask, share: bool, precision=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    eng.module.zero_grad()
    with precision or contextlib.nullcontext():
        out = eng.token_logprobs(ids, mask, START, temperature=0.8, share_prefix=share)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)  # a loss that weighs every position differently
    (out * weights * mask[:, START:]).sum().backward()
    return out.detach(), [p.grad.clone() for p in eng.module.parameters() if p.requires_grad]


def test_runs_are_found_where_neighbours_share_the_prefix():
    ids, mask = grouped_rows()
    assert shared_prefix_runs(ids, mask, START - 1).tolist() == [0, 0, 1, 1, 1, 2]
    assert shared_prefix_runs(ids[[0, 2, 5]], mask[[0, 2, 5]], START - 1) is None  # no two neighbours share
    assert shared_prefix_runs(ids, mask, 0) is None
    other = mask.clone()
    other[1, 3] = 1 - other[1, 3]  # the same tokens under another mask are another prefix
    assert shared_prefix_runs(ids, other, START - 1).tolist() == [0, 1, 2, 2, 2, 3]


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", FAMILIES)
def test_shared_prefix_equals_one_pass_with_gradients(name, use_lora):
    eng = engine(name, use_lora)
    ids, mask = grouped_rows()
    rows = passes(eng)
    one, one_grads = logprobs_and_grads(eng, ids, mask, share=False)
    shared, shared_grads = logprobs_and_grads(eng, ids, mask, share=True)
    assert rows == [6, 3, 6]  # one pass; then the 3 prompts once, and every row's response on their cache
    assert one.shape == shared.shape == (6, ids.shape[1] - START)
    torch.testing.assert_close(shared, one, atol=1e-5, rtol=0)
    assert (shared[mask[:, START:] == 0] == 0).all() and (shared[mask[:, START:] == 1] < 0).all()
    assert len(shared_grads) == len(one_grads) > 0
    for a, b in zip(shared_grads, one_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_shared_prefix_under_bf16_autocast_stays_within_bf16_of_one_pass():
    eng = engine("llama-gqa")
    ids, mask = grouped_rows(seed=3)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    one, _ = logprobs_and_grads(eng, ids, mask, share=False, precision=bf16())
    shared, _ = logprobs_and_grads(eng, ids, mask, share=True, precision=bf16())
    fp32, _ = logprobs_and_grads(eng, ids, mask, share=False)
    bound = (one - fp32).abs().max()  # bf16's own distance from fp32, on these rows
    assert 0 < bound < 0.2
    assert (shared - one).abs().max() <= bound


def test_gradient_checkpointing_falls_back_to_one_pass():
    ckpt, plain = engine("llama-gqa", gradient_checkpointing=True), engine("llama-gqa")
    ckpt.train()
    ids, mask = grouped_rows(seed=5)
    rows = passes(ckpt)
    shared, shared_grads = logprobs_and_grads(ckpt, ids, mask, share=True)
    assert rows == [6]
    one, one_grads = logprobs_and_grads(plain, ids, mask, share=False)
    torch.testing.assert_close(shared, one, atol=1e-5, rtol=0)
    for a, b in zip(shared_grads, one_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
