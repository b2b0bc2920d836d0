"""Model configurations built in for benchmarks and the CLI's default run (random weights, no hub)."""

from __future__ import annotations

import transformers

PRESETS = {
    # ~22M parameters: per-step overhead, not bandwidth, limits its decode speed.
    "llama-20m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                      num_key_value_heads=2, tie_word_embeddings=True),
    # ~125M parameters: the decode step streams ~400 MB of fp32 weights.
    "llama-125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, tie_word_embeddings=False),
    # A few hundred thousand parameters, for smoke runs.
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=True, vocab_size=1024),
    # ~120M parameters, Qwen3's shape at a small size: head_dim 128 (not 768 / 12), per-head q/k norm, tied.
    "qwen3-125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, head_dim=128, tie_word_embeddings=True),
    # ~126M parameters, Gemma 3 270M/1B's shape at a small size: head_dim 256 with 4 query heads and 1 KV head, a norm
    # on each side of every sublayer, gated GELU-tanh, 5 sliding-window layers (window 512, RoPE base 10k) to 1
    # global (base 1M), tied.
    "gemma3-125m": dict(hidden_size=768, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                        rms_norm_eps=1e-6, tie_word_embeddings=True),
}
CONFIGS = {"qwen3": transformers.Qwen3Config, "gemma3": transformers.Gemma3TextConfig}
"""A preset's config class by its name's first part; LlamaConfig for the others."""


def preset_config(name: str) -> transformers.PretrainedConfig:
    """The config of a built-in preset: a Qwen3Config for the qwen3-* ones, a Gemma3TextConfig for the gemma3-* ones
    (its default layer_types: every sixth layer global), else a LlamaConfig (vocabulary 32000 unless the preset says
    otherwise)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; built-in presets: {', '.join(PRESETS)}")
    kw = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5)
    kw.update(PRESETS[name])
    return CONFIGS.get(name.split("-")[0], transformers.LlamaConfig)(**kw)


def preset_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A randomly initialised causal LM of a preset (LlamaForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM), in eval
    mode."""
    import torch

    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(preset_config(name)).eval()
