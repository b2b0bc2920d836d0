"""Checks an installed (not editable) hybrid_engine, as a wheel leaves it: run it with the Python of the
environment the wheel went into, from a directory outside any checkout (.ci/run does so in a fresh virtualenv).

    python /path/to/scripts/check_wheel.py

1. hybrid_engine, and every submodule it imports, comes from this environment (sys.prefix), not a checkout;
2. the ops JIT-build there, from the sources the package ships (hybrid_engine/csrc/);
3. one op of each family registered under torch.ops.hybrid_engine matches its pure-torch reference (fp32, CPU).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HYBRID_ENGINE_CALIBRATE", "0")  # the built-in routes: this checks results, not speed

import torch  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)  # fp32 kernels against fp32 references
PREFIX = Path(sys.prefix).resolve()


def check_location(name: str, path: str | None) -> None:
    """Exits unless `path` lies in this environment: an editable install or a checkout on sys.path puts it
    elsewhere."""
    if path is None or not Path(path).resolve().is_relative_to(PREFIX):
        sys.exit(f"check_wheel: {name} comes from {path}, not from this environment ({PREFIX})")


def check_norm(ops):
    x, w = torch.randn(5, 123), torch.randn(123)
    return ops.rms_norm(x, w, 1e-6), ops.rms_norm_reference(x, w, 1e-6)


def check_rotary(ops):
    B, S, Hq, Hkv, D, T = 2, 3, 4, 2, 16, 8
    q, k, v = torch.randn(B, S, Hq, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    positions = torch.tensor([[0, 1, 2], [-1, 4, 5]])  # -1: a padded slot, left alone
    cos, sin = ops.rotary_tables(1.0 / 10000 ** (torch.arange(0, D, 2) / D), T)
    results = []
    for fn in (ops.rotary_append_kv, ops.rotary_append_kv_reference):
        qc, kc, caches = q.clone(), k.clone(), (torch.zeros(B, Hkv, T, D), torch.zeros(B, Hkv, T, D))
        fn(qc, kc, v, *caches, positions, cos, sin)
        results.append((qc, kc, *caches))
    return results


def check_attention(ops):
    q, k, v = torch.randn(3, 4, 16), torch.randn(3, 2, 9, 16), torch.randn(3, 2, 9, 16)
    lens = torch.tensor([9, 1, 5], dtype=torch.int32)
    return ops.decode_attention(q, k, v, lens, 0.25), ops.decode_attention_reference(q, k, v, lens, 0.25)


def check_linear(ops):
    x, w, b = torch.randn(4, 80), torch.randn(24, 80), torch.randn(24)
    return ops.decode_linear(x, w, b), ops.decode_linear_reference(x, w, b)


def check_logprobs(ops):
    h, w, tokens = torch.randn(6, 32), torch.randn(50, 32), torch.tensor([1, 7, -100, 49, 0, 3])
    return ops.token_logprobs(h, w, tokens, 0.7, True), ops.token_logprobs_reference(h, w, tokens, 0.7, True)


def check_gae(ops):
    r, v, m = torch.randn(3, 7), torch.randn(3, 7), (torch.rand(3, 7) > 0.2).float()
    return ops.gae(r, v, m, 0.99, 0.95), ops.gae_reference(r, v, m, 0.99, 0.95)


def check_reshard(ops):
    src, args = torch.randn(6, 10), (2, 10, [3, 0], [2, 3], 1, 4)
    return ops.reshard_gather(src, *args), ops.reshard_gather_reference(src, *args)


def check_training(ops):
    gate, up = torch.randn(5, 33), torch.randn(5, 33)
    return ops.silu_mul(gate, up), ops.silu_mul_reference(gate, up)


def check_decode_step(ops):
    """The C++ layer loop of a tiny random Llama against the Python loop over the reference ops."""
    import transformers

    from hybrid_engine.model import InferenceTransformer, KVCache, extract_weights, spec_from_config

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    spec = spec_from_config(config)
    net = InferenceTransformer(spec, extract_weights(transformers.LlamaForCausalLM(config).eval(), spec))
    caches, tokens = [KVCache.allocate(spec, 2, 8) for _ in range(2)], torch.tensor([5, 11])
    for _ in range(2):  # the second step reads the cache the first one wrote
        ours = net.decode(tokens, caches[0])
        with ops.use_backend("reference"):
            ref = net.decode_python(tokens, caches[1])
    return (ours, caches[0].k, caches[0].v), (ref, caches[1].k, caches[1].v)


CHECKS = {"norm": check_norm, "rotary": check_rotary, "attention": check_attention, "linear": check_linear,
          "logprobs": check_logprobs, "gae": check_gae, "reshard": check_reshard, "training": check_training,
          "decode_step": check_decode_step}


def main() -> None:
    check_location("hybrid_engine", importlib.util.find_spec("hybrid_engine").origin)  # before building anything
    start = time.perf_counter()
    from hybrid_engine import _build, ops

    ops.load()  # JIT-builds the ops (importing hybrid_engine.ops builds nothing)
    print(f"check_wheel: ops loaded in {time.perf_counter() - start:.0f} s from the sources in {_build.CSRC} "
          f"(build directory {_build.build_directory()})")
    check_location("the C++ sources", _build.CPU_SOURCES[-1] if Path(_build.CPU_SOURCES[-1]).is_file() else None)
    torch.manual_seed(0)
    for family, check in CHECKS.items():
        ours, ref = check(ops)
        torch.testing.assert_close(ours, ref, **TOL, msg=lambda m, family=family: f"{family}: {m}")
        print(f"check_wheel: {family} matches its reference")
    for name, module in list(sys.modules.items()):  # every submodule the checks imported
        if name.split(".")[0] == "hybrid_engine" and getattr(module, "__file__", None):
            check_location(name, module.__file__)
    print("check_wheel: OK")


if __name__ == "__main__":
    main()
