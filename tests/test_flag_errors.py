"""Settings that conflict or make no sense are refused in one line naming the flag, the setting or --set, before
any model loads (issue: 'unclear errors')."""

from __future__ import annotations

import pytest

from hybrid_engine.commands.main import build_parser, main
from hybrid_engine.commands.train import step_configs
from hybrid_engine.rlhf.ppo import PPOConfig
from hybrid_engine.rlhf.reward import RewardConfig
from hybrid_engine.rlhf.reward_fn import load_reward_fn
from hybrid_engine.rlhf.sft import SFTConfig


@pytest.mark.parametrize("cls", [SFTConfig, RewardConfig, PPOConfig])
@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True])
def test_a_seed_out_of_range_is_refused(cls, seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\), got"):
        cls(seed=seed)


@pytest.mark.parametrize("argv, words", [
    (["ppo", "--demo", "--reward-model", "rm", "--no-reward-model", "--reward-fn", "r.py:f"],
     "--reward-model rm and --no-reward-model exclude each other"),
    (["ppo", "--demo", "--algo", "grpo", "--critic", "c", "--reward-fn", "r.py:f", "--no-reward-model"],
     "--critic c: grpo has no critic"),
    (["ppo", "--demo", "--algo", "rloo", "--critic", "c", "--reward-fn", "r.py:f", "--no-reward-model"],
     "--critic c: rloo has no critic"),
    (["ppo", "--demo", "--reward-fn", ":ok", "--no-reward-model"], "the module or file before ':' is missing"),
    (["ppo", "--demo", "--reward-fn", "r.py:", "--no-reward-model"], "'' after ':' is not a function name"),
    (["train", "--set", "ppo.max_stepz=3"], "--set ppo.max_stepz=3, section 'ppo': unknown key 'max_stepz' (did you "
                                            "mean 'max_steps'?)"),
    (["train", "--set", "max_stepz=3"], "--set max_stepz=3: unknown key 'max_stepz'"),
    (["train", "--set", "ppo.max_steps=x"], "--set ppo.max_steps=x, section 'ppo': 'max_steps' must be int"),
])
def test_conflicting_or_malformed_flags_are_one_line_errors(argv, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no out/sft here: the flags must be refused before the model is looked for
    with pytest.raises(ValueError) as err:
        main(argv + ["--output", str(tmp_path / "out")])
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_set_keys_are_checked_alone_but_values_together():
    """sft.max_seq_len=100 alone is below the default max_prompt_len (256); with sft.max_prompt_len=50 it is valid."""
    args = build_parser().parse_args(["train", "--set", "sft.max_seq_len=100", "--set", "sft.max_prompt_len=50"])
    assert step_configs(args)["sft"].tokens.max_seq_len == 100


@pytest.mark.parametrize("spec", [":f", "m:", "m:not a name", "m", 3])
def test_a_malformed_reward_function_spec_is_refused(spec):
    with pytest.raises(ValueError, match="'module:function', 'file.py:function' or 'package.module.function'"):
        load_reward_fn(spec)


@pytest.mark.parametrize("spec", ["org/reward-model", "Skywork/Skywork-Reward-V2-Llama-3.1-8B", "out/reward"])
def test_a_model_name_given_as_a_reward_function_is_refused_saying_where_it_goes(spec):
    with pytest.raises(ValueError, match=r"reads as a model's name or folder, not a function .* give it as the reward "
                       r"model \(--reward-model\)"):
        load_reward_fn(spec)
