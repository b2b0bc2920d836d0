"""Every YAML block of the docs is a config file the commands accept: written to a file and read as `--config FILE`
is read (config_args.load_config_file, run_keys, the step's config), by each command whose run settings include the
file's (or by the one its first line names, `# hybrid-engine ppo --config FILE`); each must change the command's
settings, and its run settings (model, data, ...) must reach the run. A block whose first line is
`# accelerate launch --config_file FILE` is an accelerate config instead: accelerate's launch code reads it, and the
commands take the DeepSpeed settings it gives their processes (commands/accelerate_env.py)."""

from __future__ import annotations

import re

import pytest
import yaml
from accelerate_launch import launch_env
from doc_blocks import blocks

from hybrid_engine.commands import run_keys, trl_names
from hybrid_engine.commands.accelerate_env import accelerate_ds_config
from hybrid_engine.commands.common import step_config
from hybrid_engine.commands.config_args import load_config_file
from hybrid_engine.commands.main import build_parser
from hybrid_engine.commands.train import step_configs
from hybrid_engine.rlhf import PPOConfig, RewardConfig, SFTConfig
from hybrid_engine.rlhf.step_config import config_dict

READERS = {"sft": (SFTConfig, run_keys.STEP), "reward": (RewardConfig, run_keys.STEP),
           "ppo": (PPOConfig, run_keys.PPO), "train": (None, run_keys.TRAIN)}
"""Each command that takes --config: its config class (train: one per step) and the run settings it reads, as the
command itself calls step_config or step_configs."""

ACCELERATE = re.compile(r"#\s*accelerate launch --config_file (\S+)")
"""The first line of an accelerate config block, naming the file the docs save it as."""
YAML = [pytest.param(b, id=b.where) for b in blocks("yaml") if not ACCELERATE.match(b.code)]
ACCELERATE_YAML = [pytest.param(b, id=b.where) for b in blocks("yaml") if ACCELERATE.match(b.code)]


def settings(command: str, argv: list[str]) -> list[dict]:
    """The command's step configs, as dicts, for its flags `argv`; and the parsed flags."""
    args = build_parser().parse_args([command, *argv])
    cls, run = READERS[command]
    configs = step_configs(args).values() if command == "train" else [step_config(args, cls, command, run)]
    return [config_dict(c) for c in configs], args


def test_the_docs_have_config_blocks():
    assert len(YAML) >= 2


@pytest.mark.parametrize("block", YAML)
def test_a_yaml_block_is_a_config_the_commands_accept(tmp_path, block):
    path = tmp_path / "config.yaml"
    path.write_text(block.code, encoding="utf-8")
    values = load_config_file(path)
    names = {str(k).replace("-", "_"): v for k, v in values.items()}
    names = {trl_names.RUN.get(k, k): v for k, v in names.items()}  # TRL's names
    run = {k: v for k, v in names.items() if k in run_keys.KINDS}
    named = re.match(r"#\s*hybrid-engine (\w+)", block.code)  # a first line naming its command: that one alone
    readers = [command for command, (_, keys) in READERS.items() if set(run) <= set(keys)
               and (named is None or command == named.group(1))]
    assert readers, f"{block.where}: no command reads every run setting of {sorted(run)}"
    for command in readers:
        configs, args = settings(command, ["--config", str(path)])
        defaults, _ = settings(command, [])
        assert configs != defaults, f"{block.where}: changes nothing of `hybrid-engine {command}`"
        for key, value in run.items():
            assert getattr(args, key) in (value, [value]), f"{block.where}: {key} does not reach {command}"


@pytest.mark.parametrize("block", ACCELERATE_YAML)
def test_an_accelerate_config_block_gives_deepspeed_settings_the_commands_take(tmp_path, block):
    path = tmp_path / ACCELERATE.match(block.code).group(1)
    path.write_text(block.code, encoding="utf-8")
    config, line = accelerate_ds_config(launch_env(path))
    stage = yaml.safe_load(block.code)["deepspeed_config"]["zero_stage"]
    assert config["zero_optimization"]["stage"] == stage and line.startswith(f"ZeRO-{stage}, "), block.where
    printed = f"DeepSpeed settings from accelerate launch: {line}"
    assert printed in block.page.read_text(encoding="utf-8"), f"{block.where}: the page does not show {printed}"
