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
    # ~120M parameters (~480 MB fp32), Qwen3-MoE's shape: 8 experts of width 1024 per layer, 2 per token, so the
    # experts hold 100M of the parameters and a token reads a quarter of them (~46M active parameters).
    "qwen3-moe-120m": dict(hidden_size=512, intermediate_size=2048, moe_intermediate_size=1024, num_experts=8,
                           num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=8, num_attention_heads=8,
                           num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
}
CONFIGS = {"qwen3-moe": transformers.Qwen3MoeConfig, "qwen3": transformers.Qwen3Config}
"""Preset name prefix -> its config class (the first that matches; LlamaConfig otherwise)."""


def preset_config(name: str) -> transformers.PretrainedConfig:
    """The config of a built-in preset: a Qwen3MoeConfig for the qwen3-moe-* ones, a Qwen3Config for the other
    qwen3-* ones, else a LlamaConfig (vocabulary 32000 unless the preset says otherwise)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; built-in presets: {', '.join(PRESETS)}")
    kw = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5)
    kw.update(PRESETS[name])
    config = next((c for prefix, c in CONFIGS.items() if name.startswith(prefix)), transformers.LlamaConfig)
    return config(**kw)


def preset_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A randomly initialised causal LM of a preset (LlamaForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM), in
    eval mode."""
    import torch

    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(preset_config(name)).eval()
