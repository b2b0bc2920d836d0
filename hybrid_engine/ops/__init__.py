"""The Python face of every hybrid_engine kernel: the only caller of torch.ops.hybrid_engine.

Importing this package compiles and loads nothing: the compiled ops load (compiling on this machine's first use) at
the first call that runs one, or at `load()`, which also registers their fake (meta) and autograd implementations
(_library.py); `kernels()` is torch.ops.hybrid_engine, loaded. Each function runs on the backend chosen with
`use_backend` ("kernels", "triton" or "reference"); `<op>_reference` is the pure-torch oracle.
"""

from hybrid_engine.ops._backend import get_backend, use_backend
from hybrid_engine.ops._library import kernels, load
from hybrid_engine.ops.attention import (
    decode_attention,
    decode_attention_reference,
    prefill_attention,
    prefill_attention_reference,
)
from hybrid_engine.ops.decode_step import decode_step
from hybrid_engine.ops.gae import gae, gae_reference
from hybrid_engine.ops.linear import decode_linear, decode_linear_reference
from hybrid_engine.ops.linear_bf16 import bf16_compute_missing, decode_linear_bf16, decode_linear_bf16_reference
from hybrid_engine.ops.logprobs import token_logprobs, token_logprobs_reference
from hybrid_engine.ops.moe import moe_experts, moe_experts_reference
from hybrid_engine.ops.norm import rms_norm, rms_norm_reference
from hybrid_engine.ops.reshard import (
    gather_column_parallel,
    gather_qkv,
    gather_row_parallel,
    reshard_gather,
    reshard_gather_reference,
    reshard_scatter,
    reshard_scatter_reference,
    shard_column_parallel,
    shard_qkv,
    shard_reference,
    shard_row_parallel,
    tp_to_zero,
    tp_to_zero_reference,
    unshard_reference,
    zero_partition,
    zero_to_tp,
    zero_to_tp_reference,
    zero_unpartition,
    zero_unpartition_reference,
)
from hybrid_engine.ops.rotary import rotary_append_kv, rotary_append_kv_reference, rotary_tables
from hybrid_engine.ops.training import (
    rotary_embed,
    rotary_embed_reference,
    silu_mul,
    silu_mul_reference,
)

__all__ = [
    "decode_attention",
    "decode_attention_reference",
    "decode_linear",
    "decode_linear_reference",
    "decode_linear_bf16",
    "decode_linear_bf16_reference",
    "bf16_compute_missing",
    "decode_step",
    "gae",
    "gae_reference",
    "gather_column_parallel",
    "gather_qkv",
    "gather_row_parallel",
    "get_backend",
    "kernels",
    "load",
    "prefill_attention",
    "prefill_attention_reference",
    "reshard_gather",
    "reshard_gather_reference",
    "reshard_scatter",
    "reshard_scatter_reference",
    "moe_experts",
    "moe_experts_reference",
    "rms_norm",
    "rms_norm_reference",
    "rotary_append_kv",
    "rotary_append_kv_reference",
    "rotary_embed",
    "rotary_embed_reference",
    "rotary_tables",
    "shard_column_parallel",
    "shard_qkv",
    "shard_reference",
    "shard_row_parallel",
    "silu_mul",
    "silu_mul_reference",
    "token_logprobs",
    "token_logprobs_reference",
    "tp_to_zero",
    "tp_to_zero_reference",
    "unshard_reference",
    "use_backend",
    "zero_partition",
    "zero_to_tp",
    "zero_to_tp_reference",
    "zero_unpartition",
    "zero_unpartition_reference",
]
