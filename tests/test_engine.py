"""The hybrid engine in one process without DeepSpeed (plain torch training mode), for every supported
family, with and without LoRA. The DeepSpeed stages run in test_engine_distributed.py."""

from __future__ import annotations

import copy
import gc

import peft
import pytest
import torch
import transformers
from models import MOE, VOCAB, left_padded_prompts, tiny_model, train

import hybrid_engine
from hybrid_engine import HybridEngine

EOS = dict(eos_token_id=2, pad_token_id=0)
LORA_TARGETS = {"llama-gqa": ["q_proj", "v_proj", "down_proj"], "llama-tied-mha": ["k_proj", "gate_proj"],
                "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "k_proj", "down_proj"],
                "olmo2": ["k_proj", "o_proj", "up_proj"], "smollm3": ["q_proj", "k_proj", "gate_proj"],
                "phi3": ["qkv_proj", "gate_up_proj"], "gemma3": ["q_proj", "k_proj", "gate_proj"],
                "qwen3-moe": ["q_proj", "k_proj", "down_proj"],
                "mixtral": ["q_proj", "o_proj"],
                "opt": ["q_proj", "fc1"], "gpt2": ["c_attn", "c_fc"]}


def lora(name: str) -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[name], init_lora_weights=False,
                           fan_in_fan_out=name == "gpt2")


def engine(name: str, use_lora: bool = False, **kw) -> HybridEngine:
    torch.manual_seed(0)
    return HybridEngine(copy.deepcopy(tiny_model(name)), lora=lora(name) if use_lora else None,
                        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), **kw)


PROMPTS = left_padded_prompts([5, 8, 3], seed=11)
FAMILIES = list(LORA_TARGETS)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", FAMILIES)
def test_generate_equals_hf_of_the_saved_merged_model(name, use_lora, tmp_path):
    eng = engine(name, use_lora)
    train(eng, range(2))
    ids, mask = PROMPTS
    out = eng.generate(ids, mask, max_new_tokens=8, **EOS)
    eng.save_pretrained(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    hf = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **EOS)
    assert torch.equal(out.sequences, hf)
    assert torch.equal(hybrid_engine.generate(plain, ids, mask, max_new_tokens=8, **EOS).sequences, out.sequences)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", FAMILIES)
def test_generation_logprobs_equal_training_logprobs(name, use_lora):
    eng = engine(name, use_lora)
    train(eng, range(2))
    ids, mask = PROMPTS
    out = eng.generate(ids, mask, max_new_tokens=8, **EOS)
    assert eng.logprob_mismatch(out, mask)["max"] <= 1e-5


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_generate_takes_eos_and_pad_from_the_generation_config_as_hf_does(use_lora):
    """A call that names no eos or pad id stops at the module's generation_config.eos_token_id, as HF's generate of
    the same model does (the README's example ran past the model's <|im_end|>); an id in the call wins."""
    model = copy.deepcopy(tiny_model("llama-gqa"))
    ids, mask = PROMPTS
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    model.generation_config.eos_token_id = [int(free[0, ids.shape[1] + 2])]  # row 0 stops by step 2
    model.generation_config.pad_token_id = 5
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    adapters = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if use_lora else None  # B = 0: a no-op
    eng = HybridEngine(model, lora=adapters)  # its generation_config read through the peft wrapper
    out = eng.generate(ids, mask, max_new_tokens=8)
    assert torch.equal(out.sequences, expected) and not out.response_mask[0].all()
    assert torch.equal(eng.generate(ids, mask, max_new_tokens=8, eos_token_id=None).sequences, free)


def test_engine_generate_takes_non_contiguous_prompts():
    eng = engine("llama-gqa")
    ids, mask = PROMPTS
    ids_t, mask_t = ids.t().contiguous().t(), mask.t().contiguous().t()
    assert not ids_t.is_contiguous() and not mask_t.is_contiguous()
    expected = eng.generate(ids, mask, max_new_tokens=6, seed=1)
    out = eng.generate(ids_t, mask_t, max_new_tokens=6, seed=1)
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(out.logprobs, expected.logprobs)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", ["llama-gqa", "qwen3", "olmo2", "smollm3", "phi3", "gemma3"])
def test_training_after_generation_is_bit_identical(name, use_lora):
    a, b = engine(name, use_lora), engine(name, use_lora)
    losses = train(a, range(2))
    a.generate(*PROMPTS, max_new_tokens=6, do_sample=True, temperature=0.9, top_p=0.9)
    assert losses + train(a, range(2, 4)) == train(b, range(4))


