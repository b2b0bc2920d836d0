"""Families whose causal LM transforms its logits after the LM head (Gemma 2's soft-cap, Granite's and Cohere's scales:
tests/hf_families.py TRANSFORMED; a Gemma 3 that soft-caps: tests/models.py gemma3-softcap). The engine's
token_logprobs (one pass and a shared prompt's two), its entropy, SFT's loss and the frozen reference read them from
the HF forward's logits: log_softmax of those within 1e-5 (fp32), gradients equal to autograd through the HF forward;
generation's log-probs (the HF path's, Gemma 3's fast path) match them; SFT and a GRPO step train."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from demo_models import demo_rows, tokenizer
from hf_families import TRANSFORMED, family_model
from models import VOCAB, left_padded_prompts, tiny_model

from hybrid_engine import HybridEngine
from hybrid_engine.engine import logprobs as training_logprobs
from hybrid_engine.engine.hf_path import HFPathWarning
from hybrid_engine.engine.logprobs import positions, transforms_logits
from hybrid_engine.rlhf.demo import rule_score_batch
from hybrid_engine.rlhf.ppo import ModelSources, PPOConfig, train_ppo
from hybrid_engine.rlhf.scoring import FrozenPolicy
from hybrid_engine.rlhf.sft import sft_loss

ATOL = 1e-5
GAIN = {"granite": 4.0, "cohere": 4.0}
"""How much a family's transform multiplies its logits (and so the fp32 rounding of the hidden states a KV-cached
decode step and a whole-sequence forward compute differently); soft-capping shrinks them."""
NAMES = [*TRANSFORMED, "gemma3-softcap"]


def model_of(name: str) -> torch.nn.Module:
    return copy.deepcopy(tiny_model(name)) if name == "gemma3-softcap" else family_model(name)


def engine(name: str) -> HybridEngine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HFPathWarning)
        return HybridEngine(model_of(name), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))


def grouped_rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask, start): 2 left-padded prompts, each repeated twice (a shared prompt), then 5
    response tokens per row, the last row's final 2 masked (right padding)."""
    ids, mask = left_padded_prompts([6, 4], seed=seed)
    ids, mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
    response = torch.randint(2, VOCAB, (4, 5), generator=torch.Generator().manual_seed(seed + 1))
    response_mask = torch.ones_like(response)
    response_mask[3, 3:] = 0
    return torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1), ids.shape[1]


def hf_logprobs(model, ids, mask, start: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropy) [B, T - start] from log_softmax of the HF forward's logits, 0 where the mask is 0."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    logp = (logits[:, start - 1 : -1].float() / temperature).log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    keep = mask[:, start:]
    return logp.gather(-1, ids[:, start:, None])[..., 0] * keep, entropy.detach() * keep


@torch.no_grad()
def head_only_logprobs(model, ids, mask, start: int, temperature: float) -> torch.Tensor:
    """The log-probs of the LM head's plain output, without the model's transform (what the fused op alone gives)."""
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
    logp = (model.lm_head(hidden)[:, start - 1 : -1] / temperature).log_softmax(-1)
    return logp.gather(-1, ids[:, start:, None])[..., 0] * mask[:, start:]


def test_the_fields_set_are_what_marks_a_transform():
    assert all(transforms_logits(model_of(name).config) for name in NAMES)
    assert not transforms_logits(tiny_model("gemma3").config) and not transforms_logits(family_model("gpt_neox").config)


