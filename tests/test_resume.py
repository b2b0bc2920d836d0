"""Checkpoints and --resume: a run killed with SIGKILL and resumed gives the same losses, to the bit, as one
that never stopped (PPO through the command line, SFT and the reward model through the library); checkpoints
hold safetensors and JSON only; resuming with other settings, or with nothing to resume from, is refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from demo_models import demo_llama, demo_rows, save_demo_llama, tokenizer

from hybrid_engine.rlhf import RewardConfig, RewardModel, SFTConfig, train_reward, train_sft
from hybrid_engine.rlhf.checkpoint import check_same_config, checkpoints, config_json, load_checkpoint
from hybrid_engine.rlhf.ppo import ModelSources, PPOConfig, train_ppo


def _run_step(train, step: str, cache: str, out: str, resume=False, **config):
    cls = SFTConfig if step == "sft" else RewardConfig
    data = demo_rows(step, 64, 8, cache)
    settings = dict(max_steps=6, batch_size=4, lr=1e-3, eval_every=2, checkpoint_every=2, output_dir=out)
    return train(demo_llama(), tokenizer(), data, cls(**{**settings, **config}), progress=False, resume=resume)


@pytest.mark.parametrize("step, accumulation", [("sft", 1), ("reward", 1)])
def test_sft_and_reward_resume_to_the_bit(step, accumulation, cache, tmp_path):
    train = train_sft if step == "sft" else train_reward
    whole = _run_step(train, step, cache, str(tmp_path / "whole"), gradient_accumulation_steps=accumulation)
    out = str(tmp_path / "stopped")
    _run_step(train, step, cache, out, gradient_accumulation_steps=accumulation)
    shutil.rmtree(Path(out) / "checkpoints" / "step-4")  # as if killed between steps 2 and 4
    resumed = _run_step(train, step, cache, out, resume=True, gradient_accumulation_steps=accumulation)
    assert resumed.losses == whole.losses
    assert resumed.lrs == whole.lrs and len(whole.lrs) == 6  # the steps before the resume included
    assert resumed.evals == whole.evals
    assert resumed.steps == whole.steps == 6


def test_checkpoints_hold_safetensors_and_json_only(cache, tmp_path):
    _run_step(train_sft, "sft", cache, str(tmp_path))
    found = checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-2", "step-4"]  # none at the last step: the saved model is the result
    for folder in found:
        assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "state.json", "tensors.safetensors"]
    tensors, state = load_checkpoint(tmp_path)  # the newest
    assert state["step"] == 4 and len(state["losses"]) == 4
    assert "rng.torch" in tensors and any(k.startswith("model_optim.") for k in tensors)


def test_resume_refuses_other_settings_and_missing_checkpoints(cache, tmp_path):
    _run_step(train_sft, "sft", cache, str(tmp_path))
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        _run_step(train_sft, "sft", cache, str(tmp_path), resume=True, lr=2e-3)
    with pytest.raises(ValueError, match=r"other settings \(gradient_accumulation_steps\)"):  # not the same bits
        _run_step(train_sft, "sft", cache, str(tmp_path), resume=True, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        _run_step(train_sft, "sft", cache, str(tmp_path / "empty"), resume=True)


def _figures(record: dict) -> dict:
    """A step record without its timings."""
    return {k: v for k, v in record.items() if not k.endswith("_s")}


def test_ppo_resume_in_the_library(cache, tmp_path):
    data = demo_rows("ppo", 64, 8, cache)

    def run(out, resume=False):
        config = PPOConfig(max_steps=6, batch_size=4, train_batch_size=2, max_new_tokens=8, lr=1e-3, critic_lr=1e-3,
                           eval_every=2, ema_beta=0.9, checkpoint_every=2, output_dir=str(out))
        sources = ModelSources(actor=demo_llama(), reward_model=RewardModel.from_model(demo_llama(2)))
        return train_ppo(sources, tokenizer(), data, config, progress=False, resume=resume)

    whole = run(tmp_path / "whole")
    run(tmp_path / "stopped")
    shutil.rmtree(tmp_path / "stopped" / "checkpoints" / "step-4")
    resumed = run(tmp_path / "stopped", resume=True)
    assert [_figures(r) for r in resumed.history] == [_figures(r) for r in whole.history]
    assert resumed.evals == whole.evals
    ema_whole = torch.stack([t.flatten()[:4] for t in whole.ema.shadow])
    ema_resumed = torch.stack([t.flatten()[:4] for t in resumed.ema.shadow])
    assert torch.equal(ema_whole, ema_resumed)


# -- SIGKILL through the command line -----------------------------------------------------------------------


def _save_models(root: Path) -> tuple[str, str]:
    sft, rm = root / "sft", root / "rm"
    save_demo_llama(sft)
    torch.manual_seed(3)
    RewardModel.from_model(demo_llama(seed=2)).save_pretrained(rm)
    return str(sft), str(rm)


def _ppo_command(sft: str, rm: str, out: Path, cache: str, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "hybrid_engine.commands", "ppo", "--model", sft, "--reward-model", rm, "--output",
           str(out),
           "--cache-dir", cache, "--no-progress", "--max-steps", "12", "--batch-size", "4", "--train-batch-size", "4",
           "--max-new-tokens", "8", "--lr", "1e-3", "--critic-lr", "1e-3", "--eval-every", "4", "--checkpoint-every",
           "2", "--eval-batch-size", "8", "--demo"]
    return cmd + (["--resume"] if resume else [])


def _history(out: Path) -> list[dict]:
    return json.loads((out / "summary.json").read_text())["history"]


@pytest.mark.slow
def test_ppo_killed_with_sigkill_resumes_to_the_bit(cache, tmp_path):
    sft, rm = _save_models(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_ppo_command(sft, rm, tmp_path / "whole", cache), check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_ppo_command(sft, rm, out, cache), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step-4").is_dir():
        assert proc.poll() is None, "the run ended before its step-4 checkpoint"
        assert time.monotonic() < deadline, "no step-4 checkpoint within 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "summary.json").exists()  # it really stopped before the end

    resumed = subprocess.run(_ppo_command(sft, rm, out, cache, resume=True), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole, again = _history(tmp_path / "whole"), _history(out)
    assert len(again) == len(whole) == 12
    for a, b in zip(whole, again):
        for key in ("policy_loss", "value_loss", "score", "kl"):
            assert a[key] == b[key], (a["step"], key)
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval" not in r]
    assert steps == list(range(1, 13))  # the killed run's records after its checkpoint were dropped


def test_a_setting_newer_than_the_checkpoint_counts_as_same_at_its_default():
    """A checkpoint written before min_lr_rate and decay_steps existed resumes while they keep their defaults (the
    older run had those in effect), and is refused once one is set otherwise."""
    config = SFTConfig(max_steps=3)
    saved = {k: v for k, v in config_json(config).items() if k not in ("min_lr_rate", "decay_steps")}
    check_same_config(saved, config)
    with pytest.raises(ValueError, match=r"other settings \(min_lr_rate, schedule\)"):
        check_same_config(saved, SFTConfig(max_steps=3, schedule="cosine_with_min_lr", min_lr_rate=0.1))
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        check_same_config({**saved, "lr": 1.0}, config)
