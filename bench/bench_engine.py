"""The hybrid engine in a PPO-shaped step: 2 processes (torchrun, gloo, one thread each), DeepSpeed ZeRO-3,
a ~125M Llama, NEW new tokens for BATCH prompts per rank, then one training step (engine_worker.py).

One benchmark per variant; its timed call is the whole torchrun launch, and extra_info holds each
provider's phase figures (best of two interleaved rounds; the slower rank's seconds, the larger peak RSS)
and the ratios of this run:
- full: ours / ours-bf16 / single vs hf-zero3 and hf-gathered, train-ours vs train-ds (DeepSpeed alone);
- full-real-gather: stage3_max_live_parameters=0, so every switch really gathers: all at once vs by layer;
- lora: the same providers with peft LoRA r=16 on q_proj and v_proj.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from harness import record, representative

WORKER = Path(__file__).with_name("engine_worker.py")
VARIANTS = {
    "full": ("full", "default", "ours,ours-bf16,single,hf-gathered,hf-zero3,train-ours,train-ds"),
    "full-real-gather": ("full", "0", "ours,ours-layer,train-ours"),
    "lora": ("lora", "default", "ours,single,hf-gathered,hf-zero3,train-ours,train-ds"),
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, lora: str, live: str, providers: str) -> dict[str, dict]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), str(WORKER), str(out), lora, live, providers]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"engine benchmark failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    merged = {}
    for name in ranks[0]:
        rows = [r[name] for r in ranks]
        merged[name] = dict(rows[0], seconds=max(r["seconds"] for r in rows), peak_MB=max(r["peak_MB"] for r in rows))
    return merged


def ratios(p: dict[str, dict]) -> dict[str, float]:
    """The targets' ratios from this run's providers."""
    out = {}
    if "ours" in p and "train-ours" in p:
        step = p["ours"]["seconds"] + p["train-ours"]["seconds"]
        out["switch_fraction_of_step"] = p["ours"]["switch"]["switch_s"] / step
    for base in ("hf-zero3", "hf-gathered"):
        if base in p:
            out[f"generation_speedup_vs_{base}"] = p[base]["seconds"] / p["ours"]["seconds"]
    if "ours-bf16" in p:
        out["bf16_speedup"] = p["ours"]["seconds"] / p["ours-bf16"]["seconds"]
    if "single" in p:
        out["ours_vs_single_process"] = p["ours"]["seconds"] / p["single"]["seconds"]
    if "train-ds" in p:
        out["train_speedup_vs_deepspeed"] = p["train-ds"]["seconds"] / p["train-ours"]["seconds"]
    if "ours-layer" in p:
        out["layer_gather_time_ratio"] = p["ours-layer"]["seconds"] / p["ours"]["seconds"]
    return {k: round(v, 3) for k, v in out.items()}


# Representative: full-real-gather (~3 minutes on 2 cores; full takes ~6.5, lora ~11.5).
@pytest.mark.parametrize("variant", representative(list(VARIANTS), "full-real-gather"))
def test_engine_step(benchmark, variant, machine, roofline, tmp_path):
    benchmark.group = f"engine PPO-shaped step ({variant})"
    results = {}

    def run():
        results.update(launch(tmp_path, *VARIANTS[variant]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    record(benchmark, provider=variant, machine=machine, roofline=roofline, providers=results, **ratios(results),
           model=os.environ.get("BENCH_MODEL", "llama-125m"), prompt=int(os.environ.get("BENCH_PROMPT", 64)),
           new_tokens=int(os.environ.get("BENCH_NEW", 128)), batch_per_rank=int(os.environ.get("BENCH_BATCH", 16)))
