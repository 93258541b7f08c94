"""DELLA's keep mask for bf16 rows: a stable radix ranking per row, then the Philox draw, in one loop.

The torch reference (``kernels/della.py``) ranks with a stable argsort of ``|δ|`` as float32; here
``|δ|`` is the 15-bit key of the bf16 bit pattern (monotone in the magnitude, ±0 equal, every NaN
folded to one key above +inf, as the sort treats NaNs as equal and last), ranked by two stable
counting passes of 8 and 7 bits: O(n) per row instead of O(n log n).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .philox import fill

_KEY = np.uint16(0x7FFF)
_NAN_KEY = np.uint16(0x7F81)


@nb.njit(nogil=True, cache=True, error_model="numpy")
def keep_rows_bf16(out, d, lo, span, seed, stream, start):
    """``out[r*n + c]`` = uniform(start + r*n + c) < lo + rank(r, c) / (n-1) * span."""
    rows, n = d.shape
    denom = np.float32(max(n - 1, 1))
    p = np.empty(n, np.float32)  # keep probability by rank: the same for every row
    for i in range(n):
        p[i] = lo + (np.float32(i) / denom) * span
    key = np.empty(n, np.uint16)
    tmp = np.empty(n, np.int32)
    order = np.empty(n, np.int32)
    u = np.empty(n, np.float32)
    low = np.empty(257, np.int64)
    high = np.empty(129, np.int64)
    for r in range(rows):
        low[:] = 0
        high[:] = 0
        dr = d[r]
        for c in range(n):
            k = dr[c] & _KEY
            k = _NAN_KEY if k > np.uint16(0x7F80) else k
            key[c] = k
            low[(k & 0xFF) + 1] += 1
            high[(k >> 8) + 1] += 1
        for b in range(256):
            low[b + 1] += low[b]
        for b in range(128):
            high[b + 1] += high[b]
        for c in range(n):
            b = key[c] & 0xFF
            tmp[low[b]] = c
            low[b] += 1
        for i in range(n):
            c = tmp[i]
            b = key[c] >> 8
            order[high[b]] = c
            high[b] += 1
        fill(u, seed, stream, start + np.uint64(r * n), 1, np.uint64(0))
        base = r * n
        for i in range(n):
            c = order[i]
            out[base + c] = u[c] < p[i]
