"""ModelSpec: the architecture facts the generation-mode transformer needs, read from a Hugging Face config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hybrid_engine.model.exactness import check_rope, dynamic_rope, longrope_rerun_width
from hybrid_engine.model.moe_config import moe_fields
from hybrid_engine.ops.decode_step import ACTIVATIONS as DECODE_ACTIVATIONS
from hybrid_engine.ops.decode_step import GATED

# model_type -> family. Qwen2, Mistral, Qwen3 and OLMo 2 are Llama-shaped (Qwen2 adds q/k/v biases, Qwen3 a q/k
# RMSNorm per head before RoPE, OLMo 2 a q/k RMSNorm over the whole projection and norms after each sublayer, SmolLM3
# layers without RoPE where its no_rope_layers says 0, Phi-3 fused qkv_proj and gate_up_proj and RoPE on the first
# partial_rotary_factor of each head, Gemma 3 the differences gemma_fields reads). Qwen3-MoE and Mixtral are Qwen3 and
# Mistral with Mixture-of-Experts MLPs (moe_config.py).
SUPPORTED = {"llama": "llama", "qwen2": "llama", "mistral": "llama", "qwen3": "llama", "olmo2": "llama",
             "smollm3": "llama", "phi3": "llama", "gemma3_text": "llama", "qwen3_moe": "llama", "mixtral": "llama",
             "opt": "opt", "gpt2": "gpt2"}
FUSED_PROJECTIONS = {"phi3"}  # q|k|v in one qkv_proj, gate|up in one gate_up_proj: read as the views they are
# model_type -> qk_norm: where a family normalises q and k before RoPE.
QK_NORM = {"qwen3": "head", "qwen3_moe": "head", "olmo2": "proj", "gemma3_text": "head"}
POST_NORM = {"olmo2"}  # RMSNorm on each sublayer's output before the residual add, none before the sublayer


@dataclass(frozen=True)
class ModelSpec:
    """What differs between the supported decoder-only families."""

    family: str  # "llama" | "opt" | "gpt2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    norm: str  # "rms" (Llama) or "layer" (OPT, GPT-2)
    norm_eps: float
    activation: str  # gated: "silu" (Llama), "gelu_pytorch_tanh_gated" (Gemma 3); else the FFN activation of OPT/GPT-2
    # ("relu", "gelu_new", ...)
    rotary: bool  # rotary embeddings (Llama) or learned absolute positions (OPT, GPT-2)
    position_offset: int = 0  # OPT's learned positions start at index 2
    sliding_window: int | None = None  # Mistral, Gemma 3 (its sliding layers): attention span; longer sequences are
    # rejected
    inverse_layer_scale: bool = False  # GPT-2's scale_attn_by_inverse_layer_idx
    qk_norm: str | None = None  # RMSNorm of q and k before RoPE: "head" per head over head_dim (Qwen3), "proj" over
    # the whole q and k projections (OLMo 2)
    post_norm: bool = False  # OLMo 2: each block's norms act on its sublayers' outputs, before the residual add
    nope_layers: tuple[int, ...] = ()  # SmolLM3: the layers whose q and k take no RoPE (NoPE)
    fused_projections: bool = False  # Phi-3: the HF modules hold q|k|v and gate|up fused (qkv_proj, gate_up_proj)
    dynamic_rope: str | None = None  # "longrope" | "dynamic": RoPE tables chosen per forward call (model/rope.py);
    # "dynamic" (NTK) has no length limit: it rescales past max_positions
    rerun_width: int | None = None  # Phi-3 under LongRoPE: HF's generate drops its cache and reruns the sequences
    # in one forward when their width (padding included) first exceeds this (original_max_position_embeddings)
    sandwich_norm: bool = False  # Gemma 3: a norm before and another after each sublayer (Layer.attn_out_norm, ...)
    scale: float | None = None  # Gemma 3: the attention scale query_pre_attn_scalar**-0.5 instead of head_dim**-0.5
    local_rope_layers: tuple[int, ...] = ()  # Gemma 3: the sliding-window layers, whose RoPE has its own base
    final_softcap: float | None = None  # Gemma 3: logits -> tanh(logits / cap) * cap (final_logit_softcapping)
    # Mixture of Experts (Qwen3-MoE, Mixtral): the layers in moe_layers route each token to experts_per_token of
    # num_experts gated MLPs of moe_intermediate_size (softmax over all experts, top-k, renormalised to sum 1 when
    # norm_topk_prob); the other layers have the dense MLP of intermediate_size.
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[int, ...] = ()

    @property
    def qkv_rows(self) -> int:
        """Output features of the fused q|k|v projection."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def attention_scale(self, layer: int) -> float:
        scale = self.head_dim**-0.5 if self.scale is None else self.scale
        return scale / (layer + 1) if self.inverse_layer_scale else scale


def spec_from_config(config) -> ModelSpec:
    """The ModelSpec of a Hugging Face causal-LM config; a clear error for anything unsupported."""
    spec = _spec_from_config(config)
    if spec.rotary:
        check_rope(config)  # a RoPE type it cannot honour exactly: the HF path, not a different answer
    supported = [name for name in DECODE_ACTIVATIONS if name not in GATED]  # the gated ones: Llama's and Gemma's MLP
    if spec.family != "llama" and spec.activation not in supported:
        raise ValueError(f"{spec.family}: activation_function {spec.activation!r} is not supported; supported: "
                         f"{', '.join(supported)}")
    return spec


