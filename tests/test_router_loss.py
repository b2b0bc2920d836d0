"""The router's auxiliary load-balancing loss of a Mixture-of-Experts model: observed during a forward as Hugging
Face computes it (output_router_logits=True), and reported by SFT and PPO without being added to their losses."""

import contextlib

import pytest
import torch
from demo_models import demo_llama, demo_mixtral, demo_rows, tokenizer
from models import MOE, left_padded_prompts, tiny_model

from hybrid_engine.engine.router_loss import router_aux_loss
from hybrid_engine.rlhf import SFTConfig, sft, train_sft


@pytest.mark.parametrize("family", MOE)
def test_the_observed_loss_is_hfs_aux_loss(family):
    model = tiny_model(family)
    ids, mask = left_padded_prompts([5, 8, 3])
    with torch.no_grad():
        with router_aux_loss(model) as aux:
            model(input_ids=ids, attention_mask=mask)
        hf = model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    assert aux == [pytest.approx(float(hf), rel=1e-6)] and float(hf) > 0


def test_a_dense_model_has_none():
    ids, mask = left_padded_prompts([5, 3])
    model = tiny_model("llama-gqa")
    with torch.no_grad(), router_aux_loss(model) as aux:
        model(input_ids=ids, attention_mask=mask)
    assert aux == []


@contextlib.contextmanager
def _not_observed(model):
    yield []


def test_sft_reports_it_per_step_and_trains_on_the_nll_alone(cache, monkeypatch):
    data = demo_rows("sft", 32, 8, cache)
    config = SFTConfig(max_steps=2, batch_size=8, lr=1e-3, seed=0)
    result = train_sft(demo_mixtral(), tokenizer(), data, config, progress=False)
    assert len(result.router_aux_losses) == 2 and all(a > 0 for a in result.router_aux_losses)
    monkeypatch.setattr(sft, "router_aux_loss", _not_observed)
    unobserved = train_sft(demo_mixtral(), tokenizer(), data, config, progress=False)
    assert unobserved.router_aux_losses == [] and unobserved.losses == result.losses  # observing changes nothing
    assert train_sft(demo_llama(), tokenizer(), data, config, progress=False).router_aux_losses == []
