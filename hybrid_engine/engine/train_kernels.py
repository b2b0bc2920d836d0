"""The training forward and backward through hybrid_engine's fused ops, patched into Hugging Face modules (the
way Liger-Kernel's apply_* functions do), with one switch to turn them off.

apply_training_kernels(model) patches, for the Llama, Qwen2, Mistral, Qwen3, OLMo 2, SmolLM3 and Phi-3 families:
- every RMSNorm module's forward -> ops.rms_norm (forward and backward kernels; HF's semantics), the q_norm/k_norm
  included (Qwen3's over rows of head_dim, OLMo 2's over the whole projection; OLMo 2's norm multiplies by the
  weight in fp32 before rounding, which is what the kernels compute);
- every gated MLP with hidden_act "silu" -> down_proj(ops.silu_mul(gate_proj(x), up_proj(x))) (Phi-3's fused
  gate_up_proj MLP keeps HF's forward);
- the family's apply_rotary_pos_emb -> ops.rotary_embed where q or k requires grad. That function is
  module-level in transformers, so this part is process-wide for the family until unapply_training_kernels (a
  partial rotary, cos narrower than head_dim as in Phi-4-mini, keeps HF's function): an
  unpatched model of the family that trains gets it too (it computes the same within the ops' tolerances);
  inference (generate, no_grad forwards) always runs HF's own.
The policy loss already reads token_logprobs (never [B, T, V] logits) and the critic its value head on the
hidden states without the LM head (engine.token_logprobs, RewardModel.values). Parameters, state dicts,
save_pretrained and LoRA/DeepSpeed wrapping are untouched: only forward methods change. Results stay within the
ops' tolerances of the unpatched model (tests/test_train_kernels.py); inference on a patched model (no_grad:
generate, scoring) runs HF's own code and gives HF's results exactly.
"""

from __future__ import annotations

import importlib
import types

import torch

from hybrid_engine.ops import rms_norm
from hybrid_engine.ops.training import KERNEL_DTYPES, rotary_embed, silu_mul

FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "olmo2", "smollm3", "phi3")
_ORIGINAL_ROTARY: dict[str, object] = {}


def _takes(x: torch.Tensor) -> bool:
    """Whether a patched forward runs the kernels on x: a differentiable CPU forward in a kernel dtype. Inference
    (no_grad), float64 and GPUs (no training kernels there yet) run HF's own code, exactly."""
    return torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype in KERNEL_DTYPES


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not _takes(hidden_states):
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not _takes(x):
        return type(self).forward(self, x)
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _rotary_for(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        # Only a differentiable forward takes the kernel: inference (HF generate, no_grad scoring) stays HF's.
        # ops.rotary_embed rotates whole heads: a partial rotary (cos narrower than q's head_dim) stays HF's.
        whole = unsqueeze_dim == 1 and q.dim() == 4 and cos.shape[-1] == q.shape[-1]
        if not whole or not (q.requires_grad or k.requires_grad) or not _takes(q):
            return original(q, k, cos, sin, unsqueeze_dim)
        return rotary_embed(q, k, cos, sin)

    apply_rotary_pos_emb.hybrid_engine_original = original
    return apply_rotary_pos_emb


def _family(module: torch.nn.Module) -> str | None:
    name = type(module).__module__
    return next((f for f in FAMILIES if name == f"transformers.models.{f}.modeling_{f}"), None)


def _is_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def _is_silu_mlp(module: torch.nn.Module) -> bool:
    config = getattr(module, "config", None)
    return (all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and getattr(config, "hidden_act", None) == "silu")


def apply_training_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """Patches the training kernels into `model` (an HF causal LM, a PEFT model, a DeepSpeed engine's module or
    anything holding one, such as a RewardModel); returns the same model. Modules of other families are left
    as they are. Applying twice changes nothing."""
    _no_hub_kernels(model)
    for module in model.modules():
        family = _family(module)
        if family is None:
            continue
        if _is_norm(module):
            module.forward = types.MethodType(_norm_forward, module)
        elif _is_silu_mlp(module):
            module.forward = types.MethodType(_mlp_forward, module)
        if family not in _ORIGINAL_ROTARY:
            _install_rotary(family)
    return model


def _no_hub_kernels(model: torch.nn.Module) -> None:
    """Turns off transformers' Hub kernels (its `kernels` integration, on by default for what from_pretrained loads
    when the package is installed): it kernelizes the model again at each train()/eval() switch, which would put
    transformers' forward methods back over the patched ones, silently."""
    for module in model.modules():
        if getattr(module, "use_kernels", False) and callable(getattr(module, "reset_kernels", None)):
            module.reset_kernels()


def _install_rotary(family: str) -> None:
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    original = modeling.apply_rotary_pos_emb
    _ORIGINAL_ROTARY[family] = original
    modeling.apply_rotary_pos_emb = _rotary_for(original)


def unapply_training_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """Restores HF's own forward methods on `model` and HF's rotary function of every family."""
    for module in model.modules():
        if "forward" in vars(module) and getattr(module.forward, "__func__", None) in (_norm_forward, _mlp_forward):
            del module.forward
    for family, original in list(_ORIGINAL_ROTARY.items()):
        modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        modeling.apply_rotary_pos_emb = original
        del _ORIGINAL_ROTARY[family]
    return model


def training_kernels_applied(model: torch.nn.Module) -> bool:
    """Whether any module of `model` runs a patched forward."""
    return any(getattr(vars(m).get("forward"), "__func__", None) in (_norm_forward, _mlp_forward)
               for m in model.modules())
