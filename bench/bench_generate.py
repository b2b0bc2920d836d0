"""Generation against Hugging Face `generate`: same weights, same prompts, greedy, no eos.

Three benchmarks, all ratios measured in this run:
- test_generate: tokens/s of a whole generate() call (prefill included) per provider, model, batch and
  number of new tokens; `speedup_vs_hf-fp32` is filled in from the same run's HF fp32 row.
- test_decode_step: one decode step at context 64; weights read per step (embeddings excluded) and
  FLOPs give GB/s and the fraction of the run's roofline, and of one measured beside the step in alternation with
  it (harness.paired_roofline_fraction: this VM's read rate drifts within the hour).
- test_decode_cost_by_position: ms per token as the context grows to 1024 (bench/decode_position.png), with the
  KV cache in fp32 and, for `ours-fp32-kvbf16`, in bf16 (generate's kv_dtype).
- test_bf16_kv_cache_logprobs: how far a bf16 KV cache moves the log-probs of sampled tokens from fp32 ones.

Without --sweeps (bench/conftest.py), test_generate and test_decode_step run HF and ours in fp32 on the first model
at batch 16 (64 new tokens), and the 125M model's three sweeps do not run:

    pytest bench/bench_generate.py --benchmark-only --sweeps --benchmark-json=bench/results/generation.json
"""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch
from harness import paired_roofline_fraction, record, representative, run_benchmark
from transformers import DynamicCache

import hybrid_engine
from hybrid_engine.model import InferenceTransformer, KVCache, extract_weights, spec_from_config
from hybrid_engine.model.presets import preset_model

PROMPT = 64
MODELS = os.environ.get("BENCH_GENERATE_MODELS", "llama-20m,llama-125m,qwen3-125m").split(",")
BATCHES = [1, 4, 16, 32]
NEW_TOKENS = [64, 256]
PROVIDERS = ["hf-fp32", "hf-bf16", "ours-fp32", "ours-bf16"]
# The representative cases: fp32 HF against ours, the first model, batch 16, 64 new tokens.
AXES = dict(provider=representative(PROVIDERS, "hf-fp32", "ours-fp32"), name=representative(MODELS, MODELS[0]),
            batch=representative(BATCHES, 16), new_tokens=representative(NEW_TOKENS, 64))


@functools.cache
def model(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    m = preset_model(name)
    return m if dtype == torch.float32 else m.to(dtype)


def prompts(batch: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))


def generate_fn(provider: str, name: str, ids: torch.Tensor, new_tokens: int):
    mask = torch.ones_like(ids)
    if provider.startswith("hf"):
        m = model(name, torch.bfloat16 if provider == "hf-bf16" else torch.float32)
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  use_cache=True)
        return lambda: m.generate(input_ids=ids, attention_mask=mask, **kw)
    weight_dtype = torch.bfloat16 if provider == "ours-bf16" else None
    m = model(name)
    # No eos (eos_token_id=None, not the model's generation_config eos): every sequence runs to new_tokens, as on the
    # HF side.
    return lambda: hybrid_engine.generate(m, ids, mask, max_new_tokens=new_tokens, weight_dtype=weight_dtype,
                                          eos_token_id=None)


def our_net(name: str, provider: str) -> InferenceTransformer:
    """Our generation-mode model for an "ours-fp32" or "ours-bf16" provider."""
    m = model(name)
    spec = spec_from_config(m.config)
    return InferenceTransformer(spec, extract_weights(m, spec, torch.bfloat16 if provider == "ours-bf16" else None))


def matmul_weight_bytes(name: str, weight_dtype: torch.dtype | None) -> tuple[int, int]:
    """(bytes, parameters) of the matrices a decode step reads: every linear and the LM head."""
    m = model(name)
    w = extract_weights(m, spec_from_config(m.config), weight_dtype)
    mats = [lin.weight for layer in w.layers for lin in (layer.qkv, layer.o, layer.up, layer.down)]
    mats.append(w.lm_head.weight)
    return sum(t.numel() * t.element_size() for t in mats), sum(t.numel() for t in mats)


