"""The engine's HF path: how a decoder-only family without a fast path generates in generation mode.

spec_from_config (model/spec.py) says whether the fast path serves a config exactly; when it refuses (a family it
does not know, a RoPE type or an attention detail it lacks), the engine keeps training as usual and generates
through transformers' own `generate` (generation/hf_generate.py) on a plain model whose tensors are the trained
ones (engine/plain.py): under ZeRO-3 the whole model is gathered once for the generation mode, not per token, and
LoRA is fused, as on the fast path. One HFPathWarning per engine names the family and the reason.

What it costs: transformers' decode loop (a [B, V] logits tensor per step kept for the log-probs, no fused
kernels), and the settings that shape the fast path's weights - tensor-parallel generation, gathering one block at
a time, a bf16 KV cache - are refused (check_settings); weight_dtype bf16 generates from bf16 copies.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
import transformers

from hybrid_engine.allocator import release_freed_memory
from hybrid_engine.engine.lora import FusedWeights
from hybrid_engine.engine.plain import plain_view
from hybrid_engine.engine.settings import GenerationSettings
from hybrid_engine.engine.stats import SwitchStats, timed
from hybrid_engine.engine.zero import gathered, unique_params
from hybrid_engine.generation.hf_generate import HFPathWarning, fast_path_reason, vocab_size, warn_hf_path

__all__ = ["FAST", "HF", "HFPathWarning", "check_settings", "fast_path_reason", "hf_generation_model", "vocab_size",
           "warn_hf_path"]

FAST, HF = "fast", "hf"
"""The values of SwitchStats.path: which path generated."""


def check_settings(settings: GenerationSettings, config, reason: str) -> None:
    """Refuses the generation settings the HF path cannot honour, naming the setting and the family."""
    family = getattr(config, "model_type", None)
    bad = [(settings.inference_tp_size != 1, f"generation.inference_tp_size={settings.inference_tp_size}"),
           (settings.gather != "all", f"generation.gather={settings.gather!r}"),
           (settings.kv_dtype != torch.float32, f"generation.kv_dtype={settings.kv_dtype}"),
           (settings.activation_dtype != torch.float32, f"generation.activation_dtype={settings.activation_dtype}")]
    for hit, name in bad:
        if hit:
            raise ValueError(f"{name} needs the fast path; model_type {family!r} generates through Hugging Face's "
                             f"generate ({reason})")


@contextmanager
def hf_generation_model(model: torch.nn.Module, settings: GenerationSettings,
                        stats: SwitchStats) -> Iterator[transformers.PreTrainedModel]:
    """The plain model the HF path generates with (plain_view of `model`, an HF causal LM perhaps with LoRA layers,
    perhaps ZeRO-3 partitioned), gathered once for the whole context; on exit the view and the fused tensors are
    dropped and the partitions restored. The caller drops its own references before the exit."""
    fuse = FusedWeights()
    stats.path = HF
    with ExitStack() as stack, torch.no_grad():
        with timed(stats, "gather_s"):
            stats.gather_bytes += stack.enter_context(gathered(unique_params([model])))
        with timed(stats, "build_s"):
            plain = plain_view(model, fuse, settings.weight_dtype)
        stats.fuse_s, stats.fuse_bytes = fuse.seconds, fuse.fused_bytes
        stats.build_s -= fuse.seconds
        try:
            yield plain
        finally:
            del plain
            with timed(stats, "release_s"):
                stack.close()
                release_freed_memory()
