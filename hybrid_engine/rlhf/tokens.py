"""Token rows of the three RLHF steps and their padded batches.

A prompt is formatted once, the same way for every step: through the tokenizer's chat template as
one user message with the generation prompt (when the tokenizer has a template and the config asks
for it), else as the raw text with the tokenizer's own special tokens. A conversational prompt (a list
of messages, formats.py) goes through the chat template whole, its system turns and history kept.
A response is its tokens plus EOS, appended to the prompt's tokens, so the boundary between the two is exact.

Lengths are bounded, and every change is counted in TokenStats so the trainer can log it:
- a prompt longer than `max_prompt_len` is truncated on the left (its end, next to the response, is
  kept, and so is a leading BOS) or its row dropped, as `over_long` says;
- a response that would take the row past `max_seq_len` is cut at the end (losing its EOS).
Nothing else is removed: `kept == rows - prompts_dropped`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
"""The label of a token that carries no loss (prompt and padding), as torch's cross_entropy skips."""


@dataclass
class TokenConfig:
    """How rows become tokens (the defaults are DeepSpeed-Chat's lengths)."""

    max_prompt_len: int = 256
    """The most prompt tokens kept (DeepSpeed-Chat's max_prompt_seq_len)."""
    max_seq_len: int = 512
    """The most prompt + response tokens of an SFT or reward row (DeepSpeed-Chat's max_seq_len)."""
    over_long: str = "truncate"
    """A longer prompt is "truncate"d on the left (keeping its end) or its row is "drop"ped."""
    use_chat_template: bool = True
    """Format prompts with the tokenizer's chat template, when it has one."""

    def __post_init__(self):
        if self.over_long not in ("truncate", "drop"):
            raise ValueError(f"over_long must be 'truncate' or 'drop', got {self.over_long!r}")
        if not 0 < self.max_prompt_len < self.max_seq_len:
            raise ValueError(f"need 0 < max_prompt_len ({self.max_prompt_len}) < max_seq_len ({self.max_seq_len})")


@dataclass
class TokenStats:
    """What tokenizing one step's rows changed."""

    rows: int = 0
    """Rows in."""
    kept: int = 0
    """Rows out (rows - prompts_dropped)."""
    prompts_truncated: int = 0
    """Prompts cut on the left to max_prompt_len."""
    prompts_dropped: int = 0
    """Rows dropped for a prompt over max_prompt_len (over_long="drop")."""
    responses_truncated: int = 0
    """Responses cut at the end to fit max_seq_len (a reward row's chosen and rejected count apart)."""


def _column(rows, name: str) -> list[str]:
    # A datasets.Dataset or a sequence of mappings.
    return list(rows[name]) if hasattr(rows, "column_names") else [row[name] for row in rows]


def format_prompt(tokenizer, prompt: str | list[dict], use_chat_template: bool = True) -> str:
    """The text the model sees before its response."""
    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, list) and not templated:
        raise ValueError("a conversational prompt (a list of messages) is rendered by the tokenizer's chat template: "
                         + ("use_chat_template is off" if not use_chat_template else "this tokenizer has none"))
    if templated:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def encode_prompts(tokenizer, prompts: Sequence[str | list[dict]], use_chat_template: bool = True
                   ) -> list[list[int]]:
    """Each prompt's tokens, formatted by `format_prompt`, not yet bounded."""
    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    texts = [format_prompt(tokenizer, p, use_chat_template) for p in prompts]
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=not templated)["input_ids"]


