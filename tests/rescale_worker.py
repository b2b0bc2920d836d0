"""Run by torchrun (gloo, CPU) for tests/test_resume_rescale.py, in three phases, on 1, 2 and 1 ranks: SFT under
ZeRO-2 and ZeRO-3 with a global batch of 2 rows (batch_size 2 on 1 rank, 1 on 2 ranks), 4 steps with a checkpoint
after step 2, and each resumed from the other world size's checkpoint. Phase "one" (1 rank) runs whole; "two"
(2 ranks) runs whole and resumes the 1-rank checkpoint; "back" (1 rank) resumes the 2-rank checkpoint and tries the
refused cases; and PPO under ZeRO-2 (actor and critic), 2 -> 1. Every rank gathers each trained parameter's whole
fp32 master weight, exp_avg and exp_avg_sq with DeepSpeed's own safe_get_full_* (and the Adam step) when a checkpoint
is written and just after one is restored; rank 0 writes them to OUT/<run>-<saved|restored>.safetensors; each rank
writes its losses to OUT/<phase>-rank<r>.json.

The training rows all have responses of the same token count, so that one rank's token mean over two rows is the
mean of two ranks' token means over one row each: the runs differ only in the order of their floating-point sums."""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from demo_models import demo_llama, demo_rows, tokenizer  # noqa: E402
from resume_worker import zero  # noqa: E402
from worker_exit import write_and_leave  # noqa: E402

from hybrid_engine.engine.training import init_distributed  # noqa: E402
from hybrid_engine.rlhf import RewardModel, SFTConfig, checkpoint, train_sft  # noqa: E402
from hybrid_engine.rlhf.data import StepData  # noqa: E402
from hybrid_engine.rlhf.ppo import ModelSources, PPOConfig, train_ppo  # noqa: E402
from hybrid_engine.rlhf.ppo import state as ppo_state  # noqa: E402
from hybrid_engine.rlhf.ppo.state import PPORunState  # noqa: E402
from hybrid_engine.rlhf.tokens import TokenConfig, tokenize_sft  # noqa: E402

GLOBAL_BATCH = 2
RESPONSE_TOKENS = 13
STAGES = (2, 3)


def equal_length_rows(cache: str) -> StepData:
    """16 demo SFT rows whose responses are RESPONSE_TOKENS tokens long, and 4 held-out rows."""
    data = demo_rows("sft", 200, 4, cache)
    examples, _ = tokenize_sft(data.train, tokenizer(), TokenConfig())
    assert len(examples) == len(data.train)
    keep = [i for i, e in enumerate(examples) if sum(label != -100 for label in e["labels"]) == RESPONSE_TOKENS]
    return dataclasses.replace(data, train=data.train.select(keep[:16]))


