"""gae against its eager torch reference (a Python loop over time) and torch.compile of it."""

import pytest
import torch
from harness import baseline_time, record, representative, run_benchmark

from hybrid_engine.ops import gae, gae_reference

B, T = 16, 512


@pytest.mark.parametrize("provider", representative(["ours", "eager", "compile"], "ours", "eager"))
def test_gae(benchmark, provider, machine, roofline):
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (B,))[:, None]).float()
    args = (rewards, values, mask, 0.99, 0.95)
    fn = {
        "ours": lambda: gae(*args),
        "eager": lambda: gae_reference(*args),
        "compile": lambda f=torch.compile(gae_reference): f(*args),
    }[provider]
    benchmark.group = f"gae B={B} T={T}"
    run_benchmark(benchmark, fn, rounds=20)
    # 3 inputs read, 2 outputs written, fp32.
    record(
        benchmark,
        provider=provider,
        baseline_s=baseline_time("gae", lambda: gae_reference(*args)),
        machine=machine,
        roofline=roofline,
        bytes_moved=5 * B * T * 4,
    )