def test_generation_never_modifies_a_trained_parameter():
    eng = engine("llama-gqa", use_lora=True, generation={"weight_dtype": "bf16"})
    before = {n: p.detach().clone() for n, p in eng.module.named_parameters()}
    with eng.generation_mode():
        eng.generate(*PROMPTS, max_new_tokens=4)
    for n, p in eng.module.named_parameters():
        assert torch.equal(p, before[n]), n


def test_without_lora_generation_reads_views_of_the_parameters():
    eng = engine("llama-gqa")
    eng.generate(*PROMPTS, max_new_tokens=2)
    assert eng.stats.copied_bytes == 0 and eng.stats.fuse_bytes == 0


def test_generation_mode_holds_the_switch_across_calls():
    eng = engine("llama-gqa", use_lora=True)
    ids, mask = PROMPTS
    separate = [eng.generate(ids, mask, max_new_tokens=4, seed=s).sequences for s in (1, 2)]
    with eng.generation_mode():
        fused = eng.stats.fuse_bytes
        held = [eng.generate(ids, mask, max_new_tokens=4, seed=s).sequences for s in (1, 2)]
        assert eng.stats.fuse_bytes == fused  # fused once
    assert all(torch.equal(x, y) for x, y in zip(separate, held))


def test_bf16_generation_reports_its_logprob_mismatch():
    eng = engine("llama-gqa", generation={"weight_dtype": torch.bfloat16})
    ids, mask = PROMPTS
    out = eng.generate(ids, mask, max_new_tokens=8)
    mismatch = eng.logprob_mismatch(out, mask)
    assert 0 < mismatch["mean"] <= mismatch["max"] < 0.5
    assert eng.stats.logprob_mismatch == mismatch


def test_bf16_kv_cache_setting_reaches_generation():
    eng = engine("llama-gqa", generation={"kv_dtype": "bf16"})
    ids, mask = PROMPTS
    out = eng.generate(ids, mask, max_new_tokens=8, seed=3)
    expected = hybrid_engine.generate(eng.module, ids, mask, max_new_tokens=8, seed=3, kv_dtype=torch.bfloat16)
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(out.logprobs, expected.logprobs, atol=1e-6, rtol=0)
    assert 0 < eng.logprob_mismatch(out, mask)["max"] < 0.5


def test_token_logprobs_matches_log_softmax_with_gradients():
    eng = engine("llama-gqa")
    ids, mask = PROMPTS
    start = 4
    ours = eng.token_logprobs(ids, mask, start)
    (ours * mask[:, start:]).sum().backward()
    grads = [p.grad.clone() for p in eng.module.parameters()]
    eng.module.zero_grad()
    logits = eng(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    ref = logits[:, start - 1 : -1].log_softmax(-1).gather(-1, ids[:, start:, None])[..., 0] * mask[:, start:]
    ref.sum().backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for g, p in zip(grads, eng.module.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def layer_calls(eng: HybridEngine) -> tuple[int, int]:
    """(calls in the forward, calls in the backward) of the attention of every decoder layer over one training
    step's loss: a layer under activation checkpointing runs again in the backward, to recompute what it did not keep.
    Its attention, since transformers checkpoints a layer's forward inside its hooks (the layer's own hooks run once);
    a pre-hook, since torch's non-reentrant checkpoint may stop a recomputation before the last module returns."""
    layers = [m.self_attn for m in eng.module.modules() if type(m).__name__.endswith("DecoderLayer")]
    assert layers
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in layers]
    try:
        ids, mask = left_padded_prompts([7, 4, 6], seed=0)
        loss = eng(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        forward = len(calls)
        eng.backward(loss)
    finally:
        for hook in hooks:
            hook.remove()
    assert forward == len(layers)
    return forward, len(calls) - forward


def test_gradient_checkpointing_trains_the_same():
    plain, ckpt = engine("llama-gqa"), engine("llama-gqa", gradient_checkpointing=True)
    ckpt.train()
    plain.train()
    torch.testing.assert_close(train(ckpt, range(3)), train(plain, range(3)), atol=1e-6, rtol=1e-6)
    # Checkpointing is really on: every layer runs again in the backward (and only with the flag).
    layers, recomputed = layer_calls(ckpt)
    assert recomputed == layers, f"{recomputed} of {layers} decoder layers recomputed in the backward"
    assert layer_calls(plain)[1] == 0


def test_lora_adapters_save_and_load(tmp_path):
    eng = engine("llama-gqa", use_lora=True)
    train(eng, range(2))
    ids, mask = PROMPTS
    out = eng.generate(ids, mask, max_new_tokens=6, **EOS)
    eng.save_pretrained(tmp_path, merged=False)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_model("llama-gqa")), tmp_path).eval()
    hf = loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **EOS)
    assert torch.equal(hf, out.sequences)