@pytest.mark.parametrize("new_tokens", AXES["new_tokens"])
@pytest.mark.parametrize("batch", AXES["batch"])
@pytest.mark.parametrize("name", AXES["name"])
@pytest.mark.parametrize("provider", AXES["provider"])
def test_generate(benchmark, provider, name, batch, new_tokens, machine, roofline):
    ids = prompts(batch, model(name).config.vocab_size)
    fn = generate_fn(provider, name, ids, new_tokens)
    generate_fn(provider, name, ids[:, :8], 2)()  # warm-up outside the timing
    benchmark.group = f"generate {name} B={batch} new={new_tokens}"
    run_benchmark(benchmark, fn, rounds=1)
    t = benchmark.stats.stats.median
    record(benchmark, provider=provider, machine=machine, roofline=roofline,
           tokens_per_s=round(batch * new_tokens / t, 1), baseline_provider="hf-fp32", model=name, batch=batch,
           new_tokens=new_tokens)


def decode_step_fn(provider: str, name: str, batch: int):
    """A function running one decode step at context PROMPT, resetting the cache each call."""
    ids = prompts(batch, model(name).config.vocab_size)
    tok = ids[:, -1:]
    if provider.startswith("hf"):
        m = model(name, torch.bfloat16 if provider == "hf-bf16" else torch.float32)
        cache = DynamicCache(config=m.config)
        with torch.no_grad():
            m(input_ids=ids, past_key_values=cache, use_cache=True)
        pos = torch.full((batch, 1), PROMPT)

        def step():
            cache.crop(PROMPT - cache.get_seq_length())  # transformers 5: a negative count of tokens to drop
            with torch.no_grad():
                return m(input_ids=tok, past_key_values=cache, position_ids=pos, use_cache=True).logits

        return step
    net = our_net(name, provider)
    cache = KVCache.allocate(net.spec, batch, PROMPT + 8)
    net.prefill(ids, torch.ones_like(ids), cache)

    def step():
        cache.lengths.fill_(PROMPT)
        return net.decode(tok[:, 0], cache)

    return step


@pytest.mark.parametrize("batch", AXES["batch"])
@pytest.mark.parametrize("name", AXES["name"])
@pytest.mark.parametrize("provider", AXES["provider"])
def test_decode_step(benchmark, provider, name, batch, machine, roofline):
    step = decode_step_fn(provider, name, batch)
    benchmark.group = f"decode step {name} B={batch}"
    run_benchmark(benchmark, step, rounds=10)
    bf16 = provider.endswith("bf16")
    weight_bytes, params = matmul_weight_bytes(name, torch.bfloat16 if bf16 else None)
    spec = spec_from_config(model(name).config)
    kv_elem = 2 if provider == "hf-bf16" else 4  # our cache stays fp32 with bf16 weights
    kv_bytes = 2 * spec.num_layers * batch * spec.num_kv_heads * PROMPT * spec.head_dim * kv_elem
    flops = 2 * params * batch + 4 * spec.num_layers * batch * spec.num_heads * PROMPT * spec.head_dim
    paired, probe = paired_roofline_fraction(step, weight_bytes + kv_bytes, flops)
    record(benchmark, provider=provider, machine=machine,
           roofline=roofline, bytes_moved=weight_bytes + kv_bytes, flops=flops, baseline_provider="hf-fp32",
           tokens_per_s=round(batch / benchmark.stats.stats.median, 1), model=name, batch=batch,
           roofline_fraction_paired=round(paired, 3), paired_read_GBps=round(probe.read_bytes_per_s / 1e9, 1))


