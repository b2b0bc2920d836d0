"""The HF path: Hugging Face's own `generate` under SamplingParams' semantics, returning a GenerationOutput.

For a decoder-only family without a fast path (model.spec.spec_from_config refuses it), hybrid_engine.generate runs
transformers' generate on the model itself and the hybrid engine on a plain model (engine/plain.py), each warning
once with an HFPathWarning that names the family and why; both read the same output the fast path gives: the
sequences (prompt as given, then the new tokens, pad_token_id after each row's eos), the response mask (1 up to and
including the eos) and each new token's log-prob under the temperature-scaled distribution, from the raw logits
(`output_logits`), before top-k / top-p, as next_tokens computes them.

The call's settings are the only ones in play: the model's own generation_config (repetition penalties, a default
top_k of 50, suppressed tokens, ...) is set aside for a fresh one. HF samples from torch's global RNG: a call with a
seed or a generator runs under torch.random.fork_rng, the global RNG seeded from it, so the caller's global RNG is
left as it was (training after generation continues exactly as without it).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from transformers import GenerationConfig

from hybrid_engine.generation.checks import check_finite_logits, check_prompts
from hybrid_engine.generation.output import GenerationOutput
from hybrid_engine.generation.sampling import SamplingParams, model_token_ids
from hybrid_engine.model.dtypes import parse_activation_dtype, parse_kv_dtype, parse_weight_dtype
from hybrid_engine.model.spec import spec_from_config


class HFPathWarning(UserWarning):
    """A model generates through Hugging Face's generate (no fast path for it); the message names the family and
    why."""


def fast_path_reason(config) -> str | None:
    """Why the fast path cannot serve a model of `config` exactly (spec_from_config's error), or None."""
    try:
        spec_from_config(config)
    except ValueError as e:
        return str(e)
    return None


def warn_hf_path(config, reason: str, stacklevel: int = 3) -> None:
    warnings.warn(f"model_type {getattr(config, 'model_type', None)!r} generates through Hugging Face's generate "
                  f"(slower: no fused kernels, its own decode loop): {reason}", HFPathWarning, stacklevel=stacklevel)


def vocab_size(model: torch.nn.Module) -> int:
    """The rows of the model's LM head (what it can generate)."""
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


def hf_generation_config(params: SamplingParams) -> GenerationConfig:
    """The GenerationConfig of `params` alone: every setting that could change HF's choice of token is given."""
    eos = params.eos_ids.tolist()
    sample = params.do_sample  # greedy: HF's defaults, which it reads as no warper (and does not warn of)
    return GenerationConfig(
        do_sample=sample, temperature=params.temperature if sample else None, top_k=params.top_k if sample else None,
        top_p=params.top_p if sample else None, max_new_tokens=params.max_new_tokens, min_new_tokens=0, num_beams=1,
        repetition_penalty=1.0, eos_token_id=eos or None, pad_token_id=params.pad_id, bos_token_id=None,
        return_dict_in_generate=True, output_logits=True, output_scores=False)


def response_mask(new: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """int64 [B, n]: 1 for each generated token up to and including its row's first eos, 0 after; new [B, n]."""
    if not len(eos):
        return torch.ones_like(new)
    hit = torch.isin(new, eos).long()
    return ((hit.cumsum(1) - hit) == 0).long()


def _rng_scope(params: SamplingParams):
    """Where HF's sampling draws from: torch's global RNG, forked and seeded from the call's seed or generator when
    it gives one (the generator advances by one draw); the global RNG itself otherwise, as the fast path's
    multinomial does without a generator."""
    rng = params.rng() if params.do_sample else None
    if rng is None:
        return contextlib.nullcontext()
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64, generator=rng))
    scope = torch.random.fork_rng(devices=[])

    @contextlib.contextmanager
    def seeded():
        with scope:
            torch.manual_seed(seed)
            yield

    return seeded()


@torch.no_grad()
def hf_generate(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                params: SamplingParams) -> GenerationOutput:
    """`model.generate` (an HF causal LM: its generation_config is replaced for the call) on left-padded prompts
    under `params`, as GenerationOutput. The caller has checked the prompts and the ids."""
    input_ids, attention_mask = input_ids.long(), attention_mask.long()
    saved = model.generation_config
    model.generation_config = GenerationConfig()  # none of the model's own defaults
    try:
        with _rng_scope(params):
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 generation_config=hf_generation_config(params))
    finally:
        model.generation_config = saved
    T = input_ids.shape[1]
    new = out.sequences[:, T:]  # (B, n)
    mask = response_mask(new, params.eos_ids)
    logits = torch.stack(out.logits, 1).float()  # (B, n, V)
    for step in range(new.shape[1]):
        rows = mask[:, step].bool()
        check_finite_logits(logits[rows, step], step, torch.nonzero(rows)[:, 0])
    logprobs = torch.log_softmax(logits / params.temperature, -1).gather(2, new[..., None])[..., 0]
    logprobs = torch.where(mask.bool(), logprobs, 0.0)
    return GenerationOutput(sequences=out.sequences, logprobs=logprobs, response_mask=mask)


def generate_on_hf_path(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        sampling: SamplingParams | None, reason: str, weight_dtype, kv_dtype,
                        overrides: dict, activation_dtype=None) -> GenerationOutput:
    """hybrid_engine.generate for a model the fast path refuses (`reason`): HF's generate on the model itself under
    the same arguments and checks, after an HFPathWarning. The dtypes that shape the fast path's weights and cache
    are refused unless fp32 (HF computes in the model's own dtype)."""
    weights = parse_weight_dtype(weight_dtype)
    for name, dtype in (("weight_dtype", weights), ("kv_dtype", parse_kv_dtype(kv_dtype)),
                        ("activation_dtype", parse_activation_dtype(activation_dtype, weights))):
        if dtype not in (None, torch.float32):
            raise ValueError(f"{name}={dtype} needs the fast path; model_type "
                             f"{getattr(model.config, 'model_type', None)!r} generates through Hugging Face's "
                             f"generate ({reason})")
    vocab = vocab_size(model)
    params = SamplingParams.of(sampling, overrides, model_token_ids(model, vocab))
    params.check_vocab(vocab)
    check_prompts(input_ids, attention_mask, vocab)
    warn_hf_path(model.config, reason, stacklevel=5)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    return hf_generate(model, input_ids, mask, params)
