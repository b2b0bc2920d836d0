"""The training phase of an RLHF step: one optimizer step (forward, backward, AdamW) of a Llama policy on a batch of
rollouts, with hybrid_engine's training kernels (apply_training_kernels: rms_norm, rotary_embed, silu_mul) and the
token_logprobs loss, against HF's own modules and a log_softmax over [B, T, V] logits, in fp32 and under bf16
autocast.

Models built from configs: ~10M (hidden 384, 6 layers, vocab 4096) and ~125M (hidden 768, 12 layers, GQA 12/4,
vocab 32000); 8 sequences of 128 tokens. FLOPs: 6 x tokens x the parameters of every matmul (the input
embedding is a lookup, not one), forward and backward, against the run's fp32 matmul rate. `speedup_vs_hf`
compares the providers at the same model and precision in this run.

    pytest bench/bench_train.py --benchmark-only --sweeps --benchmark-json=bench/results/train_step.json

(without --sweeps, the ~10M model in fp32 alone)
"""

from __future__ import annotations

import pytest
import torch
import transformers
from harness import record, representative, run_benchmark

from hybrid_engine import apply_training_kernels, unapply_training_kernels
from hybrid_engine.engine.training import adamw
from hybrid_engine.ops import token_logprobs

MODELS = {"llama-10m": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                            intermediate_size=1024, vocab_size=4096),
          "llama-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                             intermediate_size=2048, vocab_size=32000)}
BATCH, LENGTH = 8, 128


def make_model(name: str) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(max_position_embeddings=512, tie_word_embeddings=False, **MODELS[name])
    return transformers.LlamaForCausalLM(config).train()


def step_fn(model, provider: str, autocast: bool):
    """One training step: the policy-gradient surrogate -mean(log p(token)) over the batch's tokens, then a fused
    AdamW step."""
    ids = torch.randint(3, model.config.vocab_size, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    optimizer = adamw(model.parameters(), lr=1e-6)  # fused, on both sides: the pipeline's and TRL's Trainer's
    head = model.get_output_embeddings()

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
            if provider == "ours":
                logprobs = token_logprobs(hidden.flatten(0, 1), head.weight, ids[:, 1:].flatten())
            else:
                logits = head(hidden).float()
                logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        loss = -logprobs.float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# The providers of one model and precision run next to each other (provider varies fastest), so that both see
# the same spell of this shared VM and the same allocator history.
@pytest.mark.parametrize("provider", ["hf", "ours"])
@pytest.mark.parametrize("precision", representative(["fp32", "bf16-autocast"], "fp32"))
@pytest.mark.parametrize("name", representative(list(MODELS), "llama-10m"))
def test_train_step(benchmark, provider, name, precision, machine, roofline):
    model = make_model(name)
    if provider == "ours":
        apply_training_kernels(model)
    try:
        benchmark.group = f"train step {name} {precision} B={BATCH} T={LENGTH}"
        run_benchmark(benchmark, step_fn(model, provider, precision != "fp32"), rounds=3)
    finally:
        unapply_training_kernels(model)
    params = sum(p.numel() for p in model.parameters())
    matmul_params = params - model.get_input_embeddings().weight.numel()
    record(benchmark, provider=provider, machine=machine, roofline=roofline, flops=6 * matmul_params * BATCH * LENGTH,
           baseline_provider="hf", model=name, precision=precision, params_M=round(params / 1e6, 2),
           tokens=BATCH * LENGTH)
