"""hybrid_engine.generate: fast generation from a Hugging Face causal LM with the hybrid_engine kernels."""

from __future__ import annotations

import torch

from hybrid_engine.generation.checks import check_finite_logits, check_fits, check_model, check_prompts
from hybrid_engine.generation.hf_generate import generate_on_hf_path
from hybrid_engine.generation.output import GenerationOutput
from hybrid_engine.generation.sampling import SamplingParams, model_token_ids, next_tokens
from hybrid_engine.generation.threads import generation_threads, parse_threads
from hybrid_engine.model.dtypes import parse_activation_dtype, parse_kv_dtype, parse_weight_dtype
from hybrid_engine.model.kv_cache import KVCache
from hybrid_engine.model.spec import spec_from_config
from hybrid_engine.model.transformer import InferenceTransformer
from hybrid_engine.model.weights import extract_weights
from hybrid_engine.ops import dispatch, get_backend
from hybrid_engine.ops.linear_bf16 import check_bf16_compute


def _retire(finished: torch.Tensor, new: torch.Tensor, cache: KVCache, slot_seq: torch.Tensor,
            active: int) -> tuple[torch.Tensor, int]:
    """Refills each finished slot with the last active one, so the active slots stay a prefix; (the active slots'
    next input tokens, the number of active slots)."""
    new = new.clone()
    for slot in torch.nonzero(finished)[:, 0].flip(0).tolist():
        last = active - 1
        if slot != last:
            cache.move_slot(last, slot)
            slot_seq[slot] = slot_seq[last]
            new[slot] = new[last]
        active -= 1
    return new[:active], active


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    sampling: SamplingParams | None = None,
    *,
    weight_dtype: torch.dtype | str | None = None,
    kv_dtype: torch.dtype | str = torch.float32,
    threads: int | str | None = None,
    activation_dtype: torch.dtype | str | None = None,
    **overrides,
) -> GenerationOutput:
    """Generates up to max_new_tokens per prompt from an HF causal LM (Llama/Qwen2/Qwen3/OLMo 2/SmolLM3/Phi-3/Gemma 3/
    Mistral, OPT, GPT-2).

    The sampling settings are a SamplingParams, or its fields as keyword arguments over it (max_new_tokens=32,
    do_sample=False, temperature=1.0, top_k=0, top_p=1.0, eos_token_id, pad_token_id, seed, generator), as
    Hugging Face's generate reads a generation_config and its keyword arguments. The eos and pad ids that neither
    gives are the model's generation_config's, as in HF's generate (an id given in the call wins; a keyword
    eos_token_id=None stops on none).

    Prompts are left-padded (attention_mask 0 on the left). weight_dtype=None (or "fp32") reads the model's own
    parameters; torch.bfloat16 ("bf16") reads bf16 copies made on entry and freed on return (activations and
    accumulation stay fp32). kv_dtype=torch.bfloat16 (or float16) stores the KV cache in that dtype: half the bytes
    decode attention reads at long contexts, the keys and values rounded once as they are written (attention still
    computes in fp32; the log-prob difference from the fp32 cache is measured in tests/test_generate.py and
    bench/bench_generate.py). activation_dtype=torch.bfloat16 ("bf16"), with bf16 weights only, is the fast mode:
    the input of every linear layer is rounded to bf16 (as vLLM computes; attention, norms and RoPE stay fp32), which
    is refused on a CPU without bf16 compute, where it would only be slower; None or "fp32" is the exact path.
    Every sequence stops at any of the eos ids; generation ends when all have stopped.
    logprobs are under the temperature-scaled distribution (before top-k/top-p).

    Samples come from `generator` when given (it is advanced, so successive calls continue its stream),
    else from a fresh generator seeded with `seed`, else from torch's default one; seed and generator
    together are refused. Bad arguments raise ValueError naming the argument, before any work starts
    (checks.py); NaN or inf logits raise checks.NonFiniteLogitsError (a FloatingPointError) naming the
    step (0: the prefill, k: the k-th decode step) and the batch rows. A model that is no HF causal LM, or one on
    the meta device, is refused the same way.

    threads: "auto" (the default, or HYBRID_ENGINE_GENERATION_THREADS where set) runs the call on torch's thread
    count less the runnable threads of other processes, so a busy shared CPU does not stall every op at a barrier;
    an int N on N threads; "torch" on torch's count. torch's count is restored on return (threads.py).
    """
    check_model(model)
    threads = parse_threads(threads)
    try:
        spec = spec_from_config(model.config)
    except ValueError as e:  # no fast path for this model, or a config detail it cannot honour: HF's generate
        with generation_threads(threads):
            return generate_on_hf_path(model, input_ids, attention_mask, sampling, str(e), weight_dtype, kv_dtype,
                                       overrides, activation_dtype)
    params = SamplingParams.of(sampling, overrides, model_token_ids(model, spec.vocab_size))
    weights, kv = parse_weight_dtype(weight_dtype), parse_kv_dtype(kv_dtype)
    activations = parse_activation_dtype(activation_dtype, weights)
    check_bf16_compute(activations)
    params.check_vocab(spec.vocab_size)  # before any work
    check_prompts(input_ids, attention_mask, spec.vocab_size)
    net = InferenceTransformer(spec, extract_weights(model, spec, weights), activation_dtype=activations)
    return generate_with(net, input_ids, attention_mask, params, kv_dtype=kv, threads=threads)


