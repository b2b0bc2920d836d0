"""The Mixture-of-Experts facts of a Hugging Face config (Qwen3-MoE, Mixtral): how many experts, how many each token
takes, whether their weights are renormalised, which layers are sparse. A routing detail the fast path does not
compute exactly is refused by name, so that such a model takes the HF path (engine/hf_path.py)."""

from __future__ import annotations

MOE_TYPES = ("qwen3_moe", "mixtral")

UNHONOURED = ("shared_expert_intermediate_size", "n_shared_experts", "routed_scaling_factor", "n_group",
              "topk_group", "router_bias", "moe_router_type")
"""Router and expert details of other MoE families (Qwen2-MoE's shared expert, DeepSeek's grouped top-k and
scaling): refused when a config sets them, since the router here does not compute them."""


def moe_fields(config) -> dict:
    """ModelSpec's MoE fields of a qwen3_moe or mixtral config (empty for any other model type)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MOE_TYPES:
        return {}
    for name in UNHONOURED:
        if getattr(config, name, None):
            raise ValueError(f"{model_type}: {name}={getattr(config, name)!r} is not computed by the fast path's "
                             "router")
    experts, top_k = int(config.num_local_experts), int(config.num_experts_per_tok)
    if not 1 <= top_k <= experts:
        raise ValueError(f"{model_type}: num_experts_per_tok={top_k} must lie in [1, num_experts={experts}]")
    layers = range(config.num_hidden_layers)
    if model_type == "mixtral":
        if getattr(config, "router_jitter_noise", 0.0):  # multiplies the router's input by noise in training mode
            raise ValueError(f"mixtral: router_jitter_noise={config.router_jitter_noise} is not computed by the fast "
                             "path's router")
        return dict(num_experts=experts, experts_per_token=top_k, moe_intermediate_size=config.intermediate_size,
                    norm_topk_prob=True, moe_layers=tuple(layers))
    step, dense = config.decoder_sparse_step, set(config.mlp_only_layers or ())
    if step < 1:
        raise ValueError(f"qwen3_moe: decoder_sparse_step={step} must be at least 1")
    sparse = tuple(i for i in layers if i not in dense and (i + 1) % step == 0)  # Qwen3MoeDecoderLayer's rule
    return dict(num_experts=experts, experts_per_token=top_k, moe_intermediate_size=config.moe_intermediate_size,
                norm_topk_prob=bool(config.norm_topk_prob), moe_layers=sparse)
