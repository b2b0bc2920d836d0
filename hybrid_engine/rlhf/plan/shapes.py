"""The models the planner sizes: a known size (a Llama shape), a built-in preset or a Hugging Face config.json, as
the list of their weight tensors and the shape their activations take. The tensors come from the model built on
torch's meta device: exact shapes, no memory, no weights."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from hybrid_engine.model.presets import PRESETS, preset_config

KNOWN = {
    # Sheared-LLaMA-1.3B's and OPT-350m's sizes; the others are LLaMA 7B/13B/30B/65B and Llama 2 70B (GQA, 8 KV heads).
    "350m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16),
    "1.3b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16),
    "6.7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "30b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52),
    "65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}
"""Known sizes, as Llama configs (vocabulary 32000, untied embeddings)."""
ALIASES = {"7b": "6.7b", "66b": "65b"}


@dataclass(frozen=True)
class Tensor:
    name: str
    numel: int
    trainable_linear: bool = False
    """A linear weight LoRA could adapt: its (in, out) are `shape`."""
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model."""

    name: str
    tensors: tuple[Tensor, ...]
    """Every weight once (tied ones once), in the model's order."""
    layers: int
    hidden: int
    intermediate: int
    """The MLP's width a token passes through (the experts' width times the experts per token for a mixture)."""
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated: bool
    """A gated MLP (Llama's SwiGLU): gate and up, 4 saved tensors of its width per token; else 2 (OPT, GPT-2)."""
    lm_head: bool = True
    """A causal LM; False: a reward model or critic (a value head of one output instead of the vocabulary)."""
    tied: bool = False
    """The LM head is the embedding: its gradient is the sum of two, both held as they are added."""

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)

    def block_params(self, layer: int = 0) -> int:
        """The weights of one decoder block."""
        prefix = f".layers.{layer}."
        return sum(t.numel for t in self.tensors if prefix in t.name or t.name.startswith(f"h.{layer}."))

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        """The adapters' weights: r * (in + out) per adapted linear."""
        return sum(r * sum(t.shape) for t in self.lora_targets(targets))

    def lora_targets(self, targets: tuple[str, ...]) -> list[Tensor]:
        return [t for t in self.tensors if t.trainable_linear and t.name.rsplit(".", 2)[-2] in targets]

    def as_reward_model(self) -> ModelShape:
        """The same body with a value head (Linear(hidden, 1) with bias) instead of the LM head."""
        head = [t for t in self.tensors if t.name == "lm_head.weight"]
        kept = tuple(t for t in self.tensors if t not in head) + (Tensor("value_head.weight", self.hidden),
                                                                   Tensor("value_head.bias", 1))
        return ModelShape(**{**self.__dict__, "tensors": kept, "lm_head": False})


def model_config(model: str) -> transformers.PretrainedConfig:
    """The HF config of a known size, a preset or a folder holding config.json; a one-line error otherwise."""
    size = ALIASES.get(model.lower(), model.lower())
    if size in KNOWN:
        return transformers.LlamaConfig(vocab_size=32000, tie_word_embeddings=False, **KNOWN[size])
    if model in PRESETS:
        return preset_config(model)
    if (Path(model) / "config.json").is_file():
        return transformers.AutoConfig.from_pretrained(model)
    raise ValueError(f"model {model!r}: not a known size ({', '.join([*KNOWN, *ALIASES])}), a built-in preset "
                     f"({', '.join(PRESETS)}) or a folder holding config.json")


@functools.lru_cache(maxsize=32)
def model_shape(model: str) -> ModelShape:
    """The ModelShape of `model` (model_config's forms), built once per process."""
    config = model_config(model)
    with torch.device("meta"):
        built = transformers.AutoModelForCausalLM.from_config(config)
    linears = {f"{name}.weight" for name, m in built.named_modules() if isinstance(m, torch.nn.Linear)}
    tensors = tuple(Tensor(name, p.numel(), name in linears and name != "lm_head.weight", tuple(p.shape[::-1]))
                    for name, p in built.named_parameters())
    text = config.get_text_config()
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    heads = _first(text, "num_attention_heads", "n_head")
    experts = getattr(text, "num_experts_per_tok", 0) or 0
    width = experts * text.moe_intermediate_size if experts and hasattr(text, "moe_intermediate_size") else \
        experts * getattr(text, "intermediate_size", 0) if experts else \
        _first(text, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden)
    gated = hasattr(built.get_decoder().layers[0].mlp, "gate_proj") if hasattr(built.get_decoder(), "layers") \
        else False
    return ModelShape(name=model, tensors=tensors, layers=_first(text, "num_hidden_layers", "n_layer"), hidden=hidden,
                      intermediate=width, heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                      head_dim=getattr(text, "head_dim", None) or hidden // heads, vocab=text.vocab_size, gated=gated,
                      tied=not any(t.name == "lm_head.weight" for t in tensors))


def _first(config, *names: str, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    if default is None:
        raise ValueError(f"{type(config).__name__}: none of {', '.join(names)} found")
    return default
