"""The generation-mode weights of a Hugging Face causal LM, in the layout the decode kernels read.

With weight_dtype=None every matmul weight is a view of the module's own parameter except where the
layout must change: the fused q|k|v projection and Llama's fused gate|up projection are concatenated
copies unless the parameters already lie end to end in one storage (`fuse_projection_storage` arranges
that; DeepSpeed's ZeRO-1/2 flat buffers often do), and GPT-2's Conv1D weights ([in, out]) are
transposed copies. Norm weights and biases are small fp32 copies. `Weights.copied_bytes` says how much was
copied (benchmarks report its cost). With weight_dtype=torch.bfloat16 every matmul weight is a bf16
copy made here, and so is the embedding table; norm weights and biases are rounded to bf16 and kept
as fp32 (tiny), so the whole model computes with exactly the values of `model.to(torch.bfloat16)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hybrid_engine.model.spec import ModelSpec


@dataclass
class Linear:
    weight: torch.Tensor  # [N, K], contiguous
    bias: torch.Tensor | None = None  # [N] fp32


@dataclass
class Norm:
    weight: torch.Tensor  # [H]
    bias: torch.Tensor | None = None  # [H] (LayerNorm only)


@dataclass
class Experts:
    """A Mixture-of-Experts MLP (Qwen3-MoE, Mixtral): views of the HF module's fused 3-D expert parameters."""

    router: torch.Tensor  # [E, H] fp32: router logits = x @ router.T
    gate_up: torch.Tensor  # [E, 2I, H]: each expert's gate rows, then its up rows
    down: torch.Tensor  # [E, H, I]


@dataclass
class Layer:
    attn_norm: Norm  # before the attention; with spec.post_norm (OLMo 2) on its output, before the residual add
    qkv: Linear  # [(Hq + 2 Hkv) * D, H]
    o: Linear  # [H, Hq * D]
    mlp_norm: Norm  # before the MLP; with spec.post_norm on its output
    up: Linear | None  # Llama: fused gate|up [2 I, H]; OPT/GPT-2: fc1 [I, H]; None in a MoE layer
    down: Linear | None  # [H, I]
    q_norm: Norm | None = None  # RMSNorm weight of q before RoPE: Qwen3 [D] per head, OLMo 2 [Hq * D]
    k_norm: Norm | None = None  # the same for k: Qwen3 [D], OLMo 2 [Hkv * D]
    attn_out_norm: Norm | None = None  # Gemma 3: the norm of the attention's output, besides attn_norm before it
    mlp_out_norm: Norm | None = None  # Gemma 3: the norm of the MLP's output, besides mlp_norm before it
    experts: Experts | None = None  # a MoE layer's router and experts (up and down are None there)


@dataclass
class Weights:
    embed: torch.Tensor  # [V, H] token embedding (lookup)
    layers: list[Layer]
    final_norm: Norm
    lm_head: Linear  # [V, H]
    pos_embed: torch.Tensor | None = None  # [P, H] learned positions (OPT, GPT-2)
    inv_freq: torch.Tensor | None = None  # [D/2] rotary frequencies (Llama)
    attention_scaling: float = 1.0
    rotary: torch.nn.Module | None = None  # HF's rotary module when spec.dynamic_rope: its state picks the tables
    copied_bytes: int = field(default=0)
    embed_scale: float | None = None  # Gemma 3: looked-up rows times sqrt(H) rounded to the table's dtype, in it
    local_inv_freq: torch.Tensor | None = None  # Gemma 3: the RoPE frequencies of the sliding layers (their own base)
    local_attention_scaling: float = 1.0


WeightFn = Callable[[torch.nn.Module], torch.Tensor]
ParamFn = Callable[[torch.nn.Module, str], torch.Tensor]


def _adjacent_rows(ws: list[torch.Tensor]) -> torch.Tensor | None:
    """The row-wise concatenation of `ws` as a view when they already lie end to end in one storage."""
    first = ws[0]
    if not all(w.is_contiguous() and w.dtype == first.dtype and w.dim() == 2 and w.shape[1] == first.shape[1]
               for w in ws):
        return None
    if any(w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for w in ws):
        return None
    for a, b in zip(ws, ws[1:]):
        if b.storage_offset() != a.storage_offset() + a.numel():
            return None
    rows = sum(w.shape[0] for w in ws)
    return first.as_strided((rows, first.shape[1]), (first.shape[1], 1))


def _module_weight(module: torch.nn.Module) -> torch.Tensor:
    return module.weight


