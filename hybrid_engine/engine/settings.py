"""The generation settings a HybridEngine owns, checked before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from hybrid_engine.model.dtypes import parse_activation_dtype, parse_kv_dtype, parse_weight_dtype
from hybrid_engine.model.spec import ModelSpec
from hybrid_engine.ops.linear_bf16 import check_bf16_compute


@dataclass
class GenerationSettings:
    """How the engine's generation mode reads the trained weights."""

    weight_dtype: torch.dtype | None = None
    """fp32 (None): generation reads the trained weights themselves, exactly; bf16: bf16 copies, made on entry and
    freed on exit (faster where the machine is bandwidth-bound, not exact)."""
    inference_tp_size: int = 1
    """Ranks that generate together, tensor-parallel: each keeps 1/k of every block's weights."""
    gather: str = "all"
    """ZeRO-3 only: "all" gathers the whole model at once (the generation weights are views of it);
    "layer" gathers one block at a time and keeps copies, so the gathered peak is one block."""
    kv_dtype: torch.dtype = torch.float32
    """The KV cache's dtype, fp32, bf16 or fp16: bf16 halves the bytes attention reads at long contexts, the cached
    keys and values rounded once (not exact)."""
    activation_dtype: torch.dtype = torch.float32
    """The linear layers' inputs: fp32 (exact: generation's log-probs match a training forward to ~1e-5) or bf16, the
    fast mode (needs weight_dtype bf16 and a CPU with bf16 compute, avx512_bf16 or amx_bf16): activations rounded
    to bf16 before each linear layer, as vLLM computes; PPO/GRPO/RLOO then recompute the old log-probs by a training
    forward and log the mismatch (logprob_mismatch_mean/max)."""

    @classmethod
    def parse(cls, value: GenerationSettings | dict | None) -> GenerationSettings:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"generation must be a GenerationSettings, a dict or None, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"generation: unknown settings {unknown}; known: {sorted(known)}")
        return cls(**value)

    def __post_init__(self):
        """Dtypes may be given by name ("bf16", "fp32", ...), as in a YAML or JSON config: parsed here, once. The
        settings that need the model or the world size are checked by check()."""
        self.weight_dtype = parse_weight_dtype(self.weight_dtype, "generation.weight_dtype")
        self.kv_dtype = parse_kv_dtype(self.kv_dtype, "generation.kv_dtype")
        self.activation_dtype = parse_activation_dtype(self.activation_dtype, self.weight_dtype,
                                                       "generation.activation_dtype", "generation.weight_dtype")
        if self.gather not in ("all", "layer"):
            raise ValueError(f"generation.gather must be 'all' or 'layer', got {self.gather!r}")
        tp = self.inference_tp_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"generation.inference_tp_size must be a positive int, got {tp!r}")

    def check(self, spec: ModelSpec, world_size: int) -> None:
        """Refuses settings that cannot work for this model and world size, naming the setting."""
        tp = self.inference_tp_size
        check_bf16_compute(self.activation_dtype, "generation.activation_dtype")
        if world_size % tp:
            raise ValueError(f"generation.inference_tp_size={tp} does not divide the world size {world_size}")
        if tp > 1:
            for name, n in (("attention heads", spec.num_heads), ("key/value heads", spec.num_kv_heads),
                            ("intermediate size", spec.intermediate_size)):
                if n % tp:
                    raise ValueError(f"generation.inference_tp_size={tp} does not divide the model's {name} ({n})")
            if spec.qk_norm == "proj":  # its mean of squares spans every head: a shard alone cannot compute it
                raise ValueError(f"generation.inference_tp_size={tp}: tensor-parallel generation does not support "
                                 "a q/k norm over the whole projection (OLMo 2's); use inference_tp_size=1")
            if spec.moe_layers:  # its experts are not sharded (expert parallelism is not built)
                raise ValueError(f"generation.inference_tp_size={tp}: tensor-parallel generation does not support "
                                 "Mixture-of-Experts models (Qwen3-MoE, Mixtral); use inference_tp_size=1")
