"""One case of plan_check.py, run by torchrun (1 or 2 processes, gloo, CPU): a built-in preset trained for two steps
by the HybridEngine (DeepSpeed ZeRO 0-3, LoRA or not, activation checkpointing or not), then one generation, with a
counting allocator under torch's CPU tensors. Each rank writes OUT/rank<r>.json: the peak bytes its tensors held in
each phase, counted from before the model was built.

Why a counting allocator (allocation_counter.cpp, installed over torch's CPU allocator): it adds each tensor's bytes
when it is allocated and takes them off when it is freed, so the figure is exactly the bytes of the tensors the run
created (weights, gradients, optimizer state, DeepSpeed's buffers, activations, KV cache), as a GPU's
max_memory_allocated counts them, without what the Python process, its libraries and malloc's free lists cost (which
a peak RSS would add, and which no planner of tensors predicts). The profiler's profile_memory keeps the same running
total, but takes a tensor off only when it is freed on a thread the profiler follows. A gloo collective's Work holds
its tensors, and gloo's worker thread drops the Work after the caller has waited on it: where the caller has dropped
the tensor too (DeepSpeed's flattened gradient bucket, all-reduced and unflattened), it is freed on that thread, and
the profiler counts it for the rest of the run (on llama-tiny's ZeRO-2 a whole fp32 copy of the weights on one rank,
0.53 of 2.6 MiB).

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
from torch.utils import cpp_extension

from hybrid_engine._build import build_directory
from hybrid_engine.engine import HybridEngine
from hybrid_engine.engine.training import init_distributed
from hybrid_engine.model.presets import preset_model
from hybrid_engine.ops import load

COUNTER = Path(__file__).with_name("allocation_counter.cpp")


def allocation_counter():
    """The counting allocator's module (compiled once, beside the ops' build): install(), allocated(), peak(),
    reset_peak()."""
    directory = build_directory().parent / "plan_allocation_counter"
    directory.mkdir(exist_ok=True)
    return cpp_extension.load("plan_allocation_counter", [str(COUNTER)], extra_cflags=["-O2"],
                              build_directory=str(directory))


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


def measured(counter, run, *args) -> tuple:
    """run(*args)'s result, and {"peak": the counted bytes' peak while it ran, "end": those alive after it}."""
    counter.reset_peak()
    result = run(*args)
    return result, {"peak": counter.peak(), "end": counter.allocated()}


def main(out: str, case: dict) -> None:
    """Measures this rank's three phases, in order (building the model and the engine, the training steps, one
    generation), and writes OUT/rank<r>.json."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HYBRID_ENGINE_CALIBRATE", "0")  # no roofline measured (256 MiB) inside the measured run
    init_distributed()
    load()  # the C++ ops loaded before counting
    counter = allocation_counter()
    counter.install()
    engine, built = measured(counter, build, case)
    phases = {"build": built, "train": measured(counter, train, engine, case)[1],
              "generate": measured(counter, generate, engine, case)[1]}
    result = {"rank": dist.get_rank(), "world": dist.get_world_size(), "phases": phases,
              "params": sum(p.numel() for p in engine.module.parameters())}
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
