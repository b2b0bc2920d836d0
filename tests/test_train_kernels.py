"""The training ops (ops/training.py) against their references, forward and backward, and the patched HF model
(engine/train_kernels.py) against the unpatched one: the same loss and gradients within the ops' tolerances,
in fp32 and under bf16 autocast."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from helpers import TOLERANCES, assert_within_twice_torch
from models import tiny_model
from transformers.models.llama import modeling_llama

from hybrid_engine.engine.train_kernels import (
    apply_training_kernels,
    training_kernels_applied,
    unapply_training_kernels,
)
from hybrid_engine.ops.training import rotary_embed, rotary_embed_reference, silu_mul, silu_mul_reference

DTYPES = [torch.float32, torch.bfloat16]
# B, Hq, Hkv, T, D: GQA and MHA, head dims 64 and 80 (a vector tail), cos/sin batch 1 or B.
ROTARY_SHAPES = [(2, 4, 2, 7, 64, 2), (1, 2, 2, 33, 80, 1), (3, 8, 1, 5, 128, 1)]


def rotary_case(B, Hq, Hkv, T, D, cos_batch, dtype):
    # q, k as the attention layer makes them: [B, T, H, D] projections viewed as [B, H, T, D].
    q = torch.randn(B, T, Hq, D).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, Hkv, D).to(dtype).transpose(1, 2).requires_grad_()
    angles = torch.rand(cos_batch, T, D // 2) * 6
    angles = torch.cat([angles, angles], -1)  # HF's cat(freqs, freqs)
    return q, k, angles.cos(), angles.sin()


def grads(fn, *inputs, seed=0):
    """fn's outputs and the gradients of a random linear function of them with respect to `inputs`."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, inputs)


def close(got, want, dtype):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,T,D,cos_batch", ROTARY_SHAPES)
def test_rotary_embed_matches_reference_forward_and_backward(B, Hq, Hkv, T, D, cos_batch, dtype):
    q, k, cos, sin = rotary_case(B, Hq, Hkv, T, D, cos_batch, dtype)
    outs, (gq, gk) = grads(lambda a, b: rotary_embed(a, b, cos, sin), q, k)
    ref_outs, (rq, rk) = grads(lambda a, b: rotary_embed_reference(a, b, cos, sin), q, k)
    assert all(o.dtype == dtype and o.is_contiguous() for o in outs)
    if dtype == torch.float32:
        close(outs + (gq, gk), ref_outs + (rq, rk), dtype)
    else:  # HF's own bf16 arithmetic rounds every product: ours must be at least as close to fp32
        hf = [modeling_llama.apply_rotary_pos_emb(q, k, cos.to(dtype), sin.to(dtype))[i] for i in (0, 1)]
        fp32 = rotary_embed_reference(q.float(), k.float(), cos, sin)
        for got, want, low in zip(outs, fp32, hf):
            assert_within_twice_torch(got, want, low)
        close((gq, gk), (rq, rk), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 40), (1, 17), (2, 300)])
def test_silu_mul_matches_reference_forward_and_backward(shape, dtype):
    gate = (torch.randn(shape) * 4).to(dtype).requires_grad_()  # both tails of the sigmoid
    up = torch.randn(shape).to(dtype).requires_grad_()
    outs, g = grads(silu_mul, gate, up)
    ref_outs, rg = grads(silu_mul_reference, gate, up)
    assert outs[0].dtype == dtype
    close(outs + g, ref_outs + rg, dtype)


def test_bad_inputs_name_the_argument():
    q, k, cos, sin = rotary_case(2, 4, 2, 7, 64, 2, torch.float32)
    with pytest.raises(RuntimeError, match=r"cos must be \[2 or 1, 7, 64\]"):
        rotary_embed(q, k, cos[:, :3], sin[:, :3])
    with pytest.raises(RuntimeError, match="up must have gate's shape"):
        silu_mul(torch.randn(3, 4), torch.randn(3, 5))


def lm_loss_and_grads(model, ids, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("family", ["llama-gqa", "qwen2", "qwen3", "olmo2", "smollm3", "phi3"])
def test_patched_model_trains_like_the_unpatched_one(family, autocast):
    model = tiny_model(family).train()
    modeling = importlib.import_module(type(model).__module__)
    hf_rotary = getattr(modeling.apply_rotary_pos_emb, "hybrid_engine_original", modeling.apply_rotary_pos_emb)
    patched = apply_training_kernels(copy.deepcopy(model))
    try:
        assert training_kernels_applied(patched) and not training_kernels_applied(model)
        assert modeling.apply_rotary_pos_emb is not hf_rotary
        ids = torch.randint(3, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
        loss, grad = lm_loss_and_grads(patched, ids, autocast)
    finally:
        unapply_training_kernels(patched)
    assert not training_kernels_applied(patched) and modeling.apply_rotary_pos_emb is hf_rotary
    ref_loss, ref_grad = lm_loss_and_grads(model, ids, autocast)
    tol = TOLERANCES[torch.float32] if not autocast else dict(atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(loss, ref_loss, **tol)
    for name, g in grad.items():
        torch.testing.assert_close(g, ref_grad[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_inference_on_a_patched_model_is_hf_exactly():
    model = tiny_model("llama-gqa").eval()
    patched = apply_training_kernels(copy.deepcopy(model))
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            got = patched(input_ids=ids).logits
            greedy = patched.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    finally:
        unapply_training_kernels(patched)
    with torch.no_grad():
        assert torch.equal(got, model(input_ids=ids).logits)
        assert torch.equal(greedy, model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0))


def test_a_loaded_model_keeps_its_patches_across_train_and_eval():
    """transformers 5 kernelizes what from_pretrained loads (its Hub `kernels` integration, on by default where the
    package is installed) and kernelizes again at each train()/eval() switch, which used to put HF's RMSNorm
    forward back over the patched one, silently."""
    model = apply_training_kernels(tiny_model("llama-gqa"))  # loaded by from_pretrained
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    for mode in (True, False, True):
        model.train(mode)
        assert all("forward" in vars(m) for m in norms), f"after train({mode})"
