"""Frozen models (the PPO reference and reward model) partitioned across ranks under ZeRO-3, as DeepSpeed-Chat's are.

`partition` hands a frozen model to deepspeed.initialize with an eval config of ZeRO stage 3 (the training config's
zero_optimization, without an optimizer, its offload or mixed precision: the model keeps its dtype and values).
DeepSpeed then keeps 1/world of every parameter on each rank (those under stage3_param_persistence_threshold
elements stay whole, as the actor's do), and its forward hooks gather each module while an HF forward runs it.

The inference path's kernels read weights outside any module forward, so `layer_by_layer` gathers for them: the
embeddings, final norm and LM head for the whole scoring call, and each decoder block only while it runs
(GatheredLayers). A rank then holds at most its shards, the top modules whole and two blocks whole (the one running
and the one being released). The arithmetic is that of the whole model's: the same kernels on the same values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from hybrid_engine.allocator import release_freed_memory
from hybrid_engine.engine.training import init_distributed
from hybrid_engine.engine.zero import gathered, is_partitioned, unique_params
from hybrid_engine.model.spec import ModelSpec
from hybrid_engine.model.transformer import InferenceTransformer
from hybrid_engine.model.weights import Layer, WeightBuilder, decoder_layers, layer_weights, model_weights, top_modules

TRAINING_ONLY = ("offload_optimizer",)
"""zero_optimization keys of the training config that a model without an optimizer leaves out."""


def eval_config(ds_config: dict) -> dict:
    """The DeepSpeed config a frozen model is partitioned under: ZeRO stage 3 with the training config's
    zero_optimization settings (persistence threshold, buckets, offload_param), no optimizer, no fp16/bf16."""
    zero = {k: v for k, v in ds_config.get("zero_optimization", {}).items() if k not in TRAINING_ONLY}
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 2**62,
            "zero_optimization": {**zero, "stage": 3}}


def partition(model: torch.nn.Module, ds_config: dict):
    """Partitions the frozen `model`'s parameters across the ranks (ZeRO-3, eval config), in place; returns the
    DeepSpeed engine, which must live as long as the model is used (its hooks gather in every forward). The whole
    parameters' freed pages go back to the OS (glibc keeps large freed heap blocks otherwise)."""
    import deepspeed

    init_distributed()
    engine, *_ = deepspeed.initialize(model=model, config=eval_config(ds_config))
    engine.eval()
    release_freed_memory()
    return engine


def resident_bytes(model: torch.nn.Module) -> int:
    """The bytes of `model`'s parameters this rank holds: its ZeRO-3 shard of each partitioned one, all of others."""
    return sum((p.ds_tensor.numel() if is_partitioned(p) else p.numel()) * p.element_size()
               for p in unique_params([model]))


class GatheredLayers:
    """The decoder blocks' Layers for the inference path, each built from its module's parameters gathered while
    the iteration is at it and released when the iteration moves on (or stops): run_blocks reads the blocks in
    order, once per pass, and nothing indexes them."""

    def __init__(self, modules: list[torch.nn.Module], build: Callable[[torch.nn.Module], Layer]):
        self.modules, self.build = modules, build

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[Layer]:
        for module in self.modules:
            with gathered(unique_params([module])):
                yield self.build(module)


@contextmanager
def layer_by_layer(model, spec: ModelSpec, weight_dtype: torch.dtype | None = None
                   ) -> Iterator[InferenceTransformer]:
    """An InferenceTransformer over a ZeRO-3 partitioned causal LM `model` (or anything with its attributes) for one
    scoring call: the top modules gathered for the duration, the blocks one at a time (GatheredLayers). The caller
    must drop its references to the net's weights before the exit."""
    b = WeightBuilder(weight_dtype)
    with gathered(unique_params(top_modules(model, spec))), torch.no_grad():
        layers = GatheredLayers(decoder_layers(model, spec), functools.partial(layer_weights, b, spec))
        yield InferenceTransformer(spec, model_weights(b, spec, model, layers))
