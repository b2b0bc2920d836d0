"""The engine's default optimizer (engine/training.py adamw): torch's AdamW, fused on the CPU, with the updates
of the unfused one."""

from __future__ import annotations

import copy

import torch

from hybrid_engine.engine.training import adamw

ATOL = 1e-6  # fp32 rounding of a few steps of lr 1e-2 on weights of order 1


def test_adamw_is_fused_on_the_cpu_and_steps_as_the_unfused_adamw():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    ref, start = copy.deepcopy(model), copy.deepcopy(model)
    ours = adamw(model.parameters(), lr=1e-2, weight_decay=0.1)
    theirs = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert ours.defaults["fused"] is True
    for step in range(5):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
        for m, opt in ((model, ours), (ref, theirs)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b, s in zip(model.parameters(), ref.parameters(), start.parameters()):
        assert (a - b).abs().max() < ATOL
        assert (a - s).abs().max() > 1e-2  # five steps of lr 1e-2 moved every tensor


def test_adamw_takes_parameter_groups():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = adamw([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5] and opt.defaults["fused"] is True