@pytest.mark.parametrize("name", NAMES)
def test_token_logprobs_and_their_gradients_are_the_hf_forwards(name, monkeypatch):
    shared = []  # whether the shared prompt's two passes ran (a None result falls back to one pass)
    two_passes = training_logprobs._shared_prefix_logprobs
    monkeypatch.setattr(training_logprobs, "_shared_prefix_logprobs",
                        lambda *a: shared.append(two_passes(*a)) or shared[-1])
    eng = engine(name)
    ref_model = copy.deepcopy(eng.module)
    ids, mask, start = grouped_rows()
    weights = torch.rand(ids.shape[0], ids.shape[1] - start, generator=torch.Generator().manual_seed(3))
    ref, ref_entropy = hf_logprobs(ref_model, ids, mask, start, temperature=0.7)
    ref_grads = torch.autograd.grad((ref * weights).sum(), list(ref_model.parameters()))
    plain = head_only_logprobs(eng.module, ids, mask, start, 0.7)
    assert (plain - ref).abs().max() > 1e-2  # the transform matters: the head alone gives other log-probs
    for share in (True, False):
        ours, entropy = eng.token_logprobs(ids, mask, start, temperature=0.7, share_prefix=share, return_entropy=True)
        # the transform's gain multiplies the fp32 rounding of the hidden states the two forwards reduce differently
        torch.testing.assert_close(ours, ref, atol=ATOL * GAIN.get(name, 1.0), rtol=0)
        torch.testing.assert_close(entropy, ref_entropy, atol=ATOL * GAIN.get(name, 1.0), rtol=0)
        grads = torch.autograd.grad((ours * weights).sum(), list(eng.module.parameters()))
        for (pname, _), g, r in zip(eng.module.named_parameters(), grads, ref_grads, strict=True):
            scale = max(1.0, float(r.abs().max()))  # Granite's gradients reach ~200: fp32 rounding scales with them
            assert float((g - r).abs().max()) <= ATOL * scale, (pname, float((g - r).abs().max()), scale)
    assert len(shared) == 1 and shared[0] is not None


@pytest.mark.parametrize("name", ["gemma2", "gemma3-softcap"])
@torch.no_grad()
def test_the_frozen_reference_scores_through_the_hf_logits(name):
    model = model_of(name)
    policy = FrozenPolicy(copy.deepcopy(model))
    ids, mask, start = grouped_rows(seed=5)
    assert policy.net is None  # Gemma 3's inference path would read the head alone
    ref, _ = hf_logprobs(model, ids, mask, start, 0.7)
    torch.testing.assert_close(policy.token_logprobs(ids, mask, start, 0.7), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_generation_logprobs_match_the_training_forward(name):
    eng = engine(name)
    assert eng.generation_path == ("fast" if name == "gemma3-softcap" else "hf")
    ids, mask = left_padded_prompts([5, 8, 3], seed=11)
    out = eng.generate(ids, mask, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    assert eng.logprob_mismatch(out, mask)["max"] <= ATOL
    sampled = eng.generate(ids, mask, max_new_tokens=6, do_sample=True, temperature=0.7, seed=3)
    assert eng.logprob_mismatch(sampled, mask, temperature=0.7)["max"] <= ATOL * GAIN.get(name, 1.0) / 0.7


@pytest.mark.parametrize("name", ["gemma2", "granite"])
def test_sft_loss_is_hfs_and_trains(name):
    eng = engine(name)
    ids, mask, start = grouped_rows(seed=7)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :start] = -100  # the prompt is not scored
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    hf = eng(input_ids=ids, attention_mask=mask, position_ids=positions(mask), labels=labels).loss
    losses = []
    for _ in range(3):
        loss = sft_loss(eng, batch)
        eng.backward(loss)
        eng.step()
        losses.append(loss.item())
    assert abs(losses[0] - hf.item()) <= ATOL
    assert losses[2] < losses[0]


def test_a_ppo_step_trains_a_family_with_transformed_logits(cache):
    """PPO's actor, its frozen reference (the KL term) and its critic all on Gemma 2 (Granite has no sequence
    classifier for a critic)."""
    config = PPOConfig(algo="ppo", max_steps=1, batch_size=2, train_batch_size=2, max_new_tokens=6, lr=1e-3,
                       eval_batch_size=2)
    sources = ModelSources(actor=family_model("gemma2"), critic=family_model("gemma2", seed=1),
                           reward_fn=rule_score_batch)
    with pytest.warns(HFPathWarning, match="'gemma2'"):
        result = train_ppo(sources, tokenizer(), demo_rows("ppo", 4, 2, cache), config, progress=False)
    record = result.history[0]
    assert result.steps == 1 and record["logprob_mismatch"] < ATOL
    assert all(bool(torch.isfinite(torch.tensor(record[k]))) for k in ("kl", "policy_loss", "value_loss"))
