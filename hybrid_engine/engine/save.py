"""Saving the trained actor as Hugging Face loads it: the merged model, or the LoRA adapters alone."""

from __future__ import annotations

import torch
import transformers

from hybrid_engine.engine.lora import FusedWeights


def trained_value(trained: torch.nn.Module, name: str, fuse: FusedWeights) -> torch.Tensor:
    """The trained value of parameter or buffer `name` of the plain model, with LoRA deltas merged."""
    path, attr = name.rsplit(".", 1) if "." in name else ("", name)
    module = trained.get_submodule(path)
    if hasattr(module, "get_base_layer"):  # a peft layer
        # a module's weight, or a parameter peft adapts in place (a MoE block's experts, its ParamWrapper)
        return fuse(module) if attr == "weight" else fuse.param(module, attr)
    return getattr(module, attr)


@torch.no_grad()
def merged_model(trained: torch.nn.Module) -> transformers.PreTrainedModel:
    """A plain HF model (no peft, no DeepSpeed hooks) holding `trained`'s values with LoRA merged. The
    trained parameters must be whole on this rank (gathered under ZeRO-3)."""
    with torch.device("meta"):
        plain = transformers.AutoModelForCausalLM.from_config(trained.config)
    plain.to_empty(device="cpu")
    fuse = FusedWeights()
    for name, t in [*plain.named_parameters(), *plain.named_buffers()]:
        t.copy_(trained_value(trained, name, fuse))
    plain.generation_config = trained.generation_config
    return plain.eval()
