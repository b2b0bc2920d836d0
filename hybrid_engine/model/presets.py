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
    # ~125M parameters each, the same size class with each family's own shape. OLMo 2: an RMSNorm after each
    # sublayer and q/k RMSNorm over the whole projections, full multi-head attention (12/12) and untied embeddings as
    # in OLMo 2 1B/7B.
    "olmo2-125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12, tie_word_embeddings=False),
    # SmolLM3: no RoPE on every 4th layer (NoPE: layers 3, 7, 11), GQA, tied, as SmolLM3-3B.
    "smollm3-125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                         num_key_value_heads=4, no_rope_layer_interval=4, tie_word_embeddings=True),
    # Phi-3 / Phi-4-mini: fused qkv_proj and gate_up_proj, RoPE on the first 3/4 of each head (Phi-4-mini's
    # partial_rotary_factor 0.75), GQA, tied as Phi-4-mini.
    "phi3-125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=4, tie_word_embeddings=True, original_max_position_embeddings=2048,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}),
    # ~126M parameters, Gemma 3 270M/1B's shape at a small size: head_dim 256 with 4 query heads and 1 KV head, a norm
    # on each side of every sublayer, gated GELU-tanh, 5 sliding-window layers (window 512, RoPE base 10k) to 1
    # global (base 1M), tied.
    "gemma3-125m": dict(hidden_size=768, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                        rms_norm_eps=1e-6, tie_word_embeddings=True),
    # ~120M parameters (~480 MB fp32), Qwen3-MoE's shape: 8 experts of width 1024 per layer, 2 per token, so the
    # experts hold 100M of the parameters and a token reads a quarter of them (~46M active parameters).
    "qwen3-moe-120m": dict(hidden_size=512, intermediate_size=2048, moe_intermediate_size=1024, num_experts=8,
                           num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=8, num_attention_heads=8,
                           num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
}

CONFIGS = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config, "olmo2": transformers.Olmo2Config,
           "smollm3": transformers.SmolLM3Config, "phi3": transformers.Phi3Config,
           "gemma3": transformers.Gemma3TextConfig, "qwen3-moe": transformers.Qwen3MoeConfig}
"""A preset's config class, by the longest family name its name starts with (then a "-")."""


def preset_config(name: str) -> transformers.PretrainedConfig:
    """The config of a built-in preset, of its family's class (CONFIGS): vocabulary 32000 unless the preset says
    otherwise, and the special ids 1 (bos), 2 (eos), 0 (pad) whatever the class's defaults."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; built-in presets: {', '.join(PRESETS)}")
    kw = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
    kw.update(PRESETS[name])
    return CONFIGS[max((family for family in CONFIGS if name.startswith(family + "-")), key=len)](**kw)


def preset_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A randomly initialised causal LM of a preset (LlamaForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, ...), in
    eval mode."""
    import torch

    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(preset_config(name)).eval()
