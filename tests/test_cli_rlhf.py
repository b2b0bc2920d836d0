"""The `sft`, `reward` and `chat` commands and the config layer under them: flags and their help, a YAML or
JSON file (flat or in sections, nested tokens), precedence flag > file > default, clear errors, and tiny end
to end runs that write loadable models and summary.json."""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers
from demo_models import demo_llama, save_demo_llama, tokenizer

from hybrid_engine.commands.chat import chat_loop, encode_conversation, fit_conversation
from hybrid_engine.commands.common import parse_data, step_data
from hybrid_engine.commands.config_args import (
    add_config_args,
    build_config,
    field_docs,
    flat_fields,
    load_config_file,
)
from hybrid_engine.commands.main import build_parser, main
from hybrid_engine.commands.train import step_configs, train_data
from hybrid_engine.rlhf import RewardModel, SFTConfig
from hybrid_engine.rlhf.demo import DEMO_DIR, DEMO_MODEL, demo_model
from hybrid_engine.rlhf.reward import RewardConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama over the demo vocabulary, saved with the demo tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    return save_demo_llama(path)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The first rows of the demo's sft and reward files, as the user's own data files."""
    path = tmp_path_factory.mktemp("data")
    for step, rows in (("sft", 48), ("reward", 40)):
        lines = (DEMO_DIR / f"{step}.jsonl").read_text().splitlines()[:rows]
        (path / f"{step}.jsonl").write_text("\n".join(lines) + "\n")
    return path


def subcommand(name: str) -> argparse.ArgumentParser:
    return build_parser()._subparsers._group_actions[0].choices[name]


# -- help -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sft", "reward", "chat"])
def test_help_explains_every_flag(name):
    for action in subcommand(name)._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, f"{name} {action.option_strings} has no help"


def test_every_config_field_is_a_flag_with_its_docstring_and_default():
    flags = {opt: a for a in subcommand("sft")._actions for opt in a.option_strings}
    for leaf in flat_fields(SFTConfig, skip=("output_dir",)):
        assert leaf.flag in flags, leaf.flag
        assert leaf.doc and leaf.doc in flags[leaf.flag].help and "(default: " in flags[leaf.flag].help
    assert "--max-prompt-len" in flags and "--use-chat-template" in flags and "--no-use-chat-template" in flags
    assert "--output-dir" not in flags and "--output" in flags
    assert "--gradient-checkpointing" not in {o for a in subcommand("reward")._actions for o in a.option_strings}
    subcommand("sft").format_help()  # a % in a docstring would break this


def test_field_docs_read_the_class_and_its_dataclass_bases():
    docs = field_docs(SFTConfig)
    assert docs["lr"].startswith("Peak learning rate of AdamW (DeepSpeed-Chat's default learning_rate)")
    assert docs["epochs"].startswith("Passes over the training examples")  # from StepConfig
    assert "Recompute" in docs["gradient_checkpointing"]
    assert RewardConfig.__dataclass_fields__["lr"].default == 5e-5 and "step-2" in field_docs(RewardConfig)["lr"]


# -- a config dataclass of every supported kind of field ------------------------------------------------------


@dataclass
class Inner:
    width: int = 4
    """How wide."""
    label: str | None = None
    """A name, or None."""


@dataclass
class Outer:
    steps: int | None = None
    """Steps; None: all."""
    rate: float = 0.5
    """A rate."""
    name: str = "x"
    """A name 100% plain."""
    flag: bool = False
    """A switch."""
    inner: Inner = field(default_factory=Inner)
    """Nested settings."""

    def __post_init__(self):
        if self.rate < 0:
            raise ValueError("rate must be >= 0")


def outer_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_config_args(parser, Outer)
    return parser


def test_flags_leave_defaults_out_of_the_namespace_and_take_none():
    parser = outer_parser()
    assert vars(parser.parse_args([])) == {}
    args = parser.parse_args(["--steps", "none", "--rate", "2", "--flag", "--width", "8", "--label", "none"])
    assert vars(args) == {"steps": None, "rate": 2.0, "flag": True, "width": 8, "label": None}
    assert vars(parser.parse_args(["--no-flag"])) == {"flag": False}
    config = build_config(Outer, args, {})
    assert config == Outer(steps=None, rate=2.0, flag=True, inner=Inner(width=8, label=None))
    assert build_config(Outer, parser.parse_args([]), {}) == Outer()
    with pytest.raises(SystemExit):
        parser.parse_args(["--width", "wide"])
    assert "100%% plain" not in parser.format_help() and "100% plain" in parser.format_help()


def test_two_fields_of_one_flag_name_are_refused():
    @dataclass
    class Clash:
        width: int = 1
        inner: Inner = field(default_factory=Inner)

    with pytest.raises(ValueError, match="inner.width and width|width and inner.width"):
        add_config_args(argparse.ArgumentParser(), Clash)


# -- config files and precedence ------------------------------------------------------------------------------


def write(path: Path, values: dict) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        import yaml

        path.write_text(yaml.safe_dump(values))
    return path


def sft_config(argv: list[str], file: Path | None = None) -> SFTConfig:
    parser = argparse.ArgumentParser()
    add_config_args(parser, SFTConfig, skip=("output_dir",))
    values = load_config_file(file) if file else {}
    return build_config(SFTConfig, parser.parse_args(argv), values, section="sft")


FLAT = {"lr": 0.01, "max-steps": 7, "batch_size": 4, "max_prompt_len": 32, "use-chat-template": False}
NESTED = {"lr": 0.01, "max_steps": 7, "batch-size": 4, "tokens": {"max-prompt-len": 32, "use_chat_template": False}}
SECTIONED = {"lr": 0.5, "batch_size": 4, "sft": {"lr": 0.01, "max_steps": 7, "tokens": {"max_prompt_len": 32},
                                                "use_chat_template": False},
             "reward": {"lr": 9.0, "whatever": 1}}


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
@pytest.mark.parametrize("values", [FLAT, NESTED, SECTIONED], ids=["flat", "nested", "sectioned"])
def test_a_flag_beats_the_file_which_beats_the_default(tmp_path, suffix, values):
    file = write(tmp_path / f"config{suffix}", values)
    config = sft_config(["--lr", "0.2", "--max-seq-len", "100"], file)
    assert config.lr == 0.2 and config.tokens.max_seq_len == 100  # flags
    assert config.max_steps == 7 and config.batch_size == 4 and config.tokens.max_prompt_len == 32  # file
    assert config.tokens.use_chat_template is False
    assert config.epochs is None and config.seed == 1234 and config.tokens.over_long == "truncate"  # defaults
    assert sft_config([], file).lr == 0.01


def test_the_reward_section_is_read_by_the_reward_command_only(tmp_path):
    file = write(tmp_path / "c.yaml", {"lr": 1e-4, "reward": {"lr": 2e-5}, "sft": {"max_steps": 3}})
    parser = argparse.ArgumentParser()
    add_config_args(parser, RewardConfig)
    config = build_config(RewardConfig, parser.parse_args([]), load_config_file(file), section="reward")
    assert config.lr == 2e-5 and config.max_steps is None
    assert sft_config([], file).lr == 1e-4 and sft_config([], file).max_steps == 3


def test_yaml_floats_without_a_dot_and_nulls_are_read(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("lr: 1e-3\nmax_grad_norm: null\nmax_steps: ~\nweight_decay: 0\n")
    config = sft_config([], file)
    assert config.lr == 1e-3 and config.max_grad_norm is None and config.max_steps is None
    assert config.weight_decay == 0.0 and isinstance(config.weight_decay, float)


@pytest.mark.parametrize("values, match", [
    ({"lrr": 0.1}, r"c\.yaml: unknown key 'lrr' \(did you mean 'lr'\?\); valid keys: .*batch_size"),
    ({"tokens": {"max_promt_len": 3}}, r"c\.yaml, tokens: unknown key 'max_promt_len' \(did you mean 'max_prompt_len'"),
    ({"sft": {"epoch": 2}}, r"c\.yaml, section 'sft': unknown key 'epoch' \(did you mean 'epochs'"),
    ({"batch_size": "big"}, r"'batch_size' must be int, got str 'big'"),
    ({"batch_size": True}, r"'batch_size' must be int, got bool"),
    ({"lr": "fast"}, r"'lr' must be float, got str 'fast'"),
    ({"max_steps": 1.5}, r"'max_steps' must be int or null, got float"),
    ({"use_chat_template": "yes"}, r"'use_chat_template' must be bool"),
    ({"tokens": 5}, r"'tokens' must be a mapping"),
    ({"max_prompt_len": 8, "tokens": {"max_prompt_len": 9}}, r"given twice"),
    ({"max_prompt_len": 600}, r"max_prompt_len \(600\) < max_seq_len \(512\)"),  # TokenConfig's own check
    ({"batch_size": 0}, r"batch_size must be a positive integer"),  # StepConfig's own check
])
def test_bad_config_values_are_clear_errors(tmp_path, values, match):
    file = write(tmp_path / "c.yaml", values)
    with pytest.raises(ValueError, match=match):
        sft_config([], file)


def test_bad_config_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.yaml: no such config file"):
        load_config_file(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("lr: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: not valid YAML"):
        load_config_file(tmp_path / "bad.yaml")
    (tmp_path / "bad.json").write_text('{"lr": 1,}')
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON at line 1"):
        load_config_file(tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"list\.yaml: a config file must hold a mapping.*list"):
        load_config_file(tmp_path / "list.yaml")
    (tmp_path / "c.toml").write_text("lr = 1")
    with pytest.raises(ValueError, match=r"must be \.yaml, \.yml or \.json"):
        load_config_file(tmp_path / "c.toml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config_file(tmp_path / "empty.yaml") == {}


def test_data_flags_parse_paths_and_weights():
    assert parse_data("a.jsonl:0.5").path == "a.jsonl" and parse_data("a.jsonl:0.5").weight == 0.5
    assert parse_data("dir:x/a.jsonl").path == "dir:x/a.jsonl" and parse_data("a.jsonl").weight is None
    assert parse_data("b.parquet:3").weight == 3.0 and parse_data("x:y:a.json:0").weight == 0.0


@pytest.mark.parametrize("text, words", [
    ("a.jsonl:abc", "the blend weight after ':' must be a number, got 'abc'"),
    ("a.jsonl:", "the blend weight after ':' must be a number, got ''"),
    ("a.jsonl:nan", "the blend weight must be a finite number >= 0, got 'nan'"),
    ("a.parquet:inf", "the blend weight must be a finite number >= 0, got 'inf'"),
    ("a.json:-1", "the blend weight must be a finite number >= 0, got '-1'"),
])
def test_a_bad_data_weight_is_a_one_line_error_naming_the_flag(text, words):
    with pytest.raises(ValueError) as e:
        parse_data(text)
    assert str(e.value) == f"--data {text}: {words}"
    with pytest.raises(ValueError, match=f"^--ptx-data {text}: "):
        parse_data(text, "--ptx-data")


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_a_step_run_alone_takes_the_whole_file_and_says_so(small_data, cache, capsys):
    sft, pairs = small_data / "sft.jsonl", small_data / "reward.jsonl"
    for command, path, rows in (("sft", sft, 48), ("reward", pairs, 40), ("ppo", pairs, 40)):
        data = step_data(parse([command, "--data", str(path), "--cache-dir", cache]), command, seed=1234)
        assert len(data.train) + len(data.eval) == rows and len(data.eval) == round(rows / 10), command
        share = {"sft": "1,0,0", "reward": "0,1,0", "ppo": "0,0,1"}[command]
        assert capsys.readouterr().out == (f"data {path}: {rows} rows, all for {command} (split {share}): "
                                           f"{rows - round(rows / 10)} train, {round(rows / 10)} held out\n")
    data = step_data(parse(["sft", "--data", str(sft), "--data-split", "2,4,4", "--cache-dir", cache]), "sft", 1234)
    assert len(data.train) + len(data.eval) == 10  # 48 * 0.2, as asked
    assert capsys.readouterr().out == f"data {sft}: 48 rows, 10 for sft (split 2,4,4): 9 train, 1 held out\n"


def test_train_splits_each_file_between_the_steps_and_says_so(small_data, cache, tmp_path, capsys):
    pairs = small_data / "reward.jsonl"
    args = parse(["train", "--data", str(pairs), "--output", str(tmp_path), "--cache-dir", cache])
    data = train_data(args, step_configs(args))
    assert [r.step_rows for step in ("sft", "reward", "ppo") for r in data[step].reports] == [8, 16, 16]
    assert set(data["sft"].train["prompt"]).isdisjoint(data["ppo"].train["prompt"])
    assert capsys.readouterr().out.splitlines() == [
        f"data {pairs}: 40 rows, 8 for sft (split 2,4,4): 7 train, 1 held out",
        f"data {pairs}: 40 rows, 16 for reward (split 2,4,4): 14 train, 2 held out",
        f"data {pairs}: 40 rows, 16 for ppo (split 2,4,4): 14 train, 2 held out"]
    args = parse(["train", "--output", str(tmp_path), "--cache-dir", cache])  # no model, no data: the demo
    demo = train_data(args, step_configs(args))
    assert [len(demo[s].train) + len(demo[s].eval) for s in ("sft", "reward", "ppo")] == [3000, 3000, 1200]
    capsys.readouterr()


def test_the_demo_data_is_used_only_when_asked(small_data, cache, model_dir, tmp_path):
    data = step_data(parse(["sft", "--demo", "--cache-dir", cache]), "sft", seed=1234)
    assert len(data.train) + len(data.eval) == 3000 and data.reports[0].path.endswith("demo/sft.jsonl")
    for command in ("sft", "reward", "ppo"):
        with pytest.raises(ValueError) as e:
            step_data(parse([command]), command, seed=1234)
        assert str(e.value).startswith(f"no data: give --data FILE ({command} rows: ") and str(e.value).endswith(
            "), or --demo for the built-in demo task")
    with pytest.raises(ValueError, match="^--data and --demo exclude each other"):
        step_data(parse(["sft", "--demo", "--data", str(small_data / "sft.jsonl")]), "sft", seed=1234)
    with pytest.raises(ValueError, match=r"^no data: give --data FILE \(split between sft, reward and ppo"):
        main(["train", "--model", str(model_dir), "--output", str(tmp_path / "run"), "--no-progress"])
    assert not (tmp_path / "run").exists()  # refused before any step


def test_the_demo_model_has_the_documented_shape():
    model = demo_model(seed=3)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.num_attention_heads) == (256, 4, 512, 4)
    assert c.num_key_value_heads == 4 and c.max_position_embeddings == 128 and not c.tie_word_embeddings
    assert c.vocab_size == len(tokenizer()) and c.pad_token_id == tokenizer().pad_token_id
    assert DEMO_MODEL["hidden_size"] == 256
    assert torch.equal(demo_model(seed=3).lm_head.weight, model.lm_head.weight)


# -- end to end -----------------------------------------------------------------------------------------------


def test_sft_trains_saves_a_loadable_model_and_a_summary(model_dir, small_data, cache, tmp_path, capsys):
    config = write(tmp_path / "c.yaml", {"sft": {"batch_size": 4, "max_steps": 5, "tokens": {"max_prompt_len": 24}}})
    out = tmp_path / "sft"
    assert main(["sft", "--model", str(model_dir), "--data", str(small_data / "sft.jsonl"), "--eval-fraction", "0.25",
                 "--config", str(config), "--max-steps", "2", "--output", str(out), "--cache-dir", cache,
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "held-out perplexity" in printed and "->" in printed and "prompts truncated / dropped" in printed
    assert f"data {small_data / 'sft.jsonl'}: 48 rows, all for sft (split 1,0,0): 36 train, 12 held out\n" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and len(summary["losses"]) == 2 and summary["config"]["batch_size"] == 4
    assert summary["config"]["tokens"]["max_prompt_len"] == 24 and summary["eval_rows"] == 12
    assert summary["train_rows"] == 36 and summary["data"][0]["data_split"] == "1,0,0"  # the whole file
    assert summary["eval_perplexity_after"] > 0 and summary["tokens_per_s"] > 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer())
    assert transformers.AutoTokenizer.from_pretrained(out).pad_token_id == tokenizer().pad_token_id


def test_sft_with_lora_saves_the_merged_model(model_dir, small_data, cache, tmp_path):
    out = tmp_path / "lora"
    assert main(["sft", "--model", str(model_dir), "--data", str(small_data / "sft.jsonl"), "--data-split", "1,0,0",
                 "--batch-size", "4", "--max-steps", "2", "--lora-r", "4", "--lora-target-modules", "q_proj", "v_proj",
                 "--output", str(out), "--cache-dir", cache, "--no-progress"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert not [n for n, _ in model.named_parameters() if "lora" in n]
    assert json.loads((out / "summary.json").read_text())["lora_r"] == 4


def test_reward_trains_and_saves_a_loadable_reward_model(model_dir, small_data, cache, tmp_path, capsys):
    out = tmp_path / "rm"
    assert main(["reward", "--model", str(model_dir), "--data", str(small_data / "reward.jsonl"), "--data-split",
                 "0,1,0", "--batch-size", "4", "--max-steps", "2", "--output", str(out), "--cache-dir", cache,
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "held-out chosen mean" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and set(summary["after"]) == {"accuracy", "chosen_mean", "rejected_mean", "loss"}
    rm = RewardModel.from_pretrained(out)
    ids = torch.tensor([[1, 5, 6, 7]])
    assert rm.score(ids, torch.ones_like(ids)).shape == (1,)


def test_only_rank_0_prints_and_writes_the_summary(model_dir, small_data, cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "sft"
    assert main(["sft", "--model", str(model_dir), "--data", str(small_data / "sft.jsonl"), "--data-split", "1,0,0",
                 "--batch-size", "4", "--max-steps", "1", "--output", str(out), "--cache-dir", cache,
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "summary" not in printed and "rows, all for sft" not in printed and not (out / "summary.json").exists()


def test_bad_command_input_is_a_clear_error(model_dir, small_data, cache, tmp_path):
    base = ["--cache-dir", cache, "--no-progress", "--output", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="--model .*nowhere: no such directory"):
        main(["sft", "--model", str(tmp_path / "nowhere"), "--demo", *base])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a saved Hugging Face model"):
        main(["reward", "--model", str(tmp_path / "empty"), "--demo", *base])
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such data file"):
        main(["sft", "--model", str(model_dir), "--data", str(tmp_path / "missing.jsonl"), *base])
    closest = r"c\.json: unknown key 'lrate' \(did you mean 'min_lr_rate'\?\); valid keys: .* lr,"  # lr listed
    with pytest.raises(ValueError, match=closest):
        main(["sft", "--config", str(write(tmp_path / "c.json", {"lrate": 1})), *base])
    with pytest.raises(ValueError, match="--lora-r must be 0"):
        main(["sft", "--lora-r", "-1", *base])
    with pytest.raises(SystemExit):
        main(["sft", "--max-steps", "two"])
    data = ["--model", str(model_dir), "--data", str(small_data / "sft.jsonl")]
    with pytest.raises(ValueError, match=r"^--data-split must be three finite numbers >= 0, not all 0, like '2,4,4'; "
                       r"got 'nan,1,1'$"):
        main(["sft", *data, "--data-split", "nan,1,1", *base])
    with pytest.raises(ValueError, match=r"^--eval-fraction must be in \[0, 1\), got inf$"):
        main(["sft", *data, "--eval-fraction", "inf", *base])
    with pytest.raises(ValueError, match=r"^--data a\.jsonl:abc: the blend weight after ':' must be a number"):
        main(["sft", "--model", str(model_dir), "--data", "a.jsonl:abc", *base])
    assert not (tmp_path / "o").exists()


# -- chat -----------------------------------------------------------------------------------------------------


def test_chat_answers_a_prompt(model_dir, capsys):
    assert main(["chat", "--model", str(model_dir), "--prompt", "tell me about a fox", "--max-new-tokens", "8"]) == 0
    answer = capsys.readouterr().out.strip().splitlines()
    assert answer and answer[-1].strip()


def test_chat_loop_answers_each_line_until_eof(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("tell me about a fox\n\ndescribe the weather in paris today\n"))
    assert main(["chat", "--model", str(model_dir), "--max-new-tokens", "6", "--sample", "--seed", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 2


def test_chat_loop_stops_at_quit(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("tell me about a fox\nquit\ntell me about a cat\n"))
    assert main(["chat", "--model", str(model_dir), "--max-new-tokens", "4"]) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if line.strip()]) == 1


@pytest.mark.parametrize("keep", [True, False])
def test_the_loop_carries_the_conversation_only_with_a_template(keep, capsys):
    seen = []

    def respond(messages):
        seen.append([m["content"] for m in messages])
        return f"answer {len(seen)}"

    assert chat_loop(respond, keep, io.StringIO("a\n  \nb\nexit\nc\n")) == 0
    assert seen == ([["a"], ["a", "answer 1", "b"]] if keep else [["a"], ["b"]])
    assert capsys.readouterr().out.split() == ["answer", "1", "answer", "2"]


def test_a_conversation_keeps_its_history_and_drops_the_oldest_when_it_must():
    tok = tokenizer()
    messages = [{"role": "user", "content": "tell me about a fox"}, {"role": "assistant", "content": "the fox"},
                {"role": "user", "content": "tell me about a cat"}]
    both = tok.decode(encode_conversation(tok, messages))
    assert "fox" in both and "cat" in both and both.rstrip().endswith("<assistant>")
    last = encode_conversation(tok, messages[2:])
    assert fit_conversation(tok, messages, room=len(last)) == last
    cut = fit_conversation(tok, messages[2:], room=4)
    assert len(cut) == 4 and cut[0] == tok.bos_token_id and cut[1:] == last[-3:]
    alone = tok.decode(encode_conversation(tok, messages, use_chat_template=False))
    assert "fox" not in alone and "<assistant>" not in alone


def test_chat_needs_a_tokenizer(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    demo_llama().save_pretrained(bare)
    with pytest.raises(ValueError, match="no tokenizer saved there; give --tokenizer DIR"):
        main(["chat", "--model", str(bare), "--prompt", "hi"])
    assert main(["chat", "--model", str(bare), "--tokenizer", str(model_dir), "--prompt", "tell me about a fox",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_chat_falls_back_to_hf_generate_for_other_architectures(tmp_path, model_dir, capsys):
    tok = tokenizer()
    config = transformers.GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id)
    path = tmp_path / "neox"
    transformers.GPTNeoXForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    assert main(["chat", "--model", str(path), "--prompt", "tell me about a fox", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()
    with pytest.raises(ValueError, match="--max-new-tokens 64 leaves no room"):
        main(["chat", "--model", str(path), "--prompt", "hi", "--max-new-tokens", "64"])
