"""The frozen models of the PPO step (rlhf/scoring.py) through the inference path: FrozenPolicy's log-probs
against the HF model's own log-softmax in fp64, FrozenRewardModel's scores against RewardModel.score, on rows
padded on the left (a prompt), on the right (after a response that ended early) and on both sides, for the
Llama, OPT and GPT-2 families; bad input; and InferenceTransformer.hidden_states beside prefill and generate."""

from __future__ import annotations

import copy

import pytest
import torch
from models import VOCAB, tiny_model

from hybrid_engine.engine.logprobs import positions
from hybrid_engine.generation import generate_with
from hybrid_engine.model.kv_cache import KVCache
from hybrid_engine.model.spec import spec_from_config
from hybrid_engine.model.transformer import InferenceTransformer
from hybrid_engine.model.weights import extract_weights
from hybrid_engine.rlhf.reward import RewardModel
from hybrid_engine.rlhf.scoring import FrozenPolicy, FrozenRewardModel

FAMILIES = ["llama-gqa", "qwen3", "olmo2", "smollm3", "phi3", "gemma3", "qwen3-moe", "mixtral", "opt", "gpt2"]
ATOL = 1e-5  # fp32 kernels against an fp64 reference
START = 5  # the prompt width P of every row below: responses begin at column 5


