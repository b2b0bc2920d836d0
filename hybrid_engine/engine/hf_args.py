"""Reading a Hugging Face `generate()` call the way the installed transformers does, and deciding whether
hybrid_engine's generation loop computes exactly what it asks for.

The generation config is resolved by transformers' own `GenerationMixin._prepare_generation_config` (the
call's `generation_config` and kwargs over the model's `generation_config` over the global defaults) and
`_prepare_generated_length` (max_new_tokens / max_length / the default 20 new tokens). Every resolved
setting outside the few the fast path implements must hold its neutral value; anything else raises
`Fallback`, whose message names the reason. Bad input raises ValueError naming the argument.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from numbers import Integral

import torch
import transformers
from transformers.generation.utils import GenerationMixin

from hybrid_engine.generation.checks import check_fits, check_prompts
from hybrid_engine.generation.sampling import SamplingParams
from hybrid_engine.model.spec import ModelSpec


class Fallback(Exception):
    """This call is Hugging Face's to serve. str(): the reason; key: what a warning is issued once for."""

    def __init__(self, reason: str, key: str | None = None):
        super().__init__(reason)
        self.key = key or reason


@dataclass
class Request:
    """One generate() call, resolved, that the fast path serves exactly."""

    input_ids: torch.Tensor  # [B, T] int, left-padded
    attention_mask: torch.Tensor  # [B, T] int64 0/1
    sampling: SamplingParams  # without a generator: the patch samples from its own
    return_dict: bool
    output_scores: bool
    output_logits: bool

    @property
    def wants_logits(self) -> bool:
        return self.return_dict and (self.output_scores or self.output_logits)


_SIGNATURE = inspect.signature(GenerationMixin.generate)
# generate()'s own parameters that change the decoding; None (or an empty list) is the only value served.
_CALL_ONLY = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model", "streamer",
              "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate")
# Resolved settings the fast path implements (checked below) or that cannot change its answer.
_SERVED = {"max_length", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
           "pad_token_id", "bos_token_id", "decoder_start_token_id", "return_dict_in_generate", "output_scores",
           "output_logits", "use_cache", "cache_implementation", "compile_config", "disable_compile",
           "transformers_version"}
# Settings read only by beam search, assisted decoding, static or paged caches: inert in greedy/sampling.
_INERT = {"early_stopping", "length_penalty", "num_assistant_tokens", "num_assistant_tokens_schedule",
          "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind", "max_cache_len",
          "continuous_batching_config"}
# Warpers HF applies only when sampling.
_SAMPLING_ONLY = {"min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff"}
_CACHES = (None, "dynamic", "static")


@functools.cache
def _neutral() -> dict:
    """The resolved settings of a call that asks for nothing: GenerationConfig() over the global defaults."""
    config = transformers.GenerationConfig()
    config.update(**config._get_default_generation_params(), defaults_only=True)
    return {k: v for k, v in config.__dict__.items() if not k.startswith("_")}


def _is_neutral(value, neutral) -> bool:
    if value is None or value is neutral:
        return True
    if isinstance(value, torch.Tensor) or isinstance(neutral, torch.Tensor):
        return False
    return value == neutral or (neutral is None and value is False)


def unserved_setting(config: transformers.GenerationConfig) -> str | None:
    """The first resolved setting the fast path does not implement, as "name=value", or None."""
    neutral = _neutral()
    ignored = _SERVED | _INERT | (set() if config.do_sample else _SAMPLING_ONLY)
    for name, value in config.__dict__.items():
        if name.startswith("_") or name in ignored:
            continue
        if name not in neutral:
            return f"custom generation setting {name}={value!r}"
        if not _is_neutral(value, neutral[name]):
            return f"{name}={value!r}"
    if config.cache_implementation not in _CACHES:
        return f"cache_implementation={config.cache_implementation!r}"
    return None


def _token_ids(value) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return [value] if isinstance(value, Integral) else list(value)


def _pad_id(value) -> int | None:
    return int(value) if isinstance(value, torch.Tensor) else value


def _hf_pad_eos(config) -> tuple[int | None, list[int] | None]:
    """(pad, eos) as HF's _prepare_special_tokens makes them: pad defaults to the first eos id."""
    eos, pad = _token_ids(config.eos_token_id), _pad_id(config.pad_token_id)
    return (eos[0] if pad is None and eos else pad), eos


def _special_tokens(config, vocab_size: int) -> tuple[list[int] | None, int | None]:
    """(eos ids, pad id) for generate_with. An eos id outside the vocabulary is never generated, so HF never
    stops on it (it warns about negative ones): it is dropped. pad matters only when some eos id can fire."""
    pad, eos = _hf_pad_eos(config)
    eos = [e for e in eos or [] if not (isinstance(e, Integral) and not 0 <= e < vocab_size)]
    if not eos:
        return None, None
    if isinstance(pad, Integral) and not 0 <= pad < vocab_size:
        raise Fallback(f"pad_token_id={pad} outside the vocabulary [0, {vocab_size})", "pad_token_id")
    return eos, pad


