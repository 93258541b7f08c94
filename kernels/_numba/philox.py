"""Philox 4x32-10 words, uniforms and keep masks in one compiled loop (the torch version's layout).

Element ``e`` of stream ``s`` is word ``e % 4`` of the block at counter ``(e//4 lo, e//4 hi, s lo,
s hi)`` under key ``(seed lo, seed hi)``: see ``kernels/philox.py``, whose bits these must equal.
All arithmetic is uint64 holding uint32 values, so the high product word is a plain shift.
"""

from __future__ import annotations

import numba as nb
import numpy as np

_M = np.uint64(0xFFFFFFFF)
_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_32 = np.uint64(32)
_8 = np.uint64(8)
_2 = np.uint64(2)
_3 = np.uint64(3)
_U24 = np.float32(2.0**-24)
_BATCH = 256


@nb.njit(inline="always", nogil=True, cache=True)
def block(q, s0, s1, k0, k1):
    """The four words of counter block ``q`` of the stream ``(s0, s1)`` under key ``(k0, k1)``."""
    c0 = q & _M
    c1 = q >> _32
    c2 = s0
    c3 = s1
    for _ in range(10):
        p0 = c0 * _M0
        p1 = c2 * _M1
        n0 = (p1 >> _32) ^ c1 ^ k0
        n2 = (p0 >> _32) ^ c3 ^ k1
        c1 = p1 & _M
        c3 = p0 & _M
        c0 = n0
        c2 = n2
        k0 = (k0 + _W0) & _M
        k1 = (k1 + _W1) & _M
    return c0, c1, c2, c3


@nb.njit(inline="always", nogil=True, cache=True)
def word_at(w0, w1, w2, w3, j):
    if j == 0:
        return w0
    if j == 1:
        return w1
    if j == 2:
        return w2
    return w3


@nb.njit(nogil=True, cache=True)
def fill(out, seed, stream, start, kind, limit):
    """Head (partial block), a branch-free loop over whole blocks, tail: the middle vectorizes."""
    k0, k1 = seed & _M, seed >> _32
    s0, s1 = stream & _M, stream >> _32
    n = out.size
    i = 0
    e = start
    while i < n and (e & _3) != 0:
        w0, w1, w2, w3 = block(e >> _2, s0, s1, k0, k1)
        _put(out, i, word_at(w0, w1, w2, w3, e & _3), kind, limit)
        i += 1
        e += np.uint64(1)
    q0 = e >> _2
    whole = (n - i) // 4
    # Rounds for a batch of blocks into lane arrays first: a loop with no stores but to them
    # vectorizes (4 blocks per AVX2 op, ~3x a block at a time).
    # (One 1-D array per word: indexing a 2-D array in these loops kept them scalar.)
    w0 = np.empty(_BATCH, np.uint64)
    w1 = np.empty(_BATCH, np.uint64)
    w2 = np.empty(_BATCH, np.uint64)
    w3 = np.empty(_BATCH, np.uint64)
    for lo in range(0, whole, _BATCH):
        m = min(_BATCH, whole - lo)
        for b in range(m):
            w0[b], w1[b], w2[b], w3[b] = block(q0 + np.uint64(lo + b), s0, s1, k0, k1)
        o = out[i + 4 * lo:i + 4 * (lo + m)]
        for b in range(m):
            _put(o, 4 * b, w0[b], kind, limit)
            _put(o, 4 * b + 1, w1[b], kind, limit)
            _put(o, 4 * b + 2, w2[b], kind, limit)
            _put(o, 4 * b + 3, w3[b], kind, limit)
    i += 4 * whole
    if i < n:
        w0, w1, w2, w3 = block(q0 + np.uint64(whole), s0, s1, k0, k1)
        j = 0
        while i < n:
            _put(out, i, word_at(w0, w1, w2, w3, j), kind, limit)
            i += 1
            j += 1


@nb.njit(inline="always", nogil=True, cache=True)
def _put(out, i, w, kind, limit):
    if kind == 0:
        out[i] = w
    elif kind == 1:
        out[i] = np.float32(w >> _8) * _U24
    else:
        out[i] = w < limit


def words_into(out: np.ndarray, seed: int, stream: int, start: int) -> None:
    """``out[i]`` = word of element ``start + i`` (out: int64 array)."""
    fill(out, np.uint64(seed), np.uint64(stream), np.uint64(start), 0, np.uint64(0))


def uniform_into(out: np.ndarray, seed: int, stream: int, start: int) -> None:
    """``out[i]`` = float32 uniform ``(word >> 8) * 2**-24`` of element ``start + i``."""
    fill(out, np.uint64(seed), np.uint64(stream), np.uint64(start), 1, np.uint64(0))


def keep_into(out: np.ndarray, seed: int, stream: int, start: int, limit: int) -> None:
    """``out[i]`` = word of element ``start + i`` < ``limit`` (DARE's keep with a float p)."""
    fill(out, np.uint64(seed), np.uint64(stream), np.uint64(start), 2, np.uint64(limit))


@nb.njit(inline="always", nogil=True, cache=True)
def uniform(w):
    """``(word >> 8) * 2**-24``: 24 random bits, exact in float32."""
    return np.float32(w >> _8) * _U24
