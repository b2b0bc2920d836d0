"""Step 2, the reward model: the pairwise loss against a loop, the last-non-pad-token read under left and
right padding, per-token values, save -> load, learning the demo preference, and bad input."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import peft
import pytest
import torch
import transformers
from demo_models import demo_llama, demo_rows, tokenizer

from hybrid_engine.rlhf import RewardConfig, RewardModel, evaluate_reward, last_token_index, pairwise_loss, train_reward
from hybrid_engine.rlhf.reward_format import HEAD_FILE
from hybrid_engine.rlhf.tokens import TokenConfig, pad, tokenize_reward


@pytest.fixture(scope="module")
def pairs(cache):
    return demo_rows("reward", 400, 100, cache)


def reward_model(seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel.from_model(demo_llama(seed)).eval()


def sequences(n: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(6, len(tokenizer()), (int(L),), generator=g).tolist() for L in torch.randint(3, 12, (n,),
                                                                                                         generator=g)]


def padded(seqs: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return pad(seqs, 0, left=left), pad([[1] * len(s) for s in seqs], 0, left=left)


def test_pairwise_loss_equals_a_loop():
    g = torch.Generator().manual_seed(0)
    chosen = torch.randn(64, generator=g, dtype=torch.float64) * 10
    rejected = torch.randn(64, generator=g, dtype=torch.float64) * 10
    chosen[:2] = torch.tensor([60.0, -60.0])  # logsigmoid stays finite far out
    ref = 0.0
    for c, r in zip(chosen.tolist(), rejected.tolist()):
        d = c - r  # -log sigmoid(d), stably
        ref += math.log1p(math.exp(-d)) if d >= 0 else -d + math.log1p(math.exp(d))
    assert float(pairwise_loss(chosen, rejected)) == pytest.approx(ref / len(chosen), rel=1e-12)
    assert float(pairwise_loss(torch.zeros(3), torch.zeros(3))) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="chosen and rejected"):
        pairwise_loss(torch.zeros(3), torch.zeros(4))


def test_last_token_index_for_right_left_and_rollout_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0],   # right-padded
                         [0, 0, 1, 1, 1],   # left-padded: the last column
                         [0, 1, 1, 1, 0],   # a left-padded prompt whose response ended early
                         [1, 1, 1, 1, 1],
                         [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 3, 4, 0]
    assert last_token_index(mask.bool()).tolist() == [2, 4, 3, 4, 0]
    with pytest.raises(ValueError, match="no tokens"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_score_reads_the_last_real_token_under_left_and_right_padding():
    model = reward_model()
    seqs = sequences()
    alone = torch.cat([model.score(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
    for left in (False, True):
        ids, mask = padded(seqs, left)
        scores = model.score(ids, mask)
        assert scores.shape == (len(seqs),) and scores.dtype == torch.float32 and not scores.requires_grad
        assert torch.allclose(scores, alone, atol=1e-5), f"left={left}"
        values = model.values(ids, mask)  # (B, T), the critic's per-token values
        assert values.shape == ids.shape and values.requires_grad
        assert torch.equal(values[~mask.bool()], torch.zeros(int((mask == 0).sum())))
        assert torch.allclose(values[torch.arange(len(seqs)), last_token_index(mask)], scores, atol=1e-6)
    with torch.no_grad():  # by hand
        hidden = model.body(input_ids=torch.tensor([seqs[0]])).last_hidden_state  # (1, T, H)
        assert float(model.value_head(hidden[0, -1])) == pytest.approx(float(alone[0]), abs=1e-5)
    assert len(set(alone.tolist())) == len(seqs)  # a read of one fixed column would not tell them apart


def test_save_and_load_round_trip_the_scores_exactly(tmp_path):
    model = reward_model()
    ids, mask = padded(sequences(), left=True)
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in Path(tmp_path).iterdir())
    assert {"config.json", "model.safetensors"} <= set(files) and HEAD_FILE not in files  # a sequence classifier
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]  # nothing pickled
    loaded = RewardModel.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.score(ids, mask), model.score(ids, mask))
    assert torch.equal(RewardModel.load(str(tmp_path)).eval().score(ids, mask), model.score(ids, mask))
    body = transformers.AutoModel.from_pretrained(tmp_path)  # the body alone is a plain HF model
    assert type(body) is transformers.LlamaModel
    assert torch.equal(body.embed_tokens.weight, model.body.embed_tokens.weight)


def test_a_causal_lm_directory_gives_its_body_and_a_new_head(tmp_path):
    lm = demo_llama()
    lm.save_pretrained(tmp_path)
    model = RewardModel.load(tmp_path)
    assert type(model.body) is transformers.LlamaModel
    for name, p in model.body.named_parameters():
        assert torch.equal(p, lm.model.get_parameter(name)), name
    shared = RewardModel.from_model(lm)
    assert shared.body is lm.model


def test_reward_model_learns_the_demo_preference_and_saves(pairs, tmp_path):
    config = RewardConfig(epochs=3, batch_size=16, lr=2e-3, seed=0, eval_every=25, output_dir=str(tmp_path))
    result = train_reward(demo_llama(), tokenizer(), pairs, config, progress=False)
    assert result.steps == len(result.losses) == 75  # 400 pairs / 16, three times
    assert [s for s, _ in result.evals] == [0, 25, 50, 75]
    assert 0.3 < result.accuracy_before < 0.7  # a random head
    assert result.accuracy_after >= 0.9  # 0.97-0.99 over seeds 0-2
    assert result.after.chosen_mean > result.after.rejected_mean
    assert sum(result.losses[-10:]) < sum(result.losses[:10])
    assert not result.model.training

    loaded = RewardModel.from_pretrained(tmp_path).eval()
    held_out, _ = tokenize_reward(pairs.eval, tokenizer(), TokenConfig())
    again = evaluate_reward(loaded, held_out, tokenizer().pad_token_id)  # HF's code (the trained model ran ours)
    assert dataclasses.asdict(again) == pytest.approx(dataclasses.asdict(result.after), rel=1e-6, abs=1e-6)


def test_a_run_is_determined_by_its_seed(pairs):
    def run(seed: int) -> list[float]:
        config = RewardConfig(max_steps=3, batch_size=8, lr=1e-3, seed=seed)
        return train_reward(demo_llama(), tokenizer(), pairs, config, progress=False).losses

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_each_steps_learning_rate_is_the_schedules(pairs):
    config = RewardConfig(max_steps=3, batch_size=8, lr=1e-3, schedule="linear")
    assert train_reward(demo_llama(), tokenizer(), pairs, config, progress=False).lrs == pytest.approx(
        [1e-3, 2e-3 / 3, 1e-3 / 3], rel=1e-12)  # linear decay over 3 steps


def test_bad_inputs_fail_with_a_clear_error(pairs, tmp_path):
    no_pad = copy.deepcopy(tokenizer())
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        train_reward(demo_llama(), no_pad, pairs, RewardConfig(max_steps=1), progress=False)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=len(tokenizer()), hidden_size=32,
                                                          num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=64))
    with pytest.raises(ValueError, match="model_type .*'bert'"):
        RewardModel.from_model(bert)
    with pytest.raises(ValueError, match="Hugging Face model"):
        RewardModel.from_model(torch.nn.Linear(4, 4))
    lora = peft.LoraConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="peft"):
        RewardModel.from_model(peft.get_peft_model(demo_llama(), lora))
    with pytest.raises(ValueError, match="LoRA layers"):
        injected = demo_llama()
        peft.get_peft_model(injected, lora)
        RewardModel.from_model(injected)
    with pytest.raises(ValueError, match="config.json"):
        RewardModel.load(tmp_path)
    demo_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=HEAD_FILE):
        RewardModel.from_pretrained(tmp_path)
    narrow = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="vocabulary"):
        train_reward(narrow, tokenizer(), pairs, RewardConfig(max_steps=1), progress=False)
    model = reward_model()
    ids, mask = padded(sequences(2), left=False)
    with pytest.raises(ValueError, match="attention_mask"):
        model.score(ids, mask[:, 1:])
    with pytest.raises(ValueError, match="input_ids"):
        model.score(ids[0], mask[0])
    with pytest.raises(ValueError, match="schedule"):
        RewardConfig(schedule="polynomial")
