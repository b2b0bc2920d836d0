"""decode_attention and prefill_attention against their eager torch references, torch.compile of the
references and (prefill) torch's scaled_dot_product_attention with the equivalent boolean mask."""

import pytest
import torch
import torch.nn.functional as F
from harness import baseline_time, record, representative, run_benchmark

from hybrid_engine.ops import (
    decode_attention,
    decode_attention_reference,
    prefill_attention,
    prefill_attention_reference,
)

B, HQ, D = 16, 16, 128
CONTEXT, T_MAX = 512, 512 + 64
PREFILL_B, PREFILL_T, PREFILL_HKV = 16, 512, 4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", representative(DTYPES, "fp32"))
@pytest.mark.parametrize("hkv", representative([16, 4], 4))
@pytest.mark.parametrize("provider", representative(["ours", "eager", "compile"], "ours", "eager"))
def test_decode_attention(benchmark, provider, hkv, dtype, machine, roofline):
    gen = torch.Generator().manual_seed(0)
    dt = DTYPES[dtype]
    q = torch.randn(B, HQ, D, generator=gen).to(dt)
    k_cache = torch.randn(B, hkv, T_MAX, D, generator=gen).to(dt)
    v_cache = torch.randn(B, hkv, T_MAX, D, generator=gen).to(dt)
    seq_lens = CONTEXT + torch.randint(-32, 33, (B,), generator=gen)
    args = (q, k_cache, v_cache, seq_lens, D**-0.5)
    fn = {
        "ours": lambda: decode_attention(*args),
        "eager": lambda: decode_attention_reference(*args),
        "compile": lambda f=torch.compile(decode_attention_reference): f(*args),
    }[provider]
    benchmark.group = f"decode_attention B={B} Hq={HQ} Hkv={hkv} D={D} context~{CONTEXT} {dtype}"
    run_benchmark(benchmark, fn, rounds=20)
    tokens = int(seq_lens.sum())
    # q and out once, every key and value row the sequences attend to once.
    record(
        benchmark,
        provider=provider,
        baseline_s=baseline_time(benchmark.group, lambda: decode_attention_reference(*args)),
        machine=machine,
        roofline=roofline,
        bytes_moved=(2 * q.numel() + 2 * hkv * tokens * D) * q.element_size(),
        flops=4 * HQ * tokens * D,
    )


def sdpa_with_mask(q, k, v, seq_lens, scale):
    """torch's SDPA with the explicit boolean mask of a left-padded causal batch (padded rows zeroed)."""
    T = q.shape[2]
    pos = torch.arange(T)
    real = pos[None] >= (T - seq_lens)[:, None]
    mask = real[:, None, :] & (pos[:, None] >= pos[None, :])[None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=True)
    return out.masked_fill(~real[:, None, :, None], 0.0)


@pytest.mark.parametrize("dtype", representative(DTYPES, "fp32"))
@pytest.mark.parametrize("provider", representative(["ours", "eager", "compile", "sdpa"], "ours", "eager"))
def test_prefill_attention(benchmark, provider, dtype, machine, roofline):
    gen = torch.Generator().manual_seed(0)
    dt, Bp, T = DTYPES[dtype], PREFILL_B, PREFILL_T
    # Transposed views of [B, T, H, D] projections, as a model produces them.
    q = torch.randn(Bp, T, HQ, D, generator=gen).to(dt).transpose(1, 2)
    k = torch.randn(Bp, T, PREFILL_HKV, D, generator=gen).to(dt).transpose(1, 2)
    v = torch.randn(Bp, T, PREFILL_HKV, D, generator=gen).to(dt).transpose(1, 2)
    seq_lens = torch.randint(T * 3 // 4, T + 1, (Bp,), generator=gen)  # prompts padded to the longest
    seq_lens[0] = T
    args = (q, k, v, seq_lens, D**-0.5)
    fn = {
        "ours": lambda: prefill_attention(*args),
        "eager": lambda: prefill_attention_reference(*args),
        "compile": lambda f=torch.compile(prefill_attention_reference): f(*args),
        "sdpa": lambda: sdpa_with_mask(*args),
    }[provider]
    benchmark.group = f"prefill_attention B={Bp} T={T} Hq={HQ} Hkv={PREFILL_HKV} D={D} {dtype}"
    run_benchmark(benchmark, fn, rounds=5)
    causal_pairs = int((seq_lens * (seq_lens + 1) // 2).sum())
    record(
        benchmark,
        provider=provider,
        baseline_s=baseline_time(benchmark.group, lambda: prefill_attention_reference(*args)),
        machine=machine,
        roofline=roofline,
        bytes_moved=2 * (q.numel() + k.numel()) * q.element_size(),
        flops=4 * HQ * causal_pairs * D,
    )
