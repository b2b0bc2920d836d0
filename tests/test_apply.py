"""apply_hybrid_engine: a patched HF generate equals HF's own, falls back (with one warning) where it cannot
be exact, refuses bad input, and serves TRL's GRPOTrainer."""

import copy
import math
import warnings

import pytest
import torch
import transformers
from models import VOCAB, left_padded_prompts, tiny_model

import hybrid_engine
from hybrid_engine import apply_hybrid_engine
from hybrid_engine.engine.patch import FallbackWarning, HybridGenerate, unapply_hybrid_engine

FAMILIES = ["llama-gqa", "qwen2", "qwen3", "olmo2", "smollm3", "phi3", "gemma3", "qwen3-moe", "mixtral", "opt", "gpt2"]
LENGTHS = [5, 1, 9, 3, 7]


def fresh(family: str) -> torch.nn.Module:
    return copy.deepcopy(tiny_model(family))


def prompts_and_eos(model, seed: int = 1):
    """Mixed left-padded prompts and an eos id that fires mid-batch (row 0 stops at step 3)."""
    ids, mask = left_padded_prompts(LENGTHS, seed=seed)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    return ids, mask, int(free[0, ids.shape[1] + 3])


def patched_call(model, **kwargs):
    """model.generate(**kwargs), asserting it took the fast path without a fallback warning."""
    calls = model.generate.calls
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(**kwargs)
    assert not [w for w in caught if issubclass(w.category, FallbackWarning)]
    assert model.generate.calls == calls + 1
    return out


def fallback_call(model, **kwargs):
    """(output, the FallbackWarning messages) of model.generate(**kwargs)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(**kwargs)
    return out, [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf(family):
    model = fresh(family)
    ids, mask, eos = prompts_and_eos(model)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=eos)
    config = transformers.GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=eos)
    expected = model.generate(**kw)
    expected_dict = model.generate(**kw, return_dict_in_generate=True)
    expected_config = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    apply_hybrid_engine(model)
    assert (expected[:, ids.shape[1]:] == 0).any()  # some row stopped early and was padded
    assert torch.equal(patched_call(model, **kw), expected)
    out = patched_call(model, **kw, return_dict_in_generate=True)
    assert isinstance(out, type(expected_dict)) and out.scores is None and out.logits is None
    assert torch.equal(out.sequences, expected_dict.sequences)
    assert torch.equal(patched_call(model, input_ids=ids, attention_mask=mask, generation_config=config),
                       expected_config)


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_length_matches_hf_when_every_row_stops_early(family):
    model = fresh(family)
    ids, mask = left_padded_prompts(LENGTHS, seed=2)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    eos = sorted(set(free[:, ids.shape[1] + 2].tolist()))  # every row stops by step 2
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    expected = model.generate(**kw)
    assert expected.shape[1] <= ids.shape[1] + 3
    apply_hybrid_engine(model)
    assert torch.equal(patched_call(model, **kw), expected)


def test_lengths_and_model_defaults_resolve_like_hf():
    model = fresh("llama-gqa")
    ids, mask, eos = prompts_and_eos(model, seed=3)
    model.generation_config.eos_token_id = eos  # as a checkpoint's generation_config.json would carry them
    model.generation_config.pad_token_id = 0
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.7
    calls = [dict(max_length=ids.shape[1] + 6, do_sample=False), dict(do_sample=False),  # max_length, default 20
             dict(max_new_tokens=4, max_length=99, do_sample=False), dict(max_new_tokens=5, top_k=3, do_sample=False)]
    expected = [model.generate(input_ids=ids, attention_mask=mask, **kw) for kw in calls]
    apply_hybrid_engine(model)
    for kw, ref in zip(calls, expected):
        assert torch.equal(patched_call(model, input_ids=ids, attention_mask=mask, **kw), ref), kw


def test_non_contiguous_prompts_match_hf():
    """A transposed (non-contiguous) input_ids and attention_mask, with the model's own eos from its
    generation_config (none given in the call), give HF's sequences on the fast path."""
    model = fresh("llama-gqa")
    ids, mask, eos = prompts_and_eos(model)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, 0
    ids_t, mask_t = ids.t().contiguous().t(), mask.t().contiguous().t()
    assert not ids_t.is_contiguous() and not mask_t.is_contiguous()
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    apply_hybrid_engine(model)
    out = patched_call(model, input_ids=ids_t, attention_mask=mask_t, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, expected)
    assert out.shape[1] > ids.shape[1] + 4 and (out[0, ids.shape[1] + 4 :] == 0).all()  # row 0 stopped at its eos


