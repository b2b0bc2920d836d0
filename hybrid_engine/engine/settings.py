"""The generation settings a HybridEngine owns, checked before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from hybrid_engine.generation.checks import KV_DTYPES
from hybrid_engine.model.spec import ModelSpec

_DTYPES = {None: None, "none": None, "fp32": None, "float32": None, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16}
_KV_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
              "fp16": torch.float16, "float16": torch.float16}


@dataclass
class GenerationSettings:
    """How the engine's generation mode reads the trained weights."""

    weight_dtype: torch.dtype | None = None
    """None: generation reads the trained (fp32) weights themselves, exactly; torch.bfloat16: bf16 copies,
    made on entry and freed on exit (faster where the machine is bandwidth-bound, not exact)."""
    inference_tp_size: int = 1
    """Ranks that generate together, tensor-parallel: each keeps 1/k of every block's weights."""
    gather: str = "all"
    """ZeRO-3 only: "all" gathers the whole model at once (the generation weights are views of it);
    "layer" gathers one block at a time and keeps copies, so the gathered peak is one block."""
    kv_dtype: torch.dtype = torch.float32
    """The KV cache's dtype (generate's kv_dtype): torch.bfloat16 halves the bytes attention reads at long
    contexts, the cached keys and values rounded once (not exact)."""

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
        """Dtypes may be given by name ("bf16", "fp32", ...), as in a YAML or JSON config."""
        if isinstance(self.weight_dtype, str):
            if self.weight_dtype.lower() not in _DTYPES:
                raise ValueError(f"generation.weight_dtype must be None or 'bf16', got {self.weight_dtype!r}")
            self.weight_dtype = _DTYPES[self.weight_dtype.lower()]
        if isinstance(self.kv_dtype, str):
            if self.kv_dtype.lower() not in _KV_DTYPES:
                raise ValueError(f"generation.kv_dtype must be 'fp32', 'bf16' or 'fp16', got {self.kv_dtype!r}")
            self.kv_dtype = _KV_DTYPES[self.kv_dtype.lower()]

    def check(self, spec: ModelSpec, world_size: int) -> None:
        """Refuses settings that cannot work for this model and world size, naming the setting."""
        if self.weight_dtype not in (None, torch.bfloat16, torch.float32):
            raise ValueError(f"generation.weight_dtype must be None or torch.bfloat16, got {self.weight_dtype}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"generation.kv_dtype must be torch.float32, bfloat16 or float16, got {self.kv_dtype}")
        if self.gather not in ("all", "layer"):
            raise ValueError(f"generation.gather must be 'all' or 'layer', got {self.gather!r}")
        tp = self.inference_tp_size
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"generation.inference_tp_size must be a positive int, got {tp!r}")
        if world_size % tp:
            raise ValueError(f"generation.inference_tp_size={tp} does not divide the world size {world_size}")
        if tp > 1:
            for name, n in (("attention heads", spec.num_heads), ("key/value heads", spec.num_kv_heads),
                            ("intermediate size", spec.intermediate_size)):
                if n % tp:
                    raise ValueError(f"generation.inference_tp_size={tp} does not divide the model's {name} ({n})")
