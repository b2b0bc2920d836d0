"""Choosing the next token from logits: greedy, temperature, top-k and top-p, in Hugging Face's order
(temperature, then top-k, then top-p), reproducible under a seeded generator; and SamplingParams, everything a
generate() call takes besides the model, the prompts and the dtypes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import torch

from hybrid_engine.generation.checks import check_sampling, check_token_id, is_int


@dataclass(frozen=True)
class SamplingParams:
    """How generate() picks each token and when it stops. Checked when made (ValueError naming the setting);
    the eos and pad ids are checked against the model's vocabulary by check_vocab."""

    do_sample: bool = False
    """Sample from the filtered distribution; False: greedy (argmax)."""
    temperature: float = 1.0
    """Logits are divided by it; the returned log-probs are under the scaled distribution (greedy too)."""
    top_k: int = 0
    """Keep the k most likely tokens when sampling; 0: no top-k filter."""
    top_p: float = 1.0
    """Keep the smallest set of tokens with this much probability when sampling; 1.0: no nucleus filter."""
    max_new_tokens: int = 32
    """The most tokens generated per prompt."""
    eos_token_id: int | Sequence[int] | None = None
    """A sequence stops at any of these ids (the eos token is kept, with its log-prob). None: unset, so generate()
    and HybridEngine.generate take the model's generation_config.eos_token_id, as Hugging Face's generate does
    (generate_with, which has no HF model, stops on none); [] or a keyword eos_token_id=None: none stops early."""
    pad_token_id: int | None = None
    """Fills a finished sequence's remaining positions. None: unset, so generate() and HybridEngine.generate take
    the model's generation_config.pad_token_id when some eos id is in play; then (or without a model) the first
    eos id, else 0."""
    seed: int | None = None
    """Sample from a fresh generator seeded with it (seed and generator together are refused)."""
    generator: torch.Generator | None = None
    """Sample from this generator, advancing it; None with no seed: torch's default generator."""

    def __post_init__(self):
        check_sampling(self.do_sample, self.temperature, self.top_k, self.top_p)
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        for name, value in self._token_ids():
            if not is_int(value):
                raise ValueError(f"{name} must be an int token id, got {value!r}")
        if self.seed is not None and self.generator is not None:
            raise ValueError("pass seed or generator, not both: seed=s is generator=torch.Generator().manual_seed(s)")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(self.generator).__name__}")

    @classmethod
    def of(cls, sampling: SamplingParams | None, overrides: dict, model_defaults: dict | None = None) -> SamplingParams:
        """`sampling` (None: the defaults) with the keyword arguments of a generate() call over it, as Hugging
        Face's generate reads a generation_config and its keyword arguments. model_defaults (model_token_ids: the
        model's own eos and pad ids) fill what neither gives: an eos or pad id left None in `sampling` and not
        given as a keyword (a keyword eos_token_id=None means none, as in HF's generate); the pad id only when some
        eos id is in play, since only then does it appear in the output."""
        if sampling is not None and not isinstance(sampling, cls):
            raise ValueError(f"sampling must be a SamplingParams or None, got {type(sampling).__name__} (the "
                             "sampling settings are keyword arguments: max_new_tokens=..., do_sample=...)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown generation arguments {unknown}; known: {sorted(known)}")
        params = dataclasses.replace(sampling or cls(), **overrides)
        unset = {name for name in ("eos_token_id", "pad_token_id")
                 if name not in overrides and getattr(params, name) is None}
        defaults = model_defaults or {}
        if "eos_token_id" in unset and defaults.get("eos_token_id") is not None:
            params = dataclasses.replace(params, eos_token_id=defaults["eos_token_id"])
        if "pad_token_id" in unset and defaults.get("pad_token_id") is not None and len(params.eos_ids):
            params = dataclasses.replace(params, pad_token_id=defaults["pad_token_id"])
        return params

    def _token_ids(self) -> list[tuple[str, object]]:
        eos = self.eos_token_id
        if eos is None:
            ids = []
        elif isinstance(eos, Sequence) and not isinstance(eos, str):
            ids = [(f"eos_token_id[{i}]", e) for i, e in enumerate(eos)]
        else:
            ids = [("eos_token_id", eos)]
        return ids + ([("pad_token_id", self.pad_token_id)] if self.pad_token_id is not None else [])

    def check_vocab(self, vocab_size: int) -> None:
        """The eos and pad ids are in the model's vocabulary [0, vocab_size)."""
        for name, value in self._token_ids():
            check_token_id(name, value, vocab_size)

    @property
    def pad_id(self) -> int:
        """What fills a finished sequence: pad_token_id, else the first eos id, else 0."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        eos = self.eos_ids
        return int(eos[0]) if len(eos) else 0

    def rng(self) -> torch.Generator | None:
        """Where samples come from: a fresh generator seeded with seed, else generator (None: torch's default)."""
        return torch.Generator().manual_seed(self.seed) if self.seed is not None else self.generator

    @property
    def eos_ids(self) -> torch.Tensor:
        """The eos ids as an int64 tensor (empty for none)."""
        eos = self.eos_token_id
        ids = [] if eos is None else [eos] if isinstance(eos, Integral) else list(eos)
        return torch.tensor([int(i) for i in ids], dtype=torch.long)


SamplingConfig = SamplingParams
"""The earlier name of SamplingParams (its first four fields, in the same order)."""


def _id_list(value) -> list[int]:
    """A generation_config's eos_token_id (None, an int, a list or a tensor of ints) as a list."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return [value] if isinstance(value, Integral) else list(value)


def model_token_ids(model: torch.nn.Module, vocab_size: int) -> dict:
    """The eos and pad ids Hugging Face's generate takes from `model`'s generation_config when a call names
    neither (transformers' _prepare_generation_config, then _prepare_special_tokens: eos an int or a list, a pad
    of None meaning the first eos id), for SamplingParams.of: {"eos_token_id": list or None, "pad_token_id": int or
    None}. An eos id outside [0, vocab_size) is never generated, so HF never stops on it: it is left out (GPT-2's
    50256 in a smaller vocabulary). {} for a model without a generation_config."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    eos = [e for e in _id_list(getattr(config, "eos_token_id", None)) if is_int(e) and 0 <= e < vocab_size]
    pad = getattr(config, "pad_token_id", None)
    pad = int(pad) if isinstance(pad, torch.Tensor) else pad
    return {"eos_token_id": eos or None, "pad_token_id": pad}


def filter_logits(logits: torch.Tensor, cfg: SamplingParams) -> torch.Tensor:
    """Scaled logits [B, V] with the tokens outside top-k / top-p set to -inf."""
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop the low tail whose mass is at most 1 - top_p; always keep the most likely token.
        drop_sorted = cumulative <= 1 - cfg.top_p
        drop_sorted[:, -1] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(
    logits: torch.Tensor, cfg: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B] int64, their log-probabilities [B] fp32 under the temperature-scaled distribution)."""
    logits = logits.float()
    # x / 1.0 is x: the division, a pass and a [B, V] tensor, is skipped at temperature 1.
    logprobs = torch.log_softmax(logits if cfg.temperature == 1.0 else logits / cfg.temperature, dim=-1)
    if cfg.do_sample:
        probs = filter_logits(logits, cfg).softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    else:
        tokens = logits.argmax(-1)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]
