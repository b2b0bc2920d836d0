"""rotary_append_kv against the straightforward eager torch code (HF's rotate_half in fp32 and an
index_put into the cache) and torch.compile of it, for a Llama-like decode step and prefill."""

import pytest
import torch
from harness import baseline_time, record, representative, run_benchmark

from hybrid_engine.ops import rotary_append_kv, rotary_append_kv_reference, rotary_tables

B, HQ, HKV, D, T_MAX = 16, 16, 4, 128, 576
SEQ = {"decode": 1, "prefill": 512}


def make_args(S: int, dtype: torch.dtype):
    """Views into a fused QKV output, caches, positions (left-padded prompts for the prefill)."""
    qkv = torch.randn(B, S, (HQ + 2 * HKV) * D, dtype=dtype)
    q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)
    q, k, v = q.unflatten(-1, (HQ, D)), k.unflatten(-1, (HKV, D)), v.unflatten(-1, (HKV, D))
    k_cache = torch.zeros(B, HKV, T_MAX, D, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    if S == 1:
        positions = torch.randint(S, T_MAX, (B, 1))
    else:
        lengths = torch.randint(S // 2, S + 1, (B,))
        mask = (torch.arange(S)[None] >= S - lengths[:, None]).long()
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, -1)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    cos, sin = rotary_tables(inv_freq, T_MAX)
    return (q, k, v, k_cache, v_cache, positions, cos, sin)


@pytest.mark.parametrize("provider", representative(["ours", "eager", "compile"], "ours", "eager"))
@pytest.mark.parametrize("dtype", representative([torch.float32, torch.bfloat16], torch.float32), ids=["fp32", "bf16"])
@pytest.mark.parametrize("step", ["decode", "prefill"])
def test_rotary_append_kv(benchmark, step, dtype, provider, machine, roofline):
    args = make_args(SEQ[step], dtype)
    fn = {
        "ours": rotary_append_kv,
        "eager": rotary_append_kv_reference,
        "compile": torch.compile(rotary_append_kv_reference),
    }[provider]
    key = f"rotary_append_kv {step} B={B} S={SEQ[step]} Hq={HQ} Hkv={HKV} D={D} {dtype}"
    benchmark.group = key
    run_benchmark(benchmark, lambda: fn(*args), rounds=10 if step == "prefill" else 50)
    # Per live token: q and k read and written, v read, k and v written to the cache.
    tokens = int((args[5] >= 0).sum())
    record(
        benchmark,
        provider=provider,
        baseline_s=baseline_time(key, lambda: rotary_append_kv_reference(*args)),
        machine=machine,
        roofline=roofline,
        bytes_moved=tokens * (2 * HQ + 5 * HKV) * D * args[0].element_size(),
        flops=tokens * (HQ + HKV) * D * 3,
        tokens_per_s=round(tokens / benchmark.stats.stats.median),
    )
