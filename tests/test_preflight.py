"""Every check a run can make from its configs, the model's config, the tokenizer and the data runs before the first
step of the first command (rlhf/preflight.py): positions, vocabulary and DeepSpeed's batch arithmetic."""

from __future__ import annotations

import datasets
import pytest
import transformers
from demo_models import demo_rows, tokenizer

from hybrid_engine.commands.main import main
from hybrid_engine.rlhf.data import StepData
from hybrid_engine.rlhf.ppo import PPOConfig
from hybrid_engine.rlhf.preflight import check_step, max_positions
from hybrid_engine.rlhf.reward import RewardConfig
from hybrid_engine.rlhf.sft import SFTConfig
from hybrid_engine.rlhf.tokens import TokenConfig, tokenize_ppo, tokenize_sft


def llama_config(positions: int, vocab: int | None = None):
    return transformers.LlamaConfig(vocab_size=vocab or len(tokenizer()), hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=positions)


def rows(step: str, **columns) -> StepData:
    ds = datasets.Dataset.from_dict(columns)
    return StepData(train=ds, eval=ds.select([]), reports=[])


def test_max_positions_reads_supported_and_other_configs():
    assert max_positions(llama_config(77)) == 77
    assert max_positions(transformers.GPT2Config(n_positions=33)) == 33
    assert max_positions(transformers.PretrainedConfig()) is None


def test_ppo_checks_its_longest_prompt_plus_new_tokens(cache):
    data, tok = demo_rows("ppo", 40, 10, cache), tokenizer()
    longest = max(len(e["input_ids"]) for d in (data.train, data.eval) for e in tokenize_ppo(d, tok, TokenConfig())[0])
    fits = PPOConfig(max_new_tokens=128 - longest)
    check_step("ppo", fits, data, tok, [("the model", llama_config(128))])  # exactly fits
    for config in (PPOConfig(max_new_tokens=129 - longest), PPOConfig(max_new_tokens=8, eval_max_new_tokens=129 -
                                                                                                   longest)):
        with pytest.raises(ValueError, match=f"ppo: its longest prompt \\({longest} tokens\\).* take 129 positions "
                                             "but the model has 128"):
            check_step("ppo", config, data, tok, [("the model", llama_config(128))])


@pytest.mark.parametrize("step, config_cls", [("sft", SFTConfig), ("reward", RewardConfig)])
def test_sft_and_reward_check_their_longest_row(step, config_cls):
    long = "tell me about a fox " * 6
    data = rows(step, prompt=["a fox", "a dog"], response=[long, "ok"], chosen=[long, "ok"], rejected=["no", long])
    tok = tokenizer()
    longest = max(len(e["input_ids"]) for e in tokenize_sft(data.train, tok, TokenConfig())[0])
    check_step(step, config_cls(), data, tok, [("m", llama_config(longest))])
    with pytest.raises(ValueError, match=f"{step}: its longest row \\({longest} tokens.* but m has {longest - 1}"):
        check_step(step, config_cls(), data, tok, [("m", llama_config(longest - 1))])
    short = config_cls(tokens=TokenConfig(max_prompt_len=4, max_seq_len=longest - 1))  # truncation makes it fit
    check_step(step, short, data, tok, [("m", llama_config(longest - 1))])


def test_a_tokenizer_larger_than_the_vocabulary_is_refused():
    data = rows("sft", prompt=["a"], response=["b"])
    with pytest.raises(ValueError, match="sft: --model m: the tokenizer has .* tokens but the model's vocabulary"):
        check_step("sft", SFTConfig(), data, tokenizer(), [("--model m", llama_config(512, vocab=10))])


def test_deepspeed_batch_arithmetic(monkeypatch):
    data = rows("sft", prompt=["a"], response=["b"])
    ok = [("m", llama_config(512))]
    with pytest.raises(ValueError, match=r"sft: ds_config's train_batch_size 7 != micro batch 4 x gradient "
                                         r"accumulation 1 \(batch_size 4\) x world size 1; set it to 4"):
        check_step("sft", SFTConfig(batch_size=4), data, tokenizer(), ok, {"train_batch_size": 7})
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_step("sft", SFTConfig(batch_size=4), data, tokenizer(), ok, {"train_batch_size": 8})
    with pytest.raises(ValueError, match="reward: ds_config.'gradient_accumulation_steps'. is 2 but the config says 1"):
        check_step("reward", RewardConfig(batch_size=4), data, tokenizer(), ok, {"gradient_accumulation_steps": 2})
    accumulated = SFTConfig(batch_size=4, gradient_accumulation_steps=2)  # micro batch 2 x 2 x 2 ranks
    check_step("sft", accumulated, data, tokenizer(), ok, {"train_batch_size": 8, "gradient_accumulation_steps": 2,
                                                           "train_micro_batch_size_per_gpu": 2})
    with pytest.raises(ValueError, match=r"micro batch 2 x gradient accumulation 2 \(batch_size 4\) x world size 2"):
        check_step("sft", accumulated, data, tokenizer(), ok, {"train_batch_size": 4})


def test_train_fails_before_sft_when_ppo_would_not_fit(tmp_path, capsys):
    """The issue's case: ppo.max_new_tokens=256 on the 128-position demo model ran SFT and the reward model first."""
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="ppo: .* take .* positions but the model has 128; lower max_new_tokens"):
        main(["train", "--output", str(out), "--no-progress", "--set", "ppo.max_new_tokens=256"])
    assert not (out / "sft").exists() and "step 1/3" not in capsys.readouterr().out
