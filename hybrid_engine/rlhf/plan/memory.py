"""Per-rank bytes of each part of a run: a trained model's state (weights, gradients, optimizer state, DeepSpeed's
buffers), its activations, the generation's weights and KV cache, a frozen model's weights. Pure arithmetic on a
ModelShape and a PlanConfig; each function says what in DeepSpeed or in this engine it counts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hybrid_engine.rlhf.plan.config import PlanConfig
from hybrid_engine.rlhf.plan.shapes import ModelShape, Tensor

FP32 = 4


def nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


@dataclass(frozen=True)
class Trained:
    """A model that trains: its shape, and the adapters' rank when LoRA trains it (0: every weight)."""

    shape: ModelShape
    lora_r: int = 0
    lora_targets: tuple[str, ...] = ()

    @property
    def tensors(self) -> list[Tensor]:
        """Every weight, the LoRA adapters' A (r x in) and B (out x r) included."""
        adapters = [Tensor(f"{t.name}.lora_{ab}", self.lora_r * n) for t in self.shape.lora_targets(self.lora_targets)
                    for ab, n in (("A", t.shape[0]), ("B", t.shape[1]))] if self.lora_r else []
        return [*self.shape.tensors, *adapters]

    @property
    def trainable(self) -> int:
        return self.shape.lora_params(self.lora_r, self.lora_targets) if self.lora_r else self.shape.params

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)


def partitioned(numel: int, world: int) -> int:
    """Elements one rank holds of a flat partition (DeepSpeed pads it to a multiple of the world size)."""
    return math.ceil(numel / world)


def weights(model: Trained, c: PlanConfig) -> int:
    """The training weights: whole on every rank under ZeRO 0-2; under ZeRO-3 each rank's 1/N of every weight, and the
    whole of those under the persistence threshold."""
    w = nbytes(c.weight_dtype)
    if c.zero_stage < 3:
        return model.params * w
    return sum(t.numel if t.numel < c.persistence_threshold else partitioned(t.numel, c.world_size)
               for t in model.tensors) * w


def optimizer(model: Trained, c: PlanConfig) -> int:
    """Adam's two fp32 moments per trained weight, and DeepSpeed's fp32 master copy: under mixed precision always,
    in fp32 under ZeRO 1-3 too (its optimizer clones its fp32 partition). Partitioned from ZeRO-1 on."""
    per_weight = 2 * FP32 + (FP32 if c.mixed_precision or c.zero_stage >= 1 else 0)
    share = model.trainable if c.zero_stage == 0 else partitioned(model.trainable, c.world_size)
    return per_weight * share


def gradients(model: Trained, c: PlanConfig) -> int:
    """The gradients of the trained weights at their fullest: whole under ZeRO 0-1 (DeepSpeed's bf16 optimizer adds an
    fp32 accumulator under mixed precision), 1/N under ZeRO 2-3 (kept in fp32 under ZeRO-3)."""
    w = nbytes(c.weight_dtype)
    if c.zero_stage <= 1:
        extra = FP32 * (model.trainable if c.zero_stage == 0 else partitioned(model.trainable, c.world_size))
        return model.trainable * w + (extra if c.mixed_precision else 0)
    if c.zero_stage == 2:
        return zero2_partition(model, c.world_size) * w
    return partitioned(model.trainable, c.world_size) * FP32


def zero2_partition(model: Trained, world: int) -> int:
    """Elements of ZeRO-2's gradient partition on its largest rank: DeepSpeed sizes it as the whole of every trained
    weight that overlaps the rank's 1/N of the flat weights (stage_1_and_2.py, grads_in_partition), so a weight that
    straddles two ranks is counted whole on both."""
    sizes = [t.numel for t in model.tensors] if not model.lora_r else \
        [t.numel for t in model.tensors if ".lora_" in t.name]
    share, start, largest = partitioned(sum(sizes), world), 0, 0
    bounds = []
    for n in sizes:
        bounds.append((start, start + n))
        start += n
    for rank in range(world):
        lo, hi = rank * share, (rank + 1) * share
        largest = max(largest, sum(b - a for a, b in bounds if a < hi and b > lo))
    return largest


def buffers(model: Trained, c: PlanConfig, resident: bool = False) -> int:
    """DeepSpeed's buffers during a step: ZeRO 1-2's gradient bucket (reduce_bucket_size elements, at most the trained
    weights' count; allocated for each step), ZeRO-3's reduce bucket (reduce_bucket_size, kept between steps), and under
    ZeRO-3 the weights gathered for the running module (the largest weight, whole) and prefetched ahead
    (prefetch_bucket_size elements), the largest twice (it and its all-gather buffer). resident: only what stays
    allocated between steps."""
    if c.zero_stage == 0 or (resident and c.zero_stage < 3):
        return 0
    w = nbytes(c.weight_dtype)
    if c.zero_stage < 3:
        return min(c.reduce_bucket_size, model.trainable) * (FP32 if c.zero_stage == 1 else w)
    bucket = c.reduce_bucket_size * w  # allocated whole whatever the model's size
    if resident:
        return bucket
    return bucket + (2 * largest_weight(model) + min(c.prefetch_bucket_size, model.params)) * w


def largest_weight(model: Trained) -> int:
    """Elements of the largest weight: ZeRO-3 gathers it whole, through an all-gather buffer of its size (gloo's
    allgather gathers into a flat tensor of the output's size and copies it out: measured, the embedding held twice
    while llama-20m's is gathered)."""
    return max(t.numel for t in model.tensors)


