"""What a checkpoint holds of the models a run trains, as named tensors and JSON (checkpoint.py writes the files).

- The weights: every parameter and buffer by its state_dict name, in the file rank 0 writes. Under ZeRO-3 the
  partitioned parameters are left out (their fp32 master partitions are in each rank's optimizer state, and
  DeepSpeed casts them back into the bf16/fp32 partitions on loading); with adapters_only (a LoRA run's
  save_adapters_only) the frozen weights are left out too: they never change from the starting model, which a resume
  checks by its fingerprint.
- A torch optimizer (plain torch, ZeRO-0: whole on every rank): its state tensors by parameter index, its
  hyper-parameters as JSON, in rank 0's file.
- A ZeRO 1-3 optimizer: each rank's own partition (engine/zero_state.py), in that rank's files.
- The RNG states (torch's, the named generators'): each rank's own when the run is distributed, since a rank's
  sampler is seeded by its rank. Resumed on another number of ranks, a rank the checkpoint had keeps its own; one it
  had not keeps the state its run seeded it with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hybrid_engine.engine.lora import lora_layers
from hybrid_engine.engine.zero import is_partitioned, unique_params
from hybrid_engine.engine.zero_state import (
    is_zero_optimizer,
    load_rescaled_zero_state,
    load_zero_optimizer_state,
    zero_optimizer_state,
)
from hybrid_engine.rlhf.distributed import rank_and_world

Trained = list[tuple[str, torch.nn.Module, torch.optim.Optimizer]]
"""(name, module, its optimizer) of each model a run trains."""


@dataclass
class Snapshot:
    """A run's trained state, split by who writes it."""

    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    """What rank 0 writes for every rank (tensors.safetensors): weights, torch optimizers' tensors."""
    optimizers: dict = field(default_factory=dict)
    """Each torch optimizer's JSON (state.json)."""
    rank: dict[str, torch.Tensor] = field(default_factory=dict)
    """This rank's own tensors (optimizer-rank<r>.safetensors): its ZeRO partition, its RNG states."""
    rank_state: dict = field(default_factory=dict)
    """Each ZeRO optimizer's JSON skeleton on this rank (optimizer-rank<r>.json)."""


def layout(trained: Trained, zero_stage: int | None, adapters_only: bool) -> dict:
    """How the run is laid out (state.json's "layout"): a checkpoint resumes only under the same ZeRO stage and LoRA
    (on any number of ranks)."""
    return {"world_size": rank_and_world()[1], "zero_stage": zero_stage,
            "lora": any(lora_layers(module) for _, module, _ in trained), "adapters_only": adapters_only}


def saved_entries(module: torch.nn.Module, adapters_only: bool) -> dict[str, torch.Tensor]:
    """The state_dict entries of `module` a checkpoint holds (the module docstring says which)."""
    return {k: v for k, v in module.state_dict(keep_vars=True).items() if not is_partitioned(v)
            and not (adapters_only and isinstance(v, torch.nn.Parameter) and not v.requires_grad)}


def module_tensors(prefix: str, module: torch.nn.Module, adapters_only: bool = False) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().contiguous() for k, v in saved_entries(module, adapters_only).items()}


@torch.no_grad()
def load_module_tensors(prefix: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor],
                        adapters_only: bool = False) -> None:
    """Copies the saved values into `module`'s own tensors (the objects optimizers and hooks hold stay)."""
    own = saved_entries(module, adapters_only)
    missing = [k for k in own if f"{prefix}.{k}" not in tensors]
    if missing:
        raise ValueError(f"the checkpoint has no {prefix} tensors {missing[:3]}...: it was written for another model")
    for k, v in own.items():
        v.data.copy_(tensors[f"{prefix}.{k}"])


def optimizer_state(prefix: str, optimizer: torch.optim.Optimizer, module: torch.nn.Module
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) of a torch optimizer's state_dict; its parameters are named by their index in
    unique_params(module) so that a rebuilt optimizer finds them."""
    index = {id(p): i for i, p in enumerate(unique_params([module]))}
    by_slot = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            by_slot[len(by_slot)] = index[id(p)]
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for slot, state in sd["state"].items():
        for name, value in state.items():
            key = f"{by_slot[slot]}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{key}"] = value.contiguous()
            else:
                scalars[key] = value
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [by_slot[s] for s in g["params"]]}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(prefix: str, optimizer: torch.optim.Optimizer, module: torch.nn.Module,
                         tensors: dict[str, torch.Tensor], meta: dict) -> None:
    index = {id(p): i for i, p in enumerate(unique_params([module]))}
    slot_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            slot_of[index[id(p)]] = len(slot_of)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            param, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(slot_of[int(param)], {})[name] = value
    for key, value in meta["scalars"].items():
        param, name = key.split(".", 1)
        state.setdefault(slot_of[int(param)], {})[name] = value
    groups = []
    for saved, live in zip(meta["param_groups"], optimizer.state_dict()["param_groups"]):
        groups.append({**{k: tuple(v) if k == "betas" else v for k, v in saved.items()}, "params": live["params"]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors(generators: dict[str, torch.Generator] | None = None) -> dict[str, torch.Tensor]:
    """torch's global CPU RNG state and the named generators' states."""
    out = {"rng.torch": torch.get_rng_state()}
    for name, g in (generators or {}).items():
        out[f"rng.{name}"] = g.get_state()
    return out


def restore_rng(tensors: dict[str, torch.Tensor], generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    for name, g in (generators or {}).items():
        g.set_state(tensors[f"rng.{name}"])


def snapshot(trained: Trained, generators: dict[str, torch.Generator] | None = None,
             adapters_only: bool = False) -> Snapshot:
    """The trained models, their optimizers and the RNG states, split by who writes them (Snapshot)."""
    out = Snapshot()
    (out.rank if torch.distributed.is_initialized() else out.shared).update(rng_tensors(generators))
    for name, module, optimizer in trained:
        out.shared.update(module_tensors(name, module, adapters_only))
        if is_zero_optimizer(optimizer):
            tensors, out.rank_state[name] = zero_optimizer_state(optimizer, f"{name}_zero")
            out.rank.update(tensors)
        else:
            tensors, out.optimizers[name] = optimizer_state(f"{name}_optim", optimizer, module)
            out.shared.update(tensors)
    return out


def restore_training(trained: Trained, tensors: dict[str, torch.Tensor], state: dict,
                     generators: dict[str, torch.Generator] | None = None) -> None:
    """Loads a checkpoint's tensors (rank 0's and this rank's together) and state.json (with this rank's
    "rank_state") into the trained models, their optimizers and the RNG states."""
    adapters_only = (state.get("layout") or {}).get("adapters_only", False)
    other_world = state.get("zero_ranks")  # written on another number of ranks: every saved rank's ZeRO state
    for name, module, optimizer in trained:
        load_module_tensors(name, module, tensors, adapters_only)
        if is_zero_optimizer(optimizer) and other_world is not None:
            load_rescaled_zero_state(optimizer, f"{name}_zero", [(t, skeletons[name]) for t, skeletons in other_world])
        elif is_zero_optimizer(optimizer):
            load_zero_optimizer_state(optimizer, f"{name}_zero", tensors, state["rank_state"][name])
        else:
            load_optimizer_state(f"{name}_optim", optimizer, module, tensors, state["optimizers"][name])
    if other_world is None or "rng.torch" in tensors:  # a rank the checkpoint had not keeps its freshly seeded RNG
        restore_rng(tensors, generators)
