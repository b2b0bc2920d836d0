"""A config file may hold the run's models, data and functions (run_keys.py), not only the step's fields: each is
the value of its flag when the flag is not given; a key still unknown is refused naming the key it could mean."""

from __future__ import annotations

import json

import pytest
import yaml

from hybrid_engine.commands import run_keys
from hybrid_engine.commands.common import step_config
from hybrid_engine.commands.main import build_parser, main
from hybrid_engine.commands.train import step_configs
from hybrid_engine.rlhf.ppo import PPOConfig
from hybrid_engine.rlhf.sft import SFTConfig


def config_file(tmp_path, values: dict, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values) if name.endswith(".yaml") else json.dumps(values))
    return str(path)


def parsed(*argv: str):
    return build_parser().parse_args(list(argv))


def test_a_step_reads_its_model_data_and_paths_from_the_file(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    path = config_file(tmp_path, {"model": "m", "tokenizer": "t", "data": "a.jsonl", "data-split": "1,1,0",
                                  "eval_fraction": 0, "cache_dir": "c", "ds_config": str(ds), "lr": 0.01,
                                  "sft": {"max_steps": 3}})
    args = parsed("sft", "--config", path)
    config = step_config(args, SFTConfig, "sft")
    assert (args.model, args.tokenizer, args.data, args.data_split) == ("m", "t", ["a.jsonl"], "1,1,0")
    assert (args.eval_fraction, args.cache_dir, args.ds_config) == (0.0, "c", str(ds))
    assert isinstance(args.eval_fraction, float)
    assert config.lr == 0.01 and config.max_steps == 3  # the step's fields as before


def test_a_flag_wins_over_the_file(tmp_path):
    path = config_file(tmp_path, {"model": "m", "data": ["a.jsonl", "b.jsonl:0.5"], "demo": True}, "run.json")
    args = parsed("sft", "--config", path, "--model", "flag", "--data", "c.jsonl")
    step_config(args, SFTConfig, "sft")
    assert args.model == "flag" and args.data == ["c.jsonl"] and args.demo is True


def test_ppo_reads_its_reward_model_and_functions(tmp_path):
    path = config_file(tmp_path, {"reward_model": "rm", "reward_fn": "rules.py:score", "eval_fn": "rules.py:exact",
                                  "no_reward_model": True, "critic": "c", "reference": "r", "ptx_data": "p.jsonl"})
    args = parsed("ppo", "--config", path)
    step_config(args, PPOConfig, "ppo", run_keys.PPO)
    assert (args.reward_model, args.reward_fn, args.eval_fn) == ("rm", ["rules.py:score"], "rules.py:exact")
    assert args.no_reward_model is True and (args.critic, args.reference, args.ptx_data) == ("c", "r", ["p.jsonl"])


def test_train_reads_its_run_settings_over_the_packaged_sections(tmp_path):
    path = config_file(tmp_path, {"data": ["x.jsonl"], "data_split": "1,1,1", "reward_fn": "r.py:f",
                                  "ppo": {"max_steps": 4}})
    args = parsed("train", "--config", path, "--set", "eval_fn=r.py:g")
    configs = step_configs(args)
    assert (args.data, args.data_split, args.reward_fn, args.eval_fn) == (["x.jsonl"], "1,1,1", ["r.py:f"], "r.py:g")
    assert configs["ppo"].max_steps == 4


@pytest.mark.parametrize("command, values, words", [
    ("sft", {"modle": "m"}, "unknown key 'modle' (did you mean 'model'?)"),
    ("sft", {"data_splt": "1,1,1"}, "did you mean 'data_split'?"),
    ("sft", {"reward_fn": "r.py:f"}, "'reward_fn' is not a setting of this command"),
    ("sft", {"sft": {"model": "m"}}, "section 'sft': 'model' is a run setting"),
    ("sft", {"data": 3}, "'data' must be a path or a list of paths"),
    ("sft", {"model": True}, "'model' must be a str"),
    ("sft", {"demo": "yes"}, "'demo' must be a bool"),
    ("train", {"ppo": {"reward_fn": "r.py:f"}}, "section 'ppo': 'reward_fn' is a run setting"),
    ("train", {"reward_modle": "x"}, "unknown key 'reward_modle'"),
])
def test_bad_run_settings_are_one_line_errors_naming_the_file(tmp_path, command, values, words):
    path = config_file(tmp_path, values)
    with pytest.raises(ValueError) as err:
        main([command, "--config", path, "--output", str(tmp_path / "out")])
    assert words in str(err.value) and path in str(err.value) and "\n" not in str(err.value)


def test_sft_trains_on_the_files_data(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"say {w}", "response": w}) + "\n" for w in ["fox", "dog"] * 10))
    path = config_file(tmp_path, {"data": str(rows), "eval_fraction": 0.1, "max_steps": 1, "batch_size": 2})
    assert main(["sft", "--config", path, "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    assert f"data {rows}: 20 rows, all for sft (split 1,0,0): 18 train, 2 held out" in capsys.readouterr().out
