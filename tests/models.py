"""Tiny random Hugging Face models of each supported family, saved with save_pretrained and loaded
back through the real loading code (nothing comes from a hub)."""

from __future__ import annotations

import functools
import tempfile

import torch
import transformers

VOCAB = 97

# Larger-than-default init so that logits are well separated: greedy parity then tests the
# arithmetic, not which of two near-equal logits rounding happens to favour.
CONFIGS = {
    "llama-gqa": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=False,
    ),
    "llama-tied-mha": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=3,
        head_dim=16,
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=True,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=False,
        use_sliding_window=False,
    ),
    # Qwen3: head_dim (24) independent of hidden / heads (64 / 4), GQA, tied embeddings as on its small sizes.
    "qwen3": lambda: transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=True,
        use_sliding_window=False,
    ),
    # OLMo 2: norms after each sublayer (no pre-norm), q/k RMSNorm over the whole projections.
    "olmo2": lambda: transformers.Olmo2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=False,
        eos_token_id=2,
        pad_token_id=0,
    ),
    # SmolLM3: no_rope_layer_interval 2 makes layer 1 of 3 a NoPE layer (no_rope_layers [1, 0, 1]); GQA, tied.
    "smollm3": lambda: transformers.SmolLM3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        no_rope_layer_interval=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    # Phi-3 / Phi-4-mini: fused qkv_proj and gate_up_proj, RoPE on the first 3/4 of each head (Phi-4-mini's
    # partial_rotary_factor), GQA.
    "phi3": lambda: transformers.Phi3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        original_max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    # Gemma 3 (text): sliding and global layers with their own RoPE bases (low, so that positions tell), head_dim 24
    # apart from hidden / heads (48 / 4) and query_pre_attn_scalar apart from both, sqrt(48) as the embedding scale
    # (not a round number), GQA, tied, norms before and after each sublayer. The window spans every test's sequences.
    "gemma3": lambda: gemma3_config(),
    "gemma3-softcap": lambda: gemma3_config(final_logit_softcapping=4.0),
    # Qwen3-MoE: 8 experts, top-2 without renormalising (norm_topk_prob False), layer 1 of 3 dense (mlp_only_layers)
    # with its own intermediate size; Qwen3's per-head q/k norm.
    "qwen3-moe": lambda: transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        mlp_only_layers=[1],
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=False,
    ),
    # Mixtral: 4 experts, top-2 renormalised, every layer sparse.
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=48,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=False,
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=64,
        init_std=0.2,
        pad_token_id=1,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_inner=96, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2
    ),
}


def gemma3_config(**overrides) -> transformers.Gemma3TextConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20, max_position_embeddings=128,
              sliding_window=GEMMA3_WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}},
              initializer_range=0.2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.Gemma3TextConfig(**{**kw, **overrides})


GEMMA3_WINDOW = 64


# Families whose RMSNorm weights (q/k norms included) HF initialises to ones (Gemma's to zeros: it multiplies by
# 1 + w): randomised, so that a norm read from the wrong module (q's for k's, OLMo 2's post-attention for its
# post-feedforward, or none at all) changes the answer.
RANDOM_NORMS = {"qwen3", "qwen3-moe", "olmo2", "gemma3", "gemma3-softcap"}


MOE = ("qwen3-moe", "mixtral")  # the Mixture-of-Experts families


@torch.no_grad()
def _randomise_norms(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):  # Gemma's norms multiply by 1 + w: 0.5 to 1.5 either way
            low = -0.5 if isinstance(model.config, transformers.Gemma3TextConfig) else 0.5
            param.uniform_(low, low + 1.0)


@functools.lru_cache(maxsize=None)
def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of `name`, round-tripped through save_pretrained/from_pretrained."""
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    model = transformers.AutoModelForCausalLM.from_config(config)
    if name in RANDOM_NORMS:
        _randomise_norms(model)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(d)
    return loaded.eval()


def left_padded_prompts(lengths: list[int], pad_id: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded into (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n :] = torch.randint(2, VOCAB, (n,), generator=g)
        mask[i, T - n :] = 1
    return ids, mask


def train_steps(engine, batches) -> list[float]:
    """One optimizer step of `engine` (a HybridEngine) on each left-padded (input_ids, attention_mask) batch, its
    tokens as the labels: the losses."""
    losses = []
    for ids, mask in batches:
        loss = engine(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def train(engine, steps: range) -> list[float]:
    """train_steps on the prompts of lengths 7, 4, 6 seeded by each step."""
    return train_steps(engine, (left_padded_prompts([7, 4, 6], seed=step) for step in steps))
