"""Generation's fast mode (activation_dtype=bf16): decode_linear_bf16 on both routes against its reference (x rounded
to bf16, fp32 products and sums), generation in the fast mode against the exact path on a tiny Llama, the refusals,
and a GRPO step that recomputes the old log-probs and logs their mismatch to generation's."""

from __future__ import annotations

from dataclasses import replace

import datasets
import pytest
import torch
from demo_models import demo_llama, tokenizer
from models import left_padded_prompts, tiny_model

import hybrid_engine
from hybrid_engine import _build
from hybrid_engine.engine.settings import GenerationSettings
from hybrid_engine.model.kv_cache import KVCache
from hybrid_engine.model.spec import spec_from_config
from hybrid_engine.model.transformer import InferenceTransformer
from hybrid_engine.model.weights import extract_weights
from hybrid_engine.ops import dispatch
from hybrid_engine.ops._library import kernels
from hybrid_engine.ops.linear_bf16 import bf16_compute_missing, decode_linear_bf16, decode_linear_bf16_reference
from hybrid_engine.rlhf.data import StepData
from hybrid_engine.rlhf.ppo import ModelSources, PPOConfig, train_ppo
from hybrid_engine.rlhf.ppo.experience import ON_POLICY

FAST = dict(weight_dtype="bf16", activation_dtype="bf16")
needs_bf16 = pytest.mark.skipif(bf16_compute_missing() is not None, reason="the fast mode needs bf16 compute")
KERNEL, TORCH = dispatch.NEVER, 0  # bf16act_kernel_max_rows: the VDPBF16PS kernel at every M, torch's GEMM at every M
# The kernel's output is fp32: only the order of its fp32 sums differs from the reference's. Torch's bf16 GEMM
# rounds its output to bf16 (a relative 2^-9 at most) before the bias is added.
TOLERANCES = {KERNEL: dict(rtol=1e-5, atol=2e-4), TORCH: dict(rtol=2**-8, atol=1e-3)}


@needs_bf16
@pytest.mark.parametrize("route", [KERNEL, TORCH], ids=["kernel", "torch"])
@pytest.mark.parametrize("M, N, K", [(1, 7, 5), (3, 33, 100), (8, 64, 768), (13, 50, 2048), (64, 96, 123)])
def test_decode_linear_bf16_matches_its_reference(route, M, N, K):
    gen = torch.Generator().manual_seed(M * K)
    x, w, b = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen).bfloat16(), torch.randn(N)
    with dispatch.routes(replace(dispatch.current(), bf16act_kernel_max_rows=route)):
        out = decode_linear_bf16(x, w, b)
        no_bias = decode_linear_bf16(x, w)
    ref = decode_linear_bf16_reference(x, w)
    torch.testing.assert_close(no_bias, ref, **TOLERANCES[route])
    torch.testing.assert_close(out - b, ref, **TOLERANCES[route])  # the bias is added after torch's rounding
    # It rounds the activations: with an fp32 x the result would differ by far more than the kernel's tolerance.
    assert (decode_linear_bf16_reference(x, w) - x @ w.float().T).abs().max() > 1e-3


@needs_bf16
def test_decode_linear_bf16_passes_opcheck():
    x, w = torch.randn(4, 64), torch.randn(48, 64).bfloat16()
    torch.library.opcheck(kernels().decode_linear_bf16.default, (x, w, torch.randn(48)))
    assert kernels().decode_linear_has_bf16dot() == ("avx512_bf16" in _build.cpu_flags()
                                                     and _build.capability() == "AVX512")


@needs_bf16
def test_fast_generation_agrees_with_the_exact_path():
    """Greedy tokens agree with the exact bf16-weight path for the first steps (the tiny model's logits are well
    separated) and the log-probs of the tokens both chose differ by under 0.05 (measured on a Zen 4: 0.021, the tokens
    equal for all 12 steps)."""
    model = tiny_model("llama-gqa")
    ids, mask = left_padded_prompts([5, 8, 3, 6], seed=11)
    exact = hybrid_engine.generate(model, ids, mask, max_new_tokens=12, weight_dtype="bf16", eos_token_id=[])
    fast = hybrid_engine.generate(model, ids, mask, max_new_tokens=12, eos_token_id=[], **FAST)
    steps = 6
    assert torch.equal(fast.sequences[:, : ids.shape[1] + steps], exact.sequences[:, : ids.shape[1] + steps])
    gap = (fast.logprobs[:, :steps] - exact.logprobs[:, :steps]).abs().max()
    assert 0 < gap < 0.05  # rounded activations: not the exact path's values, and not far from them


