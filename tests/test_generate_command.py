"""`hybrid-engine generate`, a tokens/s benchmark on random prompts, generates every --max-new-tokens even when the
model's generation_config names an eos id that its greedy tokens hit (hybrid_engine.generate's default stops
there), so that its figures stay comparable with transformers' (min_new_tokens) and between runs."""

from __future__ import annotations

import ast
import copy

import torch
from models import VOCAB, tiny_model

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