def _module_param(module: torch.nn.Module, name: str) -> torch.Tensor:
    """Parameter `name` of `module`, inside any wrappers that hold the module as base_layer (peft's)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return getattr(module, name)


class WeightBuilder:
    """Makes matmul weights in the generation dtype and counts the bytes copied.

    weight_fn(module) returns the weight a projection module computes with (default `module.weight`;
    the hybrid engine passes one that adds LoRA deltas); param_fn(module, name) the same for a parameter that is not
    a module's weight (a MoE block's 3-D expert parameters, which peft adapts with target_parameters). copy=True
    copies every tensor, so that the result holds no reference to the module's storage (needed when that storage
    is released right after, as with ZeRO-3 layer-by-layer gathering).
    """

    def __init__(self, weight_dtype: torch.dtype | None, weight_fn: WeightFn | None = None, copy: bool = False,
                 param_fn: ParamFn | None = None):
        if weight_dtype not in (None, torch.bfloat16, torch.float32):
            raise ValueError(f"weight_dtype must be None, torch.float32 or torch.bfloat16, got {weight_dtype}")
        self.weight_dtype = weight_dtype
        self.weight_fn = weight_fn or _module_weight
        self.param_fn = param_fn or _module_param
        self.copy = copy
        self.copied_bytes = 0

    def _out(self, t: torch.Tensor, copied: bool) -> torch.Tensor:
        t = t.detach()
        if self.weight_dtype is not None and t.dtype != self.weight_dtype:
            t = t.to(self.weight_dtype)
            copied = True
        if not t.is_contiguous():
            t, copied = t.contiguous(), True
        elif self.copy and not copied:
            t, copied = t.clone(), True
        if copied:
            self.copied_bytes += t.numel() * t.element_size()
        return t

    def linear(self, *modules: torch.nn.Module, transpose: bool = False) -> Linear:
        """One Linear from one module or from several fused along the output features."""
        ws = [self.weight_fn(m).detach() for m in modules]
        if transpose:  # GPT-2 Conv1D stores [in, out]
            ws = [w.t() for w in ws]
        fused = ws[0] if len(ws) == 1 else _adjacent_rows(ws)
        if fused is not None and not transpose:
            weight = self._out(fused, copied=False)
        else:
            weight = self._out(torch.cat(ws, 0) if len(ws) > 1 else ws[0], copied=len(ws) > 1 or transpose)
        biases = [m.bias for m in modules if getattr(m, "bias", None) is not None]
        bias = None
        if biases:
            if len(biases) != len(modules):
                raise ValueError("fused projections must all have biases or none")
            bias = self.vector(biases[0] if len(biases) == 1 else torch.cat([b.detach() for b in biases]))
        return Linear(weight, bias)

    def vector(self, t: torch.Tensor) -> torch.Tensor:
        """A norm weight or bias: fp32 (always a copy), rounded through weight_dtype when one is given."""
        t = t.detach()
        if self.weight_dtype is not None:
            t = t.to(self.weight_dtype)
        return t.to(torch.float32, copy=True)

    def table(self, t: torch.Tensor) -> torch.Tensor:
        """An embedding table: looked up row by row, so a view unless weight_dtype or copy asks for a copy."""
        return self._out(t, copied=False)

    def experts(self, moe: torch.nn.Module) -> Experts:
        """A sparse MoE block's router (an fp32 copy, tiny) and its experts' fused 3-D parameters (views, or copies
        where the dtype or `copy` asks)."""
        gate_up, down = (self.param_fn(moe.experts, name).detach() for name in ("gate_up_proj", "down_proj"))
        return Experts(self.vector(moe.gate.weight), self._out(gate_up, copied=False), self._out(down, copied=False))

    def norm(self, module: torch.nn.Module) -> Norm:
        bias = getattr(module, "bias", None)
        return Norm(self.vector(module.weight), None if bias is None else self.vector(bias))


def decoder_layers(model: torch.nn.Module, spec: ModelSpec) -> list[torch.nn.Module]:
    """The transformer blocks of an HF causal LM of `spec`'s family, in order."""
    if spec.family == "llama":
        return list(model.model.layers)
    if spec.family == "opt":
        return list(model.model.decoder.layers)
    return list(model.transformer.h)


def top_modules(model: torch.nn.Module, spec: ModelSpec) -> list[torch.nn.Module]:
    """The modules outside the blocks whose parameters generation reads: embeddings, final norm, LM head."""
    if spec.family == "llama":
        return [model.model.embed_tokens, model.model.norm, model.lm_head]
    if spec.family == "opt":
        dec = model.model.decoder
        return [dec.embed_tokens, dec.embed_positions, dec.final_layer_norm, model.lm_head]
    tr = model.transformer
    return [tr.wte, tr.wpe, tr.ln_f, model.lm_head]


