"""Gemma 3 (gemma3_text) on the fast path: what its spec and weights read from the HF model, the configs it refuses by
name (so that they take the HF path), and the HF outputs it reproduces beyond the per-family tests (test_generate,
test_scoring, test_engine, test_decode_step run the tiny Gemma 3 with the other families)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from models import GEMMA3_WINDOW, gemma3_config, left_padded_prompts, tiny_model
from test_generate import LENGTHS, hf_greedy

import hybrid_engine
from hybrid_engine.engine.train_kernels import apply_training_kernels, unapply_training_kernels
from hybrid_engine.model import extract_weights, spec_from_config
from hybrid_engine.rlhf.scoring import FrozenPolicy


def random_model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(gemma3_config(**overrides)).eval()


def test_spec_reads_gemma3s_differences_from_llama():
    spec = spec_from_config(tiny_model("gemma3").config)
    assert (spec.family, spec.activation, spec.qk_norm, spec.sandwich_norm, spec.post_norm) == (
        "llama", "gelu_pytorch_tanh_gated", "head", True, False)
    assert spec.attention_scale(0) == 20**-0.5 != spec.head_dim**-0.5  # query_pre_attn_scalar, not head_dim
    assert (spec.local_rope_layers, spec.sliding_window, spec.final_softcap) == ((0, 2), GEMMA3_WINDOW, None)
    assert spec_from_config(tiny_model("gemma3-softcap").config).final_softcap == 4.0


@pytest.mark.parametrize("weight_dtype", [None, torch.bfloat16])
def test_weights_fold_one_plus_the_norm_weight_and_round_the_embedding_scale(weight_dtype):
    model = tiny_model("gemma3")
    w = extract_weights(model, spec_from_config(model.config), weight_dtype)
    block, dtype = model.model.layers[1], weight_dtype or torch.float32
    norms = [w.layers[1].attn_norm, w.layers[1].attn_out_norm, w.layers[1].mlp_norm, w.layers[1].mlp_out_norm]
    hf = [block.input_layernorm, block.post_attention_layernorm, block.pre_feedforward_layernorm,
          block.post_feedforward_layernorm]
    for ours, theirs in zip(norms, hf, strict=True):
        assert torch.equal(ours.weight, 1.0 + theirs.weight.detach().to(dtype).float())
    assert w.embed_scale == torch.tensor(48**0.5).to(dtype).item() and w.embed_scale != 48**0.5
    assert torch.equal(w.local_inv_freq, model.model.rotary_emb.sliding_attention_inv_freq)
    assert not torch.equal(w.local_inv_freq, w.inv_freq)  # rope_theta 50 and 1000


@pytest.mark.parametrize("overrides, match", [
    (dict(attn_logit_softcapping=50.0), r"gemma3_text: attn_logit_softcapping=50.0 is not computed"),
    (dict(use_bidirectional_attention=True), r"gemma3_text: use_bidirectional_attention=True is not supported"),
    (dict(hidden_activation="gelu"), r"gemma3_text: hidden_activation 'gelu' is not supported"),
    (dict(rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000.0},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}),
     r"gemma3_text: rope_parameters\['rope_type'\]='dynamic' is not computed"),
], ids=["attn-softcap", "bidirectional", "gelu", "dynamic-rope"])
def test_what_the_fast_path_does_not_compute_is_refused_by_name(overrides, match):
    with pytest.raises(ValueError, match=match):
        spec_from_config(gemma3_config(**overrides))


def test_a_generation_longer_than_the_window_is_refused_naming_it():
    ids, mask = left_padded_prompts(LENGTHS)
    with pytest.raises(ValueError, match=rf"sequences of {9 + GEMMA3_WINDOW} tokens exceed the model's "
                                         rf"sliding_window={GEMMA3_WINDOW}"):
        hybrid_engine.generate(tiny_model("gemma3"), ids, mask, max_new_tokens=GEMMA3_WINDOW)


@pytest.mark.parametrize("overrides", [
    dict(layer_types=["full_attention"] * 3),
    dict(layer_types=["sliding_attention"] * 3),
    dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}),
], ids=["global-only", "sliding-only", "linear-global-rope"])
def test_other_layer_types_and_a_scaled_global_rope_generate_as_hf(overrides):
    model = random_model(**overrides)
    ids, mask = left_padded_prompts(LENGTHS)
    ours = hybrid_engine.generate(model, ids, mask, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.sequences, hf_greedy(model, ids, mask, 12))


def test_the_reference_policy_scores_rows_beyond_the_window_through_hf():
    """Rows longer than the window take the HF forward (which applies it), shorter ones the inference path."""
    model = random_model(sliding_window=8)
    policy = FrozenPolicy(copy.deepcopy(model))
    ids, mask = left_padded_prompts([12, 7, 10], seed=4)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask,
                                       position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits.double(), -1)
    ref = logp[:, 3:-1].gather(-1, ids[:, 4:, None])[..., 0] * mask[:, 4:]
    torch.testing.assert_close(policy.token_logprobs(ids, mask, 4).double(), ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rows of 12 tokens exceed the model's sliding_window=8"):
        policy.net.hidden_states(ids, mask)


def test_training_kernels_leave_gemma3s_modules_as_they_are():
    """Gemma's (1 + w) RMSNorm and GELU-tanh MLP do not fit the fused training ops: nothing is patched, the loss and
    its gradients are HF's to the bit."""
    model = tiny_model("gemma3").train()
    patched = apply_training_kernels(copy.deepcopy(model))
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    try:
        assert not any("forward" in vars(m) for m in patched.modules())
        loss = patched(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        unapply_training_kernels(patched)
    ref = model(input_ids=ids, labels=ids).loss
    ref.backward()
    assert torch.equal(loss, ref)
    for (name, p), q in zip(patched.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    model.zero_grad(set_to_none=True)
    model.eval()