def test_only_the_adapters_train_with_lora():
    eng = engine("llama-gqa", use_lora=True)
    trainable = [n for n, p in eng.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_engine_loads_a_saved_directory(tmp_path):
    tiny_model("opt").save_pretrained(tmp_path)
    eng = HybridEngine(str(tmp_path))
    assert eng.spec.family == "opt" and eng.zero_stage is None


def _live_tensor_bytes() -> int:
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter):
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return sum(storages.values())


def test_leaving_generation_mode_returns_the_memory():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.AutoModelForCausalLM.from_config(config)
    eng = HybridEngine(model, lora=peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
                       generation={"weight_dtype": "bf16"})
    ids, mask = torch.randint(3, 4096, (16, 64)), torch.ones(16, 64, dtype=torch.long)
    live = _live_tensor_bytes()
    with eng.generation_mode():
        eng.generate(ids, mask, max_new_tokens=64)
        live_during = _live_tensor_bytes()
    assert live_during > live + 10 * 2**20  # bf16 copies and the KV cache were really held
    assert abs(_live_tensor_bytes() - live) <= 0.1 * live
    # The resident size, which depends on the process-wide allocator setting: tests/test_allocator.py, in a
    # process of its own.


@pytest.mark.parametrize("kwargs, match", [
    (dict(ds_config={"zero_optimization": {"stage": 4}}), "zero_optimization.stage"),
    (dict(lora=peft.LoraConfig(target_modules=["nope_proj"])), "target_modules"),
    (dict(generation={"inference_tp_size": 3}), "inference_tp_size"),
    (dict(generation={"gather": "some"}), "gather"),
    (dict(generation={"weight_dtype": "fp8"}), "weight_dtype"),
    (dict(generation={"kv_dtype": "int8"}), "kv_dtype"),
    (dict(generation={"beams": 2}), "unknown settings"),
    (dict(ds_config="/nonexistent/ds.json"), "ds_config"),
])
def test_bad_configuration_fails_before_any_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HybridEngine(copy.deepcopy(tiny_model("llama-gqa")), **kwargs)


@pytest.mark.parametrize("ids, match", [
    (torch.tensor([[3, -1, 4]]), "input_ids"),
    (torch.tensor([[3.0, 4.0]]), "input_ids"),
    (torch.zeros(0, 4, dtype=torch.long), "input_ids"),
    (torch.tensor([[3, VOCAB]]), "input_ids"),
])
def test_engine_generate_refuses_bad_input(ids, match):
    eng = engine("llama-gqa")
    with pytest.raises(ValueError, match=match):
        eng.generate(ids, max_new_tokens=2)


@pytest.mark.parametrize("name, tp, world, match", [
    ("llama-tied-mha", 2, 2, "attention heads"),  # 3 heads
    ("qwen2", 2, 2, "key/value heads"),  # 1 kv head
    ("llama-gqa", 2, 3, "world size"),
])
def test_tp_size_that_does_not_fit_is_refused(name, tp, world, match):
    from hybrid_engine.engine import GenerationSettings
    from hybrid_engine.model.spec import spec_from_config

    with pytest.raises(ValueError, match=f"inference_tp_size={tp} does not divide the .*{match}"):
        GenerationSettings(inference_tp_size=tp).check(spec_from_config(tiny_model(name).config), world_size=world)


def test_tp_is_refused_for_a_qk_norm_over_the_whole_projection():
    from hybrid_engine.engine import GenerationSettings
    from hybrid_engine.model.spec import spec_from_config

    spec = spec_from_config(tiny_model("olmo2").config)
    with pytest.raises(ValueError, match="inference_tp_size=2: .* q/k norm over the whole projection"):
        GenerationSettings(inference_tp_size=2).check(spec, world_size=2)
    GenerationSettings(inference_tp_size=2).check(spec_from_config(tiny_model("qwen3").config), world_size=2)


@pytest.mark.parametrize("name", MOE)
def test_tp_is_refused_for_a_mixture_of_experts_model(name):
    from hybrid_engine.engine import GenerationSettings
    from hybrid_engine.model.spec import spec_from_config

    with pytest.raises(ValueError, match="inference_tp_size=2: .* Mixture-of-Experts"):
        GenerationSettings(inference_tp_size=2).check(spec_from_config(tiny_model(name).config), world_size=2)
