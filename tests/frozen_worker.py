"""Run by torchrun (gloo, CPU, one thread a process) for tests/test_frozen_distributed.py: the frozen reference and
reward model partitioned under ZeRO-3 against whole copies, on 2 ranks. Each rank writes OUT/rank<r>.json:

- scores: the largest difference between the partitioned and the whole model's scores (reference log-probs, reward
  model scores) on this rank's rows, through the inference path and through the HF forward (bf16 autocast); rank 0's
  rows are a prompt's samples (shared prefixes), rank 1's are not, so the ranks must agree on the path;
- resident: the bytes of each frozen model's parameters this rank holds, partitioned and whole;
- fingerprints: the reference's weights fingerprint (what a checkpoint records), partitioned and whole;
- ppo: the step records of one PPO step under ZeRO-3 with the frozen models partitioned and whole.

    python -m torch.distributed.run --nproc_per_node 2 frozen_worker.py OUT
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from demo_models import demo_llama, demo_rows, tokenizer  # noqa: E402
from worker_exit import write_and_leave  # noqa: E402

from hybrid_engine.engine.frozen import resident_bytes  # noqa: E402
from hybrid_engine.engine.training import init_distributed  # noqa: E402
from hybrid_engine.rlhf import RewardModel  # noqa: E402
from hybrid_engine.rlhf.fingerprints import weights_fingerprint  # noqa: E402
from hybrid_engine.rlhf.ppo import ModelSources, PPOConfig, train_ppo  # noqa: E402
from hybrid_engine.rlhf.ppo.models import build_models  # noqa: E402
from hybrid_engine.rlhf.scoring import FrozenPolicy, FrozenRewardModel  # noqa: E402

ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 2**20,
                               "allgather_bucket_size": 2**20, "stage3_prefetch_bucket_size": 2**20}}
"""Tiny parameters would stay resident under ZeRO-3: force partitioning; small buckets (ppo_worker.py's)."""
START = 6


def rows(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[4, 14] rows: rank 0's one left-padded prompt and 4 samples (right padding on one), rank 1's 4 prompts."""
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, 200, (4, 14), generator=g)
    mask = torch.ones_like(ids)
    if rank == 0:
        ids[:, :START - 1] = ids[0, :START - 1]
        mask[:, :1] = 0
    mask[1, -3:] = 0
    return ids, mask


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def scores(rank: int) -> dict:
    """The partitioned models' scores against the whole ones', through both paths; their resident bytes."""
    ids, mask = rows(rank)
    policy, rm = demo_llama(seed=3), RewardModel.from_model(demo_llama(seed=1))
    out, resident, fingerprints = {}, {}, {}
    for path, dtype in (("inference", None), ("hf", torch.bfloat16)):
        whole, part = (FrozenPolicy(copy.deepcopy(policy), autocast_dtype=dtype, partition_config=c)
                       for c in (None, ZERO3))
        out[f"reference-{path}"] = max_diff(whole.token_logprobs(ids, mask, START, 0.9),
                                            part.token_logprobs(ids, mask, START, 0.9))
        resident["reference"] = [resident_bytes(part.model), resident_bytes(whole.model)]
        fingerprints["reference"] = [weights_fingerprint(part.model), weights_fingerprint(whole.model)]
        whole, part = (FrozenRewardModel(copy.deepcopy(rm), autocast_dtype=dtype, partition_config=c)
                       for c in (None, ZERO3))
        out[f"reward-{path}"] = max_diff(whole.score(ids, mask, START), part.score(ids, mask, START))
        resident["reward"] = [resident_bytes(part.model), resident_bytes(whole.model)]
    return {"scores": out, "resident": resident, "fingerprints": fingerprints}


def ppo(partition_frozen: bool, data) -> dict:
    """One PPO step under ZeRO-3 (2 prompts per rank); its records and whether the frozen models were partitioned."""
    config = PPOConfig(max_steps=1, batch_size=2, train_batch_size=2, max_new_tokens=6, lr=1e-3, critic_lr=1e-3,
                       eval_batch_size=2, log_samples=0, partition_frozen=partition_frozen)
    torch.manual_seed(11)
    sources = ModelSources(actor=demo_llama(), reward_model=RewardModel.from_model(demo_llama(seed=1)),
                           ds_config=ZERO3)
    models = build_models(sources, config, tokenizer())
    result = train_ppo(models, tokenizer(), data, config, progress=False)
    return {"partitioned": [models.reference.partitioned, models.reward.partitioned],
            "history": [{k: v for k, v in r.items() if not k.endswith("_s")} for r in result.history]}


def main(out: str) -> None:
    init_distributed()
    rank = dist.get_rank()
    data = demo_rows("ppo", 8, 2, os.path.join(out, f"cache{rank}"))
    results = scores(rank)
    results["ppo"] = {name: ppo(name == "partitioned", data) for name in ("partitioned", "whole")}
    write_and_leave(os.path.join(out, f"rank{rank}.json"), results)


if __name__ == "__main__":
    main(sys.argv[1])