def whole_state(module: torch.nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """Each trained parameter's whole fp32 master weight and Adam moments, gathered by DeepSpeed (every rank calls
    this), and the base optimizer's step counts."""
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2 link the moments at the first step
        optimizer._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            out[f"{name}.master"] = safe_get_full_fp32_param(p).detach().cpu().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{name}.{key}"] = safe_get_full_optimizer_state(p, key).detach().cpu().clone()
    out["step"] = torch.tensor([float(s["step"]) for s in optimizer.optimizer.state.values()])
    return out


RUN = {"out": "", "name": ""}
"""Where the checkpoint hooks (capture) write the state, and under which run's name."""


def write_state(trained, when: str) -> None:
    state = {}
    for name, module, optimizer in trained:
        state.update({f"{name}.{k}": v for k, v in whole_state(module, optimizer).items()})
    if int(os.environ["RANK"]) == 0:
        save_file(state, os.path.join(RUN["out"], f"{RUN['name']}-{when}.safetensors"))


def capture() -> None:
    """Makes checkpoint writing (at step 2) and restoring gather the trained models' whole state into
    OUT/<run>-<saved|restored>.safetensors (RUN says which run), for SFT and PPO."""
    save_sft, save_ppo, restore = checkpoint.TrainedState.save, PPORunState.save, checkpoint.restore_training

    def saving(save, trained):
        def hooked(self, record):
            save(self, record)
            if record.steps == 2:
                write_state(trained(self), "saved")
        return hooked

    def restoring(trained, *args, **kwargs):
        restore(trained, *args, **kwargs)
        write_state(trained, "restored")

    checkpoint.TrainedState.save = saving(save_sft, lambda state: state.trained)
    PPORunState.save = saving(save_ppo, PPORunState._trained)
    checkpoint.restore_training = ppo_state.restore_training = restoring


def sft(out: str, data: StepData, stage: int, run: str, resume=False, batch_size: int | None = None) -> list[float]:
    world = int(os.environ["WORLD_SIZE"])
    config = SFTConfig(max_steps=4, batch_size=batch_size or GLOBAL_BATCH // world, lr=1e-2, checkpoint_every=2,
                       output_dir=os.path.join(out, run))
    RUN.update(out=out, name=run)
    return train_sft(demo_llama(), tokenizer(), data, config, ds_config=zero(stage), progress=False,
                     resume=resume).losses


def ppo(out: str, data: StepData, run: str, resume=False) -> list[dict]:
    """PPO under ZeRO-2 (actor and critic), 3 steps with a checkpoint after step 2; its step records."""
    per_rank = GLOBAL_BATCH // int(os.environ["WORLD_SIZE"])
    config = PPOConfig(max_steps=3, batch_size=per_rank, train_batch_size=per_rank, max_new_tokens=4, lr=1e-3,
                       critic_lr=1e-3, eval_batch_size=4, checkpoint_every=2, output_dir=os.path.join(out, run))
    RUN.update(out=out, name=run)
    torch.manual_seed(11)
    sources = ModelSources(actor=demo_llama(), reward_model=RewardModel.from_model(demo_llama(seed=1)),
                           ds_config=zero(2))
    result = train_ppo(sources, tokenizer(), data, config, progress=False, resume=resume)
    return [{k: v for k, v in r.items() if k in ("policy_loss", "value_loss", "score")} for r in result.history]


def refused(train) -> str | None:
    try:
        train()
    except ValueError as e:
        return str(e)
    return None


def main(out: str, phase: str) -> None:
    rank = int(os.environ["RANK"])
    data = equal_length_rows(os.path.join(out, f"cache{rank}"))
    prompts = demo_rows("ppo", 16, 4, os.path.join(out, f"cache{rank}"))
    init_distributed()
    capture()
    results = {}
    for stage in STAGES:
        one, two = os.path.join(out, f"z{stage}-1", "checkpoints", "step-2"), os.path.join(out, f"z{stage}-2",
                                                                                              "checkpoints", "step-2")
        if phase == "one":
            results[f"z{stage}-1"] = sft(out, data, stage, f"z{stage}-1")
        elif phase == "two":
            results[f"z{stage}-2"] = sft(out, data, stage, f"z{stage}-2")
            results[f"z{stage}-2from1"] = sft(out, data, stage, f"z{stage}-2from1", resume=one)
        else:
            results[f"z{stage}-1from2"] = sft(out, data, stage, f"z{stage}-1from2", resume=two)
    if phase == "two":
        results["ppo-2"] = ppo(out, prompts, "ppo-2")
    if phase == "back":
        results["ppo-1from2"] = ppo(out, prompts, "ppo-1from2", os.path.join(out, "ppo-2", "checkpoints", "step-2"))
        two = os.path.join(out, "z2-2", "checkpoints", "step-2")
        results["per_rank_batch_kept"] = refused(lambda: sft(out, data, 2, "refused-batch", two, batch_size=1))
        results["other_stage"] = refused(lambda: sft(out, data, 3, "refused-stage", two))
    write_and_leave(os.path.join(out, f"{phase}-rank{rank}.json"), results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
