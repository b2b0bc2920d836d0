"""`hybrid-engine chat`: talk to a saved causal LM, once (--prompt) or line by line from stdin.

The prompt is formatted as the trainers format it (tokens.format_prompt: the tokenizer's chat template when
it has one). With a template the conversation's messages are kept across turns, the oldest exchanges
dropped when they no longer fit the model's positions; without one every line is its own prompt.
Generation is hybrid_engine.generate for the architectures it supports, else the model's own HF generate.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import transformers

from hybrid_engine.commands.model_dirs import check_model_dir, has_tokenizer, load_tokenizer
from hybrid_engine.engine.hf_path import fast_path_reason, warn_hf_path
from hybrid_engine.generation import SamplingParams, generate
from hybrid_engine.rlhf.preflight import max_positions
from hybrid_engine.rlhf.tokens import TokenConfig, TokenStats, fit_prompt, format_prompt

QUIT = ("exit", "quit")
"""Lines that end the interactive loop (as does end of input)."""


def add_chat_command(subparsers) -> None:
    """Registers `chat` on the `hybrid-engine` command's subparsers."""
    p = subparsers.add_parser("chat", help="chat with a saved causal LM (one --prompt, or lines from stdin)",
                              description="Answer a prompt, or each line of stdin until EOF or 'exit'/'quit', "
                              "with a saved Hugging Face causal LM (e.g. the output of `hybrid-engine sft`).")
    p.add_argument("--model", metavar="DIR", required=True, help="a saved Hugging Face causal LM (save_pretrained)")
    p.add_argument("--tokenizer", metavar="DIR", help="a saved tokenizer (default: the --model directory's)")
    p.add_argument("--prompt", metavar="TEXT", help="answer this once and exit (default: read prompts from stdin)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="the most tokens of an answer "
                   "(default: 64)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", dest="sample", action="store_false", help="take the most likely token (default)")
    mode.add_argument("--sample", dest="sample", action="store_true", help="sample from the model's distribution")
    p.set_defaults(sample=False, func=run_chat)
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature, with "
                   "--sample (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="with --sample, keep the K most likely tokens "
                   "(default: 0, all)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="with --sample, keep the smallest set of "
                   "tokens with this probability mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling (default: 0)")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True, help="format prompts "
                   "with the tokenizer's chat template when it has one, as training did unless it was given "
                   "--no-use-chat-template (default: on)")


def load_chat_model(model_dir: str, tokenizer_dir: str | None = None):
    """(the causal LM saved in model_dir, in eval mode, its tokenizer from tokenizer_dir or model_dir)."""
    path = check_model_dir(model_dir)
    if tokenizer_dir is None and not has_tokenizer(path):
        raise ValueError(f"--model {model_dir}: no tokenizer saved there; give --tokenizer DIR")
    tokenizer = load_tokenizer(tokenizer_dir or path, flag="--tokenizer" if tokenizer_dir else "--model")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    reason = fast_path_reason(model.config)
    if reason is not None:
        warn_hf_path(model.config, reason, stacklevel=2)
    return model, tokenizer


def fast_path(model) -> bool:
    """Whether hybrid_engine.generate serves `model` (else HF's generate does: load_chat_model warned why)."""
    return fast_path_reason(model.config) is None


def prompt_room(model, max_new_tokens: int) -> int | None:
    """The most prompt tokens that leave room for max_new_tokens (None: the model does not say)."""
    limit = max_positions(model.config)
    if limit is not None and max_new_tokens >= limit:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt: the model takes "
                         f"{limit} tokens in all")
    return None if limit is None else limit - max_new_tokens


def templated(tokenizer, use_chat_template: bool = True) -> bool:
    """Whether prompts go through the tokenizer's chat template (and conversations keep their history)."""
    return use_chat_template and bool(getattr(tokenizer, "chat_template", None))


def encode_conversation(tokenizer, messages: list[dict[str, str]], use_chat_template: bool = True) -> list[int]:
    """The tokens the model continues: the chat-templated conversation with the generation prompt, or the last
    message formatted alone (tokens.format_prompt) without a template."""
    chat = templated(tokenizer, use_chat_template)
    if chat and len(messages) > 1:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = format_prompt(tokenizer, messages[-1]["content"], use_chat_template)
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


