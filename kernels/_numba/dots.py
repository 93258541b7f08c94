"""Segment sums of pairwise products in one read of each input (the torch path makes fp64 copies and
fp64 products, ~25x the bytes of a bf16 input, before it sums).

Inputs are bit arrays, uint16 for bf16 and uint32 for fp32, decoded by shifting into float32 bits:
one kernel for both. Products of two bf16 or two fp32 values are exact in float64.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._bits import as_f32, bf2f, rnd


@nb.njit(inline="always", nogil=True, cache=True)
def _dec(bits, shift):
    return as_f32(np.uint32(np.uint32(bits) << shift))


@nb.njit(inline="always", nogil=True, cache=True)
def _prod(x, y, rounded, shift):
    """x·y exactly, or rounded to the inputs' dtype first as an eager ``a * b`` rounds it."""
    if rounded:
        p = x * y   # float32: exact for bf16 inputs, torch's own rounding for fp32
        return np.float64(rnd(p) if shift else p)
    return np.float64(x) * np.float64(y)


# Element c of a row or segment adds into lane c % LANES (counted from the segment's start), then the
# lanes in order: an array of lanes vectorizes where four scalar accumulators stayed scalar (~0.13 vs
# ~0.55 ns an element), and the order is fixed by position, so banding never changes a sum.
LANES = 64


@nb.njit(inline="always", nogil=True, cache=True)
def fold(acc):
    """The lanes of ``acc`` added in order."""
    t = 0.0
    for lane in range(LANES):
        t += acc[lane]
    return t


_TILE = 512   # elements of every model's difference formed at once: a multiple of LANES, divides segments


@nb.njit(inline="always", nogil=True, cache=True)
def _form(vk, xk, bk, mm, has_base, shift):
    """One model's tile of v_k = x_k - base (or x_k). The dtype and base tests sit outside the element
    loops: inside them (a per-element test) they kept the loops scalar on AVX2 (profile_isa.py)."""
    if has_base and shift:
        for j in range(mm):
            vk[j] = rnd(bf2f(xk[j]) - bf2f(bk[j]))
    elif has_base:
        for j in range(mm):
            vk[j] = _dec(xk[j], shift) - _dec(bk[j], shift)
    else:
        for j in range(mm):
            vk[j] = _dec(xk[j], shift)


@nb.njit(inline="always", nogil=True, cache=True)
def _accumulate(ap, a, b, whole, mm, rp, shift):
    """Lane sums of one pair's products over a tile, one loop per kind of product (see `_form`)."""
    if rp and shift:
        for c0 in range(0, whole, LANES):
            x = a[c0:c0 + LANES]
            y = b[c0:c0 + LANES]
            for lane in range(LANES):
                ap[lane] += np.float64(rnd(x[lane] * y[lane]))
    elif rp:
        for c0 in range(0, whole, LANES):
            x = a[c0:c0 + LANES]
            y = b[c0:c0 + LANES]
            for lane in range(LANES):
                ap[lane] += np.float64(x[lane] * y[lane])
    else:
        for c0 in range(0, whole, LANES):
            x = a[c0:c0 + LANES]
            y = b[c0:c0 + LANES]
            for lane in range(LANES):
                ap[lane] += np.float64(x[lane]) * np.float64(y[lane])
    for c in range(whole, mm):
        ap[c - whole] += _prod(a[c], b[c], rp, shift)


@nb.njit(nogil=True, cache=True, error_model="numpy")
def gram_segments(xs, base, has_base, pi, pj, rounded, shift, seg, out):
    """``out[p, r * nseg + s]`` = Σ v_pi[p]·v_pj[p] over segment ``s`` (``seg`` elements by position) of
    row ``r``, with v_k = xs[k] - base (or xs[k]) and each product rounded first where ``rounded[p]``:
    each input read once and every pair summed, in lanes, from the same in-cache tile of differences."""
    k_models = len(xs)
    rows, m = xs[0].shape
    n_pairs = pi.size
    nseg = (m + seg - 1) // seg
    v = np.empty((k_models, _TILE), np.float32)
    acc = np.empty((n_pairs, LANES))
    for r in range(rows):
        br = base[r] if has_base else base[0]
        for s in range(nseg):
            lo = s * seg
            hi = min(m, lo + seg)
            acc[:, :] = 0.0
            for t0 in range(lo, hi, _TILE):
                mm = min(_TILE, hi - t0)
                for k in range(k_models):
                    _form(v[k], xs[k][r][t0:t0 + mm], br[t0:t0 + mm], mm, has_base, shift)
                whole = mm - mm % LANES
                for p in range(n_pairs):
                    _accumulate(acc[p], v[pi[p]], v[pj[p]], whole, mm, rounded[p], shift)
            for p in range(n_pairs):
                out[p, r * nseg + s] = fold(acc[p])


@nb.njit(nogil=True, cache=True, error_model="numpy")
def column_products(xs, pi, pj, shift, acc):
    """``acc[p, c] += Σ_r x_pi[p][r, c] · x_pj[p][r, c]``, the products exact in float64, added row after
    row: the roundings of a cumulative sum down each column, so any banding of the rows gives the same
    bits as long as the bands come in row order."""
    rows, m = xs[0].shape
    n_pairs = pi.size
    v = np.empty((len(xs), m))
    for r in range(rows):
        for k in range(len(xs)):
            xr = xs[k][r]
            vk = v[k]
            for c in range(m):
                vk[c] = np.float64(_dec(xr[c], shift))
        for p in range(n_pairs):
            a = v[pi[p]]
            b = v[pj[p]]
            ap = acc[p]
            for c in range(m):
                ap[c] += a[c] * b[c]
