"""Padding-free (packed) batches (engine/packing.py) and the token budget (accumulate.budget_batches).

The packed forward's losses and gradients equal the padded one's in fp32 (losses within rel 1e-5; each gradient
tensor's largest difference within 1e-5 of its largest element, measured up to 2e-6) for SFT, the reward model and
its values (the critic), the actor's log-probs and entropy, and the frozen scoring; whole runs with a token budget
equal the padded large batch (SFT, reward model, PPO, GRPO); bad settings."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import transformers
from demo_models import demo_llama, demo_rows, tokenizer
from models import VOCAB, gemma3_config, tiny_model
from test_accumulation import assert_same_weights, plain_sgd  # noqa: F401 (a fixture)
from test_ppo import config as ppo_config
from test_ppo import demo_actor
from test_ppo import run as run_ppo

from hybrid_engine.engine.logprobs import token_logprobs
from hybrid_engine.engine.packing import check_packable, packing_of
from hybrid_engine.rlhf import RewardConfig, SFTConfig, accumulate, train_reward, train_sft
from hybrid_engine.rlhf.accumulate import budget_batches
from hybrid_engine.rlhf.data import WHOLE_FILE, DataConfig, DatasetSpec, load_step_data
from hybrid_engine.rlhf.ppo import PPOConfig
from hybrid_engine.rlhf.reward import RewardModel
from hybrid_engine.rlhf.scoring import FrozenPolicy, FrozenRewardModel
from hybrid_engine.rlhf.sft import sft_loss
from hybrid_engine.rlhf.tokens import TokenConfig, collate_sft, tokenize_sft

RTOL, ATOL = 1e-5, 1e-6  # losses, log-probs, rewards (fp32)
GRAD_REL = 1e-5  # gradients: max |diff| over a tensor, relative to its largest element (fp32 sums in another order)
START = 6  # where the responses of rows() begin


def rows(lengths: list[tuple[int, int]], seed: int = 0, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of rows padded on both sides: (prompt, response) lengths, prompts left-padded to
    START columns, responses right-padded; random tokens under the padding too."""
    g = torch.Generator().manual_seed(seed)
    T = START + max(r for _, r in lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros_like(ids)
    for b, (p, r) in enumerate(lengths):
        mask[b, START - p:START + r] = 1
    return ids, mask


LENGTHS = [(6, 9), (2, 3), (4, 1), (6, 7), (1, 9)]


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name, grad in a.items():
        diff, scale = (b[name] - grad).abs().max().item(), grad.abs().max().item()
        assert diff <= GRAD_REL * scale, f"{name}: max |diff| {diff:.3g}, largest gradient {scale:.3g}"


def both_ways(model: torch.nn.Module, loss_of) -> tuple[list, list]:
    """[loss, gradients] of loss_of(model, packed) on two copies of `model`, padded and packed."""
    out = []
    for packed in (False, True):
        m = copy.deepcopy(model).train()
        loss = loss_of(m, packed)
        loss.backward()
        out.append([loss.detach(), gradients(m)])
    return out[0], out[1]


# -- the packed row ---------------------------------------------------------------------------------------------


def test_packing_lays_the_real_tokens_end_to_end_and_unpacks_them_back():
    ids, mask = rows([(2, 3), (6, 1), (1, 2)])
    packing = packing_of(mask)
    assert packing.pack(ids)[0].tolist() == sum((r[m.bool()].tolist() for r, m in zip(ids, mask)), [])
    assert packing.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2]]
    assert packing.last.tolist() == [4, 11, 14]
    assert torch.equal(packing.unpack(packing.pack(ids)), ids * mask)


def test_budget_batches_fill_micro_batches_longest_first_and_keep_the_row_order():
    lengths = [5, 9, 3, 7, 2]
    parts = budget_batches([10, 11, 12, 13, 14], lengths, 12)
    assert parts == [[11, 12], [10, 13], [14]] or parts == [[11, 14], [10, 13], [12]]
    assert all(sum(lengths[[10, 11, 12, 13, 14].index(r)] for r in p) <= 12 for p in parts)
    assert sorted(r for p in parts for r in p) == [10, 11, 12, 13, 14]
    with pytest.raises(ValueError, match="training row 11 has 9 tokens, more than max_tokens_per_batch=8"):
        budget_batches([10, 11], [5, 9], 8, "training row")


@pytest.mark.parametrize("fields, match", [
    ({"max_tokens_per_batch": 64}, "max_tokens_per_batch 64 needs packing: set packing to true"),
    ({"packing": True, "max_tokens_per_batch": 0}, "max_tokens_per_batch must be a positive integer or None"),
    ({"packing": "yes"}, "packing must be true or false"),
])
def test_bad_packing_settings_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        SFTConfig(**fields)
    with pytest.raises(ValueError, match=match):
        PPOConfig(**fields)


def test_a_model_that_cannot_run_packed_rows_is_refused():
    with pytest.raises(ValueError, match="OPT's forward computes its positions .* set packing to false"):
        check_packable(transformers.OPTConfig())
    check_packable(transformers.Qwen3Config())


# -- packed equals padded ---------------------------------------------------------------------------------------


def test_sft_loss_and_gradients_packed_equal_padded(cache):
    data = demo_rows("sft", 8, 1, cache)
    examples, _ = tokenize_sft(data.train, tokenizer(), TokenConfig())
    batch = collate_sft(examples, tokenizer().pad_token_id)
    assert (batch["attention_mask"] == 0).float().mean() > 0.1  # enough padding to matter
    padded, packed = both_ways(demo_llama(), lambda m, p: sft_loss(m, batch, p))
    torch.testing.assert_close(packed[0], padded[0], rtol=RTOL, atol=0)
    assert_same_gradients(padded[1], packed[1])


@pytest.mark.parametrize("family", ["llama-gqa", "qwen3"])
def test_actor_logprobs_entropy_and_gradients_packed_equal_padded(family):
    ids, mask = rows(LENGTHS)
    model = tiny_model(family)

    def loss_of(m, packed: bool) -> torch.Tensor:
        logprobs, entropy = token_logprobs(m, m.get_output_embeddings(), ids, mask, START, 0.7, share_prefix=False,
                                           return_entropy=True, packed=packed)
        loss_of.out.append((logprobs.detach(), entropy))
        return -(logprobs * torch.linspace(0.5, 1.5, logprobs.numel()).view_as(logprobs)).sum()

    loss_of.out = []
    padded, packed = both_ways(model, loss_of)
    (lp, ent), (lp_packed, ent_packed) = loss_of.out
    torch.testing.assert_close(lp_packed, lp, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ent_packed, ent, rtol=RTOL, atol=ATOL)
    assert_same_gradients(padded[1], packed[1])


def test_rewards_values_and_gradients_packed_equal_padded():
    ids, mask = rows(LENGTHS, vocab=len(tokenizer()))
    torch.manual_seed(0)
    rm = RewardModel.from_model(demo_llama())
    padded, packed = both_ways(rm, lambda m, p: m(ids, mask, packed=p).sum() + m.values(ids, mask, p).square().sum())
    torch.testing.assert_close(packed[0], padded[0], rtol=RTOL, atol=0)
    assert_same_gradients(padded[1], packed[1])
    torch.testing.assert_close(rm.values(ids, mask, packed=True), rm.values(ids, mask), rtol=RTOL, atol=ATOL)


def test_frozen_scoring_packed_equals_padded_under_a_sliding_window():
    """Rows longer than Gemma 3's window (8 here) score through the HF forward, which packs; the window bounds
    attention inside each packed row as in the padded one."""
    torch.manual_seed(0)
    model = type(tiny_model("gemma3"))(gemma3_config(sliding_window=8)).eval()
    ids, mask = rows(LENGTHS)
    ref = FrozenPolicy(copy.deepcopy(model)).token_logprobs(ids, mask, START, 0.9)
    ours = FrozenPolicy(copy.deepcopy(model), packed=True).token_logprobs(ids, mask, START, 0.9)
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=ATOL)
    rm = RewardModel.from_model(model)
    scores = FrozenRewardModel(copy.deepcopy(rm)).score(ids, mask, START)
    torch.testing.assert_close(FrozenRewardModel(rm, packed=True).score(ids, mask, START), scores, rtol=RTOL,
                               atol=ATOL)


# -- whole runs with a token budget equal the padded large batch --------------------------------------------------


@pytest.fixture
def formed(monkeypatch) -> list[int]:
    """The number of micro-batches of every step the token budget formed."""
    counts: list[int] = []

    def recorded(*args, **kwargs):
        parts = budget_batches(*args, **kwargs)
        counts.append(len(parts))
        return parts

    monkeypatch.setattr(accumulate, "budget_batches", recorded)
    return counts