def gradients_in_flight(model: Trained, c: PlanConfig) -> int:
    """The gradients that exist only from the backward pass to the step (ZeRO 0-1's whole gradients), with a tied
    embedding's two gradients (the LM head's and the embedding's) and their sum held at once at the end of the
    backward pass. Under ZeRO 0-1 the sum is the weight's .grad, counted in the gradients; under ZeRO 2-3 it is a
    tensor of its own until DeepSpeed copies it into its gradient partition (measured on llama-20m's ZeRO-2: the
    rank's partition buffer and three embedding-sized tensors at the backward's peak)."""
    shape = model.shape
    copies = 2 if c.zero_stage <= 1 else 3
    tied = copies * shape.vocab * shape.hidden * nbytes(c.weight_dtype) if shape.tied and not model.lora_r else 0
    return gradients(model, c) - resident_gradients(model, c) + tied


def resident_gradients(model: Trained, c: PlanConfig) -> int:
    """What of the gradients stays allocated between steps (through generation): ZeRO-3's flat fp32 partition (and
    nothing else: counted tensor by tensor after llama-20m's steps, a tied embedding's gradient is not kept whole),
    DeepSpeed's bf16 accumulator; ZeRO 0-2's gradients are freed after each step."""
    if c.zero_stage == 3:
        return gradients(model, c)
    if c.zero_stage == 0 and c.mixed_precision:
        return gradients(model, c) - model.trainable * nbytes(c.weight_dtype)
    return 0


# -- activations -----------------------------------------------------------------------------------------------


def layer_activations(model: Trained) -> int:
    """Elements one block saves for the backward pass, per token: around each sublayer its norm's input, inverse
    RMS, normalised input and output (3H); attention's rotated q and k, v, its output and log-sum-exp and that output
    made contiguous for o_proj; the MLP's gate, activation, up and product (4I; 2I for an ungated MLP). Under LoRA
    the frozen norms keep no normalised input and the frozen MLP neither its activation nor its up output, and each
    adapter keeps its r-wide output."""
    shape = model.shape
    H, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    mlp = (4 if shape.gated else 2) * shape.intermediate
    full = 2 * (3 * H + 1) + 3 * q + 2 * kv + shape.heads + mlp
    if not model.lora_r:
        return full
    return full - 2 * H - (2 if shape.gated else 1) * shape.intermediate + model.lora_r * len(model.lora_targets)


def activations(model: Trained, c: PlanConfig, sequences: int, tokens: int) -> int:
    """Peak activation bytes of one training step on `sequences` x `tokens`, at the start of the backward pass: every
    block's saved tensors (with checkpointing: each block's input, and one block's saved tensors while it is
    recomputed), the embedding's output and the final norm's (2H under LoRA, 3H), and the log-softmax of the logits
    with, as the backward starts, its gradient and the logits' (3V, fp32); a reward model's values (B, T) instead.
    Activations are in the weights' dtype."""
    shape, n = model.shape, sequences * tokens
    w = nbytes(c.weight_dtype)
    block = layer_activations(model)
    blocks = shape.layers * shape.hidden + block if c.checkpointing else shape.layers * block
    hidden = (blocks + (3 if not model.lora_r else 2) * shape.hidden + shape.hidden) * w
    return n * (hidden + (3 * shape.vocab if shape.lm_head else 2) * FP32)


# -- generation ------------------------------------------------------------------------------------------------


def generation_weights(model: Trained, c: PlanConfig) -> int:
    """What generation adds to the training weights (engine/mode.py): under ZeRO-3 the whole model gathered (gather
    "all"), or one block at a time and the embeddings and head ("layer", every block copied), either way with the
    all-gather buffer of its largest weight (in "layer" mode the embedding's, gathered after every block is copied);
    with tensor-parallel generation each block's 1/k shard copied; copies in generation_dtype where it differs from
    the training dtype; LoRA's adapted weights fused into copies."""
    shape, w, tp = model.shape, nbytes(c.weight_dtype), c.inference_tp_size
    g = nbytes(c.generation_dtype) if c.generation_dtype is not None else w
    block = shape.block_params()
    blocks = shape.layers * block
    fused = sum(t.numel for t in shape.lora_targets(model.lora_targets)) * g // tp if model.lora_r else 0
    copied = tp > 1 or g != w or (c.zero_stage == 3 and c.gather == "layer")
    copies = (blocks // tp + (shape.params - blocks if g != w else 0)) * g if copied else 0
    if c.zero_stage < 3:
        return copies + fused
    if c.gather == "layer":
        return copies + (block + shape.params - blocks + largest_weight(model)) * w + fused
    return (shape.params + largest_weight(model)) * w + copies + fused


def kv_cache(shape: ModelShape, c: PlanConfig) -> int:
    """Keys and values of every layer for the batch, allocated for prompt + response tokens."""
    tokens = c.prompt_len + c.response_len
    return 2 * shape.layers * c.batch_size * shape.kv_heads * tokens * shape.head_dim * nbytes(c.kv_dtype)


def prefill(shape: ModelShape, c: PlanConfig) -> int:
    """The prefill's working set, fp32 whatever the weights: one block's temporaries for every prompt token
    (its input and norms, q, k, v, the MLP's gate, up, activation and product), and the last position's logits."""
    H, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_token = 5 * H + q + 2 * kv + 6 * shape.intermediate
    return FP32 * (c.batch_size * c.prompt_len * per_token + 2 * c.batch_size * shape.vocab)


def frozen(shape: ModelShape, c: PlanConfig) -> int:
    """A frozen model's weights in the training dtype: whole on every rank, or 1/N when frozen_partitioned."""
    share = partitioned(shape.params, c.world_size) if c.frozen_partitioned else shape.params
    return share * nbytes(c.weight_dtype)
