"""RoPE types whose frequencies change with the length (LongRoPE, dynamic NTK) on the fast path, against HF: greedy
tokens equal to HF generate's over left-padded prompts whose generation crosses the original length (Phi-3's HF
generate reruns its cache there, Llama's keeps keys of both tables), a batch where only one row crosses, the dynamic
type's dependence on earlier calls, and log-probs against a training forward (model/rope.py)."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
import transformers
from models import CONFIGS, left_padded_prompts
from test_generate import hf_greedy
from test_scoring import ATOL, START, hf_logprobs, padded_rows

import hybrid_engine
from hybrid_engine.rlhf.scoring import FrozenPolicy

ORIGINAL = 8  # original_max_position_embeddings (LongRoPE) or max_position_embeddings (dynamic): crossed below


def _factors(seed: int, low: float, high: float, n: int = 6) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(n, generator=g)).tolist()


def _longrope(config, dims: int) -> None:
    config.max_position_embeddings = 64
    config.original_max_position_embeddings = ORIGINAL
    config.rope_parameters = {**config.rope_parameters, "rope_type": "longrope", "rope_theta": 10000.0,
                              "original_max_position_embeddings": ORIGINAL,
                              "short_factor": _factors(0, 1.0, 2.0, dims), "long_factor": _factors(1, 2.0, 8.0, dims)}


def _config(name: str):
    family = {"phi3-longrope": "phi3", "llama-longrope": "llama-gqa", "llama-dynamic": "llama-gqa"}[name]
    config = CONFIGS[family]()
    if name == "llama-dynamic":
        config.max_position_embeddings = ORIGINAL
        config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    else:
        _longrope(config, dims=6 if family == "phi3" else 8)  # rotary dims / 2: Phi-3 rotates 12 of 16
    return config


MODELS = ["phi3-longrope", "llama-longrope", "llama-dynamic"]


def rope_model(name: str) -> transformers.PreTrainedModel:
    """A fresh tiny model of `name`, round-tripped through save_pretrained/from_pretrained (each call its own
    rotary state)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(name))
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return transformers.AutoModelForCausalLM.from_pretrained(d).eval()


def both(model, ids, mask, new: int, eos=None):
    """(ours, HF's) greedy sequences, each from its own copy of the model (the rotary state is the model's)."""
    ours = hybrid_engine.generate(copy.deepcopy(model), ids, mask, max_new_tokens=new, eos_token_id=eos,
                                  pad_token_id=0).sequences
    return ours, hf_greedy(copy.deepcopy(model), ids, mask, new, eos=eos)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_across_the_original_length_matches_hf(name):
    model = rope_model(name)
    assert hybrid_engine.model.spec_from_config(model.config).dynamic_rope == name.split("-")[1]
    ids, mask = left_padded_prompts([5, 1, 7, 3])  # 7 + 10 positions: crosses 8 at the second decode step
    ours, hf = both(model, ids, mask, 10)
    assert torch.equal(ours, hf)


@pytest.mark.parametrize("name", MODELS)
def test_one_row_crossing_switches_the_batch_as_in_hf(name):
    model = rope_model(name)
    ids, mask = left_padded_prompts([7, 2], seed=1)  # row 0 crosses 8, row 1 (2 + 5) never does
    free = hf_greedy(copy.deepcopy(model), ids, mask, 5)[:, ids.shape[1]:]
    eos = int(free[0, 1])  # row 0 stops early: HF's length still counts it, ours no longer holds it
    ours, hf = both(model, ids, mask, 5, eos=eos)
    assert torch.equal(ours, hf)


def test_phi3_reruns_at_the_padded_width_as_hf():
    """Prompts wider than their longest row: Phi-3's HF generate reruns its cache at width 9, while the rows are
    still short, and switches to the long factors later with short keys in the cache."""
    model = rope_model("phi3-longrope")
    ids, mask = left_padded_prompts([4, 2], seed=2)
    ids, mask = (torch.cat([torch.zeros(2, 3, dtype=torch.long), t], dim=1) for t in (ids, mask))
    ours, hf = both(model, ids, mask, 9)
    assert torch.equal(ours, hf)


def test_dynamic_ntk_follows_the_modules_history_as_hf():
    """A call between max_position_embeddings and the longest call before it keeps that call's frequencies."""
    model = rope_model("llama-dynamic")
    ours_model, hf_model = copy.deepcopy(model), copy.deepcopy(model)
    for lengths, new in (([6, 3], 12), ([6, 4], 5), ([3, 2], 2)):  # 18 positions, then 11 (< 18), then 5 (reset)
        ids, mask = left_padded_prompts(lengths, seed=new)
        ours = hybrid_engine.generate(ours_model, ids, mask, max_new_tokens=new, eos_token_id=None, pad_token_id=0)
        assert torch.equal(ours.sequences, hf_greedy(hf_model, ids, mask, new))
        assert ours_model.model.rotary_emb.max_seq_len_cached == hf_model.model.rotary_emb.max_seq_len_cached
        assert torch.equal(ours_model.model.rotary_emb.inv_freq, hf_model.model.rotary_emb.inv_freq)


@pytest.mark.parametrize("name", MODELS)
def test_logprobs_match_a_training_forward(name):
    model = rope_model(name)
    for seed in (0, 1):
        ids, mask = padded_rows("both", seed)  # rows of up to 12 tokens: past 8
        if seed:
            mask[:, -5:] = 0  # no row past 7 tokens: the short / original tables
        ours = FrozenPolicy(copy.deepcopy(model)).token_logprobs(ids, mask, START, 1.0)
        ref = hf_logprobs(model, ids, mask, START, 1.0)
        assert (ours.double() - ref).abs().max() < ATOL, (name, seed)



@pytest.mark.parametrize("name", ["phi3-longrope", "llama-dynamic"])
def test_the_engine_generates_on_the_fast_path_as_hf(name):
    model = rope_model(name)
    ids, mask = left_padded_prompts([5, 1, 7, 3])
    engine = hybrid_engine.HybridEngine(copy.deepcopy(model), optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    out = engine.generate(ids, mask, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
    assert engine.stats.path == "fast" and torch.equal(out.sequences, hf_greedy(copy.deepcopy(model), ids, mask, 10))
