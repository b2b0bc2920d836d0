"""Checkpoints under DeepSpeed ZeRO-2 and ZeRO-3 in 2 processes started by torchrun (gloo, CPU, one thread each):
SFT (ZeRO-2 with LoRA and adapters-only checkpoints), the reward model and PPO/GRPO (GRPO's actor with LoRA), each
run 4 steps with a checkpoint after step 2 and again from that checkpoint in a fresh engine: the same losses,
evaluations and PPO figures, to the bit, on both ranks. Every rank's optimizer partition is its own file; a resume
under another ZeRO stage is refused, naming both. The worker is resume_worker.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from torchrun import run_workers

from hybrid_engine.rlhf.checkpoint import load_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("resume_worker.py")
RUNS = ("sft-zero2-lora", "sft-zero3", "rm-zero2", "rm-zero3", "ppo-zero2", "grpo-zero3-lora")


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume2")
    run_workers(WORKER, [str(folder)])
    return folder


@pytest.fixture(scope="module")
def ranks(out) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("name", RUNS)
def test_a_resumed_run_gives_the_same_losses_to_the_bit(ranks, name):
    for rank in ranks:
        whole, resumed = rank[name]["whole"], rank[name]["resumed"]
        assert resumed == whole
        figures = whole["losses"] if "losses" in whole else [r["policy_loss"] for r in whole["history"]]
        assert len(figures) == 4 and len(set(figures)) == 4
    assert ranks[0][name]["whole"] != ranks[1][name]["whole"] or name.startswith(("sft", "rm"))


@pytest.mark.parametrize("name", RUNS)
def test_every_rank_writes_its_own_optimizer_partition(ranks, name):
    files = ranks[0][name]["files"]
    assert files == ["manifest.json", "optimizer-rank0.json", "optimizer-rank0.safetensors", "optimizer-rank1.json",
                     "optimizer-rank1.safetensors", "state.json", "tensors.safetensors"]


def test_adapters_only_checkpoints_hold_no_frozen_weights(out):
    """ZeRO-2 with LoRA: rank 0's file holds the adapters and no frozen weight; ZeRO-3: no weight at all (they are
    in each rank's partition)."""
    folder = out / "sft-zero2-lora" / "checkpoints" / "step-2"
    state = json.loads((folder / "state.json").read_text())
    assert state["layout"] == {"world_size": 2, "zero_stage": 2, "lora": True, "adapters_only": True}
    weights = [k for k in load_file(folder / "tensors.safetensors") if k.endswith("weight")]
    assert weights and all(".lora_" in k for k in weights)
    folder = out / "grpo-zero3-lora" / "checkpoints" / "step-2"
    assert not any(k.startswith("actor.") and k.endswith("weight") for k in load_file(folder / "tensors.safetensors"))
    partition = load_file(folder / "optimizer-rank1.safetensors")
    assert "rng.actor_sampler" in partition and any(k.startswith("actor_zero/") for k in partition)


def test_another_zero_stage_or_world_size_is_refused(ranks, out):
    assert "written under 2 ranks, ZeRO stage 2, every weight trained; this run has 2 ranks, ZeRO stage 3" \
        in ranks[0]["other_stage"] and ranks[0]["other_stage"] == ranks[1]["other_stage"]
    one_rank = {"world_size": 1, "zero_stage": 2, "lora": False}  # another world size alone: test_resume_rescale.py
    with pytest.raises(ValueError, match=r"under 2 ranks, ZeRO stage 3, every weight trained; this run has 1 rank, "
                                         r"ZeRO stage 2.*another ZeRO stage or LoRA is not supported"):
        load_checkpoint(out / "rm-zero3" / "checkpoints" / "step-2", one_rank)
