"""One case of plan_check.py, run by torchrun (1 or 2 processes, gloo, CPU): a built-in preset trained for two steps
by the HybridEngine (DeepSpeed ZeRO 0-3, LoRA or not, activation checkpointing or not), then one generation, with
torch's profiler counting the CPU allocator's bytes. Each rank writes OUT/rank<r>.json: the peak bytes its tensors
held in each phase, counted from before the model was built.

Why the profiler's count: with profile_memory, torch's CPU allocator adds every allocation made while profiling to a
running total ("Total Allocated" on each [memory] event) and takes it off when that block is freed. So the figure is
exactly the bytes of the tensors the run created (weights, gradients, optimizer state, DeepSpeed's buffers,
activations, KV cache), as a GPU's max_memory_allocated counts them, without what the Python process, its libraries
and malloc's free lists cost (which a peak RSS would add, and which no planner of tensors predicts).

    torchrun --nproc_per_node 2 bench/plan_worker.py OUT '{"preset": "llama-20m", "stage": 3, ...}'
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import peft
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

from hybrid_engine.engine import HybridEngine
from hybrid_engine.engine.training import init_distributed
from hybrid_engine.model.presets import preset_model
from hybrid_engine.ops import load

PHASES = ("build", "train", "generate")
"""The profiled ranges, in order: building the model and the engine, the training steps, one generation."""


def ds_config(case: dict) -> dict:
    """DeepSpeed with the case's ZeRO stage and buckets, fp32, torch's AdamW (given as the optimizer)."""
    zero = {"stage": case["stage"], **case["buckets"]}
    return {"train_micro_batch_size_per_gpu": case["batch"], "zero_optimization": zero}


def batch(case: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * dist.get_rank() + step)
    ids = torch.randint(3, case["vocab"], (case["batch"], case["seq"]), generator=g)
    return ids, torch.ones_like(ids)


def build(case: dict) -> HybridEngine:
    """The preset under the HybridEngine with the case's ZeRO stage, LoRA, checkpointing and gather."""
    model = preset_model(case["preset"], seed=0).train()
    lora = peft.LoraConfig(r=case["lora_r"], lora_alpha=16, lora_dropout=0.0,
                           target_modules=list(case["lora_targets"])) if case["lora_r"] else None
    engine = HybridEngine(model, ds_config=ds_config(case), lora=lora,
                          optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5, fused=True),
                          gradient_checkpointing=case["checkpointing"], generation={"gather": case["gather"]})
    engine.train()
    return engine


def train(engine: HybridEngine, case: dict) -> None:
    for step in range(2):  # the second step runs with the optimizer's state allocated
        ids, mask = batch(case, step)
        loss = engine(input_ids=ids, attention_mask=mask, labels=ids).loss
        engine.backward(loss)
        engine.step()
        del loss


def generate(engine: HybridEngine, case: dict) -> None:
    ids, mask = batch(case, 99)
    prompt = ids[:, : case["prompt"]], mask[:, : case["prompt"]]
    engine.eval()
    engine.generate(*prompt, max_new_tokens=case["seq"] - case["prompt"])
    engine.train()


def peaks(prof) -> dict:
    """{phase: {"peak": bytes, "end": bytes}} from the allocator's running total on the CPU's [memory] events, counted
    from the profiler's start."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"plan_trace_{os.getpid()}.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text(), strict=False)["traceEvents"]
    path.unlink()
    memory = sorted((e["ts"], e["args"]["Total Allocated"]) for e in events
                    if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)
    ranges = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in events
              if e.get("name") in PHASES and e.get("ph") == "X" and e.get("cat") == "user_annotation"}
    out = {}
    for name, (start, end) in ranges.items():
        before = [total for t, total in memory if t < start][-1:]
        inside = [total for t, total in memory if start <= t <= end]
        seen = before + inside or [0]
        out[name] = {"peak": max(seen), "end": seen[-1]}
    return out


def main(out: str, case: dict) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HYBRID_ENGINE_CALIBRATE", "0")  # no roofline measured (256 MiB) inside the profiled run
    init_distributed()
    load()  # the C++ ops loaded before profiling
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("build"):
            engine = build(case)
        with record_function("train"):
            train(engine, case)
        with record_function("generate"):
            generate(engine, case)
    result = {"rank": dist.get_rank(), "world": dist.get_world_size(), "phases": peaks(prof),
              "params": sum(p.numel() for p in engine.module.parameters())}
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
