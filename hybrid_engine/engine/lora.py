"""LoRA for the hybrid engine: wrapping a model with peft, and the fused weights generation reads.

Generation never modifies a trained parameter: a LoRA projection's generation weight is a new tensor
W + scaling * B @ A (peft's own `get_delta_weight`), made on entry to generation mode and freed on exit.
"""

from __future__ import annotations

import fnmatch
import re
import time

import torch


def _lora_layer_type():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def _check_targets(model: torch.nn.Module, config) -> None:
    """Refuses a LoRA config whose target_modules name no module of `model`, before peft builds anything."""
    targets = config.target_modules
    if targets is None or targets == "all-linear":
        return
    names = [name for name, _ in model.named_modules()]
    if isinstance(targets, str):  # peft: a regex over full names
        if not any(re.fullmatch(targets, n) for n in names):
            raise ValueError(f"lora.target_modules={targets!r} matches no module of the model")
        return
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    missing = [t for t in targets if t not in leaves and not any(fnmatch.fnmatch(n, f"*{t}") for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"lora.target_modules {missing} match no module of the model; its linear layers are "
                         f"{linear}")


def wrap_lora(model: torch.nn.Module, config) -> torch.nn.Module:
    """`model` wrapped by peft with the LoRA `config` (a peft.LoraConfig); only the adapters train
    unless the config's modules_to_save says otherwise."""
    import peft

    if not isinstance(config, peft.LoraConfig):
        raise ValueError(f"lora must be a peft.LoraConfig, got {type(config).__name__}")
    if getattr(config, "use_dora", False):
        raise ValueError("lora.use_dora=True is not supported: generation fuses plain LoRA deltas only")
    _check_targets(model, config)
    return peft.get_peft_model(model, config)


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The peft LoRA layers inside `model` (none for a plain model)."""
    try:
        kind = _lora_layer_type()
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, kind)]


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a peft wrapper (the model itself when it is not wrapped)."""
    try:
        import peft
    except ImportError:
        return model
    if isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return model


class FusedWeights:
    """weight_fn for WeightBuilder: a LoRA layer's weight with its active adapters' deltas added; any
    other module's own weight. Counts the bytes of the fused tensors it makes."""

    def __init__(self):
        self.fused_bytes = 0
        self.seconds = 0.0

    def __call__(self, module: torch.nn.Module) -> torch.Tensor:
        base = getattr(module, "get_base_layer", None)
        if base is None or not isinstance(module, _lora_layer_type()):
            return module.weight
        return self._fuse(module, base().weight.detach())

    def param(self, module: torch.nn.Module, name: str) -> torch.Tensor:
        """Parameter `name` of `module` (a MoE block's experts) with the deltas of the peft ParamWrapper that adapts it
        (peft nests one wrapper per adapted parameter), or as it is where none does."""
        while hasattr(module, "base_layer") and getattr(module, "parameter_name", None) != name:
            module = module.base_layer
        if not hasattr(module, "base_layer"):
            return getattr(module, name)
        return self._fuse(module, module.get_param().detach())

    def _fuse(self, module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """weight + the LoRA layer's active adapters' deltas, a new tensor (weight itself when merged or disabled)."""
        if module.merged or module.disable_adapters:
            return weight
        t0 = time.perf_counter()
        fused = weight.clone()
        for name in module.active_adapters:
            if name in module.lora_A:
                fused += module.get_delta_weight(name).to(fused.dtype)
        self.seconds += time.perf_counter() - t0
        self.fused_bytes += fused.numel() * fused.element_size()
        return fused