def nope_layers(config) -> tuple[int, ...]:
    """SmolLM3's layers without RoPE: where no_rope_layers (one entry per layer, 1 = RoPE) holds 0."""
    flags = list(config.no_rope_layers)
    if len(flags) != config.num_hidden_layers or any(f not in (0, 1) for f in flags):
        raise ValueError(f"smollm3: no_rope_layers must hold a 0 or 1 per layer ({config.num_hidden_layers}), "
                         f"got {flags}")
    return tuple(i for i, f in enumerate(flags) if not f)


def gemma_fields(config) -> dict:
    """The ModelSpec fields in which Gemma 3 (gemma3_text) differs from Llama; refuses by name what the fast path does
    not compute (attention logit soft-capping, bidirectional attention, an activation other than GELU-tanh)."""
    if config.hidden_activation != "gelu_pytorch_tanh":
        raise ValueError(f"gemma3_text: hidden_activation {config.hidden_activation!r} is not supported; supported: "
                         "gelu_pytorch_tanh")
    if config.attn_logit_softcapping is not None:
        raise ValueError(f"gemma3_text: attn_logit_softcapping={config.attn_logit_softcapping} is not computed by the "
                         "fast path (its attention kernels do not soft-cap scores)")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("gemma3_text: use_bidirectional_attention=True is not supported (the fast path is causal)")
    return dict(activation="gelu_pytorch_tanh_gated", sandwich_norm=True, scale=config.query_pre_attn_scalar**-0.5,
                local_rope_layers=tuple(i for i, t in enumerate(config.layer_types) if t == "sliding_attention"),
                final_softcap=config.final_logit_softcapping)


def _spec_from_config(config) -> ModelSpec:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(
            f"hybrid_engine generation does not support model_type {model_type!r}; supported: "
            f"{', '.join(sorted(SUPPORTED))} (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, "
            "Qwen3ForCausalLM, Olmo2ForCausalLM, SmolLM3ForCausalLM, Phi3ForCausalLM, Gemma3ForCausalLM, "
            "Qwen3MoeForCausalLM, MixtralForCausalLM, OPTForCausalLM, GPT2LMHeadModel)"
        )
    family = SUPPORTED[model_type]
    if family == "llama":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if model_type != "gemma3_text" and getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"{model_type}: only hidden_act='silu' is supported, got {config.hidden_act!r}")
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        if model_type in ("smollm3", "gemma3_text") and "sliding_attention" not in (config.layer_types or []):
            window = None  # its window acts on the layer types that say so: none here
        spec = ModelSpec(
            family=family,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            max_positions=config.max_position_embeddings,
            norm="rms",
            norm_eps=config.rms_norm_eps,
            activation="silu",
            rotary=True,
            sliding_window=window,
            qk_norm=QK_NORM.get(model_type),
            post_norm=model_type in POST_NORM,
            nope_layers=nope_layers(config) if model_type == "smollm3" else (),
            fused_projections=model_type in FUSED_PROJECTIONS,
            dynamic_rope=dynamic_rope(config),
            rerun_width=longrope_rerun_width(config),
            **moe_fields(config),
        )
        return dataclasses.replace(spec, **gemma_fields(config)) if model_type == "gemma3_text" else spec
    if family == "opt":
        if not config.do_layer_norm_before or config.word_embed_proj_dim != config.hidden_size:
            raise ValueError(
                "OPT: only pre-LayerNorm models without input/output projections are supported "
                "(do_layer_norm_before=True and word_embed_proj_dim == hidden_size; OPT-350m is neither)"
            )
        if not getattr(config, "layer_norm_elementwise_affine", True):
            raise ValueError("OPT: layer_norm_elementwise_affine=False is not supported")
        heads = config.num_attention_heads
        return ModelSpec(
            family=family,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=config.hidden_size // heads,
            intermediate_size=config.ffn_dim,
            max_positions=config.max_position_embeddings,
            norm="layer",
            norm_eps=1e-5,
            activation=config.activation_function,
            rotary=False,
            position_offset=2,
        )
    if getattr(config, "add_cross_attention", False) or getattr(config, "reorder_and_upcast_attn", False):
        raise ValueError("GPT-2: cross-attention and reorder_and_upcast_attn are not supported")
    if not getattr(config, "scale_attn_weights", True):
        raise ValueError("GPT-2: scale_attn_weights=False is not supported")
    heads = config.n_head
    return ModelSpec(
        family=family,
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        num_layers=config.n_layer,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=config.n_embd // heads,
        intermediate_size=config.n_inner or 4 * config.n_embd,
        max_positions=config.n_positions,
        norm="layer",
        norm_eps=config.layer_norm_epsilon,
        activation=config.activation_function,
        rotary=False,
        inverse_layer_scale=bool(getattr(config, "scale_attn_by_inverse_layer_idx", False)),
    )
