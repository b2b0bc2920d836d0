"""A ZeRO-2 and a ZeRO-3 SFT checkpoint resumed on another number of ranks, 2 -> 1 and 1 -> 2 (torchrun, gloo, CPU;
the worker is rescale_worker.py): just after the resume, every trained parameter's fp32 master weight, exp_avg and
exp_avg_sq (gathered whole by DeepSpeed's safe_get_full_*) and the Adam step equal the checkpoint's, to the bit; the
next steps' losses follow the uninterrupted run within LOSS_RTOL; PPO's actor and critic under ZeRO-2, 2 -> 1,
resume the same way; a per-rank batch that would change the global batch, and another ZeRO stage, are refused, naming
what to do."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchrun import run_workers

from hybrid_engine.rlhf import SFTConfig
from hybrid_engine.rlhf.checkpoint import check_same_config, config_json
from hybrid_engine.rlhf.ppo import PPOConfig

WORKER = Path(__file__).with_name("rescale_worker.py")
LOSS_RTOL = 1e-5
"""How far a resumed run's losses may stray from the uninterrupted run's, relative. Resumed from the same weights,
moments and rows, the two differ only in how their sums are ordered: one rank's matmuls over a batch of two rows
against two ranks' over one each, and gloo's all-reduce of the gradients against a local sum. Each such difference
is a few fp32 ulps (1.2e-7 relative); Adam divides the moments' small differences by sqrt(exp_avg_sq), so the
weights after one step differ by a few ulps of the learning rate's step. 1e-5 is ~100 ulps: room for those, and far
below the loss's change from one step to the next in these runs (2% and more). Measured: at most 4.5e-8, half an
ulp of the loss. A wrong moment or weight is caught exactly by test_the_resumed_state_is_the_checkpoint_s."""


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rescale")
    for phase, nproc in (("one", 1), ("two", 2), ("back", 1)):
        run_workers(WORKER, [str(folder), phase], nproc)
    return folder


def losses(out: Path, phase: str, run: str, nproc: int) -> list[float]:
    """The run's losses, the mean of its ranks' (each rank's is its own rows' token mean; every row has as many
    response tokens, so the mean over ranks is the global batch's)."""
    ranks = [json.loads((out / f"{phase}-rank{r}.json").read_text())[run] for r in range(nproc)]
    return [sum(step) / nproc for step in zip(*ranks)]


CASES = {"2 -> 1": ("z{}-2", "two", 2, "z{}-1from2", "back", 1), "1 -> 2": ("z{}-1", "one", 1, "z{}-2from1", "two", 2)}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", (2, 3))
@pytest.mark.parametrize("case", CASES)
def test_the_resumed_state_is_the_checkpoint_s(out, stage, case):
    saved_run, resumed_run = CASES[case][0].format(stage), CASES[case][3].format(stage)
    saved = load_file(out / f"{saved_run}-saved.safetensors")
    restored = load_file(out / f"{resumed_run}-restored.safetensors")
    assert saved.keys() == restored.keys() and len(saved) > 3
    assert float(saved["model.step"].max()) == 2.0
    for key, value in saved.items():
        assert torch.equal(restored[key], value), key


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", (2, 3))
@pytest.mark.parametrize("case", CASES)
def test_the_next_losses_follow_the_uninterrupted_run(out, stage, case):
    saved_run, saved_phase, saved_n, resumed_run, resumed_phase, resumed_n = CASES[case]  # steps 1-2: the history
    whole = losses(out, saved_phase, saved_run.format(stage), saved_n)
    resumed = losses(out, resumed_phase, resumed_run.format(stage), resumed_n)
    assert len(whole) == len(resumed) == 4 and len(set(whole)) == 4
    assert resumed[2:] == pytest.approx(whole[2:], rel=LOSS_RTOL, abs=0)


@pytest.mark.distributed
@pytest.mark.slow
def test_ppo_under_zero2_resumes_its_actor_and_critic_on_one_rank(out):
    """2 -> 1: the actor's and the critic's masters and moments are the checkpoint's to the bit; the step after
    trains (its figures cannot follow the 2-rank run's: the responses are sampled, and a rank's sampler stream
    cannot be split over another number of ranks)."""
    saved, restored = load_file(out / "ppo-2-saved.safetensors"), load_file(out / "ppo-1from2-restored.safetensors")
    assert saved.keys() == restored.keys()
    assert any(k.startswith("actor.") for k in saved) and any(k.startswith("critic.") for k in saved)
    for key, value in saved.items():
        assert torch.equal(restored[key], value), key
    whole = json.loads((out / "two-rank0.json").read_text())["ppo-2"]
    resumed = json.loads((out / "back-rank0.json").read_text())["ppo-1from2"]
    assert resumed[:2] == whole[:2] and len(resumed) == 3
    assert all(math.isfinite(v) for v in resumed[2].values()) and resumed[2] != whole[2]


@pytest.mark.distributed
@pytest.mark.slow
def test_what_stays_unsupported_is_refused_by_name(out):
    back = json.loads((out / "back-rank0.json").read_text())
    assert back["per_rank_batch_kept"].startswith(
        "batch_size is per rank: the checkpoint's run took 1 a rank on 2 ranks, 2 rows a step; this run takes 1 a "
        "rank on 1 rank, 1: give batch_size 2 (--batch-size 2) to keep it")
    assert "written under 2 ranks, ZeRO stage 2, every weight trained; this run has 1 rank, ZeRO stage 3" \
        in back["other_stage"] and "another ZeRO stage or LoRA is not supported" in back["other_stage"]


def test_another_number_of_ranks_keeps_the_global_batch(monkeypatch):
    """In one process (this run: 1 rank): a 2-rank checkpoint resumes with per-rank batches twice its own, is refused
    with any other (naming the value to give), and still refuses another setting; on 3 ranks its 4 rows cannot
    split."""
    saved = config_json(PPOConfig(batch_size=2, train_batch_size=2))
    check_same_config(saved, PPOConfig(batch_size=4, train_batch_size=4), saved_world=2)
    with pytest.raises(ValueError, match=r"^train_batch_size is per rank: the checkpoint's run took 2 a rank on 2 "
                                         r"ranks, 4 rows a step; this run takes 2 a rank on 1 rank, 2: give "
                                         r"train_batch_size 4 \(--train-batch-size 4\) to keep it$"):
        check_same_config(saved, PPOConfig(batch_size=4, train_batch_size=2), saved_world=2)
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        check_same_config(saved, PPOConfig(batch_size=4, train_batch_size=4, lr=1.0), saved_world=2)
    with pytest.raises(ValueError, match=r"other settings \(batch_size\)"):  # the same number of ranks
        check_same_config(config_json(SFTConfig(batch_size=2)), SFTConfig(batch_size=4), saved_world=1)
    monkeypatch.setattr("hybrid_engine.rlhf.checkpoint.rank_and_world", lambda: (0, 3))
    with pytest.raises(ValueError, match=r"4 rows do not split over 3 ranks"):
        check_same_config(config_json(SFTConfig(batch_size=2)), SFTConfig(batch_size=1), saved_world=2)
