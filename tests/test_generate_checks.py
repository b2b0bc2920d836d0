import copy
import importlib
import re

import pytest
import torch
import transformers
from models import VOCAB, left_padded_prompts, tiny_model

import hybrid_engine
from hybrid_engine.engine.settings import GenerationSettings
from hybrid_engine.generation import SamplingConfig, SamplingParams
from hybrid_engine.generation.checks import NonFiniteLogitsError, check_finite_logits
from hybrid_engine.model.dtypes import parse_kv_dtype, parse_weight_dtype
from hybrid_engine.rlhf.ppo import PPOConfig

# The module, not the function that hybrid_engine.generation re-exports under the same name.
generate_module = importlib.import_module("hybrid_engine.generation.generate")

LENGTHS = [5, 1, 9, 3, 7]


def _prompts():
    return left_padded_prompts([3, 2])


def _with(ids_fn=None, mask_fn=None, **kw):
    """Arguments for generate(): the default prompts, edited by ids_fn / mask_fn, plus kw."""

    def build():
        ids, mask = _prompts()
        ids = ids_fn(ids.clone()) if ids_fn else ids
        mask = mask_fn(mask.clone()) if mask_fn else mask
        return dict(input_ids=ids, attention_mask=mask, **kw)

    return build


def _set(t, index, value):
    t[index] = value
    return t


