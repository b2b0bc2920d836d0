"""Generation of a Mixture-of-Experts model (the qwen3-moe-120m preset: 8 experts, 2 per token) against Hugging
Face, fp32, greedy, no eos.

- test_moe_decode_step: one decode step at context 64 at batch 1 and 16. The bytes it must read are counted from
  the router's choices in that step: every dense matrix (attention, router, LM head; embeddings excluded) and the
  KV cache, plus, in each MoE layer, the experts that at least one of the batch's tokens selected. Beside them,
  the dense equivalent (every expert read, as a dense model of the same size would): `read_MB_per_token` against
  `dense_MB_per_token`, and the fraction of the roofline counted on the bytes actually read.
- test_moe_generate: tokens/s of a whole generate() call (prefill included) at batch 16, 32 new tokens.

    pytest bench/bench_moe.py --benchmark-only --benchmark-json=bench/results/generation_moe.json
"""

from __future__ import annotations

import functools

import pytest
import torch
from bench_generate import PROMPT, decode_step_fn, generate_fn, model, prompts
from harness import record, run_benchmark

from hybrid_engine.model import moe
from hybrid_engine.model.spec import spec_from_config
from hybrid_engine.model.weights import extract_weights

NAME = "qwen3-moe-120m"
PROVIDERS = ["hf-fp32", "ours-fp32"]


def _bytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


@functools.cache
def weight_bytes() -> tuple[int, int, int]:
    """(dense bytes, one expert's bytes, MoE layers) of the matrices a decode step reads."""
    m = model(NAME)
    spec = spec_from_config(m.config)
    w = extract_weights(m, spec)
    dense = _bytes(w.lm_head.weight)
    for layer in w.layers:
        dense += _bytes(layer.qkv.weight, layer.o.weight)
        if layer.experts is None:
            dense += _bytes(layer.up.weight, layer.down.weight)
        else:
            dense += _bytes(layer.experts.router)
    expert = (_bytes(w.layers[spec.moe_layers[0]].experts.gate_up) + _bytes(w.layers[spec.moe_layers[0]].experts.down)
              ) // spec.num_experts
    return dense, expert, len(spec.moe_layers)


def experts_selected(step) -> int:
    """The experts a decode step's router selects, summed over the MoE layers (each counted once per layer, however
    many of the batch's tokens chose it): one untimed step of our model, its route() calls counted."""
    chosen: list[int] = []
    original = moe.route

    def counting(x, router, spec):
        ids, weights = original(x, router, spec)
        chosen.append(int(torch.unique(ids).numel()))
        return ids, weights

    moe.route = counting
    try:
        step()
    finally:
        moe.route = original
    return sum(chosen)


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_moe_decode_step(benchmark, provider, batch, machine, roofline):
    step = decode_step_fn(provider, NAME, batch)
    benchmark.group = f"moe decode step {NAME} B={batch}"
    run_benchmark(benchmark, step, rounds=10)
    spec = spec_from_config(model(NAME).config)
    dense, expert, moe_layers = weight_bytes()
    selected = experts_selected(decode_step_fn("ours-fp32", NAME, batch))
    kv = 2 * spec.num_layers * batch * spec.num_kv_heads * PROMPT * spec.head_dim * 4
    read, dense_equivalent = dense + selected * expert + kv, dense + moe_layers * spec.num_experts * expert + kv
    active_params = (dense + spec.experts_per_token * moe_layers * expert) // 4
    flops = 2 * active_params * batch + 4 * spec.num_layers * batch * spec.num_heads * PROMPT * spec.head_dim
    record(benchmark, provider=provider, machine=machine, roofline=roofline, bytes_moved=read, flops=flops,
           baseline_provider="hf-fp32", tokens_per_s=round(batch / benchmark.stats.stats.median, 1), model=NAME,
           batch=batch, experts_read_per_layer=round(selected / moe_layers, 2),
           read_MB_per_token=round(read / batch / 1e6, 2), dense_MB_per_token=round(dense_equivalent / batch / 1e6, 2))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_moe_generate(benchmark, provider, machine, roofline):
    batch, new_tokens = 16, 32
    ids = prompts(batch, model(NAME).config.vocab_size)
    fn = generate_fn(provider, NAME, ids, new_tokens)
    generate_fn(provider, NAME, ids[:, :8], 2)()  # warm-up outside the timing
    benchmark.group = f"moe generate {NAME} B={batch} new={new_tokens}"
    run_benchmark(benchmark, fn, rounds=1)
    record(benchmark, provider=provider, machine=machine, roofline=roofline,
           tokens_per_s=round(batch * new_tokens / benchmark.stats.stats.median, 1), baseline_provider="hf-fp32",
           model=NAME, batch=batch, new_tokens=new_tokens)
