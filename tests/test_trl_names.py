"""TRL's flag and config names (commands/trl_names.py): `--learning_rate`, a TRL GRPO YAML, `--model_name_or_path`
work under our names; a TRL setting with no meaning here is refused saying why, at any value but our fixed one."""

from __future__ import annotations

import dataclasses
import re

import pytest
import trl
import yaml
from trl.scripts.grpo import GRPOScriptArguments

from hybrid_engine.commands import trl_names
from hybrid_engine.commands.common import step_config
from hybrid_engine.commands.main import build_parser
from hybrid_engine.rlhf.ppo import PPOConfig
from hybrid_engine.rlhf.sft import SFTConfig

LEGACY = {"max_prompt_length", "warmup_ratio"}
"""TRL names of earlier releases (GRPOConfig's max_prompt_length, TrainingArguments' warmup_ratio), still read."""


def parsed(*argv: str):
    return build_parser().parse_args(list(argv))


def config_file(tmp_path, values: dict) -> str:
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def trl_fields(*classes) -> set[str]:
    return {f.name for cls in classes for f in dataclasses.fields(cls)}


def test_every_name_taken_is_one_of_trls():
    """The aliases are TRL's real names: fields of its configs (or of its scripts' ScriptArguments and
    ModelConfig), not names made up here."""
    step = trl_fields(trl.SFTConfig, trl.RewardConfig)
    rl = trl_fields(trl.GRPOConfig, trl.RLOOConfig)
    script = trl_fields(GRPOScriptArguments, trl.ModelConfig)
    assert set(trl_names.STEP) <= step
    assert set(trl_names.RL) - LEGACY <= rl
    assert set(trl_names.RUN_FLAGS) <= script | rl
    assert set(trl_names.FIXED) | set(trl_names.NO_MEANING) - LEGACY <= rl | step


def test_trl_flags_set_our_settings():
    args = parsed("ppo", "--learning_rate", "1e-5", "--per_device_train_batch_size", "8", "--max_completion_length",
                  "32", "--beta", "0.04", "--epsilon", "0.3", "--num_iterations", "2", "--num_generations", "4",
                  "--max_steps", "3", "--lr_scheduler_type", "cosine", "--bf16", "--model_name_or_path", "m",
                  "--dataset_name", "d.jsonl", "--output_dir", "o", "--reward_funcs", "f.py:g",
                  "--gradient_accumulation_steps", "1", "--algo", "grpo")
    config = step_config(args, PPOConfig, "ppo")
    ours = PPOConfig(lr=1e-5, train_batch_size=8, max_new_tokens=32, kl_coef=0.04, clip_range=0.3, ppo_epochs=2,
                     num_generations=4, max_steps=3, schedule="cosine", bf16_autocast=True, algo="grpo",
                     output_dir="o")
    assert config == ours
    assert (args.model, args.data, args.output, args.reward_fn) == ("m", ["d.jsonl"], "o", ["f.py:g"])
    sft = step_config(parsed("sft", "--per_device_train_batch_size", "4", "--num_train_epochs", "2"), SFTConfig,
                      "sft")
    assert (sft.batch_size, sft.epochs) == (4, 2)  # the SFT step's batch is TRL's per-device batch
    sft = step_config(parsed("sft", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "3"),
                      SFTConfig, "sft")
    assert (sft.batch_size, sft.gradient_accumulation_steps) == (12, 3)  # TRL's micro-batch: 3 make a step
    ours = step_config(parsed("sft", "--batch-size", "4", "--gradient-accumulation-steps", "2"), SFTConfig, "sft")
    assert (ours.batch_size, ours.gradient_accumulation_steps) == (4, 2)  # ours counts the optimizer step's rows


def test_trls_padding_free_is_our_packing(tmp_path, capsys):
    """TRL's SFTConfig.padding_free, as a flag and as a config key, sets packing (sft and reward; TRL's GRPO and
    RLOO have no such name, and neither has our ppo)."""
    assert step_config(parsed("sft", "--padding_free"), SFTConfig, "sft").packing is True
    assert step_config(parsed("sft", "--packing", "--no-padding_free"), SFTConfig, "sft").packing is False
    config = step_config(parsed("sft", "--config", config_file(tmp_path, {"padding_free": True})), SFTConfig, "sft")
    assert config == SFTConfig(packing=True, output_dir="out/sft")
    with pytest.raises(ValueError, match="'padding_free' and 'packing' are one setting .TRL's name and ours."):
        step_config(parsed("sft", "--config", config_file(tmp_path, {"padding_free": True, "packing": True})),
                    SFTConfig, "sft")
    with pytest.raises(SystemExit):
        parsed("ppo", "--padding_free")
    assert "unrecognized arguments: --padding_free" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--steps_per_generation", "4"], "steps_per_generation 4 .TRL's.: each rollout is trained on at once"),
    (["--use_vllm", "true"], "use_vllm .TRL's. has no meaning here: generation runs on the hybrid engine"),
    (["--generation_batch_size", "32"], "set batch_size, the prompts per rollout")])
def test_a_trl_flag_without_a_meaning_is_refused_saying_why(capsys, argv, message):
    with pytest.raises(SystemExit):
        parsed("ppo", *argv)
    assert re.search(message, capsys.readouterr().err)


def test_a_trl_grpo_yaml_loads(tmp_path):
    path = config_file(tmp_path, {
        "model_name_or_path": "m", "dataset_name": "prompts.jsonl",
        "reward_funcs": ["rules.py:score", "rules.py:brevity"], "reward_weights": [1.0, 0.5],
        "output_dir": "out/grpo", "learning_rate": 1.0e-6, "per_device_train_batch_size": 16, "num_generations": 8,
        "max_completion_length": 64, "beta": 0.0, "num_train_epochs": 1, "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": 5, "gradient_accumulation_steps": 1, "logging_steps": 1, "seed": 7, "save_steps": 50,
        "ppo": {"algo": "grpo"}})
    args = parsed("ppo", "--config", path)
    config = step_config(args, PPOConfig, "ppo", ("model", "data", "reward_fn"))
    assert config == PPOConfig(lr=1e-6, train_batch_size=16, num_generations=8, max_new_tokens=64, kl_coef=0.0,
                               epochs=1, schedule="constant_with_warmup", warmup_steps=5, seed=7, checkpoint_every=50,
                               algo="grpo", output_dir="out/grpo", reward_weights=(1.0, 0.5))
    assert (args.model, args.data, args.reward_fn) == ("m", ["prompts.jsonl"], ["rules.py:score", "rules.py:brevity"])


@pytest.mark.parametrize("values, message", [
    ({"gradient_accumulation_steps": 3}, "gradient_accumulation_steps 3 must divide train_batch_size 16"),
    ({"reward_weights": 0.5}, r"'reward_weights' must be a list of float or null, got float 0.5"),
    ({"lr": 1e-5, "learning_rate": 1e-5}, "'learning_rate' and 'lr' are one setting .TRL's name and ours."),
    ({"reward_funcs": ["a.py:f", 3]}, r"'reward_fn' must be a function or a list of functions, got \['a.py:f', 3\]"),
    ({"loss_type": "dapo"}, "unknown key 'loss_type'")])
def test_a_trl_key_without_a_meaning_is_refused_by_name(tmp_path, values, message):
    args = parsed("ppo", "--config", config_file(tmp_path, values))
    with pytest.raises(ValueError, match=message):
        step_config(args, PPOConfig, "ppo", ("model", "data", "reward_fn"))
