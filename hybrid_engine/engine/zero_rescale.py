"""A ZeRO 1-3 optimizer state saved by N ranks, re-cut for this run's M ranks: the same fp32 master weights, Adam
moments and step count, element for element.

Each saved rank's state (zero_state.decode's tree) is merged into the whole flat fp32 buffers of the saving run, and
this rank's partition of the new layout is cut from them, as DeepSpeed 0.19's own layout code lays it out:

- ZeRO 1/2 (stage_1_and_2.py): a param group's trainable parameters are flattened in order (round_robin_gradients
  off), each followed by its parameter-alignment padding (zero_optimization.parameter_alignment; none by default),
  and the flat buffer is padded at its end to a multiple of 2 * world ranks; rank r owns the r-th of `world` equal
  slices. The saved fp32 partitions are already stripped of that end padding (single_partition_of_fp32_groups, by
  group_paddings); the base optimizer's moments are not, and are stripped here. Their concatenation over the saved
  ranks is the unpadded flat group, whatever the world size.
- ZeRO-3 (stage3.py, partition_parameters.py): every parameter is cut on its own into `world` slices of
  ceil(numel / world) elements, the last padded with zeros; a rank's sub-group flat buffer is its slices of the
  sub-group's parameters, in order. Concatenating a rank's sub-groups gives its slices of every parameter in the
  optimizer's order (which does not depend on the world size), so the sub-group boundaries (sub_group_size, which
  do) are not needed to merge, only to cut.

Tensors of the base optimizer's state with one element per partition element (Adam's exp_avg and exp_avg_sq) are
re-cut; the others (its step count) must be the same on every saved rank and are kept. The result is the state
dict this rank's optimizer would have written, for its own load_state_dict.
"""

from __future__ import annotations

import math

import torch

# deepspeed/checkpoint/constants.py's keys of a ZeRO optimizer's state_dict
BASE_OPTIMIZER_STATE = "base_optimizer_state"
SINGLE_PARTITION_OF_FP32_GROUPS = "single_partition_of_fp32_groups"
GROUP_PADDINGS = "group_paddings"
PARAM_ALIGNMENT_PADDINGS = "param_alignment_paddings"
PARTITION_COUNT = "partition_count"
OPTIMIZER_STATE_DICT = "optimizer_state_dict"
FP32_FLAT_GROUPS = "fp32_flat_groups"
KEPT = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad")
"""The saved entries a re-cut state takes from saved rank 0 as they are (the loss scaler and its flags)."""


def recut_zero_state(optimizer, saved: list[dict], rank: int) -> dict:
    """This rank's state dict for `optimizer` (whose partitions are this run's layout), from `saved`: every saved
    rank's decoded ZeRO state, in rank order."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return _recut_stage3(optimizer, saved, rank)
    return _recut_stage12(optimizer, saved, rank)


def _cut(flat: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Elements [rank * size, (rank + 1) * size) of `flat`, zero-padded to `size` where it runs past the end."""
    piece = flat[rank * size:(rank + 1) * size]
    return torch.cat([piece, piece.new_zeros(size - piece.numel())]) if piece.numel() < size else piece.clone()


def _same_everywhere(values: list, what: str):
    """values[0], which every saved rank must share (a step count, a hyper-parameter)."""
    if any(not _equal(v, values[0]) for v in values[1:]):
        raise ValueError(f"the checkpoint's ranks disagree on the ZeRO optimizer's {what}: it cannot be re-cut")
    return values[0]


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def _moment_state(saved_states: list[dict], recut) -> dict:
    """One optimizer-state entry from every saved rank's: each partitioned tensor (a moment) by recut(key), the
    others (a step count) the same on every saved rank."""
    out = {}
    for key in saved_states[0]:
        values = [s[key] for s in saved_states]
        if isinstance(values[0], torch.Tensor) and values[0].dim() > 0:
            out[key] = recut(key)
        else:
            out[key] = _same_everywhere(values, key)
    return out


def _groups(base: list[dict], live_groups: list[dict]) -> list[dict]:
    """The base optimizer's param groups: the saved hyper-parameters (every saved rank's the same) over this run's
    parameter ids."""
    return [{**_same_everywhere([b["param_groups"][g] for b in base], "hyper-parameters"), "params": group["params"]}
            for g, group in enumerate(live_groups)]


# -- ZeRO 1/2 ------------------------------------------------------------------------------------------------------


