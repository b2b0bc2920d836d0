"""The reward model's saved forms (rlhf/reward_format.py): ours loads in transformers as a sequence classifier and
scores what we score; a model TRL's RewardTrainer trained scores our PPO as transformers scores it; the older
value_head.safetensors folders still load; refusals; a reward model with its own tokenizer (rlhf/retokenize.py)."""

from __future__ import annotations

import json

import datasets
import pytest
import tokenizers
import torch
import transformers
import trl
from demo_models import demo_llama, demo_rows, tokenizer
from safetensors.torch import save_file

from hybrid_engine.rlhf import RewardConfig, RewardModel, train_reward
from hybrid_engine.rlhf.ppo import ModelSources, PPOConfig, build_models, train_ppo
from hybrid_engine.rlhf.retokenize import RetokenizedRewardModel
from hybrid_engine.rlhf.reward_format import HEAD_FILE
from hybrid_engine.rlhf.scoring import FrozenRewardModel
from hybrid_engine.rlhf.tokens import pad

ATOL = 1e-5  # our forward vs transformers' on the same fp32 weights (different kernels, same maths)


def right_padded(n: int = 5, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n random rows of the demo vocabulary (no pad or special ids) of 3 to 11 tokens, right-padded."""
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(6, len(tokenizer()), (int(L),), generator=g).tolist()
            for L in torch.randint(3, 12, (n,), generator=g)]
    return pad(seqs, pad_id), pad([[1] * len(s) for s in seqs], 0)


def hf_scores(directory, ids, mask) -> torch.Tensor:
    model = transformers.AutoModelForSequenceClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)


@pytest.fixture(scope="module")
def pairs(cache):
    return demo_rows("reward", 32, 8, cache)


def test_ours_loads_as_a_transformers_sequence_classifier_and_scores_the_same(pairs, tmp_path):
    config = RewardConfig(max_steps=3, batch_size=8, lr=2e-3, seed=0, output_dir=str(tmp_path))
    trained = train_reward(demo_llama(), tokenizer(), pairs, config, progress=False).model
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"]
    assert len(saved["id2label"]) == 1 and saved["pad_token_id"] == tokenizer().pad_token_id
    assert not (tmp_path / HEAD_FILE).exists()
    bias = float(trained.value_head.bias)
    assert saved["score_bias"] == bias  # exactly: transformers' logit + score_bias is our reward
    ids, mask = right_padded()
    ours = trained.score(ids, mask)
    torch.testing.assert_close(hf_scores(tmp_path, ids, mask) + bias, ours, atol=ATOL, rtol=0)
    loaded = RewardModel.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.score(ids, mask), ours)
    torch.testing.assert_close(FrozenRewardModel(loaded).score(ids, mask), ours, atol=ATOL, rtol=0)  # the fast path


def test_a_head_without_bias_scores_exactly_as_transformers(tmp_path):
    torch.manual_seed(3)
    model = RewardModel.from_model(demo_llama(seed=2)).eval()
    model.save_pretrained(tmp_path, pad_token_id=0)
    ids, mask = right_padded(pad_id=0)
    torch.testing.assert_close(hf_scores(tmp_path, ids, mask), model.score(ids, mask), atol=ATOL, rtol=0)


def save_old_form(model: RewardModel, directory) -> None:
    """A reward model as hybrid_engine saved it before the sequence-classifier form."""
    model.body.save_pretrained(directory)
    head = {k: v.detach().contiguous() for k, v in model.value_head.state_dict().items()}
    save_file(head, str(directory / HEAD_FILE), metadata={"format": "pt", "kind": "hybrid_engine.reward_model.v1"})


def test_old_value_head_folders_still_load_and_score_identically(tmp_path):
    torch.manual_seed(4)
    model = RewardModel.from_model(demo_llama(seed=3)).eval()
    with torch.no_grad():
        model.value_head.bias.fill_(0.375)
    save_old_form(model, tmp_path)
    ids, mask = right_padded()
    for loaded in (RewardModel.from_pretrained(tmp_path), RewardModel.load(str(tmp_path))):
        assert torch.equal(loaded.eval().score(ids, mask), model.score(ids, mask))
        assert torch.equal(loaded.values(ids, mask), model.values(ids, mask))
    torch.manual_seed(0)  # loading draws from torch's RNG as it always did, whichever the form
    RewardModel.from_pretrained(tmp_path)
    after_old = torch.rand(1)
    model.save_pretrained(tmp_path / "new")
    torch.manual_seed(0)
    RewardModel.from_pretrained(tmp_path / "new")
    assert torch.equal(torch.rand(1), after_old)


def test_refuses_more_than_one_label_and_a_missing_head(tmp_path):
    config = demo_llama().config
    two = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**{**config.to_dict(),
                                                                                  "num_labels": 2}))
    two.save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match=r"two.*num_labels=1.*has 2"):
        RewardModel.from_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match=r"num_labels=1.*has 2"):
        RewardModel.load(two)
    headless = tmp_path / "headless"  # a causal LM's weights under a classifier's config: no score.weight
    demo_llama().save_pretrained(headless)
    saved = json.loads((headless / "config.json").read_text())
    (headless / "config.json").write_text(json.dumps({**saved, "architectures": ["LlamaForSequenceClassification"],
                                                      "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}))
    with pytest.raises(ValueError, match=r"headless: the classifier head's weights \(score.weight\) are missing"):
        RewardModel.from_pretrained(headless)
    demo_llama().save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match=r"lm holds no reward model"):
        RewardModel.from_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="no such folder"):
        RewardModel.from_pretrained(str(tmp_path / "nowhere"))


def trl_reward_model(pairs, directory) -> None:
    """A tiny LlamaForSequenceClassification trained 2 steps by TRL's RewardTrainer on demo pairs, saved there."""
    config = transformers.LlamaConfig(**{**demo_llama().config.to_dict(), "num_labels": 1})
    torch.manual_seed(7)
    model = transformers.LlamaForSequenceClassification(config)
    args = trl.RewardConfig(output_dir=str(directory / "run"), max_steps=2, per_device_train_batch_size=4,
                            learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                            dataloader_num_workers=0, disable_tqdm=True)
    rows = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pairs.train])
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer())
    trainer.train()
    trainer.save_model(str(directory))


