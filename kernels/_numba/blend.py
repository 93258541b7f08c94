"""Fused bf16 maps of model_stock (one ratio per tensor), nearswap, slerp, arcee_fusion, nuslerp (one angle per tensor),
multislerp, ram and ramplus_tl, bit-identical to their eager torch chains (each elementwise op computed in
float32 and rounded to bf16, as torch rounds it; fp32 where mergekit promotes).

The eager chains make 5-7 passes over bf16 temporaries; these read each input once and write once.
Loops over several models run in tiles, models outer and elements inner, on 1-D views of each model's
row (indexing the 2-D arrays inside the element loops kept them scalar), so the element loops vectorize.
``tests/kernel_tests/test_numba.py`` pins each to its torch expression, bit for bit.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._bits import bf2f, f2bf, rnd

_TILE = 512


@nb.njit(nogil=True, cache=True, error_model="numpy")
def stock_bf16(out, w0, ws, t, one_minus_t, count):
    """``t * (Σ ws / K) + (1 - t) * w0`` with Python's ``sum`` (from the int 0) over ``ws`` [K, n] in order."""
    zero = np.float32(0.0)
    n = out.size
    acc = np.empty(_TILE, np.float32)
    for t0 in range(0, n, _TILE):
        m = min(_TILE, n - t0)
        first = ws[0, t0:t0 + m]
        for j in range(m):
            acc[j] = rnd(zero + bf2f(first[j]))
        for k in range(1, ws.shape[0]):
            wk = ws[k, t0:t0 + m]
            for j in range(m):
                acc[j] = rnd(acc[j] + bf2f(wk[j]))
        ob = out[t0:t0 + m]
        bb = w0[t0:t0 + m]
        for j in range(m):
            avg = rnd(acc[j] / count)
            ob[j] = f2bf(rnd(t * avg) + rnd(one_minus_t * bf2f(bb[j])))


@nb.njit(nogil=True, cache=True, error_model="numpy")
def nearswap_bf16(out, a, b, t, floor):
    """``w = clamp(t / clamp(|a - b|, floor), 0, 1)``; ``w * b + (1 - w) * a``."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for i in range(out.size):
        x = bf2f(a[i])
        y = bf2f(b[i])
        gap = abs(rnd(x - y))
        gap = floor if gap < floor else gap
        w = rnd(rnd(one / gap) * t)
        w = min(max(w, zero), one)
        out[i] = f2bf(rnd(w * y) + rnd(rnd(one - w) * x))


@nb.njit(nogil=True, cache=True, error_model="numpy")
def pair_bf16(out, a, b, ca, cb):
    """slerp's ``ca * a + cb * b`` in float32 (each product and the sum rounded to float32), then bf16."""
    for i in range(out.size):
        out[i] = f2bf(np.float32(ca * bf2f(a[i])) + np.float32(cb * bf2f(b[i])))


