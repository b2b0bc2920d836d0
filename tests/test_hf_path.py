"""The HF path: decoder-only families without a fast path (GPT-NeoX, StableLM; tests/hf_families.py) train in the
HybridEngine as usual and generate through transformers' generate on the gathered, LoRA-fused model. Compared with
HF's own generate and training forward: greedy tokens equal, log-probs within 1e-5 (fp32); one warning naming the
family; training after generation bit-identical; apply_hybrid_engine, the frozen scorers, a GRPO run and the
sft/reward/ppo commands on such a family. A config the fast path cannot honour exactly takes the same path."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers
from demo_models import demo_llama, demo_rows, tokenizer
from hf_families import FAMILIES, LORA_TARGETS, family_model, save_family_model
from models import left_padded_prompts, train

import hybrid_engine
from hybrid_engine import HybridEngine
from hybrid_engine.commands.main import main
from hybrid_engine.engine.hf_path import HFPathWarning
from hybrid_engine.engine.logprobs import positions
from hybrid_engine.engine.patch import FallbackWarning, apply_hybrid_engine
from hybrid_engine.model.spec import spec_from_config
from hybrid_engine.rlhf import RewardModel
from hybrid_engine.rlhf.demo import DEMO_DIR, rule_score_batch
from hybrid_engine.rlhf.ppo import ModelSources, PPOConfig, train_ppo
from hybrid_engine.rlhf.scoring import FrozenPolicy, FrozenRewardModel

ATOL = 1e-5
PROMPTS = left_padded_prompts([5, 8, 3], seed=11)
T = PROMPTS[0].shape[1]


def lora(name: str) -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[name], init_lora_weights=False)


def engine(name: str, use_lora: bool = False, **kw) -> HybridEngine:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HFPathWarning)
        return HybridEngine(family_model(name), lora=lora(name) if use_lora else None,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), **kw)


def eos_mid_batch(eng: HybridEngine) -> int:
    """A token row 1 generates at its third step: as the eos id, row 1 stops early and the others run on."""
    free = eng.generate(*PROMPTS, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    return int(free.sequences[1, T + 2])


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request):
    """(family, its engine with LoRA adapters, trained two steps)."""
    eng = engine(request.param, use_lora=True)
    train(eng, range(2))
    return request.param, eng


def test_greedy_equals_hf_generate_of_the_merged_model_and_logprobs_the_training_forwards(trained, tmp_path):
    name, eng = trained
    eos = eos_mid_batch(eng)
    out = eng.generate(*PROMPTS, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert eng.stats.path == "hf" and eng.generation_path == "hf" and eng.stats.fuse_bytes > 0
    assert out.response_mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0] and out.response_mask.shape[1] == 8
    merged = copy.deepcopy(eng.module).merge_and_unload().eval()  # peft's own merge
    kw = dict(input_ids=PROMPTS[0], attention_mask=PROMPTS[1], max_new_tokens=8, do_sample=False, eos_token_id=eos,
              pad_token_id=0)
    assert torch.equal(out.sequences, merged.generate(**kw))
    eng.save_pretrained(tmp_path)
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(out.sequences, saved.generate(**kw))
    assert eng.logprob_mismatch(out, PROMPTS[1])["max"] <= ATOL
    sampled = eng.generate(*PROMPTS, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    again = eng.generate(*PROMPTS, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    assert torch.equal(sampled.sequences, again.sequences)
    assert eng.logprob_mismatch(sampled, PROMPTS[1], temperature=0.7)["max"] <= ATOL


def test_the_warning_is_given_once_and_names_the_family():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eng = HybridEngine(family_model("gpt_neox"))
        eng.generate(*PROMPTS, max_new_tokens=2)
        eng.generate(*PROMPTS, max_new_tokens=2)
    messages = [str(w.message) for w in caught if issubclass(w.category, HFPathWarning)]
    assert len(messages) == 1 and "model_type 'gpt_neox' generates through Hugging Face's generate" in messages[0]
    assert "does not support model_type 'gpt_neox'" in messages[0]  # the reason, spec_from_config's error


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_training_after_generation_is_bit_identical(use_lora):
    a, b = engine("stablelm", use_lora), engine("stablelm", use_lora)
    losses = train(a, range(2))
    state = torch.get_rng_state()
    a.generate(*PROMPTS, max_new_tokens=6, do_sample=True, temperature=0.9, top_p=0.9)
    assert torch.equal(torch.get_rng_state(), state)  # HF sampled from a forked global RNG
    assert losses + train(a, range(2, 4)) == train(b, range(4))


def test_settings_the_hf_path_cannot_honour_are_refused():
    for setting, match in [({"kv_dtype": "bf16"}, "generation.kv_dtype"), ({"gather": "layer"}, "generation.gather")]:
        with pytest.raises(ValueError, match=f"{match}.*needs the fast path; model_type 'gpt_neox'"):
            engine("gpt_neox", generation=setting)


def test_a_rope_type_the_fast_path_does_not_compute_takes_the_hf_path():
    model = demo_llama()
    model.config.rope_parameters = {"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    model = transformers.LlamaForCausalLM(model.config).eval()  # its rotary module built for proportional RoPE
    with pytest.raises(ValueError, match=r"rope_parameters\['rope_type'\]='proportional'"):
        spec_from_config(model.config)
    ids, mask = PROMPTS
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with pytest.warns(HFPathWarning, match=r"model_type 'llama'.*rope_type'\]='proportional'"):
        eng = HybridEngine(copy.deepcopy(model))
    out = eng.generate(ids, mask, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(out.sequences, expected) and eng.stats.path == "hf"
    assert spec_from_config(demo_llama().config).family == "llama"  # default RoPE: the fast path


@pytest.mark.parametrize("name", FAMILIES)
def test_hybrid_engine_generate_takes_the_hf_path_with_a_warning(name):
    model = family_model(name)
    ids, mask = PROMPTS
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    eos = int(free[1, T + 2])  # row 1 stops at its third token
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with pytest.warns(HFPathWarning, match=f"model_type '{name}' generates through Hugging Face's generate"):
        out = hybrid_engine.generate(model, ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert isinstance(out, hybrid_engine.GenerationOutput) and torch.equal(out.sequences, expected.sequences)
    assert out.response_mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    ref = torch.stack(expected.logits, 1).log_softmax(-1).gather(-1, expected.sequences[:, T:, None])[..., 0]
    assert (out.logprobs - ref * out.response_mask).abs().max() < ATOL
    with pytest.raises(ValueError, match=f"weight_dtype=torch.bfloat16 needs the fast path; model_type '{name}'"):
        hybrid_engine.generate(model, ids, mask, max_new_tokens=2, weight_dtype="bf16")


def test_the_generate_command_benchmarks_a_family_without_a_fast_path(tmp_path, capsys):
    save_family_model("gpt_neox", tmp_path)
    with pytest.warns(HFPathWarning, match="'gpt_neox'"):
        assert main(["generate", "--model", str(tmp_path), "--batch", "2", "--prompt-len", "5", "--max-new-tokens",
                     "4", "--compare-hf"]) == 0
    assert "greedy sequences identical to transformers: True" in capsys.readouterr().out


def test_apply_hybrid_engine_runs_hf_generate_on_the_fused_weights():
    model = peft.get_peft_model(family_model("gpt_neox"), lora("gpt_neox"))
    kw = dict(input_ids=PROMPTS[0], attention_mask=PROMPTS[1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(**kw)
    apply_hybrid_engine(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(**kw)
    messages = [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    assert torch.equal(out, expected) and model.generate.stats.path == "hf" and model.generate.stats.fuse_bytes > 0
    assert len(messages) == 1 and "gathered, LoRA-fused" in messages[0] and "'gpt_neox'" in messages[0]


@torch.no_grad()
def test_the_frozen_scorers_read_the_hf_forward():
    model = family_model("stablelm")
    ids, mask = left_padded_prompts([9, 6, 8], seed=4)
    policy = FrozenPolicy(copy.deepcopy(model))
    assert policy.net is None
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits.double()
    ref = logits.log_softmax(-1)[:, 2:-1].gather(-1, ids[:, 3:, None])[..., 0] * mask[:, 3:]
    assert (policy.token_logprobs(ids, mask, 3).double() - ref).abs().max() < ATOL
    torch.manual_seed(1)
    rm = RewardModel.from_model(model).eval()
    frozen = FrozenRewardModel(copy.deepcopy(rm))
    assert frozen.net is None and torch.equal(frozen.score(ids, mask, start=3), rm.score(ids, mask))


@pytest.mark.slow
def test_grpo_trains_a_family_without_a_fast_path(cache):
    data = demo_rows("ppo", 8, 4, cache)
    config = PPOConfig(algo="grpo", max_steps=2, batch_size=4, train_batch_size=4, max_new_tokens=6, lr=1e-3,
                       num_generations=2, eval_batch_size=4)
    with pytest.warns(HFPathWarning, match="'gpt_neox'"):
        result = train_ppo(ModelSources(actor=family_model("gpt_neox"), reward_fn=rule_score_batch), tokenizer(),
                           data, config, progress=False)
    assert result.steps == 2 and result.generation_path == "hf" and result.actor.stats.path == "hf"
    assert result.history[0]["logprob_source"] == "generation" and result.history[0]["logprob_mismatch"] < ATOL
    assert all(torch.isfinite(torch.tensor(r["policy_loss"])) for r in result.history)


@pytest.mark.slow
def test_the_sft_reward_and_ppo_commands_on_families_without_a_fast_path(cache, tmp_path, capsys):
    data = {}
    for step in ("sft", "reward", "ppo"):  # the demo's first 16 rows of each step, 4 held out
        data[step] = tmp_path / f"{step}.jsonl"
        data[step].write_text("\n".join((DEMO_DIR / f"{step}.jsonl").read_text().splitlines()[:16]) + "\n")
    tiny = ["--batch-size", "4", "--max-steps", "2", "--no-progress", "--eval-fraction", "0.25", "--cache-dir", cache]
    base = save_family_model("gpt_neox", tmp_path / "base")
    assert main(["sft", "--model", str(base), "--data", str(data["sft"]), *tiny,
                 "--output", str(tmp_path / "sft")]) == 0
    rm_base = save_family_model("stablelm", tmp_path / "rm-base")
    assert main(["reward", "--model", str(rm_base), "--data", str(data["reward"]), *tiny,
                 "--output", str(tmp_path / "rm")]) == 0
    saved = transformers.AutoConfig.from_pretrained(tmp_path / "rm")
    assert saved.architectures == ["StableLmForSequenceClassification"]
    capsys.readouterr()
    out = tmp_path / "ppo"
    assert main(["ppo", "--model", str(tmp_path / "sft"), "--reward-model", str(tmp_path / "rm"), "--data",
                 str(data["ppo"]), *tiny, "--train-batch-size", "4", "--max-new-tokens", "6",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if "generation path" in line)
    assert "hf (transformers' generate on the gathered, LoRA-fused actor" in line and "'gpt_neox'" in line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generation_path"] == "hf" and summary["steps"] == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_with_lora_gathers_once_and_generates_through_hf(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(Path(__file__).with_name("hf_zero3_worker.py")), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["stats"]["path"] == "hf" and r["stats"]["gather_bytes"] > 0 and r["stats"]["fuse_bytes"] > 0
        assert r["trained_forwards"] == 0  # no ZeRO-3 hook or peft layer ran per token
        assert r["parity"]["max"] <= ATOL and r["engine_equals_hf"]
        assert r["losses_with_generation"] == r["losses_without"]
    assert any(json.loads((tmp_path / f"rank{rank}.json").read_text())["eos_fired"] for rank in range(2))