def test_a_trl_reward_model_scores_our_ppo_as_transformers_does(pairs, tmp_path, cache):
    trl_reward_model(pairs, tmp_path)
    ids, mask = right_padded()
    theirs = hf_scores(tmp_path, ids, mask)
    sources = ModelSources(actor=demo_llama(), reward_model=str(tmp_path))
    config = PPOConfig(algo="ppo", max_steps=1, batch_size=4, train_batch_size=4, max_new_tokens=6, lr=1e-3,
                       critic_lr=1e-3, eval_batch_size=8)
    models = build_models(sources, config, tokenizer())
    assert type(models.reward) is FrozenRewardModel  # same vocabulary: no re-encoding
    torch.testing.assert_close(models.reward.score(ids, mask), theirs, atol=ATOL, rtol=0)
    critic = models.critic_model  # the critic starts from it too
    torch.testing.assert_close(critic.score(ids, mask), theirs, atol=ATOL, rtol=0)
    result = train_ppo(models, tokenizer(), demo_rows("ppo", 8, 4, cache), config, progress=False)
    assert result.steps == 1 and torch.isfinite(torch.tensor(result.history[0]["rm_score"]))
    assert result.before.reward is not None and not result.rm_own_tokenizer


def other_tokenizer(directory) -> transformers.PreTrainedTokenizerFast:
    """The demo's words under other ids (the non-special ids reversed), saved there: another vocabulary."""
    spec = json.loads(tokenizer().backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    special = {t for t in tokenizer().all_special_tokens}
    words = sorted((w for w in vocab if w not in special), key=vocab.get)
    free = sorted(vocab[w] for w in words)
    spec["model"]["vocab"] = {**{w: vocab[w] for w in special}, **dict(zip(words, reversed(free)))}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(json.dumps(spec)),
                                               bos_token=tokenizer().bos_token, eos_token=tokenizer().eos_token,
                                               pad_token=tokenizer().pad_token, unk_token=tokenizer().unk_token)
    tok.save_pretrained(directory)
    return tok


def test_a_reward_model_with_its_own_tokenizer_scores_the_re_encoded_text(tmp_path):
    policy = tokenizer()
    own = other_tokenizer(tmp_path)
    torch.manual_seed(5)
    RewardModel.from_model(demo_llama(seed=4)).save_pretrained(tmp_path)
    models = build_models(ModelSources(actor=demo_llama(), reward_model=str(tmp_path)), PPOConfig(
        algo="grpo", num_generations=2, batch_size=2, train_batch_size=4, max_new_tokens=6), policy)
    assert isinstance(models.reward, RetokenizedRewardModel)
    prompts = ["tell me about a fox", "describe the weather in paris today"]
    completions = [("the fox seems happy", True), ("it is cold and gloomy and", False)]  # (text, ended with EOS)
    prompt_ids = [policy(p)["input_ids"] for p in prompts]
    responses = [policy(c, add_special_tokens=False)["input_ids"] + [policy.eos_token_id] * ended
                 for c, ended in completions]
    width = max(map(len, responses)) + 1
    rows = pad(prompt_ids, policy.pad_token_id, left=True)  # a rollout: left-padded prompts, right-padded responses
    start = rows.shape[1]
    rows = torch.cat([rows, pad(responses, policy.pad_token_id, length=width)], 1)
    mask = torch.cat([pad([[1] * len(p) for p in prompt_ids], 0, left=True),
                      pad([[1] * len(r) for r in responses], 0, length=width)], 1)
    direct = [own(p)["input_ids"] + own(c, add_special_tokens=False)["input_ids"] + [own.eos_token_id] * ended
              for p, (c, ended) in zip(prompts, completions)]
    assert direct[0] != [i for i, m in zip(rows[0].tolist(), mask[0].tolist()) if m]  # the ids really differ
    want = models.reward.reward.score(pad(direct, own.pad_token_id), pad([[1] * len(d) for d in direct], 0))
    torch.testing.assert_close(models.reward.score(rows, mask, start), want, atol=0, rtol=0)
