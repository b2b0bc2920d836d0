"""The generation-mode transformer: a prefill over left-padded prompts, then one-token decode steps
over a preallocated KV cache, built from the hybrid_engine kernels. Activations are fp32 whatever the
weights' dtype, except in the fast mode (activation_dtype=bf16, bf16 weights), where the inputs of the linear layers
(the LM head too) are rounded to bf16 (ops.decode_linear_bf16); attention, norms, RoPE and a Mixture-of-Experts
layer's experts stay fp32 there. Shape letters: B batch, T prompt length, H hidden, D head dim."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hybrid_engine import ops
from hybrid_engine.model.kv_cache import KVCache
from hybrid_engine.model.moe import moe_mlp
from hybrid_engine.model.prefix import run_firsts, shared_prefix_runs
from hybrid_engine.model.rope import RopeTables
from hybrid_engine.model.spec import ModelSpec
from hybrid_engine.model.weights import Layer, Linear, Norm, Weights

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def linear(x: torch.Tensor, lin: Linear, bf16_activations: bool = False) -> torch.Tensor:
    """x fp32 [M, K] -> fp32 [M, N], for decode (few rows) and prefill (many) alike: decode_linear's own dispatch
    hands the row counts where torch's GEMM is faster over to it. bf16_activations: the fast mode's
    decode_linear_bf16 (x rounded to bf16)."""
    if bf16_activations:
        return ops.decode_linear_bf16(x, lin.weight, lin.bias)
    return ops.decode_linear(x, lin.weight, lin.bias)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma's final logit soft-capping, tanh(logits / cap) * cap, in HF's order of operations; None: as they are."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def local_rope_tables(spec: ModelSpec, weights: Weights):
    """(cos, sin) of the layers with a RoPE of their own (Gemma 3's sliding layers), or (None, None)."""
    if not spec.local_rope_layers:
        return None, None
    cos, sin = ops.rotary_tables(weights.local_inv_freq, spec.max_positions, weights.local_attention_scaling)
    return cos.contiguous(), sin.contiguous()


class InferenceTransformer:
    """Prefill and decode for one ModelSpec and its Weights.

    all_reduce: for tensor-parallel generation, where `weights` hold this rank's shards and `spec` its
    share of the heads and MLP: called in place on the attention output and on the MLP output of every
    block (sums the ranks' partial results). The decode loop then runs in Python.
    activation_dtype: torch.bfloat16 for the fast mode (bf16 weights only: model/dtypes.parse_activation_dtype)."""

    def __init__(self, spec: ModelSpec, weights: Weights, all_reduce: AllReduce | None = None,
                 activation_dtype: torch.dtype = torch.float32):
        self.spec = spec
        self.w = weights
        self.bf16_activations = activation_dtype == torch.bfloat16
        self.all_reduce = all_reduce
        self.cos = self.sin = self.tables = None
        if spec.rotary:
            self.tables = RopeTables(weights.inv_freq, weights.attention_scaling, spec.max_positions, weights.rotary)
            self.cos, self.sin = self.tables.static
        self.local_cos, self.local_sin = local_rope_tables(spec, weights)
        self.scales = [spec.attention_scale(i) for i in range(spec.num_layers)]
        self._flat: list[torch.Tensor | None] | None = None

    # ---- pieces shared by prefill and decode ----
    def linear(self, x: torch.Tensor, lin: Linear) -> torch.Tensor:
        return linear(x, lin, self.bf16_activations)

    def norm(self, x: torch.Tensor, n: Norm, residual: torch.Tensor | None = None):
        """Normed x, or (normed x + residual, x + residual) when a residual is given."""
        if self.spec.norm == "rms":
            return ops.rms_norm(x, n.weight, self.spec.norm_eps, residual)
        if residual is not None:
            x = x + residual
            return F.layer_norm(x, x.shape[-1:], n.weight, n.bias, self.spec.norm_eps), x
        return F.layer_norm(x, x.shape[-1:], n.weight, n.bias, self.spec.norm_eps)

    def enter(self, x: torch.Tensor, residual: torch.Tensor, n: Norm):
        """(a sublayer's input, the new residual stream) from the last sublayer's output x and the stream: the norm of
        x + residual (pre-norm), or x + residual itself (post-norm: x was normed on its way out, `leave`)."""
        if not self.spec.post_norm:
            return self.norm(x, n, residual)
        residual = x + residual
        return residual, residual

    def leave(self, x: torch.Tensor, n: Norm, out: Norm | None = None) -> torch.Tensor:
        """A sublayer's output as it joins the residual stream: normed by n under post-norm (OLMo 2), by `out` where
        the block has a norm on each side of the sublayer (Gemma 3), else as it is."""
        if self.spec.post_norm:
            return ops.rms_norm(x, n.weight, self.spec.norm_eps)
        return x if out is None else ops.rms_norm(x, out.weight, self.spec.norm_eps)

    def mlp(self, x: torch.Tensor, layer: Layer) -> torch.Tensor:
        if layer.experts is not None:
            return self.reduce(moe_mlp(x, layer.experts, self.spec))
        h = self.linear(x, layer.up)
        if self.spec.activation == "silu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.spec.activation == "gelu_pytorch_tanh_gated":
            gate, up = h.chunk(2, dim=-1)
            h = F.gelu(gate, approximate="tanh") * up
        elif self.spec.activation == "relu":
            h = F.relu(h)
        elif self.spec.activation in ("gelu_new", "gelu_pytorch_tanh"):
            h = F.gelu(h, approximate="tanh")
        elif self.spec.activation == "gelu":
            h = F.gelu(h)
        else:
            raise ValueError(f"unsupported activation {self.spec.activation!r}")
        return self.reduce(self.linear(h, layer.down))

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.all_reduce is None else self.all_reduce(x)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.w.embed[tokens]
        x = (x if self.w.embed_scale is None else x * self.w.embed_scale).float()  # Gemma: scaled in the table's dtype
        if self.w.pos_embed is not None:
            x = x + self.w.pos_embed[positions.clamp(min=0) + self.spec.position_offset].float()
        return x

    def split_qkv(self, qkv: torch.Tensor, B: int, S: int):
        """Views q [B, S, Hq, D], k, v [B, S, Hkv, D] of a fused projection [B * S, (Hq + 2 Hkv) D]."""
        s = self.spec
        qkv = qkv.view(B, S, s.num_heads + 2 * s.num_kv_heads, s.head_dim)
        return qkv.split([s.num_heads, s.num_kv_heads, s.num_kv_heads], dim=2)

    def use_length(self, seq_len: int, size: int = 0) -> None:
        """Takes the RoPE tables of a forward call that HF sees as seq_len long (max position id + 1 over the batch),
        with at least `size` rows: they change with it under a dynamic RoPE type (model/rope.py)."""
        if self.tables is not None:
            self.cos, self.sin = self.tables.at(seq_len, size)

    def rope(self, i: int):
        """Layer i's cos, sin tables; None, None for a layer without RoPE (SmolLM3's NoPE layers, OPT, GPT-2): its k
        and v are appended to the cache as they are."""
        if i in self.spec.nope_layers:
            return None, None
        if i in self.spec.local_rope_layers:
            return self.local_cos, self.local_sin
        return self.cos, self.sin

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor, layer: Layer):
        """q [B, S, Hq, D], k [B, S, Hkv, D] as RoPE takes them: Qwen3 normalises each head over D, OLMo 2 the whole
        projection over heads * D (new tensors); the other families use the projection's views as they are."""
        if layer.q_norm is None:
            return q, k
        eps = self.spec.norm_eps
        if self.spec.qk_norm == "head":
            return ops.rms_norm(q, layer.q_norm.weight, eps), ops.rms_norm(k, layer.k_norm.weight, eps)
        B, S, Hq, D = q.shape
        q = ops.rms_norm(q.reshape(B, S, Hq * D), layer.q_norm.weight, eps).view(B, S, Hq, D)
        k = ops.rms_norm(k.reshape(B, S, -1), layer.k_norm.weight, eps).view(B, S, -1, D)
        return q, k

    def logits(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h = self.norm(x, self.w.final_norm, residual)[0]
        return softcap(self.linear(h, self.w.lm_head), self.spec.final_softcap)

    # ---- prefill ----
    def run_blocks(self, x: torch.Tensor, B: int, S: int, positions: torch.Tensor, cache: KVCache, attend):
        """x [B * S, H] through every block, each token's k, v written to the cache at its position (-1: none):
        (x, residual) [B * S, H], the last block's output and the residual stream before the final norm.
        attend(q, k, v [B, heads, S, D], the layer's k_cache, v_cache, scale) -> [B, Hq, S, D]."""
        s = self.spec
        residual = torch.zeros_like(x)
        for i, layer in enumerate(self.w.layers):
            h, residual = self.enter(x, residual, layer.attn_norm)
            q, k, v = self.split_qkv(self.linear(h, layer.qkv), B, S)
            q, k = self.norm_qk(q, k, layer)
            kc, vc = cache.k[i, :B], cache.v[i, :B]
            ops.rotary_append_kv(q, k, v, kc, vc, positions, *self.rope(i))
            a = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), kc, vc, self.scales[i])
            x = self.reduce(self.linear(a.transpose(1, 2).reshape(B * S, s.num_heads * s.head_dim), layer.o))
            h, residual = self.enter(self.leave(x, layer.attn_norm, layer.attn_out_norm), residual,
                                     layer.mlp_norm)
            x = self.leave(self.mlp(h, layer), layer.mlp_norm, layer.mlp_out_norm)
        return x, residual

    def blocks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache):
        """Runs left-padded rows [B, T] through every block and fills cache slots [0, B): run_blocks' (x, residual)."""
        B, T = input_ids.shape
        lengths = attention_mask.sum(1).to(torch.int32)
        positions = (attention_mask.cumsum(1) - 1).masked_fill(attention_mask == 0, -1)
        x = self.embed(input_ids, positions).view(B * T, self.spec.hidden_size)

        def attend(q, k, v, k_cache, v_cache, scale):
            return ops.prefill_attention(q, k, v, lengths, scale)

        out = self.run_blocks(x, B, T, positions, cache, attend)
        cache.lengths[:B] = lengths
        return out

    def extend(self, input_ids: torch.Tensor, cache: KVCache):
        """Runs rows [B, S] that continue the sequences of cache slots [0, B), every column a token, through every
        block and appends them to the cache: run_blocks' (x, residual). Query j of slot b attends to the slot's
        first lengths[b] + j + 1 positions."""
        B, S = input_ids.shape
        past = cache.lengths[:B].long()
        positions = past[:, None] + torch.arange(S)  # (B, S)
        x = self.embed(input_ids, positions).view(B * S, self.spec.hidden_size)
        seen = int(past.max()) + S
        visible = (torch.arange(seen)[None, None] <= positions[:, :, None])[:, None]  # (B, 1, S, seen)
        gqa = self.spec.num_kv_heads != self.spec.num_heads

        def attend(q, k, v, k_cache, v_cache, scale):
            return F.scaled_dot_product_attention(q, k_cache[:, :, :seen].to(q.dtype), v_cache[:, :, :seen].to(q.dtype),
                                                  attn_mask=visible, scale=scale, enable_gqa=gqa)

        out = self.run_blocks(x, B, S, positions, cache, attend)
        cache.lengths[:B] = (past + S).to(cache.lengths.dtype)
        return out

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache,
                seq_len: int | None = None) -> torch.Tensor:
        """Runs left-padded prompts [B, T] through the model, fills the cache, returns last logits [B, V]. A row
        that repeats the row before it (GRPO's samples of one prompt) is run once and the cache copied to it.
        seq_len: the length HF's forward sees (see decode); by default the longest row's."""
        self.use_length(int(attention_mask.sum(1).max()) if seq_len is None else seq_len)
        runs = shared_prefix_runs(input_ids, attention_mask, input_ids.shape[1])
        if runs is None:
            return self._prefill_rows(input_ids, attention_mask, cache)
        firsts = run_firsts(runs)
        logits = self._prefill_rows(input_ids[firsts], attention_mask[firsts], cache)
        cache.copy_slots(runs)
        return logits[runs]

    def _prefill_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B, T = input_ids.shape
        x, residual = self.blocks(input_ids, attention_mask, cache)
        # Left padding puts every prompt's last token in column T - 1.
        last = torch.arange(B) * T + T - 1
        return self.logits(x[last], residual[last])

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cut: int = 0) -> torch.Tensor:
        """fp32 [B, T - cut, H]: the final-normed hidden state at columns cut.. of rows [B, T] that may be padded
        on both sides (a left-padded prompt and a response with padding after its end), as a scoring pass
        reads them. Padding on the right is run as tokens: under the causal mask it changes no position
        before it, and what is computed at those positions is for the caller to ignore. Rows that share their
        first `cut` columns with their neighbours run them once (a prompt and its samples), when every row has
        begun by then."""
        B, T = input_ids.shape
        if self.spec.sliding_window is not None and T > self.spec.sliding_window:
            raise ValueError(f"rows of {T} tokens exceed the model's sliding_window={self.spec.sliding_window}, "
                             "which the inference path does not apply")
        self.use_length(int(attention_mask.sum(1).max()), T)  # as a training forward with positions(attention_mask)
        started = (attention_mask.long().cumsum(1) > 0).long()  # (B, T): from each row's first token on
        cache = KVCache.allocate(self.spec, B, T)
        runs = self.prefix_runs(input_ids, attention_mask, cut)
        if runs is None:
            x, residual = self.blocks(input_ids, started, cache)
            return self.norm(x, self.w.final_norm, residual)[0].view(B, T, -1)[:, cut:]
        firsts = run_firsts(runs)
        self.blocks(input_ids[firsts, :cut], started[firsts, :cut], cache)
        cache.copy_slots(runs)
        x, residual = self.extend(input_ids[:, cut:], cache)
        return self.norm(x, self.w.final_norm, residual)[0].view(B, T - cut, -1)

    @staticmethod
    def prefix_runs(input_ids: torch.Tensor, attention_mask: torch.Tensor, cut: int) -> torch.Tensor | None:
        """The runs of neighbouring rows whose first `cut` columns hidden_states runs once (shared_prefix_runs),
        or None when it runs every row whole (no such runs, or a row that has not begun by column cut)."""
        if not cut or not bool((attention_mask[:, :cut].long().sum(1) > 0).all()):
            return None
        return shared_prefix_runs(input_ids, attention_mask, cut)

    # ---- decode ----
    def flat_weights(self) -> list[torch.Tensor | None]:
        """The weights in decode_step's order: 16 per layer, then final norm and LM head."""
        if self._flat is None:
            flat: list[torch.Tensor | None] = []
            for layer in self.w.layers:
                for part in (layer.attn_norm, layer.qkv, layer.o, layer.mlp_norm, layer.up, layer.down):
                    flat += [part.weight, part.bias]
                flat += [None if n is None else n.weight
                         for n in (layer.q_norm, layer.k_norm, layer.attn_out_norm, layer.mlp_out_norm)]
            self._flat = flat + [self.w.final_norm.weight, self.w.final_norm.bias, self.w.lm_head.weight,
                                 self.w.lm_head.bias]
        return self._flat

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cache: KVCache, seq_len: int | None = None) -> torch.Tensor:
        """One step for the first len(tokens) cache slots: tokens [B] -> logits [B, V]; appends to the cache.
        seq_len: the length HF's forward sees in this step (the longest row, finished ones included); by default
        the longest slot's.

        On the CPU with the compiled kernels the layer loop runs in C++ (ops.decode_step); otherwise, and for a
        Mixture-of-Experts model (its expert MLPs run ops.moe_experts), it runs here in Python (decode_python,
        which is also decode_step's reference)."""
        if self.spec.dynamic_rope:
            self.use_length(int(cache.lengths[: tokens.shape[0]].max()) + 1 if seq_len is None else seq_len)
        python_loop = self.all_reduce is not None or bool(self.spec.moe_layers)
        if tokens.device.type != "cpu" or ops.get_backend() != "kernels" or python_loop:
            return self.decode_python(tokens, cache)
        s = self.spec
        B = tokens.shape[0]
        x = self.embed(tokens, cache.lengths[:B])
        logits = ops.decode_step(x, self.flat_weights(), cache.k, cache.v, cache.lengths[:B], self.cos, self.sin,
                                 s.num_heads, s.num_kv_heads, s.head_dim, s.norm == "rms", s.activation, s.norm_eps,
                                 self.scales, s.qk_norm, s.post_norm, list(s.nope_layers), self.local_cos,
                                 self.local_sin, list(s.local_rope_layers), self.bf16_activations)
        return softcap(logits, s.final_softcap)

    @torch.no_grad()
    def decode_python(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """decode() as a Python loop over layers."""
        s = self.spec
        B = tokens.shape[0]
        positions = cache.lengths[:B].view(B, 1)
        x = self.embed(tokens, positions[:, 0])
        residual = torch.zeros_like(x)
        lengths = cache.lengths[:B] + 1
        for i, layer in enumerate(self.w.layers):
            h, residual = self.enter(x, residual, layer.attn_norm)
            q, k, v = self.split_qkv(self.linear(h, layer.qkv), B, 1)
            q, k = self.norm_qk(q, k, layer)
            kc, vc = cache.k[i, :B], cache.v[i, :B]
            ops.rotary_append_kv(q, k, v, kc, vc, positions, *self.rope(i))
            a = ops.decode_attention(q.reshape(B, s.num_heads, s.head_dim), kc, vc, lengths, self.scales[i])
            x = self.reduce(self.linear(a.view(B, s.num_heads * s.head_dim), layer.o))
            h, residual = self.enter(self.leave(x, layer.attn_norm, layer.attn_out_norm), residual,
                                     layer.mlp_norm)
            x = self.leave(self.mlp(h, layer), layer.mlp_norm, layer.mlp_out_norm)
        cache.lengths[:B] = lengths
        return self.logits(x, residual)