def test_no_attention_mask_infers_it_like_hf():
    model = fresh("opt")
    ids, _ = left_padded_prompts([4, 6, 2], pad_id=1, seed=4)  # OPT's pad id is 1
    expected = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=1)
    apply_hybrid_engine(model)
    assert torch.equal(patched_call(model, input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=1),
                       expected)


@pytest.mark.parametrize("family,targets", [("llama-gqa", ["q_proj", "v_proj", "down_proj", "lm_head"]),
                                            ("gpt2", ["c_attn", "c_fc"])])
def test_peft_lora_matches_peft_generate_and_leaves_parameters(family, targets):
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, lora_dropout=0.0,
                             fan_in_fan_out=family == "gpt2")
    model = peft.get_peft_model(fresh(family), config).eval()
    ids, mask, eos = prompts_and_eos(model)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=eos)
    expected = model.generate(**kw)
    plain = model.get_base_model()
    with model.disable_adapter():
        assert not torch.equal(plain.generate(**kw), expected)  # the adapters change the answer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_hybrid_engine(model)
    assert torch.equal(patched_call(model, **kw), expected)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("kwargs,reason", [
    (dict(num_beams=2), "num_beams=2"),
    (dict(repetition_penalty=1.3), "repetition_penalty=1.3"),
    (dict(logits_processor=transformers.LogitsProcessorList([transformers.MinLengthLogitsProcessor(4, 3)])),
     "logits_processor"),
    (dict(min_new_tokens=3), "min_new_tokens=3"),
    (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size=2"),
    (dict(bad_words_ids=[[5]]), "bad_words_ids"),
    (dict(num_return_sequences=2, do_sample=True, top_k=1), "num_return_sequences=2"),
    (dict(stopping_criteria=transformers.StoppingCriteriaList([transformers.MaxLengthCriteria(12)])),
     "stopping_criteria"),
    (dict(output_scores=True, return_dict_in_generate=True), "output_scores/output_logits"),
])
def test_unserved_settings_fall_back_with_one_warning(kwargs, reason):
    model = fresh("llama-gqa")
    ids, mask, eos = prompts_and_eos(model)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, eos_token_id=eos, **kwargs)
    torch.manual_seed(0)
    expected = model.generate(**kw)
    apply_hybrid_engine(model)
    torch.manual_seed(0)
    out, messages = fallback_call(model, **kw)
    assert len(messages) == 1 and reason in messages[0], messages
    expected = getattr(expected, "sequences", expected)
    assert torch.equal(getattr(out, "sequences", out), expected)
    assert fallback_call(model, **kw)[1] == []  # once per reason per model
    assert model.generate.fallbacks == 2 and model.generate.calls == 0


def test_unservable_batches_and_models_fall_back():
    model = fresh("gpt2")
    ids, mask = left_padded_prompts([4, 2], seed=5)
    right = dict(input_ids=ids.flip(1), attention_mask=mask.flip(1), max_new_tokens=4, do_sample=False,
                 pad_token_id=0)
    embeds = dict(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask, max_new_tokens=4,
                  do_sample=False, pad_token_id=0)
    expected = [model.generate(**right), model.generate(**embeds)]
    model.train()  # dropout 0.1: HF samples dropout masks
    torch.manual_seed(0)
    expected_train = model.generate(**right)
    apply_hybrid_engine(model)
    torch.manual_seed(0)
    out, messages = fallback_call(model, **right)
    assert torch.equal(out, expected_train) and "training mode with dropout" in messages[0]
    model.eval()
    for kw, ref, reason in zip([right, embeds], expected, ["not left-padded", "inputs_embeds"]):
        out, messages = fallback_call(model, **kw)
        assert torch.equal(out, ref) and len(messages) == 1 and reason in messages[0], messages


