"""train_ppo under DeepSpeed with torchrun (gloo, CPU, one thread a process): PPO under ZeRO-2 and ZeRO-3 (with the
EMA) and GRPO under ZeRO-3 in 2 processes (each rank generating alone, and both tensor-parallel), and PPO under
ZeRO-3 in 1 process against plain torch. Every rank finishes, trains on its own prompts, reports the same held-out
evaluation (each rank evaluates the whole split) and generates the same tokens; what rank 0 saved reloads in plain
torch and generates them too. PPO under ZeRO-2 with gradient accumulation equals the large batch. The worker is
ppo_worker.py."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("ppo_worker.py")
RUNS = ("ppo-zero2", "ppo-zero3", "grpo-zero3", "grpo-tp2-zero3")
FIGURES = ("policy_loss", "value_loss", "score", "kl", "rm_score")


def torchrun(out: Path, nproc: int, mode: str) -> list[dict]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), str(WORKER), str(out), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"torchrun --nproc_per_node {nproc} ({mode}) failed:\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-8000:]}")
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return torchrun(tmp_path_factory.mktemp("ppo2"), 2, "ranks")


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return torchrun(tmp_path_factory.mktemp("ppo1"), 1, "single")[0]


def close(a: dict, b: dict, rel: float, abs_: float) -> bool:
    """Whether two step records agree on every loss and score figure they hold."""
    return all(a.get(k) == pytest.approx(b.get(k), rel=rel, abs=abs_) for k in FIGURES if k in a or k in b)


@pytest.mark.parametrize("name", RUNS)
def test_every_rank_finishes_its_steps_with_finite_losses(ranks, name):
    a, b = ranks[0][name], ranks[1][name]
    assert a["stage"] == b["stage"] == int(name[-1])
    assert a["steps"] == b["steps"] == 2 and a["skipped"] == b["skipped"] == 0
    for record in a["history"] + b["history"]:
        assert math.isfinite(record["policy_loss"]) and math.isfinite(record["score"])
        assert ("value_loss" in record) == name.startswith("ppo")
        assert math.isfinite(record.get("value_loss", 0.0))
        assert record["logprob_source"] == "generation"
    assert [r["score"] for r in a["history"]] != [r["score"] for r in b["history"]]  # each rank its own prompts


@pytest.mark.parametrize("name", RUNS)
def test_every_rank_reports_the_same_held_out_evaluation(ranks, name):
    """Each rank evaluates the whole split. Generating alone, every rank draws the same samples; generating
    tensor-parallel, the two ranks' copies of the split are one batch, and each rank keeps its own rows' draws."""
    a, b = ranks[0][name], ranks[1][name]
    assert [s for s, _ in a["evals"]] == [0, 2]
    if "tp2" not in name:
        assert a["evals"] == b["evals"]  # the same weights and draws
    assert abs(a["evals"][0][1]["kl"]) < 1e-4 and a["evals"][-1][1]["kl"] != a["evals"][0][1]["kl"]  # it trained
    assert a["greedy"] == b["greedy"]


@pytest.mark.parametrize("name", RUNS)
def test_the_saved_actor_reloads_and_generates_what_the_engine_does(ranks, name):
    a = ranks[0][name]
    assert a["reloaded_greedy"] == a["greedy"]
    assert a["critic_loads"] == name.startswith("ppo")
    assert a["ema_loads"] == (name == "ppo-zero3")


def test_the_configs_generation_settings_are_the_engines(ranks):
    """PPOConfig.generation reaches the actor's engine: inference_tp_size=2 shards the generation weights across the
    two ranks, which generate both ranks' prompts together (the tests above check its greedy tokens against the
    saved actor's in plain torch)."""
    for rank in ranks:
        assert rank["grpo-zero3"]["tp"] == 1 and rank["grpo-tp2-zero3"]["tp"] == 2


def test_zero2_and_zero3_train_alike(ranks):
    for rank in ranks:
        for z2, z3 in zip(rank["ppo-zero2"]["history"], rank["ppo-zero3"]["history"]):
            assert close(z2, z3, rel=1e-4, abs_=1e-5), (z2, z3)


def test_zero3_in_one_process_equals_plain_torch(single):
    plain, zero3 = single["plain"], single["zero3"]
    assert plain["stage"] is None and zero3["stage"] == 3
    for a, b in zip(plain["history"], zero3["history"]):
        assert close(a, b, rel=1e-4, abs_=1e-5), (a, b)
    assert plain["greedy"] == zero3["greedy"] == zero3["reloaded_greedy"]
    assert plain["evals"][-1][1] == pytest.approx(zero3["evals"][-1][1], rel=1e-4, abs=1e-5)


def test_rank_0s_first_step_is_the_one_process_first_step(ranks, single):
    """Before any update the weights are the same, rank 0 takes the first slice of the global batch (the one
    process's batch) and samples from the same seed: its first step is the one process's first step."""
    assert close(ranks[0]["ppo-zero2"]["history"][0], single["plain"]["history"][0], rel=1e-4, abs_=1e-5)


def test_ppo_with_accumulation_under_zero2_equals_the_large_batch(ranks):
    """Each rank's minibatch of 2 sequences in 2 micro-batches against 1, SGD, fp32: the actor's and the critic's
    losses within rel 1e-5 (test_accumulation.py's), the same held-out evaluation and greedy tokens."""
    for rank in ranks:
        big, small = rank["accumulation"]["1"], rank["accumulation"]["2"]
        assert big["steps"] == small["steps"] == 2 and big["skipped"] == small["skipped"] == 0
        for a, b in zip(big["history"], small["history"]):
            assert close(a, b, rel=1e-5, abs_=1e-6), (a, b)
        for (step, a), (same_step, b) in zip(big["evals"], small["evals"]):
            numbers = [k for k, v in a.items() if isinstance(v, float)]
            assert step == same_step and a.keys() == b.keys() and numbers
            assert [b[k] for k in numbers] == pytest.approx([a[k] for k in numbers], rel=1e-5, abs=1e-6)
        assert small["greedy"] == big["greedy"]
