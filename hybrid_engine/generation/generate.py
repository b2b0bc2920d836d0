"""hybrid_engine.generate: fast generation from a Hugging Face causal LM with the hybrid_engine kernels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import torch

from hybrid_engine.generation.checks import check_finite_logits, check_fits, check_generate_args, check_prompts
from hybrid_engine.generation.sampling import SamplingConfig, next_tokens
from hybrid_engine.model.kv_cache import KVCache
from hybrid_engine.model.spec import spec_from_config
from hybrid_engine.model.transformer import InferenceTransformer
from hybrid_engine.model.weights import extract_weights


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # int64 [B, T + n]: prompt (as given) + generated, pad_token_id after eos
    logprobs: torch.Tensor  # fp32 [B, n]: log-prob of each generated token, 0 where masked out
    response_mask: torch.Tensor  # int64 [B, n]: 1 for generated tokens (eos included), 0 after


def _eos_ids(eos_token_id: int | Sequence[int] | None) -> torch.Tensor:
    if eos_token_id is None:
        return torch.empty(0, dtype=torch.long)
    ids = [eos_token_id] if isinstance(eos_token_id, Integral) else list(eos_token_id)
    return torch.tensor([int(i) for i in ids], dtype=torch.long)


def _check(vocab_size: int, input_ids, attention_mask, **args) -> None:
    check_generate_args(vocab_size, **args)
    check_prompts(input_ids, attention_mask, vocab_size)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    weight_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    kv_dtype: torch.dtype = torch.float32,
) -> GenerationOutput:
    """Generates up to max_new_tokens per prompt from an HF causal LM (Llama/Qwen2/Mistral, OPT, GPT-2).

    Prompts are left-padded (attention_mask 0 on the left). weight_dtype=None reads the model's own
    parameters; torch.bfloat16 reads bf16 copies made on entry and freed on return (activations and
    accumulation stay fp32). kv_dtype=torch.bfloat16 (or float16) stores the KV cache in that dtype: half the bytes
    decode attention reads at long contexts, the keys and values rounded once as they are written (attention still
    computes in fp32; the log-prob difference from the fp32 cache is measured in tests/test_generate.py and
    bench/bench_generate.py). Every sequence stops at any of the eos ids; generation ends when all have stopped.
    logprobs are under the temperature-scaled distribution (before top-k/top-p).

    Samples come from `generator` when given (it is advanced, so successive calls continue its stream),
    else from a fresh generator seeded with `seed`, else from torch's default one; seed and generator
    together are refused. Bad arguments raise ValueError naming the argument, before any work starts
    (checks.py); NaN or inf logits raise checks.NonFiniteLogitsError (a FloatingPointError) naming the
    step (0: the prefill, k: the k-th decode step) and the batch rows.
    """
    spec = spec_from_config(model.config)
    args = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, generator=generator,
                kv_dtype=kv_dtype)
    _check(spec.vocab_size, input_ids, attention_mask, **args)  # before any work
    net = InferenceTransformer(spec, extract_weights(model, spec, weight_dtype))
    return generate_with(net, input_ids, attention_mask, **args)


@torch.no_grad()
def generate_with(
    net: InferenceTransformer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    kv_dtype: torch.dtype = torch.float32,
) -> GenerationOutput:
    """generate() over an already built generation model (the hybrid engine builds its own, from
    gathered, LoRA-fused or tensor-parallel weights); the same arguments, checks and output."""
    spec = net.spec
    _check(spec.vocab_size, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
           temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
           seed=seed, generator=generator, kv_dtype=kv_dtype)
    if input_ids.device.type != "cpu" or (generator is not None and generator.device.type != "cpu"):
        raise ValueError("hybrid_engine.generate runs on CPU tensors (input_ids, generator) in this release")
    input_ids = input_ids.long()
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    prompt_length = int(attention_mask.sum(1).max())
    check_fits(spec, prompt_length, max_new_tokens)
    longest = prompt_length + max_new_tokens
    sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
    eos = _eos_ids(eos_token_id)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if len(eos) else 0
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)

    B = input_ids.shape[0]
    cache = KVCache.allocate(spec, B, longest, dtype=kv_dtype)
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long)
    logprobs = torch.zeros(B, max_new_tokens)
    mask = torch.zeros(B, max_new_tokens, dtype=torch.long)
    # slot_seq[s]: the sequence in cache slot s; slots [0, active) are still generating.
    slot_seq = torch.arange(B)
    active = B
    logits = net.prefill(input_ids, attention_mask, cache)
    steps = 0
    for step in range(max_new_tokens):
        check_finite_logits(logits, step, slot_seq[:active])
        new, lp = next_tokens(logits, sampling, generator)
        seqs = slot_seq[:active]
        tokens[seqs, step], logprobs[seqs, step], mask[seqs, step] = new, lp, 1
        steps = step + 1
        finished = torch.isin(new, eos) if len(eos) else torch.zeros_like(new, dtype=torch.bool)
        if finished.any():
            # Refill each finished slot with the last active one, so the batch stays a prefix.
            new = new.clone()
            for slot in torch.nonzero(finished)[:, 0].flip(0).tolist():
                last = active - 1
                if slot != last:
                    cache.move_slot(last, slot)
                    slot_seq[slot] = slot_seq[last]
                    new[slot] = new[last]
                active -= 1
            new = new[:active]
        if active == 0 or step == max_new_tokens - 1:
            break
        logits = net.decode(new, cache)
    del cache
    sequences = torch.cat([input_ids, tokens[:, :steps]], dim=1)
    return GenerationOutput(sequences=sequences, logprobs=logprobs[:, :steps], response_mask=mask[:, :steps])
