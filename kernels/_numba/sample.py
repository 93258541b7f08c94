"""The draws of ``kernels/sample.py`` straight from the Philox rounds (no array of words), then an LSD
radix sort: as few passes of at most 16-bit digits as ``n`` needs (two up to 2^32), each digit as
narrow as that allows, so that the buckets' counters stay in cache."""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from .philox import block

_M = np.uint64(0xFFFFFFFF)
_11 = np.uint64(11)
_32 = np.uint64(32)
_BATCH = 256
_SCALE = 2.0 ** -53


@nb.njit(inline="always", nogil=True, cache=True)
def _draw(hi, lo, nf, top):
    p = np.int64(math.floor((np.float64(((hi >> _11) << _32) | lo) * _SCALE) * nf))
    return p if p < top else top


@nb.njit(nogil=True, cache=True)
def sorted_draws(seed, stream, n, out, spare):
    """Draw ``i`` takes words ``2i`` and ``2i+1``: words 0-1 or 2-3 of counter block ``i // 2``;
    ``spare`` (as large as ``out``) is the sort's other buffer."""
    count = out.size
    k0, k1 = seed & _M, seed >> _32
    s0, s1 = stream & _M, stream >> _32
    nf = np.float64(n)
    top = np.int64(n - 1)
    w0 = np.empty(_BATCH, np.uint64)
    w1 = np.empty(_BATCH, np.uint64)
    w2 = np.empty(_BATCH, np.uint64)
    w3 = np.empty(_BATCH, np.uint64)
    blocks = (count + 1) // 2
    for lo in range(0, blocks, _BATCH):
        m = min(_BATCH, blocks - lo)
        for b in range(m):   # the rounds alone in this loop: it vectorizes
            w0[b], w1[b], w2[b], w3[b] = block(np.uint64(lo + b), s0, s1, k0, k1)
        for b in range(m):
            i = 2 * (lo + b)
            out[i] = _draw(w0[b], w1[b], nf, top)
            if i + 1 < count:
                out[i + 1] = _draw(w2[b], w3[b], nf, top)
    width = 1
    while (top >> width) > 0:
        width += 1
    passes = (width + 15) // 16
    digit = (width + passes - 1) // passes
    mask = (np.int64(1) << digit) - 1
    src, dst = out, spare
    for k in range(passes):
        shift = k * digit
        counts = np.zeros(mask + 2, np.int64)
        for i in range(count):
            counts[((src[i] >> shift) & mask) + 1] += 1
        for b in range(mask + 1):
            counts[b + 1] += counts[b]
        for i in range(count):
            d = (src[i] >> shift) & mask
            dst[counts[d]] = src[i]
            counts[d] += 1
        src, dst = dst, src
    if passes % 2 == 1:
        out[:] = spare