def _routes_first() -> None:
    """The kernels' routes are measured once per process, on torch's thread count of the moment (ops/dispatch.py):
    measure them before generation_threads changes that count, so that they never depend on the load of the first
    call. With the compiled kernels only, whose first op would measure them anyway."""
    if get_backend() == "kernels":
        dispatch.ensure()


@torch.no_grad()
def generate_with(
    net: InferenceTransformer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    sampling: SamplingParams | None = None,
    *,
    kv_dtype: torch.dtype | str = torch.float32,
    threads: int | str | None = None,
    **overrides,
) -> GenerationOutput:
    """generate() over an already built generation model (the hybrid engine builds its own, from
    gathered, LoRA-fused or tensor-parallel weights); the same arguments, checks and output. It has no HF model
    whose generation_config could give eos and pad ids: the caller resolves them (an unset eos stops on none)."""
    spec = net.spec
    params = SamplingParams.of(sampling, overrides)
    kv_dtype, threads = parse_kv_dtype(kv_dtype), parse_threads(threads)
    params.check_vocab(spec.vocab_size)
    check_prompts(input_ids, attention_mask, spec.vocab_size)
    generator = params.generator
    if input_ids.device.type != "cpu" or (generator is not None and generator.device.type != "cpu"):
        raise ValueError("hybrid_engine.generate runs on CPU tensors (input_ids, generator) in this release")
    input_ids = input_ids.long().contiguous()  # a transposed or sliced view is read as its values
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long().contiguous()
    check_fits(spec, int(attention_mask.sum(1).max()), params.max_new_tokens)
    _routes_first()
    with generation_threads(threads):
        return _decode_loop(net, input_ids, attention_mask, params, kv_dtype)


def _decode_loop(net: InferenceTransformer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 params: SamplingParams, kv_dtype: torch.dtype) -> GenerationOutput:
    """generate_with()'s prefill and decode steps, its arguments checked, on the threads already chosen."""
    spec = net.spec
    prompt_length = int(attention_mask.sum(1).max())
    max_new_tokens = params.max_new_tokens
    eos, generator = params.eos_ids, params.rng()

    B = input_ids.shape[0]
    cache = KVCache.allocate(spec, B, prompt_length + max_new_tokens, dtype=kv_dtype)
    tokens = torch.full((B, max_new_tokens), params.pad_id, dtype=torch.long)
    logprobs = torch.zeros(B, max_new_tokens)
    mask = torch.zeros(B, max_new_tokens, dtype=torch.long)
    # slot_seq[s]: the sequence in cache slot s; slots [0, active) are still generating.
    slot_seq = torch.arange(B)
    active = B
    logits = net.prefill(input_ids, attention_mask, cache)
    steps = 0
    for step in range(max_new_tokens):
        check_finite_logits(logits, step, slot_seq[:active])
        new, lp = next_tokens(logits, params, generator)
        seqs = slot_seq[:active]
        tokens[seqs, step], logprobs[seqs, step], mask[seqs, step] = new, lp, 1
        steps = step + 1
        finished = torch.isin(new, eos) if len(eos) else torch.zeros_like(new, dtype=torch.bool)
        if finished.any():
            new, active = _retire(finished, new, cache, slot_seq, active)
        if active == 0 or step == max_new_tokens - 1:
            break
        # HF's finished rows run on as padding: its length, which picks the RoPE tables, counts them.
        seq_len = prompt_length + step + 1
        if input_ids.shape[1] + step + 1 == (spec.rerun_width or 0) + 1:
            sequences = torch.cat([input_ids, tokens[:, : step + 1]], dim=1)[slot_seq[:active]]
            rows_mask = torch.cat([attention_mask, torch.ones_like(tokens[:, : step + 1])], dim=1)[slot_seq[:active]]
            logits = net.prefill(sequences, rows_mask, cache, seq_len)  # Phi-3's HF generate reruns at this width
        else:
            logits = net.decode(new, cache, seq_len)
    del cache
    sequences = torch.cat([input_ids, tokens[:, :steps]], dim=1)
    return GenerationOutput(sequences=sequences, logprobs=logprobs[:, :steps], response_mask=mask[:, :steps])
