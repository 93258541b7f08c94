"""Segment sums of pairwise products in one read of each input (the torch path makes fp64 copies and
fp64 products, ~25x the bytes of a bf16 input, before it sums).

Inputs are bit arrays, uint16 for bf16 and uint32 for fp32, decoded by shifting into float32 bits:
one kernel for both. Products of two bf16 or two fp32 values are exact in float64.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._bits import _as_f32, _as_u32

_BIAS = np.uint32(0x7FFF)
_ONE = np.uint32(1)
_16 = np.uint32(16)


@nb.njit(inline="always", nogil=True, cache=True)
def _dec(bits, shift):
    return _as_f32(np.uint32(np.uint32(bits) << shift))


@nb.njit(inline="always", nogil=True, cache=True)
def _round_bf16(x):
    """float32 -> nearest-even bf16 value without ``rnd``'s NaN branch, which kept this loop scalar.
    A product of two bf16 values has zero low bits, so a NaN stays a NaN."""
    u = _as_u32(x)
    return _as_f32(np.uint32(((u + _BIAS + ((u >> _16) & _ONE)) >> _16) << _16))


@nb.njit(inline="always", nogil=True, cache=True)
def _prod(x, y, rounded, shift):
    """x·y exactly, or rounded to the inputs' dtype first as an eager ``a * b`` rounds it."""
    if rounded:
        p = x * y   # float32: exact for bf16 inputs, torch's own rounding for fp32
        return np.float64(_round_bf16(p) if shift else p)
    return np.float64(x) * np.float64(y)


@nb.njit(nogil=True, cache=True, error_model="numpy")
def segment_dots(a, b, rounded, shift, seg, out):
    """``out[r * nseg + s]`` = Σ a·b over segment ``s`` (``seg`` elements by position) of row ``r``.

    Four interleaved float64 lanes per segment, then the lanes in order: a fixed order, so a segment's
    sum depends only on its elements, never on the band.
    """
    rows, m = a.shape
    nseg = (m + seg - 1) // seg
    for r in range(rows):
        for s in range(nseg):
            lo = s * seg
            hi = min(m, lo + seg)
            t0 = t1 = t2 = t3 = 0.0
            whole = lo + (hi - lo) - (hi - lo) % 4
            for c in range(lo, whole, 4):
                t0 += _prod(_dec(a[r, c], shift), _dec(b[r, c], shift), rounded, shift)
                t1 += _prod(_dec(a[r, c + 1], shift), _dec(b[r, c + 1], shift), rounded, shift)
                t2 += _prod(_dec(a[r, c + 2], shift), _dec(b[r, c + 2], shift), rounded, shift)
                t3 += _prod(_dec(a[r, c + 3], shift), _dec(b[r, c + 3], shift), rounded, shift)
            for c in range(whole, hi):
                t0 += _prod(_dec(a[r, c], shift), _dec(b[r, c], shift), rounded, shift)
            out[r * nseg + s] = ((t0 + t1) + t2) + t3
