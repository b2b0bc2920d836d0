"""`hybrid-engine demo-files`: an example input of every kind, each accepted by the code that reads it."""

from __future__ import annotations

import json

import pytest
import transformers

from hybrid_engine.commands.main import build_parser, main
from hybrid_engine.commands.model_dirs import check_model_dir, load_tokenizer
from hybrid_engine.rlhf.data import load_file
from hybrid_engine.rlhf.demo import DEMO_DIR, DEMO_MODEL
from hybrid_engine.rlhf.reward_fn import load_reward_fn

FIELDS = {"rows.jsonl": ("sft", {"prompt", "response"}), "pairs.jsonl": ("reward", {"prompt", "chosen", "rejected"}),
          "prompts.jsonl": ("ppo", {"prompt"})}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("inputs") / "demo"
    assert main(["demo-files", "--output", str(out), "--rows", "12", "--seed", "3"]) == 0
    return out


def test_the_data_files_hold_the_first_rows_of_each_step_in_its_format(written, tmp_path):
    for name, (step, fields) in FIELDS.items():
        lines = (written / name).read_text().splitlines()
        assert lines == (DEMO_DIR / f"{step}.jsonl").read_text().splitlines()[:12], name
        assert all(set(json.loads(line)) == fields for line in lines), name
        assert len(load_file(written / name, step, cache_dir=str(tmp_path))) == 12  # the commands' own reader


def test_the_model_is_a_demo_model_with_its_tokenizer(written, capsys):
    model_dir = check_model_dir(str(written / "model"))
    capsys.readouterr()
    tokenizer = load_tokenizer(model_dir, "--model")
    assert "warning" not in capsys.readouterr().err  # it splits text as its own tokenizer.json does
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.hidden_size == DEMO_MODEL["hidden_size"] and model.config.vocab_size == len(tokenizer)


def test_the_rules_file_is_a_reward_function_of_the_demo_preference(written):
    score = load_reward_fn(f"{written / 'my_rules.py'}:score")
    assert score(prompts=["a", "b", "c"], completions=["a lovely warm day", "a gloomy day", "a lovely gloomy day"],
                 answer=[1, 2, 3]) == [1.0, 0.0, 0.5]
    brevity = load_reward_fn(f"{written / 'my_rules.py'}:brevity")
    assert brevity(prompts=["a", "b"], completions=["a lovely day", " "], answer=[1, 2]) == [1 / 3, None]


def test_it_names_each_entry_and_the_flag_that_reads_it(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["demo-files", "--output", str(out), "--rows", "10"]) == 0
    printed = capsys.readouterr().out
    for flag in ("--model", "sft --data", "reward --data", "ppo --data", "--reward-fn"):
        assert flag in printed
    assert "10 (prompt) rows" in printed


def test_an_entry_already_there_is_refused_and_nothing_written(tmp_path):
    (tmp_path / "pairs.jsonl").write_text("mine\n")
    with pytest.raises(ValueError, match="pairs.jsonl already there"):
        main(["demo-files", "--output", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]
    assert (tmp_path / "pairs.jsonl").read_text() == "mine\n"


def test_too_few_rows_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 10"):
        main(["demo-files", "--output", str(tmp_path / "d"), "--rows", "9"])
    assert not (tmp_path / "d").exists()


def test_help_explains_every_flag():
    command = build_parser()._subparsers._group_actions[0].choices["demo-files"]
    assert command.description and len(command.description) > 50
    for action in command._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings
