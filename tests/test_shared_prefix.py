"""Rows that share their prompt (GRPO's and RLOO's samples of one prompt): the prompt once per run of rows, its KV
cache gathered to the run's rows, then every row's response on that cache. In training (engine/logprobs.py), held to
the one-pass forward, values and gradients, for every family, with and without LoRA, with gradient checkpointing
(which falls back to one pass) and under bf16 autocast; on the inference path (model/transformer.py), prefill,
generation, the frozen reference's log-probs and the frozen reward model's scores, held to one pass or to HF."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from models import VOCAB, left_padded_prompts, tiny_model
from test_engine import FAMILIES, engine
from test_scoring import hf_logprobs, reward_model
from torch.distributions import Categorical

from hybrid_engine.engine.logprobs import positions
from hybrid_engine.generation import generate_with
from hybrid_engine.model.kv_cache import KVCache
from hybrid_engine.model.prefix import shared_prefix_runs
from hybrid_engine.model.spec import spec_from_config
from hybrid_engine.model.transformer import InferenceTransformer
from hybrid_engine.model.weights import extract_weights
from hybrid_engine.rlhf.scoring import FrozenPolicy, FrozenRewardModel

START = 8  # the prompts' width: every response begins at column 8
RUNS = [2, 3, 1]  # rows per prompt: runs of different lengths, and one row that shares nothing


def grouped_rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [6, 14]: 3 left-padded prompts repeated RUNS times, each row followed by its own
    random response of 6, 4, 1, 6, 3 or 5 tokens, then right padding."""
    ids, mask = left_padded_prompts([5, 8, 3], seed=seed)
    owner = torch.repeat_interleave(torch.arange(3), torch.tensor(RUNS))
    g = torch.Generator().manual_seed(seed + 1)
    response = torch.randint(2, VOCAB, (6, 6), generator=g)
    response_mask = (torch.arange(6)[None] < torch.tensor([6, 4, 1, 6, 3, 5])[:, None]).long()
    return (torch.cat([ids[owner], response.masked_fill(response_mask == 0, 0)], 1),
            torch.cat([mask[owner], response_mask], 1))