def _recut_stage12(optimizer, saved: list[dict], rank: int) -> dict:
    if getattr(optimizer, "round_robin_gradients", False):
        raise ValueError("a ZeRO-1/2 checkpoint cannot move to another world size under "
                         "zero_optimization.round_robin_gradients (its parameter order depends on the world size)")
    live = optimizer.state_dict()
    paddings = optimizer.round_robin_bit16_padding
    if any(s.get(PARAM_ALIGNMENT_PADDINGS, paddings) != paddings for s in saved):
        raise ValueError("the checkpoint was written under another zero_optimization.parameter_alignment: resume "
                         "with the setting it ran with")
    base = [s[BASE_OPTIMIZER_STATE] for s in saved]
    states, fp32 = {}, []
    for g, current in enumerate(optimizer.single_partition_of_fp32_groups):
        numel = sum(p.numel() for p in optimizer.round_robin_bit16_groups[g]) + sum(paddings[g])
        size = current.numel()

        def merged(pieces: list[torch.Tensor], what: str, numel=numel) -> torch.Tensor:
            flat = torch.cat([p.reshape(-1) for p in pieces])
            if flat.numel() != numel:
                raise ValueError(f"the checkpoint's ZeRO {what} of param group {g} holds {flat.numel()} elements, "
                                 f"this run's model {numel}: it was written for another model")
            return flat

        lean = [s[SINGLE_PARTITION_OF_FP32_GROUPS][g] for s in saved]
        fp32.append(_cut(merged(lean, "fp32 weights"), rank, size))
        ids = [b["param_groups"][g]["params"][0] for b in base]
        saved_states = [b["state"].get(i, {}) for b, i in zip(base, ids)]
        keep = [t.numel() for t in lean]  # each saved rank's moments, less its end padding

        def recut(key: str, size=size, saved_states=saved_states, keep=keep, merged=merged) -> torch.Tensor:
            return _cut(merged([s[key][:n] for s, n in zip(saved_states, keep)], key), rank, size)

        states[live[BASE_OPTIMIZER_STATE]["param_groups"][g]["params"][0]] = _moment_state(saved_states, recut)
    groups = _groups(base, live[BASE_OPTIMIZER_STATE]["param_groups"])
    out = {**live, **{k: saved[0][k] for k in KEPT if k in saved[0]}}
    out[BASE_OPTIMIZER_STATE] = {"state": {k: v for k, v in states.items() if v}, "param_groups": groups}
    out[SINGLE_PARTITION_OF_FP32_GROUPS] = fp32
    return out


# -- ZeRO-3 --------------------------------------------------------------------------------------------------------


def _recut_stage3(optimizer, saved: list[dict], rank: int) -> dict:
    live = optimizer.state_dict()
    params = [p for sub_group in optimizer.fp16_groups for p in sub_group]
    numels = [p.ds_numel for p in params]
    old = [math.ceil(n / len(saved)) for n in numels]  # each parameter's slice on a saved rank
    starts = [sum(old[:k]) for k in range(len(old))]

    def whole(streams: list[torch.Tensor], what: str) -> list[torch.Tensor]:
        """Every parameter's whole flat tensor from each saved rank's concatenated slices."""
        for stream in streams:
            if stream.numel() != sum(old):
                raise ValueError(f"the checkpoint's ZeRO-3 {what} holds {stream.numel()} elements on a rank, this "
                                 f"run's model {sum(old)} on {len(saved)} ranks: it was written for another model")
        return [torch.cat([s[a:a + n] for s in streams])[:numel] for a, n, numel in zip(starts, old, numels)]

    def recut(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's sub-group flat buffers of the new layout."""
        out, k = [], 0
        for sub_group in optimizer.fp16_groups:
            out.append(torch.cat([_cut(tensors[k + j], rank, p.partition_numel()) for j, p in enumerate(sub_group)]))
            k += len(sub_group)
        return out

    fp32 = recut(whole([torch.cat([t.reshape(-1) for t in s[FP32_FLAT_GROUPS]]) for s in saved], "fp32 weights"))
    base = [s[OPTIMIZER_STATE_DICT] for s in saved]
    ids = [[i for group in b["param_groups"] for i in group["params"]] for b in base]
    saved_states = [[b["state"].get(i, {}) for i in rank_ids] for b, rank_ids in zip(base, ids)]
    firsts = [states[0] for states in saved_states]
    cut: dict[str, list[torch.Tensor]] = {}

    def moment(key: str) -> list[torch.Tensor]:
        if key not in cut:
            streams = [torch.cat([s[key].reshape(-1) for s in states]) for states in saved_states]
            cut[key] = recut(whole(streams, key))
        return cut[key]

    live_ids = [i for group in live[OPTIMIZER_STATE_DICT]["param_groups"] for i in group["params"]]
    entries = _moment_state(firsts, moment) if firsts[0] else {}  # {}: the optimizer had not stepped
    state = {i: {k: v[sub_group] if isinstance(v, list) else v for k, v in entries.items()}
             for sub_group, i in enumerate(live_ids)} if entries else {}
    groups = _groups(base, live[OPTIMIZER_STATE_DICT]["param_groups"])
    return {**live, **{k: saved[0][k] for k in KEPT if k in saved[0]},
            OPTIMIZER_STATE_DICT: {"state": state, "param_groups": groups}, FP32_FLAT_GROUPS: fp32}
