"""Tiny random models of decoder-only families without a fast path (GPT-NeoX, StableLM; Gemma 2, Granite and Cohere,
whose logits are transformed after the LM head), over the demo tokenizer's vocabulary, saved with save_pretrained and
loaded back (nothing comes from a hub): what the HF-path tests run."""

from __future__ import annotations

import tempfile

import torch
import transformers
from demo_models import tokenizer


def _ids() -> dict:
    tok = tokenizer()
    return dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, max_position_embeddings=128, initializer_range=0.2,
                tie_word_embeddings=False)


# Partial rotary embeddings in both: a detail the fast path's Llama family does not have.
CONFIGS = {
    "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                   num_attention_heads=4, rotary_pct=0.5, **_ids()),
    "stablelm": lambda: transformers.StableLmConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2,
                                                    partial_rotary_factor=0.25, **_ids()),
}
FAMILIES = list(CONFIGS)
# Families whose causal LM transforms its logits after the LM head (engine/logprobs.py transforms_logits), with a
# transform that moves the log-probs well beyond the tolerances: Gemma 2's soft-cap (its attention soft-cap keeps it
# on the HF path), Granite's division, Cohere's multiplication.
TRANSFORMED = {
    "gemma2": lambda: transformers.Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                final_logit_softcapping=2.0, attn_logit_softcapping=50.0, **_ids()),
    "granite": lambda: transformers.GraniteConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, logits_scaling=0.25,
                                                  **_ids()),
    "cohere": lambda: transformers.CohereConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, logit_scale=4.0,
                                                **_ids()),
}
LORA_TARGETS = {"gpt_neox": ["query_key_value", "dense_4h_to_h"], "stablelm": ["q_proj", "v_proj", "down_proj"]}


def family_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A fresh tiny random causal LM of family `name`, round-tripped through save_pretrained/from_pretrained."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config({**CONFIGS, **TRANSFORMED}[name]())
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return transformers.AutoModelForCausalLM.from_pretrained(d).eval()


def save_family_model(name: str, directory, seed: int = 0):
    """family_model(name, seed) and the demo tokenizer saved to `directory` (what `hybrid-engine sft` reads)."""
    family_model(name, seed).save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    return directory
