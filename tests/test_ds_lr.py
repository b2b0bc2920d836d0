"""Whose learning rate a step trains with under a DeepSpeed config that brings its own optimizer lr: the DeepSpeed
config's unless the user gave one (flag or config file), which then wins with a printed note; the summary records
the lr in use, and the optimizer DeepSpeed builds has it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_engine.commands.common import step_config
from hybrid_engine.commands.ds_lr import lr_from_ds_config
from hybrid_engine.commands.main import build_parser
from hybrid_engine.rlhf import SFTConfig
from hybrid_engine.rlhf.demo import DEMO_DIR
from hybrid_engine.rlhf.ppo import PPOConfig
from hybrid_engine.rlhf.trainer import training_ds_config

ROOT = Path(__file__).resolve().parents[1]


def ds_config(lr) -> dict:
    return {"optimizer": {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}}}


def write_ds(tmp_path: Path, lr=5e-4) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds_config(lr)))
    return str(path)


def test_an_lr_not_given_is_the_ds_configs_and_a_given_one_wins_with_a_note(capsys):
    assert lr_from_ds_config(SFTConfig(), {}, ds_config(5e-4), "sft").lr == 5e-4
    assert capsys.readouterr().err == ""
    ppo = lr_from_ds_config(PPOConfig(lr=1e-4), {"lr": "from the flag"}, ds_config(5e-4), "ppo")
    assert ppo.lr == 1e-4 and ppo.critic_lr == 5e-4  # the critic's lr was not given: DeepSpeed's
    assert capsys.readouterr().err == ("note: ppo: lr 0.0001 (from the flag) is used, not the DeepSpeed config's "
                                       "optimizer.params.lr 0.0005\n")
    assert lr_from_ds_config(SFTConfig(), {}, {"optimizer": {"type": "AdamW"}}, "sft").lr == 1e-3  # none to take
    assert lr_from_ds_config(SFTConfig(), {}, ds_config("auto"), "sft").lr == 1e-3  # "auto": the step config's
    with pytest.raises(ValueError, match=r"optimizer.params.lr must be a positive number, got 'fast'"):
        lr_from_ds_config(SFTConfig(), {}, ds_config("fast"), "sft")


def sft_config(argv: list[str]) -> SFTConfig:
    return step_config(build_parser().parse_args(["sft", "--demo", *argv]), SFTConfig, "sft")


def test_the_command_line_takes_the_ds_lr_unless_the_flag_or_the_file_gives_one(tmp_path, capsys):
    ds = write_ds(tmp_path)
    assert sft_config(["--ds-config", ds]).lr == 5e-4
    assert sft_config(["--ds-config", ds, "--lr", "1e-4"]).lr == 1e-4
    assert "note: sft: lr 0.0001 (from the flag) is used" in capsys.readouterr().err
    file = tmp_path / "c.yaml"
    file.write_text("sft:\n  lr: 2.0e-4\n")
    assert sft_config(["--ds-config", ds, "--config", str(file)]).lr == 2e-4
    assert f"note: sft: lr 0.0002 (from {file}) is used" in capsys.readouterr().err
    assert sft_config(["--lr", "1e-4"]).lr == 1e-4  # no DeepSpeed config: nothing to say


def test_the_optimizer_deepspeed_builds_starts_from_the_step_configs_lr():
    built = training_ds_config(ds_config(5e-4), batch_size=4, max_grad_norm=1.0, lr=2e-4)
    assert built["optimizer"]["params"] == {"lr": 2e-4, "torch_adam": True}
    assert training_ds_config({"zero_optimization": {"stage": 0}}, 4, 1.0, lr=2e-4).get("optimizer") is None


SPY = """
import json, sys
from hybrid_engine.commands import sft
from hybrid_engine.commands.main import main
real = sft.train_sft
def spy(*args, **kwargs):
    result = real(*args, **kwargs)
    print("LRS", json.dumps([g["lr"] for g in result.engine.optimizer.param_groups]), flush=True)
    return result
sft.train_sft = spy
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sft_under_deepspeed_trains_with_the_ds_configs_lr_and_records_it(tmp_path):
    """A DeepSpeed engine in its own process (torch's AdamW via torch_adam: no op to compile)."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join((DEMO_DIR / "sft.jsonl").read_text().splitlines(keepends=True)[:24]))
    out = tmp_path / "out"
    argv = ["sft", "--data", str(data), "--ds-config", write_ds(tmp_path), "--max-steps", "1", "--batch-size", "4",
            "--schedule", "constant", "--output", str(out), "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", SPY, *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LRS [0.0005]" in proc.stdout and "note:" not in proc.stderr
    assert json.loads((out / "summary.json").read_text())["config"]["lr"] == 5e-4