def _llama_projections(spec: ModelSpec, attn: torch.nn.Module, mlp: torch.nn.Module):
    """The modules of a Llama-shaped block's q|k|v and gate|up: one fused module each (Phi-3) or three and two; no
    gate|up modules in a MoE block (its experts are 3-D parameters)."""
    if spec.fused_projections:
        return (attn.qkv_proj,), (mlp.gate_up_proj,)
    gate_up = () if is_moe(mlp) else (mlp.gate_proj, mlp.up_proj)
    return (attn.q_proj, attn.k_proj, attn.v_proj), gate_up


def is_moe(mlp: torch.nn.Module) -> bool:
    """Whether a block's MLP module is a sparse MoE block (a router `gate` and fused `experts`)."""
    return hasattr(mlp, "experts")


def gemma_norm(b: WeightBuilder, module: torch.nn.Module) -> Norm:
    """A Gemma RMSNorm, which multiplies by (1 + weight) in fp32: 1 + the fp32 weight (rounded through weight_dtype
    first), the same fp32 sum HF computes on every call, so the folded norm is exact."""
    return Norm(b.vector(module.weight) + 1.0)


def gemma_layer_weights(b: WeightBuilder, spec: ModelSpec, layer: torch.nn.Module) -> Layer:
    """One Gemma 3 block: a norm before and after each sublayer, per-head q/k norms, all of the (1 + weight) kind."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv, gate_up = _llama_projections(spec, attn, mlp)
    return Layer(
        attn_norm=gemma_norm(b, layer.input_layernorm),
        qkv=b.linear(*qkv),
        o=b.linear(attn.o_proj),
        mlp_norm=gemma_norm(b, layer.pre_feedforward_layernorm),
        up=b.linear(*gate_up),
        down=b.linear(mlp.down_proj),
        q_norm=gemma_norm(b, attn.q_norm),
        k_norm=gemma_norm(b, attn.k_norm),
        attn_out_norm=gemma_norm(b, layer.post_attention_layernorm),
        mlp_out_norm=gemma_norm(b, layer.post_feedforward_layernorm),
    )


def gemma_rope(rotary: torch.nn.Module, layer_type: str) -> tuple[torch.Tensor | None, float]:
    """(inv_freq, attention_scaling) of one layer type of Gemma 3's rotary module; (None, 1.0) for a type no layer has
    (HF builds tables only for the types in layer_types)."""
    inv_freq = getattr(rotary, f"{layer_type}_inv_freq", None)
    if inv_freq is None:
        return None, 1.0
    return inv_freq.detach().float(), float(getattr(rotary, f"{layer_type}_attention_scaling"))


def gemma_model_weights(b: WeightBuilder, model: torch.nn.Module, layers: list[Layer]) -> Weights:
    """A Gemma 3 model's weights around its blocks: the scaled embedding, a RoPE table per layer type (the sliding
    layers' is the local one; a model of sliding layers alone has no other, and theirs serves as both)."""
    inner = model.model
    embed = b.table(inner.embed_tokens.weight)
    scale = torch.tensor(inner.embed_tokens.scalar_embed_scale, dtype=torch.float32).to(embed.dtype)
    local, local_scaling = gemma_rope(inner.rotary_emb, "sliding_attention")
    inv_freq, scaling = gemma_rope(inner.rotary_emb, "full_attention")
    return Weights(
        embed=embed,
        layers=layers,
        final_norm=gemma_norm(b, inner.norm),
        lm_head=b.linear(model.lm_head),
        inv_freq=local if inv_freq is None else inv_freq,
        attention_scaling=local_scaling if inv_freq is None else scaling,
        embed_scale=float(scale),
        local_inv_freq=local,
        local_attention_scaling=local_scaling,
    )


