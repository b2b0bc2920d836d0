"""A DeepSpeed ZeRO 1-3 optimizer's state as named tensors and a JSON skeleton, and back: no pickle.

The optimizer's own `state_dict()` (this rank's partition: the base optimizer's moments over the flat fp32
partition, the fp32 master weights, the loss scaler, the partition layout) is walked as a tree. Every tensor becomes
a named tensor; every dict, list, tuple, number and string becomes JSON; and the few other objects DeepSpeed puts
there are handled one by one (stage_1_and_2.py and stage3.py): the loss scaler (LossScaler, DynamicLossScaler: its
attributes), ZeroStageEnum (its value), fragment_address (its fields) and torch dtypes (their name). Anything else
is refused by its path and type. Loading decodes the skeleton against the live optimizer's state_dict(), whose
objects take the saved attributes, and hands the tree to the optimizer's own load_state_dict: the fp32 master
weights come from the saved partition (ZeRO 1/2: load_from_fp32_weights; ZeRO-3 casts them into its partitioned
bf16/fp32 parameters), so a resumed run continues to the bit. A state saved by another number of ranks is merged and
re-cut for this run's first (zero_rescale.py).
"""

from __future__ import annotations

import dataclasses
import enum

import torch
import torch.distributed as dist

from hybrid_engine.engine.zero_rescale import recut_zero_state

PARAM_SLICE_MAPPINGS = "param_slice_mappings"
"""ZeRO 1/2's names and offsets of the parameters' slices in one rank's partition (a deepspeed constant)."""
LOSS_SCALERS = ("LossScaler", "DynamicLossScaler")
"""The loss-scaler classes (deepspeed/runtime/fp16/loss_scaler.py) whose attributes a skeleton holds."""


def is_zero_optimizer(optimizer) -> bool:
    """Whether `optimizer` is a DeepSpeed ZeRO 1-3 optimizer (its state partitioned across ranks)."""
    return type(optimizer).__module__.startswith("deepspeed.runtime.zero.")


def encode(value, name: str, tensors: dict[str, torch.Tensor]):
    """The JSON skeleton of `value`; its tensors go to `tensors`, each under its path (`name`/key/...)."""
    if value is None or isinstance(value, (bool, int, float, str)) and not isinstance(value, enum.Enum):
        return value
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        return {"dict": [[k, encode(v, f"{name}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, list):
        return [encode(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"tuple": [encode(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, enum.Enum):
        return {"enum": type(value).__name__, "value": value.value}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if dataclasses.is_dataclass(value):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {"dataclass": type(value).__name__, "fields": encode(fields, name, tensors)}
    if type(value).__name__ in LOSS_SCALERS:
        return {"object": type(value).__name__, "attrs": encode(dict(vars(value)), name, tensors)}
    raise TypeError(f"the ZeRO optimizer's state holds a {type(value).__module__}.{type(value).__name__} at {name}, "
                    "which a checkpoint cannot store as tensors and JSON")


def decode(skeleton, tensors: dict[str, torch.Tensor], template, name: str = ""):
    """The tree `skeleton` encodes, its tensors from `tensors`; `template` (the live optimizer's state_dict at the
    same path) supplies the objects that are not data, and must match the saved enums and classes."""
    if isinstance(skeleton, list):
        child = template if isinstance(template, list) and len(template) == len(skeleton) else [None] * len(skeleton)
        return [decode(v, tensors, t, f"{name}/{i}") for i, (v, t) in enumerate(zip(skeleton, child))]
    if not isinstance(skeleton, dict):
        return skeleton
    if "tensor" in skeleton:
        if skeleton["tensor"] not in tensors:
            raise ValueError(f"the checkpoint's optimizer state has no tensor {skeleton['tensor']}")
        return tensors[skeleton["tensor"]]
    if "dict" in skeleton:
        child = template if isinstance(template, dict) else {}
        return {k: decode(v, tensors, child.get(k), f"{name}/{k}") for k, v in skeleton["dict"]}
    if "tuple" in skeleton:
        return tuple(decode(v, tensors, None, f"{name}/{i}") for i, v in enumerate(skeleton["tuple"]))
    if "dtype" in skeleton:
        dtype = getattr(torch, str(skeleton["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"the checkpoint's ZeRO optimizer names an unknown dtype {skeleton['dtype']!r} at {name}")
        return dtype
    kind = skeleton.get("enum") or skeleton.get("dataclass") or skeleton.get("object")
    if type(template).__name__ != kind:
        raise ValueError(f"the checkpoint's ZeRO optimizer holds a {kind} at {name}, this run's a "
                         f"{type(template).__name__}: it was written under another DeepSpeed configuration")
    if "enum" in skeleton:
        if template.value != skeleton["value"]:
            raise ValueError(f"the checkpoint's ZeRO optimizer has {kind} {skeleton['value']} at {name}, this run's "
                             f"{template.value}: it was written under another ZeRO stage")
        return template
    if "dataclass" in skeleton:
        return type(template)(**decode(skeleton["fields"], tensors, None, name))
    for key, value in decode(skeleton["attrs"], tensors, None, name).items():  # a loss scaler: the live one
        setattr(template, key, value)
    return template


def zero_optimizer_state(optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors named `prefix`/..., JSON skeleton) of this rank's ZeRO optimizer state."""
    if getattr(optimizer, "elastic_checkpoint", False):
        raise ValueError("checkpoints need zero_optimization.elastic_checkpoint false in the DeepSpeed config (its "
                         "merged state is not this rank's partition)")
    tensors: dict[str, torch.Tensor] = {}
    skeleton = encode(optimizer.state_dict(), prefix, tensors)
    return tensors, skeleton


def load_zero_optimizer_state(optimizer, prefix: str, tensors: dict[str, torch.Tensor], skeleton) -> None:
    """Loads this rank's saved ZeRO state into `optimizer` (built as the saving run's: same stage, world size and
    parameters). Under ZeRO 1/2 the module's weights are loaded first (the bit16 copies); the fp32 master partition
    comes from the checkpoint."""
    state = decode(skeleton, {k: v for k, v in tensors.items() if k.startswith(prefix + "/")},
                   optimizer.state_dict(), prefix)
    _load(optimizer, state)


def load_rescaled_zero_state(optimizer, prefix: str, saved: list[tuple[dict[str, torch.Tensor], dict]]) -> None:
    """Loads a ZeRO state that `saved`'s ranks wrote, (tensors, skeleton) of each in rank order, into `optimizer`,
    built under another world size but the same stage and parameters: every rank's is decoded (less its
    param_slice_mappings, names of that rank's slices, which this run's ranks do not share) and re-cut for this
    rank (zero_rescale.recut_zero_state)."""
    template = optimizer.state_dict()
    states = []
    for tensors, skeleton in saved:
        lean = {"dict": [[k, v] for k, v in skeleton["dict"] if k != PARAM_SLICE_MAPPINGS]}
        states.append(decode(lean, {k: v for k, v in tensors.items() if k.startswith(prefix + "/")}, template,
                             prefix))
    _load(optimizer, recut_zero_state(optimizer, states, dist.get_rank() if dist.is_initialized() else 0))


def _load(optimizer, state: dict) -> None:
    """The optimizer's own load_state_dict of this rank's `state`, with its fp32 master weights."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3: only this rank's entry is read
        optimizer.load_state_dict([state] * world, load_optimizer_states=True)
    else:
        optimizer.load_state_dict([state] * world, load_optimizer_states=True, load_from_fp32_weights=True)
