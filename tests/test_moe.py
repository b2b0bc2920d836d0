"""moe_experts (every backend against the reference, the reference against Hugging Face's experts module) and the
router (the same experts as Hugging Face's TopKRouter on the same inputs, ties included)."""

import copy

import pytest
import torch
import transformers
from models import CONFIGS, tiny_model

from hybrid_engine.engine.hf_path import fast_path_reason
from hybrid_engine.model import spec_from_config
from hybrid_engine.model.moe import route
from hybrid_engine.ops import kernels, moe_experts, moe_experts_reference, use_backend

ATOL = dict(atol=1e-5, rtol=1e-5)


def make_inputs(M, E, k, H, F, wdtype=torch.float32, device="cpu"):
    x = torch.randn(M, H, device=device)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(M)]).to(device)
    weights = torch.rand(M, k, device=device)
    gate_up = (torch.randn(E, 2 * F, H, device=device) / H**0.5).to(wdtype)
    down = (torch.randn(E, H, F, device=device) / F**0.5).to(wdtype)
    return x, ids, weights, gate_up, down


SHAPES = [(1, 8, 2, 64, 32), (16, 8, 2, 48, 40), (5, 4, 3, 33, 17)]  # M, E, k, H, F (the experts' width)


def test_reference_matches_hf_experts_module():
    config = CONFIGS["qwen3-moe"]()
    experts = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x, ids, weights, *_ = make_inputs(7, config.num_experts, 2, config.hidden_size, config.moe_intermediate_size)
    with torch.no_grad():
        hf = experts(x, ids, weights)
    ours = moe_experts_reference(x, ids, weights, experts.gate_up_proj, experts.down_proj)
    torch.testing.assert_close(ours, hf, atol=0, rtol=0)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,E,k,H,F", SHAPES)
@pytest.mark.parametrize("backend", ["kernels", "triton"])
def test_backend_matches_reference(backend, M, E, k, H, F, wdtype):
    args = make_inputs(M, E, k, H, F, wdtype)
    with use_backend(backend):
        out = moe_experts(*args)
    torch.testing.assert_close(out, moe_experts_reference(*args), **ATOL)


@pytest.mark.parametrize("backend", ["kernels", "triton"])
def test_an_expert_no_token_chose_is_not_read(backend):
    x, ids, weights, gate_up, down = make_inputs(16, 8, 2, 32, 24)
    ids = torch.where(ids == 5, 6, ids).sort(-1).values  # nobody picks expert 5 (rows may repeat 6: fine below)
    ids[:, 1] = torch.where(ids[:, 0] == ids[:, 1], (ids[:, 0] + 1) % 5, ids[:, 1])
    expected = moe_experts_reference(x, ids, weights, gate_up, down)
    gate_up[5], down[5] = float("nan"), float("nan")
    with use_backend(backend):
        torch.testing.assert_close(moe_experts(x, ids, weights, gate_up, down), expected, **ATOL)


def test_opcheck():
    torch.library.opcheck(kernels().moe_experts.default, make_inputs(6, 4, 2, 16, 8),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_expert_id_names_the_argument():
    x, ids, weights, gate_up, down = make_inputs(3, 4, 2, 16, 8)
    ids[1, 0] = 4
    with pytest.raises(RuntimeError, match=r"expert_ids must lie in \[0, 4\), got 4"):
        moe_experts(x, ids, weights, gate_up, down)


def _router_hf(model, layer: int):
    return model.model.layers[layer].mlp.gate


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("family", ["qwen3-moe", "mixtral"])
def test_router_selects_as_hf_on_the_same_inputs(family, norm_topk_prob):
    """The inputs HF's routers see in a forward pass, captured by a hook, routed by ours: the same experts and
    weights; then a constructed tie (two experts with equal router rows give equal fp32 logits) breaks the same way."""
    model = copy.deepcopy(tiny_model(family))
    model.config.norm_topk_prob = norm_topk_prob
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.norm_topk_prob = norm_topk_prob
    spec = spec_from_config(model.config)
    gate = _router_hf(model, 0)
    with torch.no_grad():
        gate.weight[3] = gate.weight[1]  # experts 1 and 3 tie for every token
    seen = []
    gate.register_forward_hook(lambda mod, args, out: seen.append((args[0].detach(), out)))
    with torch.no_grad():
        model(torch.randint(3, 97, (2, 9)))
    x, (_, hf_weights, hf_ids) = seen[0]
    ids, weights = route(x, gate.weight.detach().float(), spec)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights, atol=0, rtol=0)
    tied = (hf_ids == 1).any(-1) | (hf_ids == 3).any(-1)
    assert tied.any(), "the constructed tie never reached the top k: the test would not test it"


def test_spec_reads_the_sparse_and_dense_layers():
    spec = spec_from_config(tiny_model("qwen3-moe").config)
    assert (spec.num_experts, spec.experts_per_token, spec.moe_layers, spec.norm_topk_prob) == (8, 2, (0, 2), False)
    config = CONFIGS["qwen3-moe"]()
    config.mlp_only_layers, config.decoder_sparse_step = [], 2
    assert spec_from_config(config).moe_layers == (1,)
    mixtral = spec_from_config(tiny_model("mixtral").config)
    assert (mixtral.moe_layers, mixtral.norm_topk_prob, mixtral.moe_intermediate_size) == ((0, 1), True, 48)


@pytest.mark.parametrize("family,field,value", [
    ("mixtral", "router_jitter_noise", 0.1),
    ("qwen3-moe", "shared_expert_intermediate_size", 64),
    ("qwen3-moe", "num_experts_per_tok", 9),
])
def test_a_routing_detail_it_cannot_honour_is_refused_naming_the_field(family, field, value):
    config = CONFIGS[family]()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=field):
        spec_from_config(config)
    assert field in fast_path_reason(config)  # the engine takes the HF path, its warning naming the field


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["kernels", "triton"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,E,k,H,F", SHAPES + [(16, 8, 2, 512, 384)])
def test_cuda_matches_reference(backend, M, E, k, H, F, wdtype):
    args = make_inputs(M, E, k, H, F, wdtype, device="cuda")
    with use_backend(backend):
        out = moe_experts(*args)
    torch.testing.assert_close(out, moe_experts_reference(*args), **ATOL)
