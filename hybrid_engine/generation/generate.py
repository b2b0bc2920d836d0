"""hybrid_engine.generate: fast generation from a Hugging Face causal LM with the hybrid_engine kernels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

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


def _check_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    lengths = attention_mask.sum(1)
    if (lengths == 0).any():
        raise ValueError(f"prompt rows {torch.nonzero(lengths == 0)[:, 0].tolist()} are empty (all padding)")
    # Left padding: each row is 0...0 1...1, i.e. non-decreasing along the sequence.
    bad = (attention_mask[:, 1:] < attention_mask[:, :-1]).any(1)
    if bad.any():
        raise ValueError(
            f"prompt rows {torch.nonzero(bad)[:, 0].tolist()} are not left-padded: padding must come "
            "first (tokenizer.padding_side = 'left') and the prompt must be contiguous"
        )


def _eos_ids(eos_token_id: int | Sequence[int] | None) -> torch.Tensor:
    if eos_token_id is None:
        return torch.empty(0, dtype=torch.long)
    return torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), dtype=torch.long)


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
) -> GenerationOutput:
    """Generates up to max_new_tokens per prompt from an HF causal LM (Llama/Qwen2/Mistral, OPT, GPT-2).

    Prompts are left-padded (attention_mask 0 on the left). weight_dtype=None reads the model's own
    parameters; torch.bfloat16 reads bf16 copies made on entry and freed on return (activations and
    accumulation stay fp32). Every sequence stops at any of the eos ids; generation ends when all
    have stopped. logprobs are under the temperature-scaled distribution (before top-k/top-p).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if input_ids.device.type != "cpu":
        raise ValueError("hybrid_engine.generate runs on CPU tensors in this release")
    sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
    input_ids = input_ids.long()
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    _check_prompts(input_ids, attention_mask)
    spec = spec_from_config(model.config)
    lengths = attention_mask.sum(1)
    longest = int(lengths.max()) + max_new_tokens
    if longest > spec.max_positions:
        raise ValueError(
            f"a prompt of {int(lengths.max())} tokens plus max_new_tokens={max_new_tokens} needs "
            f"{longest} positions; the model has {spec.max_positions}. Shorten the prompt or "
            "max_new_tokens."
        )
    if spec.sliding_window is not None and longest > spec.sliding_window:
        raise ValueError(
            f"sequences of {longest} tokens exceed the model's sliding_window={spec.sliding_window}, "
            "which this release does not implement"
        )
    eos = _eos_ids(eos_token_id)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if len(eos) else 0
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    net = InferenceTransformer(spec, extract_weights(model, spec, weight_dtype))
    B = input_ids.shape[0]
    cache = KVCache.allocate(spec, B, longest)
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long)
    logprobs = torch.zeros(B, max_new_tokens)
    mask = torch.zeros(B, max_new_tokens, dtype=torch.long)
    # slot_seq[s]: the sequence in cache slot s; slots [0, active) are still generating.
    slot_seq = torch.arange(B)
    active = B
    logits = net.prefill(input_ids, attention_mask, cache)
    steps = 0
    for step in range(max_new_tokens):
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
    del net, cache  # frees the generation copies of the weights and the cache
    sequences = torch.cat([input_ids, tokens[:, :steps]], dim=1)
    return GenerationOutput(sequences=sequences, logprobs=logprobs[:, :steps], response_mask=mask[:, :steps])