def test_unsupported_architecture_falls_back():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=37, is_decoder=True)
    model = transformers.BertLMHeadModel(config).eval()
    ids = torch.tensor([[5, 6, 7]])
    expected = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    apply_hybrid_engine(model)
    out, messages = fallback_call(model, input_ids=ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, expected) and "does not support model_type 'bert'" in messages[0]


@pytest.mark.parametrize("change,argument", [
    (lambda ids, mask: (ids.masked_fill(ids == ids[0, -1], -3), mask), "input_ids"),
    (lambda ids, mask: (ids.float(), mask), "input_ids"),
    (lambda ids, mask: (ids[:0], mask[:0]), "input_ids"),
    (lambda ids, mask: (ids.masked_fill(ids == ids[0, -1], VOCAB), mask), "input_ids"),
    (lambda ids, mask: (ids, mask * 2), "attention_mask"),
    (lambda ids, mask: (ids, mask.float()), "attention_mask"),
    (lambda ids, mask: (ids, mask.masked_fill(torch.arange(len(mask))[:, None] == 1, 0)), "attention_mask"),
])
def test_bad_input_raises_naming_the_argument(change, argument):
    model = apply_hybrid_engine(fresh("llama-gqa"))
    ids, mask = change(*left_padded_prompts(LENGTHS, seed=6))
    with pytest.raises(ValueError, match=argument):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize("kwargs,argument", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_length=3), "max_length"),
    (dict(max_new_tokens=4, do_sample=True, top_k=-1), "top_k"),
    (dict(max_new_tokens=4, do_sample=True, temperature=0.0), "temperature"),
    (dict(max_new_tokens=4, eos_token_id="x"), "eos_token_id"),
])
def test_bad_settings_raise_naming_the_argument(kwargs, argument):
    model = apply_hybrid_engine(fresh("llama-gqa"))
    ids, mask = left_padded_prompts(LENGTHS, seed=6)
    with pytest.raises(ValueError, match=argument):
        model.generate(input_ids=ids, attention_mask=mask, **kwargs)


def test_sampling_is_reproducible_after_manual_seed_and_leaves_the_global_rng():
    ids, mask = left_padded_prompts(LENGTHS, seed=7)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=20,
              top_p=0.9, pad_token_id=0, eos_token_id=None)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        model = apply_hybrid_engine(fresh("qwen2"))
        state = torch.get_rng_state()
        runs.append([patched_call(model, **kw) for _ in range(2)])
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[0][1])  # the patch's generator advances between calls
    assert runs[0][0].shape == (len(LENGTHS), ids.shape[1] + 12)


@pytest.mark.parametrize("sample", [False, True])
def test_scores_and_logits_match_hf_where_exact(sample):
    model = fresh("llama-gqa")
    ids, mask = left_padded_prompts(LENGTHS, seed=8)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
              return_dict_in_generate=True, output_scores=True, output_logits=True)
    expected = model.generate(**kw)
    apply_hybrid_engine(model)
    if sample:
        kw.update(do_sample=True, temperature=0.5, top_k=5)
    out = patched_call(model, **kw)
    T = ids.shape[1]
    if not sample:
        assert torch.equal(out.sequences, expected.sequences)
        for ours, ref in zip(out.scores + out.logits, expected.scores + expected.logits, strict=True):
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
        return
    full = torch.cat([mask, torch.ones_like(out.sequences[:, T:])], 1)
    with torch.no_grad():
        hf_logits = model(input_ids=out.sequences, attention_mask=full,
                          position_ids=(full.cumsum(1) - 1).clamp(min=0)).logits[:, T - 1 : -1]
    for i, (scores, logits) in enumerate(zip(out.scores, out.logits, strict=True)):
        torch.testing.assert_close(logits, hf_logits[:, i], atol=1e-4, rtol=1e-4)
        kept = scores.isfinite()
        assert (kept.sum(1) == 5).all() and kept.gather(1, out.sequences[:, T + i, None]).all()
        torch.testing.assert_close(scores[kept], (logits / 0.5)[kept])


