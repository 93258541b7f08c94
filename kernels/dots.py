"""Sums of elementwise products of two tensors over fixed row segments: the partial sums behind the
whole-tensor dot products and norms of the spherical and stock methods.

A row of ``m`` elements is cut into segments of ``SEGMENT`` elements by position within the row, so a
segment's sum never depends on which rows share a band; the caller adds the segment sums exactly
(``methods._stats.ExactSum``). The torch path sums each segment with one call below torch's intra-op
grain size (never split across threads); the compiled path sums it in a fixed lane order. The two
agree to ~1e-16 relative, far below the rounding of the cosines and norms they feed.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
import torch.nn.functional as F

from . import dispatch

__all__ = ["SEGMENT", "column_products", "gram_segments", "segment_dots", "segment_sums"]

SEGMENT = 4096
_BITS = {torch.bfloat16: (torch.int16, "uint16", 16), torch.float32: (torch.int32, "uint32", 0)}


def segment_sums(x: torch.Tensor) -> torch.Tensor:
    """Sums of the fixed row segments of a ``[rows, m]`` tensor, flattened row-major."""
    n, m = x.shape
    if m > SEGMENT:
        pad = (-m) % SEGMENT
        if pad:
            x = F.pad(x, (0, pad))
        x = x.reshape(n, -1, SEGMENT)
    return x.sum(dim=-1).reshape(-1)


def segment_dots(a: torch.Tensor, b: torch.Tensor, rounded: bool = False) -> torch.Tensor:
    """float64 segment sums of ``a * b`` for ``[rows, m]`` tensors of one dtype.

    The products are exact (fp64), or with ``rounded`` rounded to the inputs' dtype first, as
    mergekit's ``(a * b).sum()`` rounds them.
    """
    if a.shape != b.shape or a.dim() != 2 or a.dtype != b.dtype:
        raise ValueError(f"segment_dots needs two [rows, m] tensors of one dtype; got {tuple(a.shape)} "
                         f"{a.dtype} and {tuple(b.shape)} {b.dtype}")
    return dispatch.call("segment_dots", a.device, a, b, rounded)


def segment_dots_fits_numba(a: torch.Tensor, b: torch.Tensor, rounded: bool) -> bool:
    return _compiled([a, b])


def segment_dots_numba(a: torch.Tensor, b: torch.Tensor, rounded: bool) -> torch.Tensor:
    return gram_segments_numba([a, b], None, [(0, 1)], {(0, 1)} if rounded else ())[0]


def segment_dots_torch(a: torch.Tensor, b: torch.Tensor, rounded: bool) -> torch.Tensor:
    prod = (a * b).double() if rounded else a.double() * b.double()
    return segment_sums(prod)


def gram_segments(xs: Sequence[torch.Tensor], base: torch.Tensor | None, pairs: Sequence[tuple[int, int]],
                  rounded: Collection[tuple[int, int]] = ()) -> torch.Tensor:
    """``segment_dots(v_i, v_j, (i, j) in rounded)`` for each pair, stacked ``[len(pairs), segments]``,
    with ``v_k = xs[k] - base`` in the inputs' dtype (or ``xs[k]`` without a base); ``[rows, m]`` inputs.

    The compiled path forms each tile of the differences once, in cache, and sums every pair from it:
    one read of each input and no difference tensors (model_stock's six sums over three task vectors
    were nine passes over memory and three bf16 tensors). Same bits as the unfused calls.
    """
    return dispatch.call("gram_segments", xs[0].device, xs, base, pairs, rounded)


def gram_segments_fits_numba(xs: Sequence[torch.Tensor], base: torch.Tensor | None, *args) -> bool:
    return _compiled([*xs] if base is None else [*xs, base])


def gram_segments_numba(xs: Sequence[torch.Tensor], base: torch.Tensor | None, pairs: Sequence[tuple[int, int]],
                        rounded: Collection[tuple[int, int]]) -> torch.Tensor:
    import numpy as np

    from ._numba import dots as kernel

    inputs = [*xs] if base is None else [*xs, base]
    rows, m = xs[0].shape
    out = torch.empty(len(pairs), rows * -(-m // SEGMENT), dtype=torch.float64)
    bits = [_as_bits(t) for t in inputs]
    kernel.gram_segments(tuple(bits[:len(xs)]), bits[-1] if base is not None else bits[0][:1],
                         base is not None, np.array([i for i, _ in pairs], np.int64),
                         np.array([j for _, j in pairs], np.int64),
                         np.array([p in rounded for p in pairs], np.bool_), _BITS[xs[0].dtype][2], SEGMENT,
                         out.numpy())
    return out


def gram_segments_torch(xs: Sequence[torch.Tensor], base: torch.Tensor | None, pairs: Sequence[tuple[int, int]],
                        rounded: Collection[tuple[int, int]]) -> torch.Tensor:
    vs = list(xs) if base is None else [x - base for x in xs]
    return torch.stack([segment_dots(vs[i], vs[j], (i, j) in rounded) for i, j in pairs])


def column_products(xs: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]], acc: torch.Tensor) -> bool:
    """Add ``Σ_rows xs[i] * xs[j]`` (float64, exact products) into ``acc[p]`` for each pair, row after row,
    from ``[rows, m]`` inputs; ``acc``: float64 ``[len(pairs), m]``. The same bits as a cumulative sum down
    each column of the float64 products. Returns False, doing nothing, where there is no compiled path
    (the caller then runs its torch reference, which the report counts as this call's torch path)."""
    return dispatch.call("column_products", xs[0].device if xs else acc.device, xs, pairs, acc)


def column_products_fits_numba(xs: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]],
                               acc: torch.Tensor) -> bool:
    return (bool(xs) and _compiled(xs) and acc.dtype == torch.float64 and acc.is_contiguous()
            and acc.device.type == "cpu")


def column_products_numba(xs: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]], acc: torch.Tensor) -> bool:
    import numpy as np

    from ._numba import dots as kernel

    kernel.column_products(tuple(_as_bits(t) for t in xs), np.array([i for i, _ in pairs], np.int64),
                           np.array([j for _, j in pairs], np.int64), _BITS[xs[0].dtype][2], acc.numpy())
    return True


def column_products_torch(xs: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]], acc: torch.Tensor) -> bool:
    return False


def _compiled(xs: Sequence[torch.Tensor]) -> bool:
    """Whether the numba kernels take these inputs: [rows, m] tensors of one shape and a dtype they decode."""
    return (all(x.shape == xs[0].shape and x.dtype == xs[0].dtype and x.dim() == 2 for x in xs)
            and xs[0].dtype in _BITS)


def _as_bits(t: torch.Tensor):
    """The unsigned bit pattern of a bf16 or fp32 tensor as a numpy array (shares memory when contiguous)."""
    signed, unsigned, _ = _BITS[t.dtype]
    return t.contiguous().view(signed).numpy().view(unsigned)