@pytest.mark.sweep
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("provider", ["ours-fp32", "ours-fp32-kvbf16", "ours-bf16", "hf-fp32"])
def test_decode_cost_by_position(benchmark, provider, batch, machine, roofline):
    """Decode steps from position 1 to 1024 at batch `batch` on the 125M model; ms/token every 64 positions."""
    name, total, window = MODELS[-1], 1024, 64
    ids = prompts(batch, model(name).config.vocab_size)[:, :1]
    timings: list[tuple[int, float]] = []

    def run():
        timings.clear()
        if provider.startswith("hf"):
            m = model(name)
            cache = DynamicCache(config=m.config)
            tok = ids
            with torch.no_grad():
                for pos in range(total):
                    t0 = time.perf_counter()
                    out = m(input_ids=tok, past_key_values=cache, use_cache=True,
                            position_ids=torch.full((batch, 1), pos))
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)
                    timings.append((pos, time.perf_counter() - t0))
            return
        net = our_net(name, provider)
        kv_dtype = torch.bfloat16 if provider.endswith("kvbf16") else torch.float32
        cache = KVCache.allocate(net.spec, batch, total + 1, dtype=kv_dtype)
        logits = net.prefill(ids, torch.ones_like(ids), cache)
        for pos in range(1, total):
            t0 = time.perf_counter()
            logits = net.decode(logits.argmax(-1), cache)
            timings.append((pos, time.perf_counter() - t0))

    benchmark.group = f"decode cost by position {name} B={batch}"
    run_benchmark(benchmark, run, rounds=1)
    by_window = []
    for start in range(0, total, window):
        ts = sorted(t for p, t in timings if start <= p < start + window)
        if ts:
            by_window.append([start + window // 2, round(ts[len(ts) // 2] * 1e3, 3)])
    record(benchmark, provider=provider, machine=machine,
           roofline=roofline, ms_per_token_by_position=by_window, model=name, batch=batch)


@pytest.mark.sweep
@pytest.mark.parametrize("case", ["none-finish", "half-finish-at-step-1"])
def test_finished_sequences_leave_the_batch(benchmark, case, machine, roofline):
    """125M model, batch 16, 128 new tokens. With eos ids chosen so that half the prompts stop after
    their first token, the remaining steps run on 8 sequences: the run should cost close to a batch of 8."""
    name, batch, new_tokens = MODELS[-1], 16, 128
    m = model(name)
    ids = prompts(batch, m.config.vocab_size)
    first = hybrid_engine.generate(m, ids, max_new_tokens=1, eos_token_id=None).sequences[:, -1]
    eos = sorted(set(first[: batch // 2].tolist()) - set(first[batch // 2:].tolist()))
    kw = dict(max_new_tokens=new_tokens, eos_token_id=eos if case != "none-finish" else None, pad_token_id=0)
    benchmark.group = f"finished sequences {name} B={batch} new={new_tokens}"
    out = run_benchmark(benchmark, lambda: hybrid_engine.generate(m, ids, **kw), rounds=1)
    record(benchmark, provider=case, machine=machine, roofline=roofline, baseline_provider="none-finish",
           generated_tokens=int(out.response_mask.sum()), finished_at_step_1=int((out.response_mask.sum(1) == 1).sum()))


@pytest.mark.sweep
def test_bf16_kv_cache_logprobs(benchmark, machine, roofline):
    """The 125M model samples 8 x 256 tokens with a bf16 KV cache; HF's fp32 forward over the same sequences gives
    the fp32 log-probs they are compared with (|difference| per token: max, mean, 99th percentile)."""
    name, batch, new_tokens = MODELS[-1], 8, 256
    m = model(name)
    ids = prompts(batch, m.config.vocab_size)
    kw = dict(max_new_tokens=new_tokens, do_sample=True, seed=0, kv_dtype=torch.bfloat16, eos_token_id=None)
    benchmark.group = f"bf16 KV cache {name} B={batch} new={new_tokens}"
    out = run_benchmark(benchmark, lambda: hybrid_engine.generate(m, ids, **kw), rounds=1)
    with torch.no_grad():
        logits = m(input_ids=out.sequences).logits[:, PROMPT - 1 : -1].float()
    fp32 = torch.log_softmax(logits, -1).gather(2, out.sequences[:, PROMPT:, None])[..., 0]
    diff = (out.logprobs - fp32).abs()[out.response_mask.bool()]
    record(benchmark, provider="ours-fp32-kvbf16", machine=machine, roofline=roofline, model=name, batch=batch,
           new_tokens=new_tokens, logprob_diff_max=round(float(diff.max()), 5),
           logprob_diff_mean=round(float(diff.mean()), 5), logprob_diff_p99=round(float(diff.quantile(0.99)), 5))
