"""Run by torchrun (gloo, CPU) for tests/test_ppo_distributed.py: train_ppo on a few demo prompts under DeepSpeed,
then reload what rank 0 saved. Each rank writes what it measured to OUT/<mode>-rank<r>.json.

    python -m torch.distributed.run --nproc_per_node 2 ppo_worker.py OUT ranks   # ppo ZeRO-2, ppo and grpo ZeRO-3,
                                                    # grpo ZeRO-3 generating with TP 2, ppo ZeRO-2 with SGD and
                                                    # gradient accumulation 1 and 2
    python -m torch.distributed.run --nproc_per_node 1 ppo_worker.py OUT single  # plain torch, then ZeRO-3 alone
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, os.path.dirname(__file__))
from demo_models import demo_llama, demo_rows, tokenizer  # noqa: E402
from worker_exit import write_and_leave  # noqa: E402

from hybrid_engine.engine.training import init_distributed  # noqa: E402
from hybrid_engine.generation import generate  # noqa: E402
from hybrid_engine.rlhf import RewardModel  # noqa: E402
from hybrid_engine.rlhf.demo import rule_score_batch  # noqa: E402
from hybrid_engine.rlhf.ppo import ModelSources, PPOConfig, train_ppo  # noqa: E402
from hybrid_engine.rlhf.ppo import models as ppo_models  # noqa: E402
from hybrid_engine.rlhf.ppo.experience import Prompts  # noqa: E402
from hybrid_engine.rlhf.tokens import collate_ppo  # noqa: E402


def zero(stage: int) -> dict:
    # Tiny parameters would stay resident under ZeRO-3: force partitioning. Small buckets: DeepSpeed's defaults
    # reserve ~2 GB per engine.
    return {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                  "reduce_bucket_size": 2**20, "allgather_bucket_size": 2**20,
                                  "stage3_prefetch_bucket_size": 2**20}}


def sgd(params, lr: float, weight_decay: float = 0.0) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr)


def accumulation_run(n: int, out: str, data) -> dict:
    """PPO under ZeRO-2 with SGD (linear in the gradient: test_accumulation.py says why not AdamW), each rank's
    minibatch of 2 sequences in n micro-batches of different token counts."""
    adamw, ppo_models.adamw = ppo_models.adamw, sgd
    try:
        return run(f"accumulation-{n}", "ppo", 2, out, data, ds={"zero_allow_untested_optimizer": True}, lr=1.0,
                   critic_lr=1.0, gradient_accumulation_steps=n)
    finally:
        ppo_models.adamw = adamw


def run(name: str, algo: str, stage: int | None, out: str, data, ds: dict | None = None, **fields) -> dict:
    """One train_ppo run of 2 steps (2 prompts per rank and step); what this rank saw, and on rank 0 what the
    saved actor (and critic, EMA) give when reloaded."""
    tok = tokenizer()
    rank = dist.get_rank() if dist.is_initialized() else 0
    settings = dict(algo=algo, max_steps=2, batch_size=2, train_batch_size=2, max_new_tokens=8, lr=1e-3,
                    critic_lr=1e-3, num_generations=1 if algo == "ppo" else 2, eval_batch_size=4,
                    output_dir=os.path.join(out, name))
    config = PPOConfig(**{**settings, **fields})
    torch.manual_seed(11)
    rm = RewardModel.from_model(demo_llama(seed=1))
    sources = ModelSources(actor=demo_llama(), reward_model=rm, eval_fn=rule_score_batch,
                           ds_config=None if stage is None else {**zero(stage), **(ds or {})})
    result = train_ppo(sources, tok, data, config, progress=False)
    prompts = collate_ppo(Prompts.of(data.eval, tok, config).examples, tok.pad_token_id)
    args = dict(max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    greedy = result.actor.generate(prompts["input_ids"], prompts["attention_mask"], **args)  # every rank (ZeRO-3)
    record = {"stage": result.actor.zero_stage, "tp": result.actor.settings.inference_tp_size,
              "steps": result.steps, "skipped": result.skipped,
              "history": [{k: v for k, v in r.items() if not k.endswith("_s")} for r in result.history],
              "evals": [(s, asdict(e)) for s, e in result.evals], "greedy": greedy.sequences.tolist()}
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:  # what rank 0 wrote, read back in plain torch
        saved = transformers.AutoModelForCausalLM.from_pretrained(config.output_dir)
        record["reloaded_greedy"] = generate(saved, prompts["input_ids"], prompts["attention_mask"],
                                             **args).sequences.tolist()
        record["critic_loads"] = algo == "ppo" and RewardModel.from_pretrained(
            os.path.join(config.output_dir, "critic")) is not None
        record["ema_loads"] = config.ema_beta is not None and transformers.AutoModelForCausalLM.from_pretrained(
            os.path.join(config.output_dir, "ema")) is not None
    return record


def main(out: str, mode: str) -> None:
    rank = int(os.environ["RANK"])
    data = demo_rows("ppo", 16, 6, os.path.join(out, f"cache-{mode}{rank}"))  # one datasets cache per process
    results = {}
    if mode == "single":
        results["plain"] = run("single-plain", "ppo", None, out, data)
        init_distributed()
        results["zero3"] = run("single-zero3", "ppo", 3, out, data)
    else:
        init_distributed()
        results["ppo-zero2"] = run("ppo-zero2", "ppo", 2, out, data)
        results["ppo-zero3"] = run("ppo-zero3", "ppo", 3, out, data, ema_beta=0.9)
        results["grpo-zero3"] = run("grpo-zero3", "grpo", 3, out, data)
        results["grpo-tp2-zero3"] = run("grpo-tp2-zero3", "grpo", 3, out, data, generation={"inference_tp_size": 2})
        results["accumulation"] = {n: accumulation_run(n, out, data) for n in (1, 2)}
    write_and_leave(os.path.join(out, f"{mode}-rank{rank}.json"), results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
