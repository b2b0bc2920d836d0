"""The dtypes a generation model may read its weights and keep its KV cache in, and the one parser of their names.

A setting given by name ("bf16", as a flag or in a YAML file) or as a torch.dtype is parsed here, once, where it
enters (GenerationSettings, generate()), and checked against the one allowed set of that setting, with the same
error wherever it came from.
"""

from __future__ import annotations

import torch

NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
         "fp16": torch.float16, "float16": torch.float16}
"""Every name a dtype setting takes (case-insensitive)."""
SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
"""generation's weights: fp32 reads the trained weights themselves (kept as None: nothing is copied), bf16 reads
bf16 copies."""
KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The KV cache's storage dtypes (activations stay fp32; a bf16/fp16 cache is rounded once on the write)."""
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)
"""What the linear layers' inputs are rounded to: fp32, the exact path (the default), or bf16, the fast mode (bf16
weights only)."""


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """The short name of a dtype ("bf16"), as configs write it; None stays None."""
    return None if dtype is None else SHORT_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def parse_dtype(value, allowed: tuple[torch.dtype, ...], setting: str) -> torch.dtype:
    """`value` (a torch.dtype or one of NAMES) as a dtype of `allowed`; else a ValueError naming `setting`."""
    dtype = NAMES.get(value.lower()) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or dtype not in allowed:
        names = ", ".join(SHORT_NAMES[d] for d in allowed)
        raise ValueError(f"{setting} must be one of {names}, got {value!r}")
    return dtype


def parse_weight_dtype(value, setting: str = "weight_dtype") -> torch.dtype | None:
    """None for the trained weights themselves (None, "none", "fp32" or torch.float32), torch.bfloat16 for bf16
    copies ("bf16")."""
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    dtype = parse_dtype(value, WEIGHT_DTYPES, setting)
    return None if dtype == torch.float32 else dtype


def parse_kv_dtype(value, setting: str = "kv_dtype") -> torch.dtype:
    """The KV cache's dtype, one of KV_DTYPES."""
    return parse_dtype(value, KV_DTYPES, setting)


def parse_activation_dtype(value, weight_dtype: torch.dtype | None, setting: str = "activation_dtype",
                           weights_setting: str = "weight_dtype") -> torch.dtype:
    """The linear layers' activation dtype, one of ACTIVATION_DTYPES (None: fp32); bf16 is refused unless the weights
    are bf16 (`weight_dtype`, parsed), where bf16 activations would round the inputs of fp32 products for nothing."""
    dtype = torch.float32 if value is None else parse_dtype(value, ACTIVATION_DTYPES, setting)
    if dtype == torch.bfloat16 and weight_dtype != torch.bfloat16:
        raise ValueError(f"{setting}=bf16 (the fast mode) needs {weights_setting}=bf16, got "
                         f"{weights_setting}={dtype_name(weight_dtype or torch.float32)}")
    return dtype
