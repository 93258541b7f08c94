"""Row L1 sums of bf16 task vectors in one read (the torch path makes |δ|, a masked copy and two sums)."""

from __future__ import annotations

import numba as nb
import numpy as np

from ._bits import bf2f, f2bf
from .dots import LANES, fold
from .philox import fill

_ABS = np.uint16(0x7FFF)


@nb.njit(inline="always", nogil=True, cache=True)
def _mag(bits):
    return np.float64(bf2f(bits & _ABS))


@nb.njit(nogil=True, cache=True, error_model="numpy")
def _row_sums(row, keep, has_keep, acc, acc_kept):
    """(Σ |row|, Σ |row| where ``keep``) of one row of bf16 bits, in lanes."""
    n = row.size
    whole = n - n % LANES
    acc[:] = 0.0
    acc_kept[:] = 0.0
    for c0 in range(0, whole, LANES):
        r = row[c0:c0 + LANES]
        if has_keep:
            k = keep[c0:c0 + LANES]
            for lane in range(LANES):
                acc[lane] += _mag(r[lane])
                acc_kept[lane] += _mag(r[lane] & (np.uint16(0) - np.uint16(k[lane])))
        else:
            for lane in range(LANES):
                acc[lane] += _mag(r[lane])
    for c in range(whole, n):
        acc[c - whole] += _mag(row[c])
        if has_keep:
            acc_kept[c - whole] += _mag(row[c] & (np.uint16(0) - np.uint16(keep[c])))
    return fold(acc), fold(acc_kept)


@nb.njit(nogil=True, cache=True, error_model="numpy")
def row_l1_bf16(d, mask, l1, kept):
    """``l1[k, r] = Σ_c |d[k, r, c]|``, ``kept[k, r]`` the same over ``mask`` (or all when it is empty).

    float64 sums in a fixed order per row (see ``dots.LANES``), so banding never changes a sum.
    """
    k_models, rows, n = d.shape
    has_mask = mask.shape[0] > 0
    acc = np.empty(LANES)
    acc_kept = np.empty(LANES)
    for k in range(k_models):
        for r in range(rows):
            keep = mask[k, r] if has_mask else mask.reshape(-1)[:0]
            l1[k, r], kept[k, r] = _row_sums(d[k, r], keep, has_mask, acc, acc_kept)
            if not has_mask:
                kept[k, r] = l1[k, r]


@nb.njit(inline="always", nogil=True, cache=True)
def _pack(keep, packed, i0):
    """OR the bools ``keep`` into ``packed`` from bit ``i0`` on (bit i: byte i // 8, bit i % 8)."""
    n = keep.size
    if i0 % 8 == 0 and n % 8 == 0:
        out = packed[i0 >> 3:(i0 + n) >> 3]
        for q in range(n >> 3):
            v = np.uint8(0)
            for b in range(8):
                v |= np.uint8(keep[8 * q + b]) << np.uint8(b)
            out[q] = v
        return
    for c in range(n):
        i = i0 + c
        packed[i >> 3] |= np.uint8(keep[c]) << np.uint8(i & 7)


@nb.njit(nogil=True, cache=True, error_model="numpy")
def dare_row_l1_bf16(e, b, seed, stream, start, limit, apply, l1, kept, packed):
    """``row_l1_bf16`` of δ = e - b (rounded to bf16) and of δ under DARE's Philox keep mask, formed row by
    row in cache: no δ tensor and no mask tensor. ``start``: flat index of the first element. With a
    non-empty ``packed`` (``ceil(rows * n / 8)`` bytes), the keep bits are also stored there, element i
    as bit ``i % 8`` of byte ``i // 8``, for the map to reuse instead of drawing them again."""
    rows, n = e.shape
    d = np.empty(n, np.uint16)
    keep = np.empty(n, np.bool_)
    acc = np.empty(LANES)
    acc_kept = np.empty(LANES)
    store = packed.size > 0
    if store:
        packed[:] = 0
    for r in range(rows):
        er = e[r]
        br = b[r]
        for c in range(n):
            d[c] = f2bf(bf2f(er[c]) - bf2f(br[c]))
        if apply:
            fill(keep, seed, stream, start + np.uint64(r * n), 2, limit)
            if store:
                _pack(keep, packed, r * n)
        l1[r], kept[r] = _row_sums(d, keep, apply, acc, acc_kept)
        if not apply:
            kept[r] = l1[r]
