"""Tiny random Llamas (and a Mixtral) over the demo tokenizer's vocabulary, and small slices of the demo data, for the
SFT and reward-model tests (nothing comes from a hub)."""

from __future__ import annotations

import functools

import torch
import transformers

from hybrid_engine.rlhf.data import StepData, load_step_data
from hybrid_engine.rlhf.demo import demo_config, demo_tokenizer


@functools.lru_cache(maxsize=None)
def tokenizer():
    return demo_tokenizer()


def demo_llama(seed: int = 0, hidden: int = 64, layers: int = 2) -> transformers.LlamaForCausalLM:
    """A fresh random Llama (hidden 64, 2 layers by default) whose vocabulary is the demo tokenizer's."""
    tok = tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def demo_mixtral(seed: int = 0) -> transformers.MixtralForCausalLM:
    """A fresh random Mixtral (hidden 64, 2 layers of 4 experts, 2 per token) over the demo tokenizer's vocabulary."""
    tok = tokenizer()
    config = transformers.MixtralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(config).eval()


def save_demo_llama(directory, seed: int = 0):
    """demo_llama(seed) and the demo tokenizer saved to `directory`, as `hybrid-engine sft` leaves its output;
    returns the directory."""
    demo_llama(seed).save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    return directory


@functools.lru_cache(maxsize=None)
def _step_data(step: str, cache_dir: str) -> StepData:
    return load_step_data(demo_config(step, cache_dir=cache_dir), step)


def demo_rows(step: str, train_rows: int, eval_rows: int, cache_dir: str) -> StepData:
    """The first train_rows training and eval_rows held-out rows of the demo's `step` data."""
    data = _step_data(step, cache_dir)
    return StepData(train=data.train.select(range(train_rows)), eval=data.eval.select(range(eval_rows)),
                    reports=data.reports)
