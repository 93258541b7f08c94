"""Per-row L1 sums of task vectors for mergekit's rescale: ‖δ‖₁ and ‖masked δ‖₁, row by row.

Rows are the unit so that any band of whole rows gives the same sums; the caller adds the rows with
``math.fsum``.  Row sums are float64 over the row in flat order on the compiled path and in torch's
own order on the reference path; the two agree to ~1e-16 relative, far below the bf16/fp32 rounding
of the rescale factor they feed.
"""

from __future__ import annotations

import torch

from . import dispatch
from .contract import keep_limit

__all__ = ["dare_row_l1", "row_l1"]


def row_l1(d: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``[K, rows]`` sums of ``|d|`` and of ``|d|`` where ``mask``, for ``d`` of shape ``[K, rows, n]``."""
    if d.dim() != 3 or (mask is not None and mask.shape != d.shape):
        raise ValueError(f"row_l1 needs d [K, rows, n] and a mask of the same shape; got {tuple(d.shape)}, "
                         f"{None if mask is None else tuple(mask.shape)}")
    return dispatch.call("row_l1", d.device, d, mask)


def row_l1_fits_numba(d: torch.Tensor, mask: torch.Tensor | None) -> bool:
    return d.dtype == torch.bfloat16


def row_l1_numba(d: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    from ._numba import norms as kernel

    k, rows, _ = d.shape
    l1 = torch.empty(k, rows, dtype=torch.float64)
    kept = torch.empty(k, rows, dtype=torch.float64)
    keep = torch.empty((0, 0, 0), dtype=torch.bool) if mask is None else mask.contiguous()
    kernel.row_l1_bf16(d.contiguous().view(torch.int16).numpy().view(np.uint16), keep.numpy(),
                       l1.numpy(), kept.numpy())
    return l1, kept


def row_l1_torch(d: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    mag = d.abs()
    l1 = mag.sum(dim=2, dtype=torch.float64)
    kept = l1 if mask is None else torch.where(mask, mag, 0).sum(dim=2, dtype=torch.float64)
    return l1, kept


def dare_row_l1(expert: torch.Tensor, base: torch.Tensor, seed: int, stream: int, start: int,
                p: float | None, packed: "np.ndarray | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``row_l1`` of ``δ = expert - base`` (``[rows, n]``) and of δ under DARE's keep mask with probability
    ``p`` (None: no mask), element ``start + r * n + c`` drawn from ``stream``: what the DARE rescale pass
    needs from one expert, without a δ or mask tensor on the compiled path. ``packed`` (uint8,
    ``ceil(rows * n / 8)``) receives the keep bits, element i in bit i % 8 of byte i // 8."""
    return dispatch.call("dare_row_l1", base.device, expert, base, seed, stream, start, p, packed)


def dare_row_l1_fits_numba(expert: torch.Tensor, base: torch.Tensor, *args) -> bool:
    return base.dtype == expert.dtype == torch.bfloat16 and expert.shape == base.shape


def dare_row_l1_numba(expert: torch.Tensor, base: torch.Tensor, seed: int, stream: int, start: int,
                      p: float | None, packed: "np.ndarray | None") -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    from ._numba import norms as kernel

    rows, _ = base.shape
    l1 = torch.empty(rows, dtype=torch.float64)
    kept = torch.empty(rows, dtype=torch.float64)
    bits = [t.contiguous().view(torch.int16).numpy().view(np.uint16) for t in (expert, base)]
    kernel.dare_row_l1_bf16(*bits, np.uint64(seed), np.uint64(stream), np.uint64(start),
                            np.uint64(0 if p is None else keep_limit(p)), p is not None, l1.numpy(), kept.numpy(),
                            np.empty(0, np.uint8) if packed is None else packed)
    if p is not None:
        dispatch.ran("philox", "numba", base.device)  # the loop drew the keep mask itself
    return l1, kept


def dare_row_l1_torch(expert: torch.Tensor, base: torch.Tensor, seed: int, stream: int, start: int,
                      p: float | None, packed: "np.ndarray | None") -> tuple[torch.Tensor, torch.Tensor]:
    from .philox import bernoulli_keep

    rows, n = base.shape
    d = (expert - base).unsqueeze(0)
    mask = None if p is None else bernoulli_keep(seed, stream, start, rows * n, p, device=base.device).reshape(d.shape)
    if packed is not None and mask is not None:
        import numpy as np

        packed[:] = np.packbits(mask.reshape(-1).cpu().numpy(), bitorder="little")
    l1, kept = row_l1(d, mask)
    return l1[0], kept[0]
