"""How a run stops and what it does with NaN and inf: epochs and max_steps (max_steps alone cycles the rows, both:
the first reached, the reason reported), non-finite settings refused at config time, non-finite losses skipped or
stopping SFT, the reward step and PPO, and a run whose every update was skipped failing without saving its model."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from demo_models import demo_llama, demo_rows, tokenizer

from hybrid_engine.commands.main import main
from hybrid_engine.rlhf import RewardConfig, SFTConfig, train_reward, train_sft
from hybrid_engine.rlhf import sft as sft_module
from hybrid_engine.rlhf.ppo import ModelSources, NonFiniteError, PPOConfig, train_ppo
from hybrid_engine.rlhf.schedule import stop_reason, total_steps


@pytest.fixture(scope="module")
def sft_rows(cache):
    return demo_rows("sft", 24, 8, cache)  # 3 batches of 8 an epoch


@pytest.fixture(scope="module")
def pairs(cache):
    return demo_rows("reward", 16, 8, cache)


@pytest.fixture(scope="module")
def prompts(cache):
    return demo_rows("ppo", 8, 4, cache)


def steps(epochs, max_steps, per_epoch=12):
    config = SimpleNamespace(epochs=epochs, max_steps=max_steps)
    return total_steps(per_epoch, config), stop_reason(per_epoch, config)


def test_max_steps_alone_cycles_the_rows_and_both_stop_at_the_first_reached():
    assert steps(None, 40) == (40, "max_steps (40)")  # epochs left at its default: as many as it takes
    assert steps(1, 40) == (12, "epochs (1 epoch of 12 steps)")  # both given: the epoch runs out first
    assert steps(5, 40) == (40, "max_steps (40)")
    assert steps(None, None) == (12, "epochs (1 epoch of 12 steps)")
    assert steps(3, None) == (36, "epochs (3 epochs of 12 steps)")


def test_sft_reaches_max_steps_over_several_epochs_and_says_why_it_stopped(sft_rows):
    result = train_sft(demo_llama(), tokenizer(), sft_rows, SFTConfig(max_steps=7, batch_size=8), progress=False)
    assert result.steps == 7 and len(result.losses) == 7 and result.stop_reason == "max_steps (7)"
    result = train_sft(demo_llama(), tokenizer(), sft_rows, SFTConfig(epochs=1, max_steps=7, batch_size=8),
                       progress=False)
    assert result.steps == 3 and result.stop_reason == "epochs (1 epoch of 3 steps)"


def test_the_summary_prints_the_stop_reason(cache, tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(["sft", "--demo", "--max-steps", "2", "--batch-size", "4", "--output", str(out), "--cache-dir", cache,
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"\n  stopped by +max_steps \(2\)\n", printed)
    assert re.search(r"\n  steps +2 \(0 updates skipped for NaN/inf\)\n", printed)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max_steps (2)" and summary["skipped"] == 0 and summary["config"]["epochs"] is None


# -- non-finite settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: SFTConfig(lr=math.inf), r"lr must be a finite number, got inf"),
    (lambda: RewardConfig(weight_decay=math.nan), r"weight_decay must be a finite number, got nan"),
    (lambda: PPOConfig(lam=math.nan), r"lam must be a finite number, got nan"),
    (lambda: PPOConfig(kl_coef=math.inf), r"kl_coef must be a finite number, got inf"),
    (lambda: PPOConfig(lam=1.5), r"lam must be in \[0, 1\], got 1.5"),
    (lambda: SFTConfig(nonfinite="ignore"), r"nonfinite must be 'skip' or 'stop', got 'ignore'"),
])
def test_non_finite_settings_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_inf_is_allowed_where_it_means_no_limit():
    assert PPOConfig(clip_reward=math.inf, max_grad_norm=math.inf).clip_reward == math.inf


# -- non-finite losses ----------------------------------------------------------------------------------------------


def nan_model(seed: int = 0):
    model = demo_llama(seed)
    with torch.no_grad():
        model.model.norm.weight[0] = math.nan
    return model


def test_sft_on_a_nan_model_fails_and_saves_nothing(sft_rows, tmp_path):
    config = SFTConfig(max_steps=2, batch_size=8, output_dir=str(tmp_path / "out"))
    with pytest.raises(NonFiniteError, match=r"sft: the update of every one of its 2 steps was skipped for NaN or inf"
                       r" .*; nothing was saved to .*out$"):
        train_sft(nan_model(), tokenizer(), sft_rows, config, progress=False)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    with pytest.raises(NonFiniteError, match=r"sft step 1: the loss is nan; nothing was trained on it"):
        train_sft(nan_model(), tokenizer(), sft_rows, SFTConfig(max_steps=2, batch_size=8, nonfinite="stop"),
                  progress=False)


def test_a_nan_sft_loss_skips_that_update_only(sft_rows, monkeypatch):
    real, calls = sft_module.sft_loss, []

    def nan_on_second(model, batch, *packed):
        calls.append(1)
        loss = real(model, batch, *packed)
        return loss * math.nan if len(calls) == 2 else loss

    monkeypatch.setattr(sft_module, "sft_loss", nan_on_second)
    model = demo_llama()
    result = train_sft(model, tokenizer(), sft_rows, SFTConfig(max_steps=3, batch_size=8), progress=False)
    assert result.steps == 3 and result.skipped == 1 and math.isnan(result.losses[1])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_reward_step_on_a_nan_model_fails_from_the_command_line(pairs, tmp_path, cache):
    model_dir = tmp_path / "nan-model"
    nan_model().save_pretrained(model_dir)
    tokenizer().save_pretrained(model_dir)
    with pytest.raises(NonFiniteError, match=r"reward: the update of every one of its 2 steps was skipped"):
        main(["reward", "--model", str(model_dir), "--demo", "--max-steps", "2", "--output", str(tmp_path / "rm"),
              "--cache-dir", cache, "--no-progress"])
    assert not (tmp_path / "rm" / "model.safetensors").exists()
    result = train_reward(demo_llama(), tokenizer(), pairs, RewardConfig(max_steps=2, batch_size=8), progress=False)
    assert result.skipped == 0 and result.stop_reason == "max_steps (2)"


def always_nan(prompts, completions, **fields):
    return [math.nan] * len(completions)


def test_ppo_whose_every_step_is_skipped_fails_and_saves_nothing(prompts, tmp_path):
    config = PPOConfig(algo="grpo", max_steps=2, batch_size=2, train_batch_size=4, num_generations=2,
                       max_new_tokens=4, lr=1e-3, output_dir=str(tmp_path / "ppo"))
    sources = ModelSources(actor=demo_llama(), reward_fn=always_nan)
    with pytest.raises(NonFiniteError, match=r"grpo: the update of every one of its 2 steps was skipped"):
        train_ppo(sources, tokenizer(), prompts, config, progress=False)
    assert not (tmp_path / "ppo" / "model.safetensors").exists()
