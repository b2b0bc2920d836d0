"""A plain Hugging Face model that reads a trained model's tensors: what the HF path generates with.

The trained model may be peft-wrapped (LoRA) and ZeRO-3 partitioned, so its own `generate` would run peft's
layers and fire DeepSpeed's hooks at every token. plain_view builds the same architecture on the meta device and
points each of its parameters and buffers at the trained value: a view of the trained tensor (no copy), a LoRA
layer's weight with its deltas fused (a new tensor, engine/lora.py's FusedWeights), or a copy in weight_dtype when
one is given. Nothing of the trained model is modified; its parameters must be whole on this rank (gathered) for
as long as the view is used.
"""

from __future__ import annotations

import torch
import transformers

from hybrid_engine.engine.lora import FusedWeights
from hybrid_engine.engine.save import trained_value


def _set(plain: torch.nn.Module, name: str, value: torch.Tensor, parameter: bool) -> None:
    path, attr = name.rsplit(".", 1) if "." in name else ("", name)
    module = plain.get_submodule(path)
    if parameter:
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


@torch.no_grad()
def plain_view(trained: torch.nn.Module, fuse: FusedWeights,
               weight_dtype: torch.dtype | None = None) -> transformers.PreTrainedModel:
    """A plain HF causal LM (no peft, no DeepSpeed hooks, eval mode) of `trained`'s config whose tensors are
    `trained`'s values, LoRA fused by `fuse`; floating-point ones cast to weight_dtype when it is given."""
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        plain = transformers.AutoModelForCausalLM.from_config(trained.config)
    for parameter, named in ((True, plain.named_parameters), (False, plain.named_buffers)):
        for name, _ in list(named(remove_duplicate=False)):
            value = trained_value(trained, name, fuse).detach()
            if weight_dtype is not None and value.is_floating_point():
                value = value.to(weight_dtype)
            _set(plain, name, value, parameter)
    plain.generation_config = trained.generation_config
    return plain.eval()
