"""The generation-mode weights of a Hugging Face causal LM, in the layout the decode kernels read.

With weight_dtype=None every tensor is a view of the module's own parameter except where the layout
must change: the fused q|k|v projection and Llama's fused gate|up projection are concatenated copies,
and GPT-2's Conv1D weights ([in, out]) are transposed copies. `Weights.copied_bytes` says how much was
copied (benchmarks report its cost). With weight_dtype=torch.bfloat16 every matmul weight is a bf16
copy made here, and so is the embedding table; norm weights and biases are rounded to bf16 and kept
as fp32 (tiny), so the whole model computes with exactly the values of `model.to(torch.bfloat16)`.
"""

from __future__ import annotations

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
class Layer:
    attn_norm: Norm
    qkv: Linear  # [(Hq + 2 Hkv) * D, H]
    o: Linear  # [H, Hq * D]
    mlp_norm: Norm
    up: Linear  # Llama: fused gate|up [2 I, H]; OPT/GPT-2: fc1 [I, H]
    down: Linear  # [H, I]


@dataclass
class Weights:
    embed: torch.Tensor  # [V, H] token embedding (lookup)
    layers: list[Layer]
    final_norm: Norm
    lm_head: Linear  # [V, H]
    pos_embed: torch.Tensor | None = None  # [P, H] learned positions (OPT, GPT-2)
    inv_freq: torch.Tensor | None = None  # [D/2] rotary frequencies (Llama)
    attention_scaling: float = 1.0
    copied_bytes: int = field(default=0)


class _Builder:
    """Makes matmul weights in the generation dtype and counts the bytes copied."""

    def __init__(self, weight_dtype: torch.dtype | None):
        self.weight_dtype = weight_dtype
        self.copied_bytes = 0

    def _out(self, t: torch.Tensor, copied: bool) -> torch.Tensor:
        t = t.detach()
        if self.weight_dtype is not None and t.dtype != self.weight_dtype:
            t = t.to(self.weight_dtype)
            copied = True
        if not t.is_contiguous():
            t = t.contiguous()
            copied = True
        if copied:
            self.copied_bytes += t.numel() * t.element_size()
        return t

    def linear(self, *modules: torch.nn.Module, transpose: bool = False) -> Linear:
        """One Linear from one module or from several fused along the output features."""
        ws = [m.weight.detach() for m in modules]
        if transpose:  # GPT-2 Conv1D stores [in, out]
            ws = [w.t() for w in ws]
        weight = self._out(ws[0] if len(ws) == 1 else torch.cat(ws, 0), copied=len(ws) > 1 or transpose)
        biases = [m.bias for m in modules if getattr(m, "bias", None) is not None]
        bias = None
        if biases:
            if len(biases) != len(modules):
                raise ValueError("fused projections must all have biases or none")
            bias = self.vector(biases[0] if len(biases) == 1 else torch.cat([b.detach() for b in biases]))
        return Linear(weight, bias)

    def vector(self, t: torch.Tensor) -> torch.Tensor:
        """A norm weight or bias: fp32, rounded through weight_dtype when one is given."""
        t = t.detach()
        if self.weight_dtype is None:
            return t.float()
        return t.to(self.weight_dtype).float()

    def table(self, t: torch.Tensor) -> torch.Tensor:
        """An embedding table: looked up row by row, so a view unless weight_dtype asks for a copy."""
        return self._out(t, copied=False)

    def norm(self, module: torch.nn.Module) -> Norm:
        bias = getattr(module, "bias", None)
        return Norm(self.vector(module.weight), None if bias is None else self.vector(bias))


def extract_weights(model: torch.nn.Module, spec: ModelSpec, weight_dtype: torch.dtype | None = None) -> Weights:
    """The generation weights of `model` (an HF causal LM of `spec`'s family)."""
    if weight_dtype not in (None, torch.bfloat16, torch.float32):
        raise ValueError(f"weight_dtype must be None, torch.float32 or torch.bfloat16, got {weight_dtype}")
    b = _Builder(weight_dtype)
    if spec.family == "llama":
        inner = model.model
        layers = [
            Layer(
                attn_norm=b.norm(layer.input_layernorm),
                qkv=b.linear(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                o=b.linear(layer.self_attn.o_proj),
                mlp_norm=b.norm(layer.post_attention_layernorm),
                up=b.linear(layer.mlp.gate_proj, layer.mlp.up_proj),
                down=b.linear(layer.mlp.down_proj),
            )
            for layer in inner.layers
        ]
        rotary = inner.rotary_emb
        weights = Weights(
            embed=b.table(inner.embed_tokens.weight),
            layers=layers,
            final_norm=b.norm(inner.norm),
            lm_head=b.linear(model.lm_head),
            inv_freq=rotary.inv_freq.detach().float(),
            attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
        )
    elif spec.family == "opt":
        dec = model.model.decoder
        layers = [
            Layer(
                attn_norm=b.norm(layer.self_attn_layer_norm),
                qkv=b.linear(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                o=b.linear(layer.self_attn.out_proj),
                mlp_norm=b.norm(layer.final_layer_norm),
                up=b.linear(layer.fc1),
                down=b.linear(layer.fc2),
            )
            for layer in dec.layers
        ]
        weights = Weights(
            embed=b.table(dec.embed_tokens.weight),
            layers=layers,
            final_norm=b.norm(dec.final_layer_norm),
            lm_head=b.linear(model.lm_head),
            pos_embed=b.table(dec.embed_positions.weight),
        )
    else:
        tr = model.transformer
        layers = [
            Layer(
                attn_norm=b.norm(block.ln_1),
                qkv=b.linear(block.attn.c_attn, transpose=True),
                o=b.linear(block.attn.c_proj, transpose=True),
                mlp_norm=b.norm(block.ln_2),
                up=b.linear(block.mlp.c_fc, transpose=True),
                down=b.linear(block.mlp.c_proj, transpose=True),
            )
            for block in tr.h
        ]
        weights = Weights(
            embed=b.table(tr.wte.weight),
            layers=layers,
            final_norm=b.norm(tr.ln_f),
            lm_head=b.linear(model.lm_head),
            pos_embed=b.table(tr.wpe.weight),
        )
    weights.copied_bytes = b.copied_bytes
    return weights