def layer_weights(b: WeightBuilder, spec: ModelSpec, layer: torch.nn.Module) -> Layer:
    """One block's generation weights."""
    if spec.sandwich_norm:
        return gemma_layer_weights(b, spec, layer)
    if spec.family == "llama":
        attn, mlp = layer.self_attn, layer.mlp
        # OLMo 2 (post_norm): post_attention_layernorm acts on the attention's output, post_feedforward_ on the MLP's.
        attn_norm, mlp_norm = ((layer.post_attention_layernorm, layer.post_feedforward_layernorm) if spec.post_norm
                               else (layer.input_layernorm, layer.post_attention_layernorm))
        qkv, gate_up = _llama_projections(spec, attn, mlp)
        moe = is_moe(mlp)
        return Layer(
            attn_norm=b.norm(attn_norm),
            qkv=b.linear(*qkv),
            o=b.linear(attn.o_proj),
            mlp_norm=b.norm(mlp_norm),
            up=None if moe else b.linear(*gate_up),
            down=None if moe else b.linear(mlp.down_proj),
            q_norm=b.norm(attn.q_norm) if spec.qk_norm else None,
            k_norm=b.norm(attn.k_norm) if spec.qk_norm else None,
            experts=b.experts(mlp) if moe else None,
        )
    if spec.family == "opt":
        attn = layer.self_attn
        return Layer(
            attn_norm=b.norm(layer.self_attn_layer_norm),
            qkv=b.linear(attn.q_proj, attn.k_proj, attn.v_proj),
            o=b.linear(attn.out_proj),
            mlp_norm=b.norm(layer.final_layer_norm),
            up=b.linear(layer.fc1),
            down=b.linear(layer.fc2),
        )
    return Layer(
        attn_norm=b.norm(layer.ln_1),
        qkv=b.linear(layer.attn.c_attn, transpose=True),
        o=b.linear(layer.attn.c_proj, transpose=True),
        mlp_norm=b.norm(layer.ln_2),
        up=b.linear(layer.mlp.c_fc, transpose=True),
        down=b.linear(layer.mlp.c_proj, transpose=True),
    )


def model_weights(b: WeightBuilder, spec: ModelSpec, model: torch.nn.Module, layers: list[Layer]) -> Weights:
    """The whole model's generation weights around already-built `layers`."""
    if spec.sandwich_norm:
        weights = gemma_model_weights(b, model, layers)
    elif spec.family == "llama":
        inner = model.model
        rotary = inner.rotary_emb
        weights = Weights(
            embed=b.table(inner.embed_tokens.weight),
            layers=layers,
            final_norm=b.norm(inner.norm),
            lm_head=b.linear(model.lm_head),
            inv_freq=rotary.inv_freq.detach().float(),
            attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
            rotary=rotary if spec.dynamic_rope else None,
        )
    elif spec.family == "opt":
        dec = model.model.decoder
        weights = Weights(
            embed=b.table(dec.embed_tokens.weight),
            layers=layers,
            final_norm=b.norm(dec.final_layer_norm),
            lm_head=b.linear(model.lm_head),
            pos_embed=b.table(dec.embed_positions.weight),
        )
    else:
        tr = model.transformer
        weights = Weights(
            embed=b.table(tr.wte.weight),
            layers=layers,
            final_norm=b.norm(tr.ln_f),
            lm_head=b.linear(model.lm_head),
            pos_embed=b.table(tr.wpe.weight),
        )
    weights.copied_bytes = b.copied_bytes
    return weights


def extract_weights(model: torch.nn.Module, spec: ModelSpec, weight_dtype: torch.dtype | None = None) -> Weights:
    """The generation weights of `model` (an HF causal LM of `spec`'s family)."""
    b = WeightBuilder(weight_dtype)
    return model_weights(b, spec, model, [layer_weights(b, spec, layer) for layer in decoder_layers(model, spec)])


def _fused_groups(spec: ModelSpec, layer: torch.nn.Module) -> list[tuple[torch.nn.Module, ...]]:
    """The projections of one block that generation reads as one fused matrix (untransposed ones only)."""
    if spec.family == "llama":
        return [group for group in _llama_projections(spec, layer.self_attn, layer.mlp) if len(group) > 1]
    if spec.family == "opt":
        attn = layer.self_attn
        return [(attn.q_proj, attn.k_proj, attn.v_proj)]
    return []  # GPT-2 already stores c_attn fused (transposed)


@torch.no_grad()
def fuse_projection_storage(model: torch.nn.Module, spec: ModelSpec) -> int:
    """Lays each block's q, k, v (and gate, up) weights end to end in one buffer, so that generation
    reads them fused as views instead of concatenating copies. The parameters stay the same objects
    (only their .data moves, values unchanged), so optimizers and hooks are unaffected. Returns the
    bytes moved."""
    moved = 0
    for layer in decoder_layers(model, spec):
        for group in _fused_groups(spec, layer):
            params = [m.weight for m in group]
            if any(p.dim() != 2 or p.dtype != params[0].dtype for p in params):
                continue  # partitioned (ZeRO-3) or mixed: leave as is
            if _adjacent_rows([p.data for p in params]) is not None:
                continue
            buf = torch.cat([p.data for p in params], 0)
            row = 0
            for p in params:
                p.data = buf[row : row + p.shape[0]]
                row += p.shape[0]
            moved += buf.numel() * buf.element_size()
    return moved
