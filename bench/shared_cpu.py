"""Generation on a shared CPU (issue 37, item 3): how much a competing process slows our generate(), with the thread
policy (threads="auto", the default) and without it (threads="torch": torch's count whatever the load).

    python bench/shared_cpu.py --out /tmp/shared_cpu.json

The model is a built-in preset (llama-125m by default), made from its config with seed 0. Each case (weights fp32 or
bf16, batch) times one whole greedy generate() of --new-tokens per prompt (prefill included) under each load:
alone, and beside bench/peers/competing_load.py (fp32 matmuls) on 1 and on 2 threads. The loads interleave: each
round runs every load in turn (its competitor started, given a second to get going, and stopped), every case and
both policies inside it, policy off then on; each (load, case, policy) reports its best round. `degradation` is a
case's best time under a load over its best time alone, for the same policy; `auto_vs_torch` the policy's speed-up.
The JSON names the machine, torch's thread count and the load average and runnable threads seen at the start of each
load (on a machine others share, they are the other work that ran). The JSON is written after every load
block, so a run cut short keeps what it timed.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_generate import model, prompts
from generate_vs_vllm import DTYPES, CompetingLoad, _ints, _names

import hybrid_engine
from hybrid_engine import _build
from hybrid_engine.generation import threads as policy

POLICIES = ("torch", "auto")
"""threads= of each timed call: torch's count (the policy off), then the policy."""
SETTLE_S = 1.0
"""Seconds a competitor runs before the first timed call beside it."""


def timed(m, ids: torch.Tensor, new_tokens: int, weight_dtype, setting: str) -> float:
    t0 = time.perf_counter()
    hybrid_engine.generate(m, ids, torch.ones_like(ids), max_new_tokens=new_tokens, weight_dtype=weight_dtype,
                           eos_token_id=None, threads=setting)
    return time.perf_counter() - t0


def load_seen() -> dict:
    """What else runs now: the load average and the machine's runnable threads less ours."""
    return {"loadavg": Path("/proc/loadavg").read_text().split()[:3], "others_running": policy.others_running()}


def measure(args, save: Callable[[dict, list[dict]], None]) -> None:
    """Times every (load, dtype, batch, policy) into {key: [seconds per round]}, calling save(times, seen) after each
    load block, seen saying what ran beside each block."""
    m = model(args.model)
    cases = [(dtype, batch) for dtype in args.dtypes for batch in args.batches]
    for dtype, _ in cases:
        timed(m, prompts(1, m.config.vocab_size)[:, :8], 2, DTYPES[dtype][0], "torch")  # warm-up
    times: dict = {}
    seen = []
    for rnd in range(args.rounds):
        for competing in args.competing:
            with CompetingLoad(competing > 0, competing):
                time.sleep(SETTLE_S if competing else 0.0)
                seen.append({"round": rnd, "competing_threads": competing} | load_seen())
                for dtype, batch in cases:
                    ids = prompts(batch, m.config.vocab_size)
                    for setting in POLICIES:
                        s = timed(m, ids, args.new_tokens, DTYPES[dtype][0], setting)
                        times.setdefault((competing, dtype, batch, setting), []).append(s)
            print(json.dumps(seen[-1]), flush=True)
            save(times, seen)


def rows(times: dict, args) -> list[dict]:
    """One row per (competing threads, weights, batch, policy): best seconds, tokens/s, degradation vs alone."""
    out = []
    for (competing, dtype, batch, setting), seconds in times.items():
        best, alone = min(seconds), min(times[(0, dtype, batch, setting)])  # 0 runs first in every round
        row = {"competing_threads": competing, "dtype": dtype, "batch": batch, "threads": setting, "best_s": best,
               "rounds_s": seconds, "tokens_per_s": round(batch * args.new_tokens / best, 1),
               "degradation": round(best / alone, 3)}
        if setting == "auto":
            row["auto_vs_torch"] = round(min(times[(competing, dtype, batch, "torch")]) / best, 3)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the results JSON")
    p.add_argument("--model", default="llama-125m", help="the built-in preset")
    p.add_argument("--batches", type=_ints, default=[1, 16], help="comma-separated batch sizes")
    p.add_argument("--dtypes", type=_names, default=["fp32", "bf16"], help="comma-separated weights: fp32, bf16")
    p.add_argument("--competing", type=_ints, default=[0, 1, 2],
                   help="comma-separated competitor thread counts, 0: alone (must be among them)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt (eos ignored)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the best of each is reported)")
    args = p.parse_args(argv)
    if 0 not in args.competing:
        p.error(f"--competing {args.competing}: 0 (alone) must be among them, every degradation is against it")
    began = time.perf_counter()
    machine = {"cpu": _build.cpu_model(), "capability": _build.capability(), "cores": policy.usable_cores(),
               "threads": torch.get_num_threads(), "torch": torch.__version__}

    def save(times: dict, seen: list[dict]) -> None:  # after every load block: a run cut short keeps what it timed
        result = {"machine": machine, "settings": vars(args) | {"out": str(args.out)}, "load_seen": seen,
                  "rows": rows(times, args), "wall_s": round(time.perf_counter() - began, 1)}
        args.out.write_text(json.dumps(result, indent=1) + "\n")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stops the competitor (CompetingLoad's exit) too
    measure(args, save)
    for row in json.loads(args.out.read_text())["rows"]:
        print(json.dumps({k: v for k, v in row.items() if k != "rounds_s"}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
