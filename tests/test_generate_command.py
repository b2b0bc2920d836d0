"""`hybrid-engine generate`, a tokens/s benchmark on random prompts, generates every --max-new-tokens even when the
model's generation_config names an eos id that its greedy tokens hit (hybrid_engine.generate's default stops
there), so that its figures stay comparable with transformers' (min_new_tokens) and between runs. With --prompt or
--prompts-file it completes text prompts, each as transformers completes it alone."""

from __future__ import annotations

import ast
import copy
import json

import pytest
import torch
from demo_models import save_demo_llama
from models import VOCAB, tiny_model

from hybrid_engine.commands.chat import encode_conversation, load_chat_model
from hybrid_engine.commands.main import main

BATCH, PROMPT, NEW = 2, 8, 6


def test_the_benchmark_runs_past_the_models_eos(tmp_path, capsys):
    model = copy.deepcopy(tiny_model("llama-gqa"))  # tiny_model is cached: never edit it in place
    torch.manual_seed(0)  # the command's prompts: --seed 0, then torch.randint(3, vocab, (batch, prompt_len))
    ids = torch.randint(3, VOCAB, (BATCH, PROMPT))
    free = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[:, PROMPT:]
    model.generation_config.eos_token_id = int(free[0, 1])  # row 0's second token: the default would stop there
    model.generation_config.pad_token_id = 0
    model.save_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--batch", str(BATCH), "--prompt-len", str(PROMPT),
                 "--max-new-tokens", str(NEW), "--compare-hf", "--show", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "greedy sequences identical to transformers: True" in out
    shown = ast.literal_eval(out.split("first sequence's new tokens:")[1].strip().splitlines()[0])
    assert shown == free[0].tolist()  # all NEW tokens, none cut at the eos


# -- text prompts: --prompt / --prompts-file -------------------------------------------------------------------------

PROMPTS = ["tell me about a fox", "what is a cat", "a", "tell me a long story about the quick brown fox and the dog"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return save_demo_llama(tmp_path_factory.mktemp("demo-llama"))


def hf_completions(directory, prompts: list[str], new: int) -> list[str]:
    """Each prompt alone (no padding) through transformers' greedy generate: the reference."""
    model, tokenizer = load_chat_model(str(directory))
    out = []
    for prompt in prompts:
        ids = torch.tensor([encode_conversation(tokenizer, [{"role": "user", "content": prompt}])])
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(seq[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip())
    return out


def jsonl_out(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_text_prompts_are_completed_as_transformers_completes_each_alone(demo_dir, capsys):
    """Prompts of different lengths, batched 3 at a time (left-padded): each completion is the one transformers'
    greedy generate gives the prompt alone."""
    argv = ["generate", "--model", str(demo_dir), "--max-new-tokens", "12", "--batch", "3", "--jsonl"]
    assert main(argv + [a for p in PROMPTS for a in ("--prompt", p)]) == 0
    rows = jsonl_out(capsys)
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["completion"] for r in rows] == hf_completions(demo_dir, PROMPTS, 12)


def test_a_prompts_file_of_lines_or_rows(demo_dir, tmp_path, capsys):
    text = tmp_path / "prompts.txt"
    text.write_text("\ufefftell me about a fox\n\n  what is a cat  \n")  # a BOM, a blank line, spaces: skipped
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": p, "answer": 1}) for p in PROMPTS[:2]) + "\n")
    for path in (text, rows):
        assert main(["generate", "--model", str(demo_dir), "--max-new-tokens", "6", "--prompts-file", str(path)]) == 0
        captured = capsys.readouterr()
        blocks = [b.splitlines() for b in captured.out.strip().split("\n\n")]
        assert [b[0] for b in blocks] == ["> " + p for p in PROMPTS[:2]]
        assert [b[1] if len(b) > 1 else "" for b in blocks] == [c or "(an empty completion)"
                                                                for c in hf_completions(demo_dir, PROMPTS[:2], 6)]
        assert "2 prompts," in captured.err and "tokens/s" in captured.err


@pytest.mark.parametrize("argv, words", [
    (["--prompt", "hi"], "need --model"),
    (["--model", "{dir}", "--prompt", "hi", "--compare-hf"], "--compare-hf and --show"),
    (["--model", "{dir}", "--prompts-file", "{bad}"], "line 2: not utf-8"),
    (["--model", "{dir}", "--prompts-file", "{empty}"], "no prompts in it"),
    (["--model", "{dir}", "--prompts-file", "{missing}"], "no such file"),
])
def test_text_mode_errors_are_one_line(demo_dir, tmp_path, argv, words):
    (tmp_path / "bad.txt").write_bytes(b"fine\ncaf\xe9\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    names = {"dir": str(demo_dir), "bad": str(tmp_path / "bad.txt"), "empty": str(tmp_path / "empty.txt"),
             "missing": str(tmp_path / "missing.txt")}
    with pytest.raises(ValueError) as err:
        main(["generate"] + [a.format(**names) for a in argv])
    assert words in str(err.value).lower() and "\n" not in str(err.value)