@nb.njit(nogil=True, cache=True, error_model="numpy")
def fusion_bf16(out, b, f, kl, threshold):
    """arcee_fusion's map per row: ``d = f - b`` (bf16), kept where ``|d| * kl[row]`` (bf16) is at least
    the threshold, added to ``b`` in float32 (``d * 0.0`` keeps its sign, as the eager product does)."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    rows, n = out.shape
    for r in range(rows):
        k = bf2f(kl[r])
        br = b[r]
        fr = f[r]
        orow = out[r]
        for j in range(n):
            x = bf2f(br[j])
            d = rnd(bf2f(fr[j]) - x)
            m = one if rnd(abs(d) * k) >= threshold else zero
            orow[j] = x + d * m


@nb.njit(nogil=True, cache=True, error_model="numpy")
def multislerp_bf16(out, xs, base, has_base, denom, w, dots, mean_norm, cos_s, sinc_s, avg_norm):
    """mergekit's multislerp map: units u = v / denom, m = Σ w u / ‖mean‖, tangent Σ w (u - dots m),
    out = (m cos + tangent sinc) · avg_norm, with v = x - base and out + base when there is a base."""
    k_models = xs.shape[0]
    n = out.size
    zero = np.float32(0.0)
    u = np.empty((k_models, _TILE), np.float32)
    b = np.zeros(_TILE, np.float32)
    acc = np.empty(_TILE, np.float32)
    mm = np.empty(_TILE, np.float32)
    for t0 in range(0, n, _TILE):
        m = min(_TILE, n - t0)
        if has_base:
            bb = base[t0:t0 + m]
            for j in range(m):
                b[j] = bf2f(bb[j])
            for k in range(k_models):
                xk, uk, dk = xs[k, t0:t0 + m], u[k], denom[k]
                for j in range(m):
                    uk[j] = rnd(rnd(bf2f(xk[j]) - b[j]) / dk)
        else:
            for k in range(k_models):
                xk, uk, dk = xs[k, t0:t0 + m], u[k], denom[k]
                for j in range(m):
                    uk[j] = rnd(bf2f(xk[j]) / dk)
        acc[:m] = zero
        for k in range(k_models):
            uk, wk = u[k], w[k]
            for j in range(m):
                acc[j] += rnd(uk[j] * wk)
        for j in range(m):
            mm[j] = rnd(rnd(acc[j]) / mean_norm)
        acc[:m] = zero
        for k in range(k_models):
            uk, wk, dk = u[k], w[k], dots[k]
            for j in range(m):
                acc[j] += rnd(rnd(uk[j] - rnd(dk * mm[j])) * wk)
        ob = out[t0:t0 + m]
        for j in range(m):
            r = rnd(rnd(rnd(mm[j] * cos_s) + rnd(rnd(acc[j]) * sinc_s)) * avg_norm)
            ob[j] = f2bf(r + b[j]) if has_base else f2bf(r)


@nb.njit(nogil=True, cache=True, error_model="numpy")
def slerp_bf16(out, x0, x1, base, has_base, s0, s1, sin_theta):
    """nuslerp with one angle per tensor: ``(s0 v0 + s1 v1) / sin θ``, v = x - base, + base after."""
    zero = np.float32(0.0)
    for i in range(out.size):
        b = bf2f(base[i]) if has_base else zero
        v0 = rnd(bf2f(x0[i]) - b) if has_base else bf2f(x0[i])
        v1 = rnd(bf2f(x1[i]) - b) if has_base else bf2f(x1[i])
        r = rnd(rnd(rnd(s0 * v0) + rnd(s1 * v1)) / sin_theta)
        out[i] = f2bf(r + b) if has_base else f2bf(r)


@nb.njit(inline="always", nogil=True, cache=True)
def _ram_tile(xs, base, t0, m, eps, tv, nz, cnt):
    """Task vectors of one tile, which exceed ``eps``, and how many models exceed it per element."""
    bb = base[t0:t0 + m]
    for k in range(xs.shape[0]):
        xk, tk, nk = xs[k, t0:t0 + m], tv[k], nz[k]
        for j in range(m):
            t = rnd(bf2f(xk[j]) - bf2f(bb[j]))
            tk[j] = t
            nk[j] = np.float32(abs(t) > eps)
    cnt[:m] = np.float32(0.0)
    for k in range(xs.shape[0]):
        nk = nz[k]
        for j in range(m):
            cnt[j] += nk[j]


@nb.njit(nogil=True, cache=True, error_model="numpy")
def ram_bf16(out16, out32, base, xs, eps, lam, plus):
    """RAM: each model's task-vector entry above ``eps`` is kept where it is the only one and averaged
    where several are; RAM+ (``plus``) multiplies the unique entries by ``lam[k]`` in fp32 and writes fp32."""
    k_models = xs.shape[0]
    n = base.size
    zero = np.float32(0.0)
    one = np.float32(1.0)
    tv = np.empty((k_models, _TILE), np.float32)
    nz = np.empty((k_models, _TILE), np.float32)
    cnt = np.empty(_TILE, np.float32)
    acc = np.empty(_TILE, np.float32)
    for t0 in range(0, n, _TILE):
        m = min(_TILE, n - t0)
        _ram_tile(xs, base, t0, m, eps, tv, nz, cnt)
        acc[:m] = zero
        for k in range(k_models):
            lk = lam[k] if plus else one
            tk, nk = tv[k], nz[k]
            for j in range(m):
                tz = tk[j] * nk[j]
                alone = tz * np.float32(cnt[j] == one)
                shared = rnd(tz * np.float32(cnt[j] > one) / max(cnt[j], one))
                if plus:
                    acc[j] += alone * lk + shared
                else:
                    acc[j] += rnd(alone + shared)
        bb = base[t0:t0 + m]
        if plus:
            o32 = out32[t0:t0 + m]
            for j in range(m):
                o32[j] = bf2f(bb[j]) + acc[j]
        else:
            o16 = out16[t0:t0 + m]
            for j in range(m):
                o16[j] = f2bf(bf2f(bb[j]) + rnd(acc[j]))


@nb.njit(nogil=True, cache=True, error_model="numpy")
def ram_counts_bf16(base, xs, eps, shared, unique):
    """Per model, how many of its entries above ``eps`` other models share, and how many only it has."""
    k_models = xs.shape[0]
    n = base.size
    one = np.float32(1.0)
    tv = np.empty((k_models, _TILE), np.float32)
    nz = np.empty((k_models, _TILE), np.float32)
    cnt = np.empty(_TILE, np.float32)
    for t0 in range(0, n, _TILE):
        m = min(_TILE, n - t0)
        _ram_tile(xs, base, t0, m, eps, tv, nz, cnt)
        for k in range(k_models):
            s = 0
            u = 0
            nk = nz[k]
            for j in range(m):
                s += np.int64(nk[j] * np.float32(cnt[j] > one))
                u += np.int64(nk[j] * np.float32(cnt[j] == one))
            shared[k] += s
            unique[k] += u