@pytest.mark.parametrize("gather", ["all", "layer"])
def test_generation_settings_pass_through(gather):
    model = fresh("opt")
    ids, mask, eos = prompts_and_eos(model)
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    expected = hybrid_engine.generate(model, ids, mask, weight_dtype=torch.bfloat16, **kw).sequences
    expected_kv = hybrid_engine.generate(model, ids, mask, weight_dtype=torch.bfloat16, kv_dtype=torch.bfloat16,
                                         **kw).sequences
    apply_hybrid_engine(model, weight_dtype=torch.bfloat16, gather=gather)
    assert torch.equal(patched_call(model, input_ids=ids, attention_mask=mask, **kw), expected)
    apply_hybrid_engine(model, weight_dtype=torch.bfloat16, gather=gather, kv_dtype=torch.bfloat16)
    assert torch.equal(patched_call(model, input_ids=ids, attention_mask=mask, **kw), expected_kv)
    assert model.generate.stats.copied_bytes > 0 and model.generate.stats.generated_tokens > 0


def test_apply_twice_unapply_and_deepcopy():
    model = fresh("llama-gqa")
    ids, mask = left_padded_prompts(LENGTHS, seed=9)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = model.generate(**kw)
    apply_hybrid_engine(model)
    patch = model.generate
    assert apply_hybrid_engine(model) is model and model.generate is patch  # same settings: untouched
    apply_hybrid_engine(model, weight_dtype=torch.bfloat16)
    assert isinstance(model.generate.__wrapped__, type(patch.__wrapped__))  # re-wraps the original, not the patch
    assert not isinstance(model.generate.__wrapped__, HybridGenerate)
    apply_hybrid_engine(model)
    twin = copy.deepcopy(model)
    assert twin.generate.model is twin and torch.equal(patched_call(twin, **kw), expected)
    assert twin.generate.__wrapped__.__self__ is twin
    unapply_hybrid_engine(model)
    assert "generate" not in model.__dict__ and torch.equal(model.generate(**kw), expected)


def test_tensor_parallel_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match="inference_tp_size"):
        apply_hybrid_engine(fresh("gpt2"), inference_tp_size=2)
    with pytest.raises(ValueError, match="gather"):
        apply_hybrid_engine(fresh("gpt2"), gather="some")
    with pytest.raises(ValueError, match="unknown settings"):
        apply_hybrid_engine(fresh("gpt2"), seed=3)


# ---- TRL ----
WORDS = ["<pad>", "<eos>", "<bos>", "<unk>", "the", "a", "cat", "dog", "sat", "ran", "on", "mat", "big", "small",
         "red", "blue", "and", "it", "was", "happy"]


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                bos_token="<bos>", unk_token="<unk>", padding_side="left")


@pytest.mark.slow
def test_trl_grpo_trainer_generates_through_the_patch(tmp_path):
    import datasets
    import trl

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")  # TRL reads config._name_or_path
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    prompts = ["the cat sat", "a dog ran on", "the big red mat", "it was", "a small blue cat and", "the dog"]
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=2,
                          per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                          learning_rate=1e-3, beta=0.0, logging_steps=1, save_strategy="no", bf16=False,
                          gradient_checkpointing=False, disable_dropout=True, seed=0, dataloader_num_workers=0)

    def reward_red(completions, **kwargs):
        return [float(c.split().count("red")) - 0.1 * len(c.split()) for c in completions]

    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward_red, args=args, processing_class=tiny_tokenizer(),
                              train_dataset=datasets.Dataset.from_dict({"prompt": prompts}))
    apply_hybrid_engine(trainer.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    assert trainer.model.generate.calls == 2 and trainer.model.generate.fallbacks == 0  # one generation per step
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