def passes(eng) -> list[int]:
    """The rows of every forward the engine runs from now on."""
    rows, forward = [], eng._trainer.forward

    def counted(*args, **kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    eng._trainer.forward = counted
    return rows


def logprobs_and_grads(eng, ids, mask, share: bool, precision=None, entropy: bool = False):
    """(the log-probs, or with `entropy` the pair (log-probs, entropy)), and the gradients of a loss on them."""
    eng.module.zero_grad()
    with precision or contextlib.nullcontext():
        out = eng.token_logprobs(ids, mask, START, temperature=0.8, share_prefix=share, return_entropy=entropy)
    lp = out[0] if entropy else out
    weights = torch.linspace(-1, 1, lp.numel()).view_as(lp)  # a loss that weighs every position differently
    (lp * weights * mask[:, START:]).sum().backward()
    grads = [p.grad.clone() for p in eng.module.parameters() if p.requires_grad]
    return ((lp.detach(), out[1]) if entropy else lp.detach()), grads


def test_runs_are_found_where_neighbours_share_the_prefix():
    ids, mask = grouped_rows()
    assert shared_prefix_runs(ids, mask, START - 1).tolist() == [0, 0, 1, 1, 1, 2]
    assert shared_prefix_runs(ids[[0, 2, 5]], mask[[0, 2, 5]], START - 1) is None  # no two neighbours share
    assert shared_prefix_runs(ids, mask, 0) is None
    other = mask.clone()
    other[1, 3] = 1 - other[1, 3]  # the same tokens under another mask are another prefix
    assert shared_prefix_runs(ids, other, START - 1).tolist() == [0, 1, 2, 2, 2, 3]


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", FAMILIES)
def test_shared_prefix_equals_one_pass_with_gradients(name, use_lora):
    eng = engine(name, use_lora)
    ids, mask = grouped_rows()
    rows = passes(eng)
    one, one_grads = logprobs_and_grads(eng, ids, mask, share=False)
    shared, shared_grads = logprobs_and_grads(eng, ids, mask, share=True)
    assert rows == [6, 3, 6]  # one pass; then the 3 prompts once, and every row's response on their cache
    assert one.shape == shared.shape == (6, ids.shape[1] - START)
    torch.testing.assert_close(shared, one, atol=1e-5, rtol=0)
    assert (shared[mask[:, START:] == 0] == 0).all() and (shared[mask[:, START:] == 1] < 0).all()
    assert len(shared_grads) == len(one_grads) > 0
    # The prefix's gradient is summed over its rows in another order: fp32's rounding, relative to the gradients'
    # scale (up to ~20 here; on an AVX2 Zen 3 a 1.5e-5 difference in a gradient of magnitude 14).
    scale = max(b.abs().max().item() for b in one_grads)
    for a, b in zip(shared_grads, one_grads):
        torch.testing.assert_close(a, b, atol=max(1e-5, 2e-6 * scale), rtol=1e-4)


def test_shared_prefix_under_bf16_autocast_stays_within_bf16_of_one_pass():
    eng = engine("llama-gqa")
    ids, mask = grouped_rows(seed=3)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    one, _ = logprobs_and_grads(eng, ids, mask, share=False, precision=bf16())
    shared, _ = logprobs_and_grads(eng, ids, mask, share=True, precision=bf16())
    fp32, _ = logprobs_and_grads(eng, ids, mask, share=False)
    bound = (one - fp32).abs().max()  # bf16's own distance from fp32, on these rows
    assert 0 < bound < 0.2
    assert (shared - one).abs().max() <= bound


def test_gradient_checkpointing_falls_back_to_one_pass():
    ckpt, plain = engine("llama-gqa", gradient_checkpointing=True), engine("llama-gqa")
    ckpt.train()
    ids, mask = grouped_rows(seed=5)
    rows = passes(ckpt)
    shared, shared_grads = logprobs_and_grads(ckpt, ids, mask, share=True)
    assert rows == [6]
    one, one_grads = logprobs_and_grads(plain, ids, mask, share=False)
    torch.testing.assert_close(shared, one, atol=1e-5, rtol=0)
    for a, b in zip(shared_grads, one_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("share", [True, False], ids=["shared", "one-pass"])
def test_the_entropy_beside_the_logprobs_is_the_policys_and_changes_nothing(share):
    eng = engine("llama-gqa")
    ids, mask = grouped_rows(seed=7)
    plain, plain_grads = logprobs_and_grads(eng, ids, mask, share)
    rows = passes(eng)
    (ours, entropy), grads = logprobs_and_grads(eng, ids, mask, share, entropy=True)
    assert rows == ([3, 6] if share else [6])  # the same forwards, none more
    assert torch.equal(ours, plain) and all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    with torch.no_grad():
        logits = copy.deepcopy(eng.module).double()(input_ids=ids, attention_mask=mask,
                                                    position_ids=positions(mask)).logits
    ref = Categorical(logits=logits[:, START - 1 : -1] / 0.8).entropy() * mask[:, START:]  # (B, R) fp64
    assert entropy.shape == ours.shape and entropy.dtype == torch.float32 and not entropy.requires_grad
    torch.testing.assert_close(entropy.double(), ref, atol=1e-5, rtol=0)
    assert (entropy[mask[:, START:] == 0] == 0).all() and (entropy[mask[:, START:] == 1] > 0).all()


# -- the inference path: prefill and scoring -------------------------------------------------------------------------

INFERENCE_FAMILIES = ["llama-gqa", "opt", "gpt2"]


def inference_net(family: str) -> InferenceTransformer:
    model = tiny_model(family)
    spec = spec_from_config(model.config)
    return InferenceTransformer(spec, extract_weights(model, spec))


def counted_rows(net: InferenceTransformer) -> list[int]:
    """The rows of every blocks() pass the net runs from now on."""
    rows, blocks = [], net.blocks

    def counted(input_ids, attention_mask, cache):
        rows.append(input_ids.shape[0])
        return blocks(input_ids, attention_mask, cache)

    net.blocks = counted
    return rows


@pytest.mark.parametrize("family", INFERENCE_FAMILIES)
def test_inference_hidden_states_run_a_shared_prefix_once(family):
    net = inference_net(family)
    ids, mask = grouped_rows()
    rows = counted_rows(net)
    one_pass = net.hidden_states(ids, mask)[:, START - 1 :]
    shared = net.hidden_states(ids, mask, cut=START - 1)
    assert rows == [6, 3]  # one pass of the 6 rows, then the 3 prompts once each
    assert shared.shape == one_pass.shape == (6, ids.shape[1] - START + 1, net.spec.hidden_size)
    torch.testing.assert_close(shared, one_pass, atol=1e-5, rtol=0)


def test_inference_hidden_states_share_nothing_where_a_row_has_not_begun():
    net = inference_net("llama-gqa")
    ids, mask = grouped_rows()
    rows = counted_rows(net)
    cut = 2  # the second prompt (5 tokens of 8) is still left padding at column 2
    torch.testing.assert_close(net.hidden_states(ids, mask, cut=cut), net.hidden_states(ids, mask)[:, cut:],
                               atol=0, rtol=0)
    assert rows == [6, 6]


@pytest.mark.parametrize("family", INFERENCE_FAMILIES)
def test_frozen_policy_logprobs_of_grouped_rows_equal_hf_log_softmax(family):
    model = tiny_model(family)
    ids, mask = grouped_rows(seed=3)
    ours = FrozenPolicy(copy.deepcopy(model)).token_logprobs(ids, mask, START, 0.8)
    ref = hf_logprobs(model, ids, mask, START, 0.8)
    assert (ours.double() - ref).abs().max() < 1e-5
    assert (ours[mask[:, START:] == 0] == 0).all()


@pytest.mark.parametrize("family", INFERENCE_FAMILIES)
def test_frozen_reward_model_scores_grouped_rows_as_one_pass(family):
    rm = reward_model(family)
    ids, mask = grouped_rows(seed=5)
    frozen = FrozenRewardModel(copy.deepcopy(rm))
    rows = counted_rows(frozen.net)
    shared = frozen.score(ids, mask, START)
    one_pass = frozen.score(ids, mask)
    assert rows == [3, 6]  # the 3 prompts once each, then the one pass of the 6 rows
    torch.testing.assert_close(shared, one_pass, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared, rm.score(ids, mask), atol=1e-5, rtol=0)
    assert one_pass.std() > 1e-3  # the rows' scores differ: a wrong row read would show


@pytest.mark.parametrize("family", INFERENCE_FAMILIES)
def test_prefill_runs_repeated_prompts_once(family):
    net = inference_net(family)
    prompts, prompt_mask = left_padded_prompts([5, 8, 3], seed=4)
    owner = torch.repeat_interleave(torch.arange(3), torch.tensor(RUNS))
    ids, mask = prompts[owner], prompt_mask[owner]
    spec, (B, T) = net.spec, ids.shape
    alone = KVCache.allocate(spec, B, T + 4)
    expected = torch.cat([net.prefill(ids[b : b + 1], mask[b : b + 1], KVCache.allocate(spec, 1, T + 4))
                          for b in range(B)])
    rows = counted_rows(net)
    cache = KVCache.allocate(spec, B, T + 4)
    logits = net.prefill(ids, mask, cache)
    assert rows == [3]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == mask.sum(1).tolist()
    for b in range(B):
        net.prefill(ids[b : b + 1], mask[b : b + 1], alone)
        n = int(mask[b].sum())
        torch.testing.assert_close(cache.k[:, b, :, :n], alone.k[:, 0, :, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache.v[:, b, :, :n], alone.v[:, 0, :, :n], atol=1e-5, rtol=0)
    # Generation on the copied cache: each row's tokens as when its prompt is generated alone (greedy).
    args = dict(max_new_tokens=5, eos_token_id=None)
    together = generate_with(net, ids, mask, **args)
    for b in range(B):
        single = generate_with(net, ids[b : b + 1], mask[b : b + 1], **args)
        assert together.sequences[b].tolist() == single.sequences[0].tolist()
        torch.testing.assert_close(together.logprobs[b], single.logprobs[0], atol=1e-5, rtol=0)