BAD = [
    ("negative id", _with(lambda i: _set(i, (0, -1), -1)), r"input_ids row 0 has token id -1 .*\[0, 97\)"),
    ("id >= vocab", _with(lambda i: _set(i, (1, -1), VOCAB)), rf"input_ids row 1 has token id {VOCAB} .*\[0, 97\)"),
    ("float ids", _with(lambda i: i.float()), "input_ids must be an integer tensor"),
    ("int16 ids", _with(lambda i: i.to(torch.int16)), "input_ids must be an integer tensor"),
    ("list ids", _with(lambda i: i.tolist()), "input_ids must be a torch.Tensor"),
    ("1-d ids", _with(lambda i: i[0], lambda m: m[0]), r"input_ids must be \[batch, length\]"),
    ("0 rows", _with(lambda i: i[:0], lambda m: m[:0]), r"input_ids must have at least one row .*\(0, 3\)"),
    ("0 columns", _with(lambda i: i[:, :0], lambda m: m[:, :0]), r"input_ids must .* column, got shape \(2, 0\)"),
    ("float mask", _with(mask_fn=lambda m: m.float()), "attention_mask must be an integer or bool tensor"),
    ("mask of 2s", _with(mask_fn=lambda m: m * 2), r"attention_mask must hold only 0 and 1, got \[2\]"),
    ("mask shape", _with(mask_fn=lambda m: m[:, 1:]), "attention_mask must have input_ids' shape"),
    ("empty row", _with(mask_fn=lambda m: _set(m, 1, 0)), r"attention_mask rows \[1\] are empty"),
    ("right padded", _with(mask_fn=lambda m: m.flip(1)), r"attention_mask rows \[1\] are not left-padded"),
    ("max_new_tokens 0", _with(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    ("max_new_tokens float", _with(max_new_tokens=2.0), "max_new_tokens must be an int >= 1"),
    ("max_new_tokens bool", _with(max_new_tokens=True), "max_new_tokens must be an int >= 1"),
    ("do_sample str", _with(do_sample="yes"), "do_sample must be a bool"),
    ("temperature 0", _with(do_sample=True, temperature=0.0), "temperature must be a finite number > 0"),
    ("temperature < 0", _with(do_sample=True, temperature=-1.0), "temperature must be a finite number > 0"),
    ("temperature nan", _with(do_sample=True, temperature=float("nan")), "temperature must be a finite number > 0"),
    ("temperature inf", _with(do_sample=True, temperature=float("inf")), "temperature must be a finite number > 0"),
    ("greedy temperature 0", _with(temperature=0.0), "temperature must be a finite number > 0"),
    ("top_k < 0", _with(do_sample=True, top_k=-1), "top_k must be an int >= 0"),
    ("top_k float", _with(do_sample=True, top_k=2.5), "top_k must be an int >= 0"),
    ("top_p 0", _with(do_sample=True, top_p=0.0), r"top_p must be a number in \(0, 1\]"),
    ("top_p > 1", _with(do_sample=True, top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    ("top_p nan", _with(do_sample=True, top_p=float("nan")), r"top_p must be a number in \(0, 1\]"),
    ("eos < 0", _with(eos_token_id=-1), r"eos_token_id=-1 is outside the vocabulary \[0, 97\)"),
    ("eos >= vocab", _with(eos_token_id=VOCAB), r"eos_token_id=97 is outside the vocabulary"),
    ("eos list", _with(eos_token_id=[3, VOCAB + 5]), r"eos_token_id\[1\]=102 is outside the vocabulary"),
    ("eos float", _with(eos_token_id=2.0), "eos_token_id must be an int token id"),
    ("eos str", _with(eos_token_id="2"), "eos_token_id must be an int token id"),
    ("pad < 0", _with(pad_token_id=-1), r"pad_token_id=-1 is outside the vocabulary"),
    ("pad >= vocab", _with(pad_token_id=VOCAB), r"pad_token_id=97 is outside the vocabulary"),
    ("pad float", _with(pad_token_id=1.0), "pad_token_id must be an int token id"),
    ("seed str", _with(seed="1"), "seed must be an int"),
    ("seed and generator", _with(seed=1, generator=torch.Generator()), "pass seed or generator, not both"),
    ("generator int", _with(generator=1), "generator must be a torch.Generator"),
    ("unknown argument", _with(top_a=0.1), r"unknown generation arguments \['top_a'\]; known: .*'top_k'"),
    ("sampling positional int", _with(sampling=8), r"sampling must be a SamplingParams or None, got int"),
    ("kv_dtype int8", _with(kv_dtype=torch.int8), r"kv_dtype must be one of fp32, bf16, fp16, got torch.int8"),
    ("kv_dtype name", _with(kv_dtype="half-ish"), r"kv_dtype must be one of fp32, bf16, fp16, got 'half-ish'"),
    ("weight_dtype fp16", _with(weight_dtype="fp16"), r"weight_dtype must be one of fp32, bf16, got 'fp16'"),
]


@pytest.mark.parametrize("build,match", [pytest.param(b, m, id=name) for name, b, m in BAD])
def test_bad_input_is_refused_before_any_work(build, match, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("generate() started work before checking its arguments")

    monkeypatch.setattr(generate_module, "extract_weights", no_work)
    with pytest.raises(ValueError, match=match):
        hybrid_engine.generate(tiny_model("gpt2"), **build())


def _meta_model():
    config = tiny_model("gpt2").config  # built (and cached) outside the meta device
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("make, match", [
    (lambda: "gpt2", r"model must be a Hugging Face causal LM \(an AutoModelForCausalLM.*\), got str$"),
    (lambda: torch.nn.Linear(4, VOCAB), r"model must be a Hugging Face causal LM .*, got Linear$"),
    (lambda: tiny_model("gpt2").state_dict(), r"model must be a Hugging Face causal LM .*, got OrderedDict$"),
    (_meta_model, r"model has tensors on the meta device \(e.g. transformer\.wte\.weight\).*load its weights first"),
], ids=["str", "nn.Linear", "state_dict", "meta"])
def test_a_model_that_cannot_generate_is_refused_before_any_work(make, match, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("generate() started work before checking its model")

    model = make()
    monkeypatch.setattr(generate_module, "extract_weights", no_work)
    monkeypatch.setattr(generate_module, "spec_from_config", no_work)
    ids, mask = _prompts()
    with pytest.raises(ValueError, match=match) as e:
        hybrid_engine.generate(model, ids, mask, max_new_tokens=2)
    assert "\n" not in str(e.value)


def test_bad_weight_dtype_names_the_argument():
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="weight_dtype must be one of fp32, bf16, got torch.float16"):
        hybrid_engine.generate(tiny_model("gpt2"), ids, mask, max_new_tokens=2, weight_dtype=torch.float16)


@pytest.mark.parametrize("setting, value, allowed", [
    ("kv_dtype", torch.int8, "fp32, bf16, fp16"),
    ("kv_dtype", "half-ish", "fp32, bf16, fp16"),
    ("weight_dtype", "fp16", "fp32, bf16"),
    ("weight_dtype", 16, "fp32, bf16"),
])
def test_a_dtype_setting_is_refused_with_one_error_wherever_it_enters(setting, value, allowed):
    """generate(), the engine's GenerationSettings and PPOConfig read a dtype setting through one parser, against
    one allowed set."""
    ids, mask = _prompts()
    expected = re.escape(f"{setting} must be one of {allowed}, got {value!r}")
    with pytest.raises(ValueError, match=expected):
        hybrid_engine.generate(tiny_model("gpt2"), ids, mask, max_new_tokens=2, **{setting: value})
    with pytest.raises(ValueError, match="generation." + expected):
        GenerationSettings(**{setting: value})
    with pytest.raises(ValueError, match="generation." + expected):
        PPOConfig(generation={setting: value})


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16),
                                         ("fp16", torch.float16), ("float32", torch.float32)])
def test_dtype_names_are_the_dtypes(name, dtype):
    assert parse_kv_dtype(name) == parse_kv_dtype(dtype) == dtype
    assert GenerationSettings(kv_dtype=name).kv_dtype == dtype
    assert parse_weight_dtype("fp32") is parse_weight_dtype(torch.float32) is parse_weight_dtype("none") is None
    assert parse_weight_dtype("bf16") == torch.bfloat16


def test_a_sampling_params_and_keywords_over_it_are_the_keywords_alone():
    model = tiny_model("gpt2")
    ids, mask = left_padded_prompts(LENGTHS)
    keywords = dict(max_new_tokens=5, do_sample=True, temperature=0.8, top_k=20, eos_token_id=[3, 4], pad_token_id=0)
    expected = hybrid_engine.generate(model, ids, mask, seed=7, **keywords)
    params = SamplingParams(**keywords, seed=1)
    for out in (hybrid_engine.generate(model, ids, mask, SamplingParams(**keywords, seed=7)),
                hybrid_engine.generate(model, ids, mask, params, seed=7),  # a keyword over the params
                hybrid_engine.generate(model, ids, mask, sampling=params, seed=7, weight_dtype="fp32",
                                       kv_dtype="fp32")):
        assert torch.equal(out.sequences, expected.sequences) and torch.equal(out.logprobs, expected.logprobs)
    assert SamplingConfig(True, 2.0, 5, 0.5) == SamplingParams(do_sample=True, temperature=2.0, top_k=5, top_p=0.5)


def test_dtypes_by_name_generate_as_the_dtypes():
    model = tiny_model("llama-gqa")
    ids, mask = left_padded_prompts(LENGTHS)
    by_dtype = hybrid_engine.generate(model, ids, mask, max_new_tokens=4, weight_dtype=torch.bfloat16,
                                      kv_dtype=torch.bfloat16)
    by_name = hybrid_engine.generate(model, ids, mask, max_new_tokens=4, weight_dtype="bf16", kv_dtype="bf16")
    assert torch.equal(by_name.sequences, by_dtype.sequences) and torch.equal(by_name.logprobs, by_dtype.logprobs)


def test_int32_ids_and_bool_mask_are_accepted():
    model = tiny_model("gpt2")
    ids, mask = left_padded_prompts(LENGTHS)
    expected = hybrid_engine.generate(model, ids, mask, max_new_tokens=4, pad_token_id=0)
    ours = hybrid_engine.generate(model, ids.int(), mask.bool(), max_new_tokens=4, pad_token_id=0)
    assert torch.equal(ours.sequences, expected.sequences)
    assert torch.equal(ours.logprobs, expected.logprobs)


def _broken(family, edit):
    model = copy.deepcopy(tiny_model(family))  # tiny_model is cached: never edit it in place
    with torch.no_grad():
        edit(model)
    return model


@pytest.mark.parametrize(
    "edit,kind",
    [
        (lambda m: m.model.layers[0].mlp.down_proj.weight.__setitem__((0, 0), float("nan")), "NaN"),
        (lambda m: m.lm_head.weight.__setitem__((7, 0), float("inf")), "inf"),
    ],
    ids=["nan-layer-weight", "inf-lm-head-weight"],
)
def test_non_finite_logits_at_prefill_name_step_0_and_every_row(edit, kind):
    model = _broken("llama-gqa", edit)
    ids, mask = left_padded_prompts(LENGTHS)
    with pytest.raises(NonFiniteLogitsError, match=r"step 0 \(prefill\) in batch rows \[0, 1, 2, 3, 4\]") as e:
        hybrid_engine.generate(model, ids, mask, max_new_tokens=4, pad_token_id=0)
    assert isinstance(e.value, FloatingPointError)
    assert f"{kind} in rows [0, 1, 2, 3, 4]" in str(e.value)


@pytest.mark.parametrize("value,kind", [(float("nan"), "NaN"), (float("inf"), "inf"), (float("-inf"), "inf")])
def test_check_finite_logits_finds_one_non_finite_value(value, kind):
    """One NaN, +inf or -inf anywhere in [B, V] fails the check (aminmax carries each to its min or max), with the
    batch row named; finite logits of any size, and none, pass."""
    logits = torch.randn(4, 1000) * 30
    check_finite_logits(logits, 3)
    check_finite_logits(logits[:0], 3)
    logits[2, 517] = value
    with pytest.raises(NonFiniteLogitsError, match=re.escape(f"step 3 (decode) in batch rows [12] ({kind} in rows")):
        check_finite_logits(logits, 3, torch.tensor([10, 11, 12, 13]))


def test_non_finite_logits_at_a_decode_step_name_that_step_and_only_the_rows_hit():
    ids, mask = left_padded_prompts(LENGTHS, seed=3)
    first = hybrid_engine.generate(tiny_model("llama-gqa"), ids, mask, max_new_tokens=1).sequences[:, -1]
    token = int(first[1])
    assert token not in ids.flatten().tolist()  # so the prefill stays finite and only step 1 sees it
    rows = torch.nonzero(first == token)[:, 0].tolist()
    model = _broken("llama-gqa", lambda m: m.model.embed_tokens.weight[token].fill_(float("nan")))
    with pytest.raises(NonFiniteLogitsError, match=re.escape(f"step 1 (decode) in batch rows {rows}")):
        hybrid_engine.generate(model, ids, mask, max_new_tokens=4, pad_token_id=0)


def test_generator_continues_its_stream():
    model = tiny_model("llama-gqa")
    ids, mask = left_padded_prompts(LENGTHS, seed=4)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.5, pad_token_id=0)

    def two_calls(make_generator):
        return [hybrid_engine.generate(model, ids, mask, generator=make_generator(), **kw).sequences for _ in range(2)]

    g = torch.Generator().manual_seed(11)
    shared = two_calls(lambda: g)
    fresh = two_calls(lambda: torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    reproduced = two_calls(lambda: g)
    assert torch.equal(shared[0], fresh[0]) and torch.equal(fresh[0], fresh[1])
    assert not torch.equal(shared[1], fresh[1])
    assert torch.equal(shared[0], reproduced[0]) and torch.equal(shared[1], reproduced[1])
    # seed=s is a fresh generator seeded with s.
    assert torch.equal(hybrid_engine.generate(model, ids, mask, seed=11, **kw).sequences, fresh[0])
