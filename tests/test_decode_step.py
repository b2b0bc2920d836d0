import copy
import dataclasses

import pytest
import torch
from models import CONFIGS, MOE, left_padded_prompts, tiny_model

from hybrid_engine.model import InferenceTransformer, KVCache, extract_weights, spec_from_config
from hybrid_engine.ops import kernels
from hybrid_engine.ops.decode_step import ACTIVATIONS, QK_NORMS


def prefilled(family: str, weight_dtype=None):
    model = tiny_model(family)
    spec = spec_from_config(model.config)
    net = InferenceTransformer(spec, extract_weights(model, spec, weight_dtype))
    ids, mask = left_padded_prompts([5, 1, 9])
    cache = KVCache.allocate(spec, 3, 16)
    logits = net.prefill(ids, mask, cache)
    return net, cache, logits.argmax(-1)


@pytest.mark.parametrize("weight_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("family", [f for f in CONFIGS if f not in MOE])  # MoE models decode in the Python loop
def test_cpp_step_matches_python_loop(family, weight_dtype):
    net, cache, tokens = prefilled(family, weight_dtype)
    cache_py = copy.deepcopy(cache)
    for _ in range(3):  # a few steps, so the cache written by each path is read back by it
        ours = net.decode(tokens, cache)
        ref = net.decode_python(tokens, cache_py)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(cache.lengths, cache_py.lengths)
        tokens = ref.argmax(-1)
    torch.testing.assert_close(cache.k, cache_py.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v, cache_py.v, atol=1e-5, rtol=1e-5)


def test_step_on_a_prefix_of_the_batch():
    net, cache, tokens = prefilled("llama-gqa")
    cache_py = copy.deepcopy(cache)
    torch.testing.assert_close(net.decode(tokens[:2], cache), net.decode_python(tokens[:2], cache_py))
    assert cache.lengths.tolist() == [6, 2, 9]


@pytest.mark.parametrize("family", ["llama-gqa", "qwen3", "olmo2", "smollm3", "phi3", "gemma3"])
def test_opcheck(family):
    net, cache, tokens = prefilled(family)
    s = net.spec
    x = net.embed(tokens, cache.lengths)
    args = (x, net.flat_weights(), cache.k, cache.v, cache.lengths.clone(), net.cos, net.sin, s.num_heads,
            s.num_kv_heads, s.head_dim, True, ACTIVATIONS[s.activation], s.norm_eps, net.scales, QK_NORMS[s.qk_norm],
            s.post_norm, list(s.nope_layers), net.local_cos, net.local_sin, list(s.local_rope_layers))
    torch.library.opcheck(kernels().decode_step.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_wrong_weight_count_names_the_argument():
    net, cache, tokens = prefilled("gpt2")
    s = net.spec
    with pytest.raises(RuntimeError, match="weights must hold 16 entries per layer"):
        kernels().decode_step(net.embed(tokens, cache.lengths), net.flat_weights()[:-1], cache.k,
                                            cache.v, cache.lengths, None, None, s.num_heads, s.num_kv_heads,
                                            s.head_dim, False, 2, s.norm_eps, net.scales)


def test_missing_qk_norm_weight_names_the_slot():
    net, cache, tokens = prefilled("qwen3")
    s = net.spec
    weights = list(net.flat_weights())
    weights[12] = None  # layer 0's q norm
    with pytest.raises(RuntimeError, match=r"weights\[12\] is required but missing"):
        kernels().decode_step(net.embed(tokens, cache.lengths), weights, cache.k, cache.v, cache.lengths, net.cos,
                              net.sin, s.num_heads, s.num_kv_heads, s.head_dim, True, 0, s.norm_eps, net.scales, 1)


def test_nope_layer_out_of_range_is_named():
    net, cache, tokens = prefilled("smollm3")
    s = net.spec
    with pytest.raises(RuntimeError, match=r"nope_layers must name layers in \[0, 3\), got 3"):
        kernels().decode_step(net.embed(tokens, cache.lengths), net.flat_weights(), cache.k, cache.v, cache.lengths,
                              net.cos, net.sin, s.num_heads, s.num_kv_heads, s.head_dim, True, 0, s.norm_eps,
                              net.scales, 0, False, [3])


def test_nope_layer_caches_k_unrotated():
    """SmolLM3's layer 1 appends k as projected; its RoPE layers 0 and 2 rotate it (positions > 0 differ)."""
    net, cache, tokens = prefilled("smollm3")
    s, i = net.spec, 1
    assert s.nope_layers == (i,)
    cache_py, cache_rot = copy.deepcopy(cache), copy.deepcopy(cache)
    net.decode(tokens, cache)
    rotated = InferenceTransformer(dataclasses.replace(s, nope_layers=()), net.w)
    rotated.decode_python(tokens, cache_rot)
    net.decode_python(tokens, cache_py)
    torch.testing.assert_close(cache.k, cache_py.k, atol=1e-5, rtol=1e-5)
    rows = torch.arange(3), cache.lengths.long() - 1  # the k each row just appended
    assert not torch.allclose(cache.k[i][rows[0], :, rows[1]], cache_rot.k[i][rows[0], :, rows[1]])


def test_local_layers_out_of_range_or_without_tables_are_named():
    net, cache, tokens = prefilled("gemma3")
    s = net.spec
    args = (net.embed(tokens, cache.lengths), net.flat_weights(), cache.k, cache.v, cache.lengths, net.cos, net.sin,
            s.num_heads, s.num_kv_heads, s.head_dim, True, 4, s.norm_eps, net.scales, 1, False, [])
    with pytest.raises(RuntimeError, match=r"local_layers must name layers in \[0, 3\), got 3"):
        kernels().decode_step(*args, net.local_cos, net.local_sin, [3])
    with pytest.raises(RuntimeError, match="local_layers need local_cos and local_sin"):
        kernels().decode_step(*args, None, None, [0])


def test_local_layers_rotate_k_with_their_own_table():
    """Gemma 3's sliding layers 0 and 2 rotate k with the local RoPE base (layer 0's k, the first to differ, is not
    that of the global base)."""
    net, cache, tokens = prefilled("gemma3")
    s = net.spec
    assert s.local_rope_layers == (0, 2)
    cache_py, cache_global = copy.deepcopy(cache), copy.deepcopy(cache)
    net.decode(tokens, cache)
    net.decode_python(tokens, cache_py)
    InferenceTransformer(dataclasses.replace(s, local_rope_layers=()), net.w).decode_python(tokens, cache_global)
    torch.testing.assert_close(cache.k, cache_py.k, atol=1e-5, rtol=1e-5)
    rows = torch.arange(3), cache.lengths.long() - 1  # the k each row just appended
    assert not torch.allclose(cache.k[0][rows[0], :, rows[1]], cache_global.k[0][rows[0], :, rows[1]])