def encode_responses(tokenizer, responses: Sequence[str]) -> list[list[int]]:
    """Each response's tokens followed by EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: a response could never end")
    if not responses:
        return []
    ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    return [r + [tokenizer.eos_token_id] for r in ids]


def fit_prompt(ids: list[int], config: TokenConfig, bos_id: int | None, stats: TokenStats) -> list[int] | None:
    """`ids` bounded to config.max_prompt_len: itself, its end (after any BOS), or None to drop it."""
    limit = config.max_prompt_len
    if len(ids) <= limit:
        return ids
    if config.over_long == "drop":
        stats.prompts_dropped += 1
        return None
    stats.prompts_truncated += 1
    if bos_id is not None and ids[0] == bos_id and limit > 1:
        return ids[:1] + ids[len(ids) - limit + 1:]
    return ids[len(ids) - limit:]


def fit_response(prompt_len: int, ids: list[int], config: TokenConfig, stats: TokenStats) -> list[int]:
    """`ids` cut at the end so that prompt + response fit config.max_seq_len."""
    room = config.max_seq_len - prompt_len
    if len(ids) <= room:
        return ids
    stats.responses_truncated += 1
    return ids[:room]


def _prompts(rows, tokenizer, config: TokenConfig, stats: TokenStats) -> list[list[int] | None]:
    prompts = _column(rows, "prompt")
    stats.rows = len(prompts)
    encoded = encode_prompts(tokenizer, prompts, config.use_chat_template)
    fitted = [fit_prompt(ids, config, tokenizer.bos_token_id, stats) for ids in encoded]
    stats.kept = sum(ids is not None for ids in fitted)
    return fitted


def tokenize_sft(rows, tokenizer, config: TokenConfig) -> tuple[list[dict[str, list[int]]], TokenStats]:
    """SFT rows (prompt, response) -> [{"input_ids", "labels", "row"}]: labels are IGNORE_INDEX on the prompt; row is
    the index of the example's row in `rows` (rows whose prompt was dropped leave gaps)."""
    stats = TokenStats()
    prompts = _prompts(rows, tokenizer, config, stats)
    out = []
    for i, (p, r) in enumerate(zip(prompts, encode_responses(tokenizer, _column(rows, "response")))):
        if p is not None:
            r = fit_response(len(p), r, config, stats)
            out.append({"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r, "row": i})
    return out, stats


def tokenize_reward(rows, tokenizer, config: TokenConfig) -> tuple[list[dict[str, list[int]]], TokenStats]:
    """Reward rows (prompt, chosen, rejected) -> [{"chosen_input_ids", "rejected_input_ids", "row"}] (row: as
    tokenize_sft's)."""
    stats = TokenStats()
    prompts = _prompts(rows, tokenizer, config, stats)
    chosen = encode_responses(tokenizer, _column(rows, "chosen"))
    rejected = encode_responses(tokenizer, _column(rows, "rejected"))
    out = []
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        if p is not None:
            out.append({"chosen_input_ids": p + fit_response(len(p), c, config, stats),
                        "rejected_input_ids": p + fit_response(len(p), r, config, stats), "row": i})
    return out, stats


def tokenize_ppo(rows, tokenizer, config: TokenConfig) -> tuple[list[dict], TokenStats]:
    """PPO rows (prompt) -> [{"input_ids", "row"}]: the formatted prompt the policy continues, and the index
    of its row in `rows` (rows whose prompt was dropped leave gaps), where a reward function finds its fields."""
    stats = TokenStats()
    fitted = _prompts(rows, tokenizer, config, stats)
    return [{"input_ids": p, "row": i} for i, p in enumerate(fitted) if p is not None], stats


# -- batches ----------------------------------------------------------------------------------------


def pad(seqs: Sequence[Sequence[int]], value: int, left: bool = False, length: int | None = None) -> torch.Tensor:
    """(B, T) int64 of `seqs` padded with `value` on the right (or left) to `length` or the longest."""
    width = max((len(s) for s in seqs), default=0) if length is None else length
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) > width:
            raise ValueError(f"row {i} has {len(s)} tokens, more than the batch width {width}")
        start = width - len(s) if left else 0
        out[i, start:start + len(s)] = torch.tensor(list(s), dtype=torch.long)
    return out


def _mask(seqs: Sequence[Sequence[int]], width: int, left: bool = False) -> torch.Tensor:
    return pad([[1] * len(s) for s in seqs], 0, left=left, length=width)


def collate_sft(examples: Sequence[Mapping[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (B, T); labels are IGNORE_INDEX on padding."""
    ids = [e["input_ids"] for e in examples]
    input_ids = pad(ids, pad_id)
    return {"input_ids": input_ids, "attention_mask": _mask(ids, input_ids.shape[1]),
            "labels": pad([e["labels"] for e in examples], IGNORE_INDEX)}


def collate_reward(examples: Sequence[Mapping[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected rows (B, T), right-padded to one T so the trainer can stack them."""
    chosen = [e["chosen_input_ids"] for e in examples]
    rejected = [e["rejected_input_ids"] for e in examples]
    width = max((len(s) for s in chosen + rejected), default=0)
    return {"chosen_input_ids": pad(chosen, pad_id, length=width), "chosen_attention_mask": _mask(chosen, width),
            "rejected_input_ids": pad(rejected, pad_id, length=width),
            "rejected_attention_mask": _mask(rejected, width)}


def collate_ppo(examples: Sequence[Mapping[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt input_ids and attention_mask (B, T): every prompt ends at the last column."""
    ids = [e["input_ids"] for e in examples]
    input_ids = pad(ids, pad_id, left=True)
    return {"input_ids": input_ids, "attention_mask": _mask(ids, input_ids.shape[1], left=True)}