def padded_rows(layout: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [4, 12] of random tokens, padded as `layout` says: "left" (prompts of different
    lengths, every response the full 7 tokens), "right" (full prompts, responses of 7, 4, 1 and 3 tokens then
    padding) or "both". The pad token is 1 (OPT's) and a padded position holds a random token otherwise, so
    nothing can depend on what padding holds."""
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 12
    ids = torch.randint(2, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    prompt_lens = [5, 3, 1, 4] if layout in ("left", "both") else [5] * B
    response_lens = [7, 4, 1, 3] if layout in ("right", "both") else [7] * B
    for b, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        mask[b, : START - p] = 0
        mask[b, START + r :] = 0
    ids[(mask == 0) & (torch.rand(B, T, generator=g) < 0.5)] = 1
    return ids, mask


def fp64_copy(module: torch.nn.Module) -> torch.nn.Module:
    """An fp64 copy of `module` (an HF model or a reward model around one); MoE models run HF's plain loop over the
    experts, since its default grouped_mm takes no fp64."""
    ref = copy.deepcopy(module).double()
    for m in ref.modules():
        if hasattr(m, "set_experts_implementation") and getattr(m.config, "_experts_implementation", None):
            m.set_experts_implementation("eager")
    return ref


@torch.no_grad()
def hf_logprobs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, start: int,
                temperature: float) -> torch.Tensor:
    """fp64 [B, T - start]: the HF model's log_softmax(logits / temperature) at the token of each response
    position (position ids counted from each row's first token), 0 where the mask is 0."""
    ref = fp64_copy(model).eval()
    logits = ref(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
    logp = (logits / temperature).log_softmax(-1)  # (B, T, V)
    T = ids.shape[1]
    picked = logp[:, start - 1 : T - 1].gather(-1, ids[:, start:, None]).squeeze(-1)  # (B, T - start)
    return torch.where(mask[:, start:].bool(), picked, 0)


@pytest.mark.parametrize("layout", ["left", "right", "both"])
@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_policy_logprobs_equal_hf_log_softmax(family, layout):
    model = tiny_model(family)
    ids, mask = padded_rows(layout)
    policy = FrozenPolicy(copy.deepcopy(model))  # FrozenPolicy freezes its model in place: keep the cached one
    for temperature in (1.0, 0.7):
        ours = policy.token_logprobs(ids, mask, START, temperature)
        ref = hf_logprobs(model, ids, mask, START, temperature)
        assert ours.dtype == torch.float32 and ours.shape == (4, 12 - START)
        assert (ours.double() - ref).abs().max() < ATOL, (family, layout, temperature)
        assert (ours[mask[:, START:] == 0] == 0).all()
        assert (ours[mask[:, START:] == 1] < 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_policy_reads_any_start_and_does_not_train(family):
    model = copy.deepcopy(tiny_model(family))
    ids, mask = padded_rows("both", seed=1)
    policy = FrozenPolicy(model)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    full = policy.token_logprobs(ids, mask, 1)
    ref = hf_logprobs(model, ids, mask, 1, 1.0)
    assert (full.double() - ref).abs().max() < ATOL
    assert torch.allclose(policy.token_logprobs(ids, mask, START), full[:, START - 1 :], atol=ATOL, rtol=0)


def reward_model(family: str) -> RewardModel:
    torch.manual_seed(3)
    return RewardModel.from_model(copy.deepcopy(tiny_model(family))).eval()


@pytest.mark.parametrize("layout", ["left", "right", "both"])
@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_reward_model_scores_equal_reward_model_score(family, layout):
    rm = reward_model(family)
    ids, mask = padded_rows(layout, seed=2)
    ref = rm.score(ids, mask)  # the reward model's own HF forward, fp32
    ref64 = fp64_copy(rm).score(ids, mask)
    frozen = FrozenRewardModel(copy.deepcopy(rm))
    ours = frozen.score(ids, mask)
    assert ours.dtype == torch.float32 and ours.shape == (4,)
    assert (ours - ref).abs().max() < ATOL, (family, layout)
    assert (ours.double() - ref64).abs().max() < ATOL, (family, layout)
    assert ref.std() > 1e-3  # the rows' scores differ: the test would see a wrong row being read


def test_frozen_reward_model_is_a_copy_that_stays_frozen():
    rm = reward_model("llama-gqa")
    ids, mask = padded_rows("both")
    before = rm.score(ids, mask)
    frozen = FrozenRewardModel(rm)
    assert not any(p.requires_grad for p in rm.parameters())
    assert torch.allclose(frozen.score(ids, mask), before, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])  # GPT-2's Conv1D weights are transposed: copies
def test_frozen_models_read_their_fp32_projections_in_place(family):
    """No second copy of the model for the run: every projection the inference path reads, the fused q|k|v and
    gate|up included, lies in the frozen model's own parameter storage, and the parameters keep their values."""
    for frozen, model in ((FrozenPolicy, copy.deepcopy(tiny_model(family))), (FrozenRewardModel, reward_model(family))):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        net = frozen(model).net
        storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        read = [lin.weight for layer in net.w.layers for lin in (layer.qkv, layer.o, layer.up, layer.down)]
        assert all(w.untyped_storage().data_ptr() in storages for w in read), frozen.__name__
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), frozen.__name__


@torch.no_grad()
def autocast_hidden(body: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """fp32 (B, T, H): the HF body's final hidden states under bf16 autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = body(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
    return out.last_hidden_state.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_under_autocast_the_frozen_models_score_through_their_hf_forward_in_bf16(family):
    """PPOConfig.bf16_autocast: the HF body runs under bf16 autocast and the head reads its hidden states in fp32,
    within the kernels' fp32 tolerance of the same computed by hand, and within bf16's reach of fp64."""
    model = tiny_model(family)
    ids, mask = padded_rows("both", seed=4)
    policy = FrozenPolicy(copy.deepcopy(model), autocast_dtype=torch.bfloat16)
    assert policy.net is None
    ours = policy.token_logprobs(ids, mask, START, 0.7)
    hidden = autocast_hidden(model.base_model, ids, mask)[:, START - 1 : -1]
    logp = (hidden @ model.get_output_embeddings().weight.T / 0.7).log_softmax(-1)
    by_hand = torch.where(mask[:, START:].bool(), logp.gather(-1, ids[:, START:, None]).squeeze(-1), 0)
    assert ours.dtype == torch.float32 and (ours - by_hand).abs().max() < ATOL
    assert (ours.double() - hf_logprobs(model, ids, mask, START, 0.7)).abs().max() < 0.15  # bf16 activations

    rm = reward_model(family)
    frozen = FrozenRewardModel(copy.deepcopy(rm), autocast_dtype=torch.bfloat16)
    last = autocast_hidden(rm.body, ids, mask)[torch.arange(4), mask.shape[1] - 1 - mask.flip(1).argmax(1)]
    value = (last @ rm.value_head.weight.float().T).squeeze(-1) + (0 if rm.value_head.bias is None
                                                                 else rm.value_head.bias.float())
    scores = frozen.score(ids, mask)
    assert scores.dtype == torch.float32 and (scores - value).abs().max() < 0.02  # the head under autocast: bf16
    assert (scores.double() - fp64_copy(rm).score(ids, mask)).abs().max() < 0.1


@pytest.mark.parametrize("bad, match", [
    (lambda ids, mask: (ids[0], mask[0], START), r"\[B, T\]"),
    (lambda ids, mask: (ids, mask[:, :-1], START), r"\[B, T\]"),
    (lambda ids, mask: (ids, mask, 0), r"start must be in \[1, 12\), got 0"),
    (lambda ids, mask: (ids, mask, 12), r"start must be in \[1, 12\), got 12"),
])
def test_bad_rows_are_refused(bad, match):
    ids, mask = padded_rows("left")
    policy = FrozenPolicy(copy.deepcopy(tiny_model("llama-gqa")))
    with pytest.raises(ValueError, match=match):
        policy.token_logprobs(*bad(ids, mask))
    frozen = FrozenRewardModel(reward_model("llama-gqa"))
    if bad(ids, mask)[2] == START:  # the reward model takes no start
        with pytest.raises(ValueError, match=match):
            frozen.score(*bad(ids, mask)[:2])
    with pytest.raises(ValueError, match="no tokens"):
        frozen.score(ids, torch.zeros_like(mask))


def test_frozen_reward_model_needs_a_reward_model():
    with pytest.raises(ValueError, match="needs a RewardModel, got LlamaForCausalLM"):
        FrozenRewardModel(copy.deepcopy(tiny_model("llama-gqa")))


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_match_prefill_and_leave_generate_unchanged(family):
    model = tiny_model(family)
    spec = spec_from_config(model.config)
    net = InferenceTransformer(spec, extract_weights(model, spec))
    ids, mask = padded_rows("left")
    B, T = ids.shape
    prefill = net.prefill(ids, mask, KVCache.allocate(spec, B, T))  # (B, V) the last column's logits
    hidden = net.hidden_states(ids, mask)  # (B, T, H)
    head = net.w.lm_head
    from_hidden = hidden[:, -1] @ head.weight.float().T + (0 if head.bias is None else head.bias.float())
    assert torch.allclose(from_hidden, prefill, atol=ATOL, rtol=0)
    args = dict(max_new_tokens=6, do_sample=True, temperature=1.0, seed=4)
    first = generate_with(net, ids, mask, **args)
    net.hidden_states(ids, mask)
    second = generate_with(net, ids, mask, **args)
    assert torch.equal(first.sequences, second.sequences) and torch.equal(first.logprobs, second.logprobs)
