"""TRL's dataset formats (rlhf/formats.py) read into the steps' columns: conversational texts, `messages`, completion,
implicit prompts; against TRL's own extract_prompt and the tokenizer's own chat template; trained on by SFT and GRPO;
bad rows named by file, row and field."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from demo_models import demo_llama, tokenizer
from trl.data_utils import extract_prompt

from hybrid_engine.rlhf import SFTConfig, train_sft
from hybrid_engine.rlhf.data import DataConfig, DatasetSpec, load_file, load_step_data
from hybrid_engine.rlhf.ppo import ModelSources, PPOConfig, train_ppo
from hybrid_engine.rlhf.tokens import IGNORE_INDEX, TokenConfig, tokenize_ppo, tokenize_sft

SYSTEM = {"role": "system", "content": "you answer briefly"}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    if name.endswith(".parquet"):
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_of(tmp_path, rows, step, name="rows.jsonl"):
    return load_file(write(tmp_path, rows, name), step, cache_dir=str(tmp_path / "cache")).to_list()


CONVERSATION = [SYSTEM, user("tell me about a fox"), assistant("it is quick"), user("and a dog?")]


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.parquet"])
def test_sft_reads_messages_completions_and_conversational_pairs(tmp_path, name):
    assert rows_of(tmp_path, [{"messages": [*CONVERSATION, assistant("it is lazy")]}], "sft", name) == [
        {"prompt": CONVERSATION, "response": "it is lazy"}]
    assert rows_of(tmp_path, [{"prompt": CONVERSATION, "completion": [assistant("it is lazy")]}], "sft", name) == [
        {"prompt": CONVERSATION, "response": "it is lazy"}]
    assert rows_of(tmp_path, [{"prompt": "a fox", "completion": "is quick"}], "sft", name) == [
        {"prompt": "a fox", "response": "is quick"}]


def as_text(value):
    """A completion as our steps read it: the string, or its one assistant message's content."""
    return value if isinstance(value, str) else value[0]["content"]


@pytest.mark.parametrize("row", [
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    {"chosen": "The sky is blue.", "rejected": "The sky is black."},  # a difference inside a word
    {"chosen": [user("What color is the sky?"), assistant("It is blue.")],
     "rejected": [user("What color is the sky?"), assistant("It is green.")]},
    {"chosen": [SYSTEM, user("a"), assistant("b"), user("c"), assistant("yes")],
     "rejected": [SYSTEM, user("a"), assistant("b"), user("c"), assistant("no")]}])
def test_an_implicit_prompt_is_what_trl_extracts(tmp_path, row):
    trl = extract_prompt(dict(row))
    expected = {"prompt": trl["prompt"], "chosen": as_text(trl["chosen"]), "rejected": as_text(trl["rejected"])}
    assert rows_of(tmp_path, [row], "reward") == [expected]
    assert rows_of(tmp_path, [row], "ppo")[0]["prompt"] == trl["prompt"]  # chosen, rejected: columns for the reward


def test_an_explicit_conversational_preference_and_its_prompt_for_ppo(tmp_path):
    row = {"prompt": CONVERSATION, "chosen": [assistant("lazy")], "rejected": [assistant("loud")], "answer": 7}
    assert rows_of(tmp_path, [row], "reward") == [{"prompt": CONVERSATION, "chosen": "lazy", "rejected": "loud"}]
    assert rows_of(tmp_path, [row], "ppo") == [{"prompt": CONVERSATION, "chosen": [assistant("lazy")],
                                                "rejected": [assistant("loud")], "answer": 7}]


