"""Sums over models in a fixed order: shared by the torch reference (``vote``) and the fused kernels'
launchers, so every path divides by the same rounded weight sum. Imports no other kernel module."""

from __future__ import annotations

import torch

from .contract import NO_CONSENSUS_EPS

__all__ = ["sum_models", "weight_divisor"]


def sum_models(x: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 in model order, from zero; reduced floats accumulate in fp32, round once."""
    if x.dtype in (torch.bfloat16, torch.float16):
        acc_dtype = torch.float32
    elif x.dtype == torch.bool or not x.dtype.is_floating_point:
        acc_dtype = torch.int64
    else:
        acc_dtype = x.dtype
    acc = torch.zeros(x.shape[1:], dtype=acc_dtype, device=x.device)
    for k in range(x.shape[0]):
        acc += x[k]
    return acc if acc_dtype == torch.int64 else acc.to(x.dtype)


def weight_divisor(w: torch.Tensor) -> torch.Tensor:
    """The no-consensus divisor of ``[K]`` weights: their sum in model order, 1 where ``|sum| < 1e-8``."""
    divisor = sum_models(w.unsqueeze(1))
    return torch.where(divisor.abs() < NO_CONSENSUS_EPS, torch.ones((), dtype=w.dtype), divisor)
