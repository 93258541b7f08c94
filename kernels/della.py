"""DELLA's keep mask (MagPrune): keep probability rising with the rank of |δ| within its row.

For a row of ``n`` elements, the element of rank ``r`` (0 = smallest |δ|; equal magnitudes ranked in
index order, a stable sort) is kept with probability ``p = (density - eps) + r / (n - 1) * 2 eps``,
drawn from the element's Philox uniform: ``keep = u < p``.  Everything is float32 in the order
written (it is the arithmetic of the torch code that defines the result).  Ranks are per row, so a
band of whole rows gives the same mask as the whole tensor.
"""

from __future__ import annotations

import torch

from . import dispatch
from .philox import bernoulli_keep

__all__ = ["della_keep", "keep_probability"]


def keep_probability(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-element keep probabilities (float32, flat) of a ``[rows, n]`` δ band: the torch reference."""
    n = rows.shape[1]
    order = torch.argsort(rows.abs().float(), dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=rows.device).expand_as(order))
    rn = rank.float() / max(n - 1, 1)
    return ((density - epsilon) + rn * (2 * epsilon)).reshape(-1)


def della_keep(rows: torch.Tensor, density: float, epsilon: float, seed: int, stream: int, start: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Keep mask (bool, flat) of a ``[rows, n]`` δ band whose first element is ``start`` of the stream,
    written into ``out`` (a contiguous bool tensor of ``rows.numel()`` elements) when given.

    Callers in a block loop pass ``out``: a fresh mask per block is a sub-MiB aligned heap block, and
    glibc (before 2.38) cannot reuse a freed one for the next aligned request of the same size once a
    long-lived small allocation lands beside it, so the heap grew by one mask per block."""
    if rows.dim() != 2:
        raise ValueError(f"della_keep needs a [rows, n] band, got shape {tuple(rows.shape)}")
    if out is not None and (out.dtype != torch.bool or out.numel() != rows.numel() or not out.is_contiguous()):
        raise ValueError(f"della_keep's out must be a contiguous bool tensor of {rows.numel()} elements, got "
                         f"{out.dtype} {tuple(out.shape)}")
    return dispatch.call("della_keep", rows.device, rows, density, epsilon, seed, stream, start, out)


def della_keep_fits_triton(rows: torch.Tensor, *args) -> bool:
    return rows.dtype in (torch.bfloat16, torch.float16, torch.float32)


def della_keep_fits_numba(rows: torch.Tensor, *args) -> bool:
    return rows.dtype == torch.bfloat16 and rows.numel() > 0


def della_keep_numba(rows: torch.Tensor, density: float, epsilon: float, seed: int, stream: int,
                     start: int, out: torch.Tensor | None = None) -> torch.Tensor:
    import numpy as np

    from ._numba import della as kernel

    out = torch.empty(rows.numel(), dtype=torch.bool) if out is None else out.view(-1)
    bits = rows.contiguous().view(torch.int16).numpy().view(np.uint16)
    kernel.keep_rows_bf16(out.numpy(), bits, np.float32(density - epsilon), np.float32(2 * epsilon),
                          np.uint64(seed), np.uint64(stream), np.uint64(start))
    return out


def della_keep_torch(rows: torch.Tensor, density: float, epsilon: float, seed: int, stream: int,
                     start: int, out: torch.Tensor | None = None) -> torch.Tensor:
    p = keep_probability(rows, density, epsilon)
    keep = bernoulli_keep(seed, stream, start, rows.numel(), p, device=rows.device)
    return keep if out is None else out.view(-1).copy_(keep)