def test_a_conversational_prompt_is_the_chat_templates_and_only_the_response_is_trained_on(tmp_path):
    tok = tokenizer()
    rows = rows_of(tmp_path, [{"messages": [*CONVERSATION, assistant("it is lazy")]}], "sft")
    (example,), _ = tokenize_sft(rows, tok, TokenConfig(max_prompt_len=120, max_seq_len=127))
    prompt = tok.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True, return_dict=True)
    prompt = prompt["input_ids"]
    response = tok("it is lazy", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert example["input_ids"] == prompt + response
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + response
    (ppo,), _ = tokenize_ppo(rows_of(tmp_path, [{"prompt": CONVERSATION}], "ppo"), tok, TokenConfig(120, 127))
    assert ppo["input_ids"] == prompt


def test_string_and_conversational_files_blend(tmp_path):
    a = write(tmp_path, [{"prompt": f"tell me about a fox {i}"} for i in range(4)], "a.jsonl")
    b = write(tmp_path, [{"prompt": [SYSTEM, user(f"a dog {i}")]} for i in range(4)], "b.jsonl")
    data = load_step_data(DataConfig([DatasetSpec(str(a)), DatasetSpec(str(b))], data_split="0,0,1",
                                     eval_fraction=0, cache_dir=str(tmp_path / "cache")), "ppo")
    prompts = sorted(data.train["prompt"], key=str)
    assert [user("tell me about a fox 0")] in prompts and [SYSTEM, user("a dog 0")] in prompts
    tok = tokenizer()  # a string prompt and its one user message are the same tokens
    assert tokenize_ppo([{"prompt": "hi"}], tok, TokenConfig())[0] == tokenize_ppo([{"prompt": [user("hi")]}], tok,
                                                                                     TokenConfig())[0]


@pytest.mark.parametrize("row, step, message", [
    ({"messages": [user("hi"), user("again")]}, "sft", "row 1: field 'messages' must end with an assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}, assistant("x")]}, "sft", "message 1: needs a role of"),
    ({"messages": [user("hi"), {**assistant("x"), "tool_calls": []}]}, "sft", "tool calls are not supported"),
    ({"prompt": [user("hi")], "completion": [assistant("a"), assistant("b")]}, "sft", "must be one assistant message"),
    ({"chosen": "yes", "rejected": "no"}, "reward", "row 1: 'chosen' and 'rejected' share no prompt"),
    ({"chosen": [user("hi"), assistant("a")], "rejected": "b"}, "reward", "must both be strings or both lists of"),
    ({"prompt": [user("hi"), assistant("a")]}, "ppo", "a prompt ends with a user or system turn"),
    ({"prompt": [user("hi")], "completion": ""}, "sft", "field 'completion' must be a non-empty string")])
def test_a_bad_row_is_named_by_file_row_and_field(tmp_path, row, step, message):
    with pytest.raises(ValueError, match=message) as error:
        rows_of(tmp_path, [row], step)
    assert "rows.jsonl, row 1" in str(error.value)


def test_a_conversational_prompt_needs_a_chat_template():
    with pytest.raises(ValueError, match="rendered by the tokenizer's chat template: use_chat_template is off"):
        tokenize_ppo([{"prompt": [user("hi")]}], tokenizer(), TokenConfig(use_chat_template=False))


@pytest.fixture
def conversational(tmp_path):
    rows = [{"messages": [SYSTEM, user(f"tell me about a fox {i}"), assistant(f"the fox {i} is quick")]}
            for i in range(12)]
    return DataConfig([DatasetSpec(str(write(tmp_path, rows)))], data_split="1,0,1", eval_fraction=0.25,
                      cache_dir=str(tmp_path / "cache"))


def test_sft_and_grpo_train_on_a_conversational_file(conversational):
    torch.manual_seed(0)
    model, tok = demo_llama(), tokenizer()
    sft = train_sft(model, tok, load_step_data(conversational, "sft"), SFTConfig(max_steps=3, batch_size=4, lr=1e-3),
                    progress=False)
    assert sft.evals[-1][1] < sft.evals[0][1]  # the held-out perplexity of the responses fell
    seen = []
    config = PPOConfig(algo="grpo", max_steps=2, batch_size=2, train_batch_size=4, num_generations=2,
                       max_new_tokens=4, lr=1e-3)
    result = train_ppo(ModelSources(actor=model, reward_fn=lambda prompts, completions, **_: seen.extend(prompts)
                                    or [float(len(c)) for c in completions]),
                       tok, load_step_data(conversational, "ppo"), config, progress=False)
    assert len(result.history) == 2
    assert all(p[0] == SYSTEM and p[1]["role"] == "user" for p in seen)  # the reward function gets the messages


def test_a_trl_reward_function_gets_messages_completion_ids_and_may_be_async(conversational):
    """TRL's GRPOTrainer contract: conversational completions as one assistant message, completion_ids (the
    response tokens through EOS, no padding), an `async def` function awaited; a function without **kwargs is not
    given completion_ids."""
    calls = []

    async def trl_style(prompts, completions, completion_ids, **kwargs):
        calls.append((prompts, completions, completion_ids))
        return [float(len(ids)) for ids in completion_ids]

    tok = tokenizer()
    config = PPOConfig(algo="grpo", max_steps=1, batch_size=2, train_batch_size=4, num_generations=2,
                       max_new_tokens=4, lr=1e-3)
    result = train_ppo(ModelSources(actor=demo_llama(), reward_fn=trl_style), tok,
                       load_step_data(conversational, "ppo"), config, progress=False)
    prompts, completions, ids = calls[1]  # calls[0] is the held-out evaluation before training
    assert all(p[0] == SYSTEM for p in prompts) and len(ids) == len(completions) == 4
    for completion, row in zip(completions, ids):
        assert completion == [assistant(tok.decode(row, skip_special_tokens=True))]
        assert 1 <= len(row) <= 4 and tok.pad_token_id not in row[:-1]
    assert result.history[0]["fn_score"] == pytest.approx(sum(map(len, ids)) / 4)
    plain = []
    train_ppo(ModelSources(actor=demo_llama(), reward_fn=lambda prompts, completions: plain.append(1) or [0.0] *
                           len(completions)), tok, load_step_data(conversational, "ppo"), config, progress=False)
    assert plain  # called without completion_ids, which it does not take