def _bind(args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """(generate()'s named parameters, its **kwargs), as transformers' generate binds the call."""
    try:
        bound = _SIGNATURE.bind(None, *args, **kwargs)
    except TypeError as e:
        raise Fallback(f"arguments generate() does not bind ({e})", "arguments") from None
    named = {k: v for k, v in bound.arguments.items() if k not in ("self", "kwargs")}
    return named, dict(bound.arguments.get("kwargs", {}))


def _check_call_only(named: dict, kwargs: dict) -> None:
    for name in _CALL_ONLY:
        value = named.get(name)
        if value is not None and not (isinstance(value, list) and len(value) == 0):
            raise Fallback(f"{name} given", name)
    for name in ("tokenizer", "trust_remote_code"):  # read only for stop strings / custom_generate
        kwargs.pop(name, None)
    if kwargs.pop("assistant_tokenizer", None) is not None:
        raise Fallback("assistant_tokenizer given", "assistant_tokenizer")


def _model_inputs(named: dict, model_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids, attention_mask) from what _prepare_generation_config left over; any other input falls back."""
    input_ids, inputs = model_kwargs.pop("input_ids", None), named.get("inputs")
    if input_ids is not None and inputs is not None:
        raise ValueError("pass the prompts as inputs or as input_ids, not both")
    input_ids = inputs if input_ids is None else input_ids
    attention_mask = model_kwargs.pop("attention_mask", None)
    others = sorted(k for k, v in model_kwargs.items() if v is not None)
    if others:
        raise Fallback(f"model inputs {others}", f"model inputs {others}")
    if input_ids is None:
        raise Fallback("no input_ids (HF starts from bos_token_id)", "no input_ids")
    if isinstance(input_ids, torch.Tensor) and input_ids.device.type != "cpu":
        raise Fallback(f"input_ids on {input_ids.device.type} (the fast path runs on the CPU)", "device")
    return input_ids, attention_mask


def _inferred_mask(input_ids: torch.Tensor, pad, eos: list[int] | None) -> torch.Tensor:
    """The mask HF's generate builds without one: not-pad where pad occurs and is no eos, else all ones."""
    if isinstance(pad, Integral) and bool((input_ids == pad).any()) and (eos is None or pad not in eos):
        return (input_ids != pad).long()
    return torch.ones_like(input_ids, dtype=torch.long)


def _left_padded_prompts(input_ids, attention_mask, pad, eos, vocab_size: int) -> torch.Tensor:
    """The batch's attention mask, checked; a batch that is not left-padded falls back (HF serves it)."""
    if attention_mask is None:
        attention_mask = _inferred_mask(input_ids, pad, eos)
    if (isinstance(attention_mask, torch.Tensor) and attention_mask.shape == input_ids.shape
            and not attention_mask.dtype.is_floating_point and not attention_mask.dtype.is_complex):
        mask = attention_mask.long()
        if bool(((mask == 0) | (mask == 1)).all()) and bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise Fallback("a batch that is not left-padded", "padding")
    check_prompts(input_ids, attention_mask, vocab_size)
    return attention_mask.long()


def _max_new_tokens(hf, config, user_config, kwargs: dict, input_ids: torch.Tensor) -> int:
    """max_length - T after transformers' own _prepare_generated_length (T: the padded prompt length)."""
    has_default_max = (kwargs.get("max_length") is None and (user_config is None or user_config.max_length is None)
                       and hf.generation_config.max_length is None)
    has_default_min = (kwargs.get("min_length") is None and (user_config is None or user_config.min_length is None)
                       and hf.generation_config.min_length is None)
    T = input_ids.shape[1]
    config = hf._prepare_generated_length(generation_config=config, has_default_max_length=has_default_max,
                                          has_default_min_length=has_default_min, model_input_name="input_ids",
                                          input_ids_length=T, inputs_tensor=input_ids)
    n = config.max_length - T
    if n < 1 and config.max_new_tokens is None:
        raise ValueError(f"max_length={config.max_length} leaves no new tokens after a prompt of {T} (set "
                         "max_new_tokens)")
    return n


def _sampling(config, max_new_tokens: int, eos: list[int] | None, pad: int | None) -> SamplingParams:
    """The call's sampling settings; greedy ignores temperature, top-k and top-p (HF builds warpers only to
    sample)."""
    if not config.do_sample:
        return SamplingParams(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    return SamplingParams(do_sample=True, temperature=1.0 if config.temperature is None else config.temperature,
                          top_k=config.top_k or 0, top_p=1.0 if config.top_p is None else config.top_p,
                          max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)


def resolve(hf, spec: ModelSpec, args: tuple, kwargs: dict) -> Request:
    """The Request of `hf.generate(*args, **kwargs)` (hf: the HF causal LM), or Fallback, or ValueError."""
    named, kwargs = _bind(args, kwargs)
    _check_call_only(named, kwargs)
    user_config = named.get("generation_config")
    config, model_kwargs = hf._prepare_generation_config(user_config, **kwargs)
    input_ids, attention_mask = _model_inputs(named, model_kwargs)
    unserved = unserved_setting(config)
    if unserved is not None:
        raise Fallback(unserved)
    eos, pad = _special_tokens(config, spec.vocab_size)
    check_prompts(input_ids, None, spec.vocab_size)  # the ids themselves
    max_new = _max_new_tokens(hf, config, user_config, kwargs, input_ids)
    sampling = _sampling(config, max_new, eos, pad)
    sampling.check_vocab(spec.vocab_size)
    attention_mask = _left_padded_prompts(input_ids, attention_mask, *_hf_pad_eos(config), spec.vocab_size)
    try:
        check_fits(spec, int(attention_mask.sum(1).max()), max_new)
    except ValueError as e:
        raise Fallback(str(e), "length") from None
    request = Request(input_ids, attention_mask, sampling,
                      bool(config.return_dict_in_generate), bool(config.output_scores), bool(config.output_logits))
    if request.wants_logits and eos and input_ids.shape[0] > 1:
        raise Fallback("output_scores/output_logits with an eos id on a batch of several rows (HF keeps scoring "
                       "the pad tokens of finished rows)", "scores")
    return request
