"""Row L1 sums of bf16 task vectors in one read (the torch path makes |δ|, a masked copy and two sums)."""

from __future__ import annotations

import numba as nb
import numpy as np

from ._bits import bf2f, f2bf
from .philox import _fill

_ABS = np.uint16(0x7FFF)


@nb.njit(inline="always", nogil=True, cache=True)
def _mag(bits):
    return np.float64(bf2f(bits & _ABS))


@nb.njit(nogil=True, cache=True, error_model="numpy")
def _sum(row):
    t0 = t1 = t2 = t3 = 0.0
    whole = row.size - row.size % 4
    for c in range(0, whole, 4):
        t0 += _mag(row[c])
        t1 += _mag(row[c + 1])
        t2 += _mag(row[c + 2])
        t3 += _mag(row[c + 3])
    for c in range(whole, row.size):
        t0 += _mag(row[c])
    return ((t0 + t1) + t2) + t3


@nb.njit(nogil=True, cache=True, error_model="numpy")
def _masked_sum(row, keep, scratch):
    """Σ |row| where ``keep``: the bits of dropped elements are zeroed first (a random mask defeats branches)."""
    for c in range(row.size):
        scratch[c] = row[c] & (np.uint16(0) - np.uint16(keep[c]))
    return _sum(scratch[: row.size])


@nb.njit(nogil=True, cache=True, error_model="numpy")
def row_l1_bf16(d, mask, l1, kept):
    """``l1[k, r] = Σ_c |d[k, r, c]|``, ``kept[k, r]`` the same over ``mask`` (or all when it is empty).

    Each row is summed in four interleaved float64 lanes (independent adds instead of one latency
    chain), then the lanes in order: a fixed order per row, so banding never changes a sum.
    """
    k_models, rows, n = d.shape
    has_mask = mask.shape[0] > 0
    scratch = np.empty(n, np.uint16)
    for k in range(k_models):
        for r in range(rows):
            l1[k, r] = _sum(d[k, r])
            kept[k, r] = _masked_sum(d[k, r], mask[k, r], scratch) if has_mask else l1[k, r]


@nb.njit(nogil=True, cache=True, error_model="numpy")
def dare_row_l1_bf16(e, b, seed, stream, start, limit, apply, l1, kept):
    """``row_l1_bf16`` of δ = e - b (rounded to bf16) and of δ under DARE's Philox keep mask, formed row by
    row in cache: no δ tensor and no mask tensor. ``start``: flat index of the first element."""
    rows, n = e.shape
    d = np.empty(n, np.uint16)
    keep = np.empty(n, np.bool_)
    scratch = np.empty(n, np.uint16)
    for r in range(rows):
        for c in range(n):
            d[c] = f2bf(bf2f(e[r, c]) - bf2f(b[r, c]))
        l1[r] = _sum(d)
        if apply:
            _fill(keep, seed, stream, start + np.uint64(r * n), 2, limit)
            kept[r] = _masked_sum(d, keep, scratch)
        else:
            kept[r] = l1[r]
