"""Run by torchrun (2 processes, gloo, CPU): train_sft under DeepSpeed ZeRO-2 and train_reward under ZeRO-3 on a
few demo rows, then reload what rank 0 saved; both again with plain SGD, with and without gradient accumulation.
Each rank writes what it measured to OUT/rank<r>.json;
tests/test_rlhf_distributed.py asserts on it."""

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
from hybrid_engine.rlhf import (  # noqa: E402
    RewardConfig,
    RewardModel,
    SFTConfig,
    evaluate_reward,
    perplexity,
    reward,
    sft,
    train_reward,
    train_sft,
)
from hybrid_engine.rlhf.tokens import TokenConfig, tokenize_reward, tokenize_sft  # noqa: E402


def zero(stage: int) -> dict:
    # Tiny parameters would stay resident under ZeRO-3: force partitioning. Small buckets: DeepSpeed's
    # defaults reserve ~2 GB per engine.
    return {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                  "reduce_bucket_size": 2**20, "allgather_bucket_size": 2**20,
                                  "stage3_prefetch_bucket_size": 2**20}}


def with_sgd(stage: int) -> dict:
    return {**zero(stage), "zero_allow_untested_optimizer": True}


def sgd(params, lr: float, weight_decay: float = 0.0) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr)


def accumulation_runs(sft_rows, rm_rows) -> dict:
    """SFT under ZeRO-2 and the reward model under ZeRO-3, 2 steps of 4 rows per rank in 1 or 2 micro-batches, with
    SGD (its update is linear in the gradient: test_accumulation.py says why not AdamW): losses and held-out
    figures."""
    sft.adamw = reward.adamw = sgd
    out = {}
    for n in (1, 2):
        s = train_sft(demo_llama(), tokenizer(), sft_rows, SFTConfig(max_steps=2, batch_size=4, lr=1.0,
                      gradient_accumulation_steps=n), ds_config=with_sgd(2), progress=False)
        r = train_reward(demo_llama(), tokenizer(), rm_rows, RewardConfig(max_steps=2, batch_size=4, lr=1.0,
                         gradient_accumulation_steps=n), ds_config=with_sgd(3), progress=False)
        out[n] = dict(sft=s.losses, sft_ppl=s.eval_perplexity_after, rm=r.losses, rm_eval=asdict(r.after))
    return out


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    cache = os.path.join(out, f"cache{rank}")  # one datasets cache per process
    sft_rows, rm_rows = demo_rows("sft", 64, 16, cache), demo_rows("reward", 64, 16, cache)
    init_distributed()
    tok = tokenizer()
    results = {}

    sft_dir = os.path.join(out, "sft")
    sft = train_sft(demo_llama(), tok, sft_rows, SFTConfig(max_steps=3, batch_size=4, lr=1e-2, output_dir=sft_dir),
                    ds_config=zero(2), progress=False)
    results["sft"] = dict(losses=sft.losses, evals=sft.evals, stage=sft.engine.zero_stage)

    rm_dir = os.path.join(out, "rm")
    rm = train_reward(demo_llama(), tok, rm_rows, RewardConfig(max_steps=3, batch_size=4, lr=1e-2, output_dir=rm_dir),
                      ds_config=zero(3), progress=False)
    results["rm"] = dict(losses=rm.losses, evals=[(s, asdict(e)) for s, e in rm.evals])

    results["accumulation"] = accumulation_runs(sft_rows, rm_rows)
    dist.barrier()
    if rank == 0:  # what rank 0 wrote, read back in plain torch
        held_out, _ = tokenize_sft(sft_rows.eval, tok, TokenConfig())
        results["sft"]["reloaded_ppl"] = perplexity(transformers.AutoModelForCausalLM.from_pretrained(sft_dir),
                                                    held_out, tok.pad_token_id)
        pairs, _ = tokenize_reward(rm_rows.eval, tok, TokenConfig())
        results["rm"]["reloaded"] = asdict(evaluate_reward(RewardModel.from_pretrained(rm_dir).eval(), pairs,
                                                    tok.pad_token_id))
    write_and_leave(os.path.join(out, f"rank{rank}.json"), results)


if __name__ == "__main__":
    main(sys.argv[1])
