"""Fused bf16 maps of model_stock (one ratio per tensor) and nearswap, bit-identical to their eager
torch chains (each elementwise op computed in float32 and rounded to bf16, as torch rounds it).

The eager chains make 5-7 passes over bf16 temporaries; these read each input once and write once.
``tests/kernel_tests/test_numba.py`` pins both to the torch expressions in ``methods/stock.py``.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._bits import bf2f, f2bf, rnd


@nb.njit(nogil=True, cache=True, error_model="numpy")
def stock_bf16(out, w0, ws, t, one_minus_t, count):
    """``t * (Σ ws / K) + (1 - t) * w0`` with Python's ``sum`` (from the int 0) over ``ws`` in order."""
    zero = np.float32(0.0)
    for i in range(out.size):
        acc = rnd(zero + bf2f(ws[0][i]))
        for k in range(1, len(ws)):
            acc = rnd(acc + bf2f(ws[k][i]))
        avg = rnd(acc / count)
        out[i] = f2bf(rnd(t * avg) + rnd(one_minus_t * bf2f(w0[i])))


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
def multislerp_bf16(out, xs, base, has_base, denom, w, dots, mean_norm, cos_s, sinc_s, avg_norm):
    """mergekit's multislerp map: units u = v / denom, m = Σ w u / ‖mean‖, tangent Σ w (u - dots m),
    out = (m cos + tangent sinc) · avg_norm, with v = x - base and out + base when there is a base."""
    k_models = len(xs)
    zero = np.float32(0.0)
    for i in range(out.size):
        b = bf2f(base[i]) if has_base else zero
        acc = zero
        for k in range(k_models):
            v = rnd(bf2f(xs[k][i]) - b) if has_base else bf2f(xs[k][i])
            acc += rnd(rnd(v / denom[k]) * w[k])
        m = rnd(rnd(acc) / mean_norm)
        tan = zero
        for k in range(k_models):
            v = rnd(bf2f(xs[k][i]) - b) if has_base else bf2f(xs[k][i])
            u = rnd(v / denom[k])
            tan += rnd(rnd(u - rnd(dots[k] * m)) * w[k])
        r = rnd(rnd(rnd(m * cos_s) + rnd(rnd(tan) * sinc_s)) * avg_norm)
        out[i] = f2bf(r + b) if has_base else f2bf(r)


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
def _ram_count(xs, b, i, eps):
    count = 0
    for k in range(len(xs)):
        count += abs(rnd(bf2f(xs[k][i]) - b)) > eps
    return count


@nb.njit(nogil=True, cache=True, error_model="numpy")
def ram_bf16(out16, out32, base, xs, eps, lam, plus):
    """RAM: each model's task-vector entry above ``eps`` is kept where it is the only one and averaged
    where several are; RAM+ (``plus``) multiplies the unique entries by ``lam[k]`` in fp32 and writes fp32."""
    zero = np.float32(0.0)
    for i in range(base.size):
        b = bf2f(base[i])
        count = _ram_count(xs, b, i, eps)
        div = np.float32(max(count, 1))
        acc = zero
        for k in range(len(xs)):
            t = rnd(bf2f(xs[k][i]) - b)
            tz = t * np.float32(abs(t) > eps)
            alone = tz * np.float32(count == 1)
            shared = rnd(tz * np.float32(count > 1) / div)
            if plus:
                acc += alone * lam[k] + shared
            else:
                acc += rnd(alone + shared)
        if plus:
            out32[i] = b + acc
        else:
            out16[i] = f2bf(b + rnd(acc))


@nb.njit(nogil=True, cache=True, error_model="numpy")
def ram_counts_bf16(base, xs, eps, shared, unique):
    """Per model, how many of its entries above ``eps`` other models share, and how many only it has."""
    for i in range(base.size):
        b = bf2f(base[i])
        count = _ram_count(xs, b, i, eps)
        for k in range(len(xs)):
            if abs(rnd(bf2f(xs[k][i]) - b)) > eps:
                if count > 1:
                    shared[k] += 1
                else:
                    unique[k] += 1
