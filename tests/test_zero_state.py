"""engine/zero_state.py without DeepSpeed: a ZeRO optimizer's state_dict tree (a torch optimizer's state, tuples,
int keys, a loss scaler, an enum, a dataclass, a dtype) goes to named tensors and JSON and comes back equal, the
live loss scaler taking the saved attributes; what it cannot store, and a saved enum that differs from the live
one, are refused by their path."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

import pytest
import torch

from hybrid_engine.engine.zero_state import decode, encode


class ZeroStageEnum(enum.IntEnum):  # DeepSpeed's names: the skeleton records classes by name
    optimizer_states = 1
    gradients = 2


class LossScaler:
    def __init__(self, scale: float):
        self.cur_scale, self.dynamic, self.dtype = scale, False, torch.float32


@dataclass
class fragment_address:  # noqa: N801 - DeepSpeed's name
    numel: int
    start: int


def tree(scale: float, stage: ZeroStageEnum) -> dict:
    return {"loss_scaler": LossScaler(scale), "zero_stage": stage, "clip_grad": 1.0, "overflow": False,
            "base_optimizer_state": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(5)}},
                                     "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]},
            "single_partition_of_fp32_groups": [torch.randn(5)], "ds_version": "0.19.8",
            "param_slice_mappings": [{"w": fragment_address(numel=5, start=0)}]}


def test_the_tree_round_trips_through_tensors_and_json():
    saved = tree(2.0, ZeroStageEnum.gradients)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.loads(json.dumps(encode(saved, "opt", tensors)))
    assert sorted(tensors) == ["opt/base_optimizer_state/state/0/exp_avg", "opt/base_optimizer_state/state/0/step",
                               "opt/single_partition_of_fp32_groups/0"]
    live = tree(1.0, ZeroStageEnum.gradients)
    back = decode(skeleton, tensors, live)
    assert back["loss_scaler"] is live["loss_scaler"] and back["loss_scaler"].cur_scale == 2.0
    assert back["loss_scaler"].dtype == torch.float32 and back["zero_stage"] is ZeroStageEnum.gradients
    assert back["base_optimizer_state"]["param_groups"] == saved["base_optimizer_state"]["param_groups"]
    assert list(back["base_optimizer_state"]["state"]) == [0]  # the int key stays an int
    assert torch.equal(back["base_optimizer_state"]["state"][0]["exp_avg"],
                       saved["base_optimizer_state"]["state"][0]["exp_avg"])
    assert back["param_slice_mappings"] == saved["param_slice_mappings"]


def test_another_stage_and_unknown_objects_are_refused():
    tensors: dict[str, torch.Tensor] = {}
    skeleton = encode(tree(1.0, ZeroStageEnum.gradients), "opt", tensors)
    with pytest.raises(ValueError, match="ZeroStageEnum 2 at /zero_stage, this run's 1: .*another ZeRO stage"):
        decode(skeleton, tensors, tree(1.0, ZeroStageEnum.optimizer_states))
    with pytest.raises(TypeError, match=r"holds a builtins.object at opt/x, which a checkpoint cannot store"):
        encode({"x": object()}, "opt", {})
