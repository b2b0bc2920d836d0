"""RLHF end to end against TRL (issue 13, first slice): our GRPO and RLOO against TRL 1.16's GRPOTrainer and
RLOOTrainer, and against TRL with apply_hybrid_engine on its model, at equal settings on the demo task.

Each case runs bench/rlhf_worker.py in a process of its own (peak memory is the run's): the same ~10M Llama
made from a config, 8 prompts x 4 samples per step, 32 new tokens, lr 1e-5, KL 0.04 (GRPO) or 0.05 (RLOO),
fp32, the rule score as the reward. Recorded per case: the median step time after the first (warm-up) step,
samples/s, generated tokens/s, peak resident memory, our phase split, and the reward per step (equal learning:
a speed-up must not come from doing less). `python scripts/rlhf_table.py bench/results/rlhf.json --readme
README.md` makes the README table; ratios are against TRL in the same run.

    pytest bench/bench_rlhf.py --benchmark-only --benchmark-json=bench/results/rlhf.json   # ~10 minutes
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("rlhf_worker.py")
PROVIDERS = ["ours", "trl", "trl-patched"]
BETA = {"grpo": 0.04, "rloo": 0.05}


def _figures(result: dict) -> dict:
    steps = result["steps"][1:] or result["steps"]  # the first step warms up (JIT, allocator, caches)
    step_s = statistics.median(s["time_s"] for s in steps)
    samples = result["settings"]["prompts"] * result["settings"]["generations"]
    tokens = statistics.median(s["completion_tokens"] for s in steps)
    out = {"step_s": round(step_s, 4), "samples_per_s": round(samples / step_s, 2),
           "generated_tokens_per_s": round(tokens / step_s, 1), "peak_rss_mb": round(result["peak_rss_mb"]),
           "params_M": round(result["params"] / 1e6, 2), "rewards": [round(s["reward"], 4) for s in result["steps"]]}
    for phase in ("generate_s", "experience_s", "train_s"):
        if phase in steps[0]:
            out[phase] = round(statistics.median(s[phase] for s in steps), 4)
    return out


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_rlhf_step(benchmark, algo, provider, machine, tmp_path):
    if provider.startswith("trl") and importlib.util.find_spec("trl") is None:
        pytest.skip("trl is not installed (pip install -e '.[dev]')")
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(WORKER), provider, algo, str(out), "--beta", str(BETA[algo])]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    benchmark.pedantic(lambda: subprocess.run(cmd, check=True, env=env, capture_output=True), rounds=1,
                       iterations=1)
    result = json.loads(out.read_text())
    benchmark.extra_info.update(provider=provider, algo=algo, **machine, settings=result["settings"],
                                **_figures(result))
