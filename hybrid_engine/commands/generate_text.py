"""`hybrid-engine generate --prompt TEXT` / `--prompts-file FILE`: text prompts in, decoded completions out.

    hybrid-engine generate --model out/ppo --prompt "what is 3 plus 4" --prompt "what is 5 plus 1"
    hybrid-engine generate --model out/ppo --prompts-file prompts.jsonl --jsonl > completions.jsonl

Each prompt is formatted as `chat` formats a first message (the tokenizer's chat template when it has one), cut on
the left to leave room for --max-new-tokens, and generated --batch prompts at a time (left-padded), with
hybrid_engine.generate for the architectures it supports, else the model's own HF generate. The output is, per
prompt, `> PROMPT` and its completion (or, with --jsonl, one {"prompt": ..., "completion": ...} line each, as TRL
logs completions); the speed goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hybrid_engine.commands.chat import (
    fast_path,
    fit_conversation,
    load_chat_model,
    prompt_room,
    sampling_settings,
)
from hybrid_engine.generation import generate
from hybrid_engine.rlhf.data import FORMATS, decode_text, load_file
from hybrid_engine.rlhf.tokens import collate_ppo


def add_text_args(gen: argparse.ArgumentParser) -> None:
    """The text mode's flags on `generate`'s parser."""
    text = gen.add_argument_group("text prompts (instead of the benchmark's random ones; needs --model)")
    text.add_argument("--prompt", metavar="TEXT", action="append", help="a prompt to complete; repeatable")
    text.add_argument("--prompts-file", metavar="FILE", help="prompts to complete: a text file (one per line, blank "
                      "lines skipped) or a .jsonl, .json or .parquet file with a `prompt` column")
    text.add_argument("--tokenizer", metavar="DIR", help="a saved tokenizer, when the --model directory has none")
    text.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True, help="format prompts "
                      "with the tokenizer's chat template when it has one, as training does")
    text.add_argument("--jsonl", action="store_true", help="print one JSON line per prompt, {\"prompt\": ..., "
                      "\"completion\": ...}, instead of text")


def wants_text(args: argparse.Namespace) -> bool:
    return bool(args.prompt or args.prompts_file)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt's texts, then --prompts-file's."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if path.suffix.lower() in FORMATS:
            prompts += list(load_file(path, "ppo")["prompt"])  # checked: every row has a non-empty prompt
        else:
            prompts += text_lines(path)
    if not prompts:
        raise ValueError(f"--prompts-file {args.prompts_file}: no prompts in it")
    return prompts


def text_lines(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped; a one-line error naming the file and line otherwise."""
    if not path.is_file():
        raise ValueError(f"--prompts-file {path}: no such file")
    return [line.strip() for line in decode_text(path, path.read_bytes()).splitlines() if line.strip()]


def complete(model, tokenizer, prompts: list[str], args: argparse.Namespace) -> tuple[list[str], int]:
    """(each prompt's decoded completion, special tokens skipped; the number of tokens generated)."""
    room = prompt_room(model, args.max_new_tokens)
    sampling, hf_kwargs = sampling_settings(args, tokenizer)
    pad_id = hf_kwargs.get("pad_token_id", 0)
    texts, tokens = [], 0
    for lo in range(0, len(prompts), args.batch):
        rows = [fit_conversation(tokenizer, [{"role": "user", "content": p}], room, args.chat_template)
                for p in prompts[lo:lo + args.batch]]
        batch = collate_ppo([{"input_ids": r} for r in rows], pad_id)  # left-padded, as PPO's prompts
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if fast_path(model):
            out = generate(model, ids, mask, sampling=sampling, weight_dtype=args.weight_dtype,
                           kv_dtype=args.kv_dtype, activation_dtype=args.activation_dtype)
            new = [seq[ids.shape[1]:][keep.bool()] for seq, keep in zip(out.sequences, out.response_mask)]
        else:
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, **hf_kwargs)
            new = list(out[:, ids.shape[1]:])
        tokens += sum(len(n) for n in new)
        texts += [tokenizer.decode(n.tolist(), skip_special_tokens=True).strip() for n in new]
    return texts, tokens


def run_text(args: argparse.Namespace) -> int:
    """`hybrid-engine generate` with text prompts: prints each prompt's completion."""
    if not args.model:
        raise ValueError("--prompt and --prompts-file need --model DIR (a saved causal LM with its tokenizer); "
                         "the presets have random weights and no tokenizer")
    if args.compare_hf or args.show:
        raise ValueError("--compare-hf and --show belong to the benchmark on random prompts, not to --prompt")
    prompts = read_prompts(args)
    model, tokenizer = load_chat_model(args.model, args.tokenizer)
    t0 = time.perf_counter()
    completions, tokens = complete(model, tokenizer, prompts, args)
    seconds = time.perf_counter() - t0
    for prompt, completion in zip(prompts, completions):
        if args.jsonl:
            print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False))
        else:
            print(f"> {prompt}\n{completion or '(an empty completion)'}\n")
    print(f"{len(prompts)} prompts, {tokens} tokens generated in {seconds:.2f} s ({tokens / seconds:.1f} tokens/s)",
          file=sys.stderr)
    return 0