STEPS = {  # step -> (trainer, its config, a budget that cuts a step of 8 rows, the trained model, held-out loss)
    "sft": (train_sft, SFTConfig, 160, lambda r: r.engine.module, lambda r: r.eval_perplexity_after),
    "reward": (train_reward, RewardConfig, 200, lambda r: r.model, lambda r: r.after.loss),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_sft_and_reward_with_a_token_budget_equal_the_padded_batch(cache, plain_sgd, formed, step):  # noqa: F811
    train, config_class, budget, trained, held_out = STEPS[step]
    data = demo_rows(step, 16, 4, cache)

    def run(**fields):
        config = config_class(max_steps=2, batch_size=8, lr=1.0, **fields)
        return train(demo_llama(), tokenizer(), data, config, progress=False)

    big, packed = run(), run(packing=True, max_tokens_per_batch=budget)
    assert big.losses[-1] != big.losses[0]  # it trained
    assert len(formed) == 2 and min(formed) > 1  # the budget cut each step into micro-batches
    assert packed.losses == pytest.approx(big.losses, rel=RTOL)
    assert held_out(packed) == pytest.approx(held_out(big), rel=RTOL)
    assert_same_weights(trained(big), trained(packed))
    with pytest.raises(ValueError, match=r"training (row|pair) \d+ has \d+ tokens, more than max_tokens_per_batch=16"):
        run(packing=True, max_tokens_per_batch=16)


def test_an_sft_row_over_the_budget_is_named_by_its_data_file_and_row(tmp_path):
    """The over-budget row is named as the user's file numbers it (a JSON Lines file by line: the blank line counts),
    through the split, the blend's shuffle and the tokenizer's dropped rows; a second file is blended in by weight."""
    short = [{"prompt": f"say {w}", "response": w} for w in ("yes", "no", "maybe", "fine", "good", "bad")]
    first = tmp_path / "first.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in short[:3]) + "\n"
                     + json.dumps({"prompt": "tell me", "response": " ".join(["dog"] * 40)}) + "\n")
    second = tmp_path / "second.json"
    second.write_text(json.dumps(short[3:]))
    specs = [DatasetSpec(str(first), weight=1.0), DatasetSpec(str(second), weight=1.0)]
    data = load_step_data(DataConfig(specs, data_split=WHOLE_FILE["sft"], eval_fraction=0.0,
                                     cache_dir=str(tmp_path / "cache")), "sft")
    assert sorted(data.train_origins) == [(str(first), n) for n in (1, 2, 3, 5)] + [(str(second), n) for n in (1, 2, 3)]
    long = [data.train[i]["response"] for i, (_, n) in enumerate(data.train_origins) if n == 5]
    assert long == [" ".join(["dog"] * 40)]
    config = SFTConfig(max_steps=1, batch_size=7, packing=True, max_tokens_per_batch=30)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(first))}, row 5 has 4\d tokens, more than "
                                         r"max_tokens_per_batch=30: raise the budget"):
        train_sft(demo_llama(), tokenizer(), data, config, progress=False)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_ppo_and_grpo_with_a_token_budget_equal_the_padded_batch(cache, algo, plain_sgd, formed):  # noqa: F811
    data, rm = demo_rows("ppo", 16, 2, cache), RewardModel.from_model(demo_llama(seed=1)).eval()

    def run(**fields):
        cfg = ppo_config(algo, max_steps=2, train_batch_size=8, num_generations=2, lr=1.0, critic_lr=1.0, **fields)
        actor = demo_actor()
        return actor, run_ppo(data, cfg, rm, actor=actor)

    (big_actor, big), (packed_actor, packed) = run(), run(packing=True, max_tokens_per_batch=96)
    assert max(formed) > 1  # the budget cut some minibatch into micro-batches
    for a, b in zip(big.history, packed.history):
        for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "score"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=RTOL, abs=ATOL), key
    assert_same_weights(big_actor, packed_actor)


def test_deepspeed_refuses_a_budget_that_forms_more_micro_batches_than_it_counts():
    class DeepSpeedLike:
        zero_stage = 2

    with pytest.raises(ValueError, match="formed 3 micro-batches for one step, more than the "
                                         "gradient_accumulation_steps=2 DeepSpeed counts"):
        accumulate.accumulated_step(DeepSpeedLike(), torch.nn.Linear(1, 1), [torch.zeros] * 3, [1, 1, 1], 2, None)
