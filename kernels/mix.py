"""Weighted sums of whole models (linear merging); task-vector mixing lives in vote.py.

Each is elementwise along the chunk, so the same call on any row band gives the same bytes as on the
whole tensor. The order of operations follows mergekit 0.1.5 so results match it bit for bit.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch


@lru_cache(maxsize=256)
def _weights(weights: tuple[float, ...], dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-model coefficients and their sum, rounded to `dtype` the way mergekit rounds them."""
    w = torch.tensor(weights, dtype=torch.float64).to(dtype)
    return list(w.unbind(0)), w.sum()


def weighted_sum(chunks: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool,
                 acc_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Σ w_k x_k (÷ Σ w_k), accumulated in `acc_dtype`, returned in the first input's dtype."""
    first = chunks[0]
    coefs, total = _weights(tuple(float(w) for w in weights), acc_dtype)
    out = torch.zeros(first.shape, dtype=acc_dtype, device=first.device)
    for x, coef in zip(chunks, coefs):
        out.addcmul_(x, coef.to(first.device))  # fused multiply-add, as mergekit accumulates
    if normalize:
        out.div_(total.to(first.device))
    return out.to(first.dtype)