@needs_bf16
def test_the_fast_decode_step_matches_its_python_loop():
    """decode_step's C++ layer loop in the fast mode (every linear layer, the LM head too, on decode_linear_bf16)
    against InferenceTransformer.decode_python, its reference, from the same prefilled cache."""
    model = tiny_model("llama-gqa")
    spec = spec_from_config(model.config)
    net = InferenceTransformer(spec, extract_weights(model, spec, torch.bfloat16), activation_dtype=torch.bfloat16)
    ids, mask = left_padded_prompts([5, 8, 3], seed=2)
    caches = [KVCache.allocate(spec, 3, 12) for _ in range(2)]
    for cache in caches:
        net.prefill(ids, mask, cache)
    tokens = torch.tensor([4, 9, 17])
    torch.testing.assert_close(net.decode(tokens, caches[0]), net.decode_python(tokens, caches[1]), rtol=1e-5,
                               atol=1e-4)
    exact = InferenceTransformer(spec, extract_weights(model, spec, torch.bfloat16))
    assert (exact.decode_python(tokens, caches[1]) - net.decode(tokens, caches[0])).abs().max() > 1e-3


def test_the_fast_mode_is_refused_where_it_makes_no_sense(monkeypatch):
    model = tiny_model("llama-gqa")
    ids, mask = left_padded_prompts([5, 8], seed=1)
    with pytest.raises(ValueError, match="activation_dtype=bf16 .the fast mode. needs weight_dtype=bf16, got "
                                         "weight_dtype=fp32"):
        hybrid_engine.generate(model, ids, mask, max_new_tokens=2, activation_dtype="bf16")
    with pytest.raises(ValueError, match="generation.activation_dtype=bf16 .the fast mode. needs "
                                         "generation.weight_dtype=bf16"):
        GenerationSettings(activation_dtype="bf16")
    with pytest.raises(ValueError, match="activation_dtype must be one of fp32, bf16, got 'fp16'"):
        hybrid_engine.generate(model, ids, mask, max_new_tokens=2, weight_dtype="bf16", activation_dtype="fp16")
    monkeypatch.setattr(_build, "cpu_flags", lambda: {"avx2", "fma"})
    with pytest.raises(ValueError, match=r"activation_dtype=bf16: this CPU .* has no bf16 compute .avx512_bf16 or "
                                         r"amx_bf16.: bf16 activations would only be slower"):
        hybrid_engine.generate(model, ids, mask, max_new_tokens=2, **FAST)
    with pytest.raises(ValueError, match="generation.activation_dtype=bf16: this CPU"):
        hybrid_engine.HybridEngine(tiny_model("llama-gqa"), generation=FAST)


@needs_bf16
@pytest.mark.parametrize("ppo_epochs, source", [(2, "recomputed"), (1, ON_POLICY)])
def test_a_grpo_step_in_the_fast_mode_logs_the_mismatch(ppo_epochs, source):
    """Two passes over the rollout: the old log-probs are recomputed by a training forward, and generation's are
    compared with them; one on-policy pass: the update's own forward is the old policy, and generation's are
    compared with it there."""
    words = ["the cat sat", "a dog ran", "the red mat", "it was big", "a blue cat", "the dog sat"]
    rows = [{"prompt": w} for w in words]
    data = StepData(train=datasets.Dataset.from_list(rows[:4]), eval=datasets.Dataset.from_list(rows[4:]), reports=[])
    config = PPOConfig(algo="grpo", max_steps=1, batch_size=2, train_batch_size=4, num_generations=2,
                       max_new_tokens=4, lr=1e-3, ppo_epochs=ppo_epochs, generation=GenerationSettings(**FAST))
    assert config.inexact_logprobs
    length = lambda completions, **kw: [float(len(c)) for c in completions]  # noqa: E731
    records = []
    result = train_ppo(ModelSources(actor=demo_llama(), reward_fn=length), tokenizer(), data, config,
                       progress=False, log=lambda step, r: records.append(r))
    record = result.history[0]
    assert record["logprob_source"] == source and result.logprob_source == source
    assert 0 < record["logprob_mismatch_mean"] <= record["logprob_mismatch_max"] < 0.5
    assert any("logprob_mismatch_max" in r for r in records)  # what metrics.jsonl receives
