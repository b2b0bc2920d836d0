"""Tolerances and comparisons shared by the op tests."""

from __future__ import annotations

import torch

# Absolute/relative tolerances of an op's output against its fp32 reference, per input dtype.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.float() - ref.float()).abs().max().item() if x.numel() else 0.0


def assert_within_twice_torch(
    ours: torch.Tensor, ref_fp32: torch.Tensor, torch_same_precision: torch.Tensor, floor: float = 1e-6
) -> None:
    """The low-precision rule: our error against the fp32 reference is at most twice the error of
    a PyTorch implementation run in the same precision (plus a floor for the exact cases)."""
    ours_err = max_error(ours, ref_fp32)
    torch_err = max_error(torch_same_precision, ref_fp32)
    assert ours_err <= 2 * torch_err + floor, f"error {ours_err:.3g} > 2 x torch's {torch_err:.3g} (+{floor:g})"