def fit_conversation(tokenizer, messages: list[dict[str, str]], room: int | None,
                     use_chat_template: bool = True) -> list[int]:
    """The conversation's tokens within `room`: the oldest exchanges dropped first, then the last prompt cut on
    the left (keeping a leading BOS) as the trainers cut an over-long prompt."""
    ids = encode_conversation(tokenizer, messages, use_chat_template)
    while room is not None and len(ids) > room and len(messages) > 2:
        messages = messages[2:]  # drop the oldest user message and its answer
        ids = encode_conversation(tokenizer, messages, use_chat_template)
    if room is not None and len(ids) > room:
        bounds = TokenConfig(max_prompt_len=room, max_seq_len=room + 1)
        ids = fit_prompt(ids, bounds, tokenizer.bos_token_id, TokenStats())
        print(f"(the prompt is cut to its last {room} tokens to leave room for the answer)", file=sys.stderr)
    return ids


def responder(model, tokenizer, args: argparse.Namespace) -> Callable[[list[dict[str, str]]], str]:
    """A function from the conversation so far to the model's decoded answer (special tokens skipped)."""
    room = prompt_room(model, args.max_new_tokens)
    sampling, hf_kwargs = sampling_settings(args, tokenizer)

    def respond(messages: list[dict[str, str]]) -> str:
        ids = fit_conversation(tokenizer, messages, room, args.chat_template)
        input_ids = torch.tensor([ids])
        if fast_path(model):
            out = generate(model, input_ids, sampling=sampling)
            new = out.sequences[0, len(ids):][out.response_mask[0].bool()]
        else:
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **hf_kwargs)
            new = out[0, len(ids):]
        return tokenizer.decode(new.tolist(), skip_special_tokens=True).strip()

    return respond


def sampling_settings(args: argparse.Namespace, tokenizer) -> tuple[SamplingParams, dict]:
    """(the SamplingParams of --max-new-tokens, --sample, --temperature, --top-k, --top-p and --seed for
    hybrid_engine.generate, the same as keyword arguments of HF's generate). Seeds torch's global RNG, which HF's
    generate samples from. The eos and pad ids are the tokenizer's; those it lacks are left to the model's
    generation_config, which both generates read when a call gives none (an explicit None would mean none)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    special = {name: value for name, value in (("eos_token_id", eos), ("pad_token_id", pad)) if value is not None}
    choice = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) \
        if args.sample else dict(do_sample=False)
    generator = torch.Generator().manual_seed(args.seed) if args.sample else None
    torch.manual_seed(args.seed)
    sampling = SamplingParams(**choice, max_new_tokens=args.max_new_tokens, generator=generator, **special)
    return sampling, dict(max_new_tokens=args.max_new_tokens, **special, **choice)


def read_line(stream) -> tuple[str, bool]:
    """The next line of `stream` ("" at its end), and whether it held bytes that its encoding cannot decode (a
    non-UTF-8 byte typed into a UTF-8 terminal): those are read as U+FFFD (errors="replace"), never a crash. A
    text stream without a binary buffer beneath it (io.StringIO) holds text already and is read as it is."""
    binary = getattr(stream, "buffer", None)
    if binary is None:
        return stream.readline(), False
    raw = binary.readline()
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        return raw.decode(encoding), False
    except UnicodeDecodeError:
        return raw.decode(encoding, errors="replace"), True


def chat_loop(respond: Callable[[list[dict[str, str]]], str], keep_history: bool, stream=None) -> int:
    """Answers each non-empty line of `stream` (stdin) until its end or a line in QUIT; the conversation's
    messages carry across turns when keep_history. Undecodable input bytes become U+FFFD, said once on stderr."""
    stream = stream or sys.stdin
    interactive = stream.isatty()
    messages: list[dict[str, str]] = []
    said = False
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line, replaced = read_line(stream)
        if replaced and not said:
            said = True
            print(f"(the input holds bytes that are not valid {getattr(stream, 'encoding', None) or 'utf-8'}: they "
                  "are read as U+FFFD, the replacement character; this note is shown once)", file=sys.stderr)
        if not line or line.strip().lower() in QUIT:
            return 0
        if not line.strip():
            continue
        messages = (messages if keep_history else []) + [{"role": "user", "content": line.strip()}]
        answer = respond(messages)
        messages.append({"role": "assistant", "content": answer})
        print(answer or "(an empty answer)", flush=True)


def run_chat(args: argparse.Namespace) -> int:
    """`hybrid-engine chat`."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer = load_chat_model(args.model, args.tokenizer)
    respond = responder(model, tokenizer, args)
    if args.prompt is not None:
        answer = respond([{"role": "user", "content": args.prompt}])
        print(answer or "(an empty answer)")
        return 0
    return chat_loop(respond, keep_history=templated(tokenizer, args.chat_template))
