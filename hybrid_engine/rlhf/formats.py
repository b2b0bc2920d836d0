"""TRL's dataset formats, read into the columns the steps train on.

A file's format is told from its columns, once per file; a text is a string (TRL's standard form) or a list of
messages {"role", "content"} (its conversational form):

    format                       columns                              sft              reward   ppo
    prompt-completion            prompt, completion (or response)     yes              -        prompt
    language modeling, chat      messages                             yes              -        prompt
    preference                   prompt, chosen, rejected             prompt, chosen   yes      prompt
    implicit-prompt preference   chosen, rejected                     prompt, chosen   yes      prompt
    prompt-only                  prompt                               -                -        yes

A conversational prompt keeps its system turns and history, and is rendered by the tokenizer's chat template
(tokens.format_prompt). `messages` is a prompt (every turn before the last) and a response (the last turn, the
assistant's). A conversational completion, chosen or rejected is one assistant message, whose content is the
response. An implicit prompt is the longest common start of chosen and rejected: whole messages, or text up to the
first difference (less a space just before it, which starts the completions), as TRL's extract_prompt takes it.

Out: sft prompt, response; reward prompt, chosen, rejected; ppo prompt, then the file's other columns. The prompt
is a string or a list of messages; the others are strings. Every row is checked on the way, and a bad one is named
by file, row and field.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
CONVERTED = ("messages", "completion")
"""Columns that only a conversion reads (a file with one is converted even when its texts are strings)."""


def is_messages(value: Any) -> bool:
    """Whether `value` is in TRL's conversational form: a list of messages (dicts)."""
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def needs_conversion(columns: Sequence[str], first: dict, step: str) -> bool:
    """Whether a file with `columns` (and `first`, a row holding its texts) is other than plain prompt and response
    (or chosen) strings: conversational texts, a messages or completion column, or an implicit prompt."""
    texts = [c for c in ("prompt", "response", "chosen", "rejected") if c in columns]
    implicit = "prompt" not in columns and {"chosen", "rejected"} <= set(columns)
    plain_sft = step == "sft" and "response" in columns  # completion beside response: response is read
    return (implicit or any(is_messages(first.get(c)) for c in texts)
            or any(c in columns for c in CONVERTED) and not plain_sft)


def _messages(value: Any, where: str) -> list[dict]:
    """`value` checked as a non-empty list of messages, each with a role of ROLES and string content."""
    if not is_messages(value) or not value:
        raise ValueError(f"{where} must be a non-empty list of messages {{'role', 'content'}}, got {value!r:.60}")
    out = []
    for i, message in enumerate(value):
        extra = set(message) - {"role", "content"}
        if extra:
            raise ValueError(f"{where}, message {i + 1}: only 'role' and 'content' are read, it also has "
                             f"{sorted(extra)} (tool calls are not supported)")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(f"{where}, message {i + 1}: needs a role of {ROLES} and string content, "
                             f"got {message!r:.80}")
        out.append({"role": role, "content": content})
    return out


def _text(value: Any, where: str) -> str:
    """A non-empty string, or one assistant message's content (a conversational completion)."""
    if isinstance(value, list):
        messages = _messages(value, where)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise ValueError(f"{where} must be one assistant message, got {len(messages)} messages "
                             f"({', '.join(m['role'] for m in messages)})")
        value = messages[0]["content"]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} must be a non-empty string or one assistant message, got {value!r:.60}")
    return value


def _prompt(value: Any, where: str) -> str | list[dict]:
    if isinstance(value, list):
        messages = _messages(value, where)
        if messages[-1]["role"] == "assistant":
            raise ValueError(f"{where}: a prompt ends with a user or system turn, not the assistant's")
        return messages
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} must be a non-empty string or a list of messages, got {value!r:.60}")
    return value


def _split_messages(row: dict, where: str) -> tuple[list[dict], str]:
    messages = _messages(row.get("messages"), f"{where}: field 'messages'")
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: field 'messages' must end with an assistant turn after the prompt's")
    return _prompt(messages[:-1], f"{where}: field 'messages'"), messages[-1]["content"]


def _implicit(row: dict, where: str) -> tuple[Any, str, str]:
    """(prompt, chosen, rejected) of a row whose chosen and rejected start with their prompt."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if is_messages(chosen) and is_messages(rejected):
        chosen, rejected = _messages(chosen, f"{where}: field 'chosen'"), _messages(rejected, f"{where}: field "
                                                                                              "'rejected'")
        n = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)))
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    elif isinstance(chosen, str) and isinstance(rejected, str):
        n = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)))
        if n and chosen[n - 1] == " ":  # a space just before the difference starts the completions
            n -= 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
        raise ValueError(f"{where}: 'chosen' and 'rejected' must both be strings or both lists of messages")
    if not prompt:
        raise ValueError(f"{where}: 'chosen' and 'rejected' share no prompt at their start (give a 'prompt' column)")
    return (_prompt(prompt, f"{where}: the shared start of 'chosen' and 'rejected'"),
            _text(chosen, f"{where}: field 'chosen' after the prompt"),
            _text(rejected, f"{where}: field 'rejected' after the prompt"))


def _row(row: Any, step: str, where: str) -> dict:
    """One row in the step's columns (FIELDS[step]; PPO keeps the others after them)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: not a JSON object but {type(row).__name__}")
    if "messages" in row and "prompt" not in row:
        prompt, response = _split_messages(row, where)
        texts = {"chosen": response}
    elif "prompt" not in row:
        prompt, chosen, rejected = _implicit(row, where)
        texts = {"chosen": chosen, "rejected": rejected}
    else:
        prompt = _prompt(row.get("prompt"), f"{where}: field 'prompt'")
        texts = {}
    if step == "ppo":
        return {"prompt": prompt, **{k: v for k, v in row.items() if k not in ("prompt", "messages")}}
    if step == "sft":
        name = next((n for n in ("response", "completion", "chosen") if n in row or n in texts), "completion")
        value = texts[name] if name in texts else _text(row.get(name), f"{where}: field {name!r}")
        return {"prompt": prompt, "response": value}
    return {"prompt": prompt, **{name: texts[name] if name in texts else _text(row.get(name), f"{where}: field "
                                                                                              f"{name!r}")
                                 for name in ("chosen", "rejected")}}


def convert(path: str | Path, rows: Sequence[tuple[int, Any]], step: str) -> list[tuple[int, dict]]:
    """Every (row number, row) of file `path` (or a data set's name) in the step's columns; a ValueError naming the
    file, row and field of the first bad row."""
    return [(number, _row(row, step, f"{path}, row {number}")) for number, row in rows]
