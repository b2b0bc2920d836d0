"""The switch into generation mode and back, as small steps with their inverses: gather (ZeRO-3) /
re-partition, fuse LoRA / drop the fused copies, reshard (TP) / drop the shards, build / release.

`generation_weights` composes them into one context manager whose exit undoes exactly what its entry
did, also on an exception. Nothing here modifies a trained parameter."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

from hybrid_engine.allocator import release_freed_memory
from hybrid_engine.engine.lora import FusedWeights
from hybrid_engine.engine.settings import GenerationSettings
from hybrid_engine.engine.stats import SwitchStats, timed
from hybrid_engine.engine.tp import TPGroup, shard_layer
from hybrid_engine.engine.zero import gathered, is_partitioned, unique_params
from hybrid_engine.model.spec import ModelSpec
from hybrid_engine.model.weights import (
    Layer,
    WeightBuilder,
    Weights,
    decoder_layers,
    layer_weights,
    model_weights,
    top_modules,
)


def _gather(stack: ExitStack, params: list[torch.nn.Parameter], stats: SwitchStats) -> None:
    with timed(stats, "gather_s"):
        stats.gather_bytes += stack.enter_context(gathered(params))


def _layer(b: WeightBuilder, spec: ModelSpec, module: torch.nn.Module, settings: GenerationSettings,
           tp: TPGroup | None, stats: SwitchStats) -> Layer:
    """One block's generation weights: gathered alone in "layer" mode, fused, then cut to this rank's shard."""
    with ExitStack() as stack:
        if settings.gather == "layer":
            _gather(stack, unique_params([module]), stats)
        with timed(stats, "build_s"):
            layer = layer_weights(b, spec, module)
        if tp is None:
            return layer
        with timed(stats, "reshard_s"):
            shard = shard_layer(layer, spec, tp.size, tp.rank)
        stats.reshard_bytes += sum(t.numel() * t.element_size() for t in _tensors(shard))
        return shard


def _tensors(layer: Layer) -> list[torch.Tensor]:
    return [t for lin in (layer.qkv, layer.o, layer.up, layer.down) for t in (lin.weight, lin.bias) if t is not None]


@contextmanager
def generation_weights(model: torch.nn.Module, spec: ModelSpec, settings: GenerationSettings,
                       tp: TPGroup | None, stats: SwitchStats) -> Iterator[Weights]:
    """The generation weights of `model` (an HF causal LM, perhaps peft-wrapped, perhaps ZeRO-3
    partitioned) while active; on exit every gathered, fused, bf16 or sharded tensor is released.
    The caller must drop its own references to the yielded weights before the exit."""
    fuse = FusedWeights()
    # In "layer" mode each ZeRO-3 block's gathered storage is released right after it is read: keep
    # copies (tensor-parallel shards are copies anyway). Unpartitioned parameters are read as views.
    partitioned = any(is_partitioned(p) for p in model.parameters())
    b = WeightBuilder(settings.weight_dtype, fuse, copy=settings.gather == "layer" and tp is None and partitioned,
                      param_fn=fuse.param)
    with ExitStack() as stack, torch.no_grad():
        if settings.gather == "all":
            _gather(stack, unique_params([model]), stats)
        layers = [_layer(b, spec, m, settings, tp, stats) for m in decoder_layers(model, spec)]
        if settings.gather == "layer":
            _gather(stack, unique_params(top_modules(model, spec)), stats)
            b.copy = False  # these stay gathered until the exit
        with timed(stats, "build_s"):
            weights = model_weights(b, spec, model, layers)
        del layers
        stats.fuse_s, stats.fuse_bytes = fuse.seconds, fuse.fused_bytes
        stats.build_s -= fuse.seconds  # fusing happens inside the build: count it once, as fuse
        stats.copied_bytes = b.copied_bytes
        try:
            yield weights
        finally:
            del weights
            with timed(stats, "release_s"):
                stack.close()  # re-partitions what was gathered
                release_freed_memory()  # a no-op under keep_freed_memory: training reuses the pages
