"""Run by torchrun (2 processes, gloo, CPU) for tests/test_resume_distributed.py: each training step under DeepSpeed
ZeRO-2 and ZeRO-3 (SFT under ZeRO-2 and GRPO's actor under ZeRO-3 with LoRA and adapters-only checkpoints), 4 steps
with a checkpoint after step 2, then a fresh run resumed from that checkpoint (as a run stopped after step 2 would
be); and a resume under another ZeRO stage, refused. Each rank writes what it ran to OUT/rank<r>.json."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict

import peft
import torch

sys.path.insert(0, os.path.dirname(__file__))
from demo_models import demo_llama, demo_rows, tokenizer  # noqa: E402
from worker_exit import write_and_leave  # noqa: E402

from hybrid_engine.engine.training import init_distributed  # noqa: E402
from hybrid_engine.rlhf import RewardConfig, RewardModel, SFTConfig, train_reward, train_sft  # noqa: E402
from hybrid_engine.rlhf.ppo import ModelSources, PPOConfig, train_ppo  # noqa: E402


def zero(stage: int) -> dict:
    # Tiny parameters would stay resident under ZeRO-3: force partitioning. Small buckets: DeepSpeed's defaults
    # reserve ~2 GB per engine.
    return {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                  "reduce_bucket_size": 2**20, "allgather_bucket_size": 2**20,
                                  "stage3_prefetch_bucket_size": 2**20}}


def lora() -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           init_lora_weights=False)


def sft(out: str, data, stage: int, resume=False, use_lora=False, **fields) -> dict:
    config = SFTConfig(**{**dict(max_steps=4, batch_size=2, lr=1e-2, checkpoint_every=2, output_dir=out), **fields})
    result = train_sft(demo_llama(), tokenizer(), data, config, ds_config=zero(stage),
                       lora=lora() if use_lora else None, progress=False, resume=resume)
    return {"losses": result.losses, "evals": result.evals}


def rm(out: str, data, stage: int, resume=False) -> dict:
    config = RewardConfig(max_steps=4, batch_size=2, lr=1e-2, checkpoint_every=2, output_dir=out)
    result = train_reward(demo_llama(), tokenizer(), data, config, ds_config=zero(stage), progress=False,
                          resume=resume)
    return {"losses": result.losses, "evals": [(s, asdict(e)) for s, e in result.evals]}


def ppo(out: str, data, stage: int, algo: str, resume=False, use_lora=False) -> dict:
    config = PPOConfig(algo=algo, max_steps=4, batch_size=2, train_batch_size=2, max_new_tokens=6, lr=1e-3,
                       critic_lr=1e-3, num_generations=1 if algo == "ppo" else 2, eval_batch_size=4,
                       checkpoint_every=2, save_adapters_only=use_lora, ema_beta=0.9 if algo == "ppo" else None,
                       output_dir=out)
    torch.manual_seed(11)
    sources = ModelSources(actor=demo_llama(), reward_model=RewardModel.from_model(demo_llama(seed=1)),
                           ds_config=zero(stage), lora=lora() if use_lora else None)
    result = train_ppo(sources, tokenizer(), data, config, progress=False, resume=resume)
    return {"history": [{k: v for k, v in r.items() if not k.endswith("_s")} for r in result.history],
            "evals": [(s, asdict(e)) for s, e in result.evals]}


def whole_and_resumed(name: str, out: str, train) -> dict:
    """train(output folder, resume) run whole, then again from the whole run's checkpoint after step 2."""
    folder = os.path.join(out, name)
    whole = train(folder)
    resumed = train(folder + "-resumed", resume=os.path.join(folder, "checkpoints", "step-2"))
    return {"whole": whole, "resumed": resumed, "files": sorted(os.listdir(os.path.join(folder, "checkpoints",
                                                                                        "step-2")))}


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    cache = os.path.join(out, f"cache{rank}")  # one datasets cache per process
    rows = {step: demo_rows(step, 32, 4, cache) for step in ("sft", "reward", "ppo")}
    init_distributed()
    runs = {
        "sft-zero2-lora": lambda f, resume=False: sft(f, rows["sft"], 2, resume, use_lora=True,
                                                      save_adapters_only=True),
        "sft-zero3": lambda f, resume=False: sft(f, rows["sft"], 3, resume),
        "rm-zero2": lambda f, resume=False: rm(f, rows["reward"], 2, resume),
        "rm-zero3": lambda f, resume=False: rm(f, rows["reward"], 3, resume),
        "ppo-zero2": lambda f, resume=False: ppo(f, rows["ppo"], 2, "ppo", resume),
        "grpo-zero3-lora": lambda f, resume=False: ppo(f, rows["ppo"], 3, "grpo", resume, use_lora=True),
    }
    results = {name: whole_and_resumed(name, out, train) for name, train in runs.items()}
    try:  # a ZeRO-2 checkpoint under ZeRO-3
        rm(os.path.join(out, "other-stage"), rows["reward"], 3, os.path.join(out, "rm-zero2", "checkpoints", "step-2"))
        results["other_stage"] = None
    except ValueError as e:
        results["other_stage"] = str(e)
    write_and_leave(os.path.join(out, f"rank{rank}.json"), results)


if __name__ == "__main__":
    main(sys.argv[1])
