"""The memory planner (hybrid_engine/rlhf/plan/) against measured peaks: each case trains a built-in preset for two
steps with the HybridEngine and generates once (plan_worker.py, under torchrun, 1 or 2 processes, gloo, CPU), and
the planner estimates the same run. Writes bench/results/plan_check.json: per case and phase the estimate, the
measured peak (the largest over the ranks) and the relative error.

    python bench/plan_check.py                       # measure every case (a few minutes on 2 cores)
    python bench/plan_check.py --reuse results.json  # the estimates again, the measured peaks from an earlier run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import deepspeed
import torch

from hybrid_engine._build import cpu_model
from hybrid_engine.model.presets import preset_config
from hybrid_engine.rlhf.plan import PlanConfig, plan

WORKER = Path(__file__).with_name("plan_worker.py")
RESULTS = Path(__file__).with_name("results") / "plan_check.json"
BUCKETS = {"reduce_bucket_size": 2**20, "allgather_bucket_size": 2**20, "stage3_prefetch_bucket_size": 2**20,
           "stage3_max_live_parameters": 0, "stage3_param_persistence_threshold": 0}
"""DeepSpeed's buckets in every case: small (its defaults reserve ~2 GB an engine), and every parameter partitioned
under ZeRO-3 (the tiny presets' would all stay resident under the default persistence threshold)."""
BOUND = 0.15
"""An estimate's largest relative error from the measured peak."""
MEASURED = ("per rank, the peak of the bytes of the CPU tensors alive (a counting allocator over torch's, "
            "allocation_counter.cpp), counted from before the model is built; the largest over the ranks")
PHASES = {"train": "sft", "generate": "generation"}
"""The worker's measured phase -> the planner's phase it checks: the actor trained alone is SFT's phase; its
generation (the training state resident, the weights gathered, the KV cache) is PPO's generation for the actor."""


def case(preset: str, world: int, stage: int, lora_r: int = 0, checkpointing: bool = False, gather: str = "all",
         batch: int = 4, seq: int = 64, prompt: int = 32) -> dict:
    name = f"{preset}-{world}rank-zero{stage}" + (f"-lora{lora_r}" if lora_r else "") + \
        ("-ckpt" if checkpointing else "") + (f"-gather-{gather}" if stage == 3 else "")
    return dict(name=name, preset=preset, world=world, stage=stage, lora_r=lora_r, lora_targets=["q_proj", "v_proj"],
                checkpointing=checkpointing, gather=gather, batch=batch, seq=seq, prompt=prompt,
                vocab=preset_config(preset).vocab_size, buckets=BUCKETS)


CASES = [
    case("llama-tiny", 1, 0), case("llama-tiny", 1, 0, lora_r=8), case("llama-tiny", 2, 2),
    case("llama-tiny", 2, 3), case("llama-tiny", 2, 3, lora_r=8, gather="layer"),
    case("llama-20m", 1, 0), case("llama-20m", 1, 0, lora_r=8), case("llama-20m", 1, 0, checkpointing=True),
    case("llama-20m", 2, 2), case("llama-20m", 2, 3), case("llama-20m", 2, 3, gather="layer"),
    case("llama-20m", 2, 3, lora_r=8),
]


def measure(c: dict) -> dict:
    """{phase: peak bytes}, the largest over the ranks, of one case run by plan_worker.py."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HYBRID_ENGINE_CALIBRATE": "0"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(c["world"]), "--master_addr",
               "127.0.0.1", "--master_port", str(port), str(WORKER), out, json.dumps(c)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{c['name']}: the worker failed:\n{proc.stderr[-4000:]}")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(c["world"])]
    return {phase: max(r["phases"][phase]["peak"] for r in ranks) for phase in PHASES}


def estimate(c: dict) -> dict:
    """{phase: the planner's per-rank bytes} for the case's run."""
    config = PlanConfig(model=c["preset"], world_size=c["world"], zero_stage=c["stage"], lora_r=c["lora_r"],
                        lora_targets=tuple(c["lora_targets"]), batch_size=c["batch"], prompt_len=c["prompt"],
                        response_len=c["seq"] - c["prompt"], weight_dtype="fp32", checkpointing=c["checkpointing"],
                        gather=c["gather"], reduce_bucket_size=BUCKETS["reduce_bucket_size"],
                        prefetch_bucket_size=BUCKETS["stage3_prefetch_bucket_size"],
                        persistence_threshold=BUCKETS["stage3_param_persistence_threshold"])
    phases = {p.name: p for p in plan(config).phases}
    return {measured: phases[ours].actor_total for measured, ours in PHASES.items()}


def rows(c: dict, measured: dict) -> dict:
    est = estimate(c)
    return {"case": c["name"], "config": {k: v for k, v in c.items() if k != "name"},
            "phases": {p: {"estimate_bytes": est[p], "measured_bytes": measured[p],
                           "error": round(est[p] / measured[p] - 1, 4)} for p in PHASES}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reuse", metavar="JSON", help="take the measured peaks from this earlier output")
    parser.add_argument("--cases", nargs="+", metavar="NAME", help="only these cases")
    parser.add_argument("--out", default=str(RESULTS), help="where to write (default: %(default)s)")
    args = parser.parse_args()
    earlier = {}
    if args.reuse:
        earlier = {r["case"]: {p: v["measured_bytes"] for p, v in r["phases"].items()}
                   for r in json.loads(Path(args.reuse).read_text())["cases"]}
    results = []
    for c in CASES:
        if args.cases and c["name"] not in args.cases:
            continue
        measured = earlier.get(c["name"]) or measure(c)
        results.append(rows(c, measured))
        r = results[-1]["phases"]
        print(c["name"], " ".join(f"{p}: {v['estimate_bytes'] / 2**20:.1f}/{v['measured_bytes'] / 2**20:.1f} MiB "
                                  f"({v['error']:+.1%})" for p, v in r.items()), flush=True)
    within = sum(abs(v["error"]) <= BOUND for r in results for v in r["phases"].values())
    print(f"{within} of {2 * len(results)} estimates within {BOUND:.0%} of the measured peak")
    out = {"bound": BOUND, "measured": MEASURED, "cpu": cpu_model(), "torch": torch.__version__,
           "deepspeed": deepspeed.__version__, "cases": results}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
