"""The task-vector mix of ``kernels/vote.py`` fused into one loop over a bf16 chunk.

Per element, the eager reference makes ~30 passes over bf16 temporaries; here each expert's δ is
read once and the output written once, with a bf16 rounding wherever the reference rounds (each
elementwise product; each sum over models accumulated in float32 from zero in model order, rounded
once).  ``tests/kernel_tests/test_numba.py`` pins it bit for bit to ``vote.mix``.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._bits import bf2f, f2bf, rnd
from .philox import fill

NO_CONSENSUS, SUM, COUNT = 0, 1, 2


@nb.njit(inline="always", nogil=True, cache=True)
def _sign(x):
    """torch.sign as arithmetic (NaN gives 0, as torch's does): random signs defeat branch prediction."""
    return np.float32(x > 0) - np.float32(x < 0)


_TILE = 512  # elements per tile: K rows of float32 work stay in L1; a multiple of 8 (packed keep bits)


@nb.njit(inline="always", nogil=True, cache=True)
def _unpack(packed, t0, m, keep):
    """``keep[j]`` = bit ``t0 + j`` of ``packed`` (``t0`` a multiple of 8)."""
    src = packed[t0 >> 3:(t0 + m + 7) >> 3]
    full = m >> 3
    for q in range(full):
        v = src[q]
        for b in range(8):
            keep[8 * q + b] = (v >> np.uint8(b)) & np.uint8(1)
    for j in range(8 * full, m):
        keep[j] = (src[full] >> np.uint8(j - 8 * full)) & np.uint8(1)


@nb.njit(nogil=True, cache=True, error_model="numpy")
def mix_bf16(out, base, ds, from_experts, mask, seed, streams, start, limits, cached, use_cached, scale, w, consensus,
             normalize, lam, divisor_const):
    """``out = bf16(base + mix(δ, w, mask, scale, ...))`` on uint16 bit arrays.

    ``ds``: a tuple of K 1-D arrays, the bits of each δ, or with ``from_experts`` of each expert (δ =
    e - base, rounded as torch's bf16 subtraction rounds it, formed per tile: no δ tensor, no stacking). The mask is ``mask`` ([K, n] bool), or with ``mask``
    of shape [0, 0] DARE's keep drawn per tile: model k keeps element i where Philox word
    ``(seed, streams[k], start + i)`` < ``limits[k]``, and ``limits`` empty means no mask at all; with
    ``use_cached`` those bits come packed in ``cached[k]`` (bit i % 8 of byte i // 8), drawn already by
    the rescale pass.
    ``scale``: [K] float32 bf16 values or empty for none; ``w``: [K] float32 bf16 values; ``lam``:
    float32, 1 for none; ``divisor_const``: the no-consensus divisor (it depends on the weights only).
    Loops run over elements innermost on 1-D views, branch-free, so they vectorize.
    """
    k_models = len(ds)
    n = base.size
    has_mask = mask.shape[0] > 0
    draw = limits.shape[0] > 0
    has_scale = scale.shape[0] > 0
    one = np.float32(1.0)
    zero = np.float32(0.0)
    wd = np.empty((k_models, _TILE), np.float32)
    acc = np.empty(_TILE, np.float32)
    wacc = np.empty(_TILE, np.float32)
    majority = np.empty(_TILE, np.float32)
    keep = np.empty(_TILE, np.bool_)
    for t0 in range(0, n, _TILE):
        m = min(_TILE, n - t0)
        bb = base[t0:t0 + m]
        for k in range(k_models):
            dk = ds[k][t0:t0 + m]
            wdk = wd[k]
            if from_experts:
                for j in range(m):
                    wdk[j] = rnd(bf2f(dk[j]) - bf2f(bb[j]))
            else:
                for j in range(m):
                    wdk[j] = bf2f(dk[j])
            if has_mask:
                mk = mask[k, t0:t0 + m]
                for j in range(m):
                    wdk[j] = wdk[j] * np.float32(mk[j])
            elif draw and limits[k] > 0:
                if use_cached:
                    _unpack(cached[k], t0, m, keep)
                else:
                    fill(keep[:m], seed, streams[k], start + np.uint64(t0), 2, limits[k])
                for j in range(m):
                    wdk[j] = wdk[j] * np.float32(keep[j])
            if has_scale:
                sk = scale[k]
                for j in range(m):
                    wdk[j] = rnd(wdk[j] * sk)
            wk = w[k]
            for j in range(m):
                wdk[j] = rnd(wdk[j] * wk)
        acc[:m] = zero
        if consensus == NO_CONSENSUS:
            for k in range(k_models):
                wdk = wd[k]
                for j in range(m):
                    acc[j] += wdk[j]
            for j in range(m):
                wacc[j] = divisor_const
        else:
            for k in range(k_models):
                wdk = wd[k]
                if consensus == SUM:
                    for j in range(m):
                        acc[j] += wdk[j]
                else:
                    for j in range(m):
                        acc[j] += _sign(wdk[j])
            for j in range(m):
                up = np.float32(rnd(acc[j]) >= zero)
                majority[j] = up + up - one
            acc[:m] = zero
            wacc[:m] = zero
            for k in range(k_models):
                wk = w[k]
                wdk = wd[k]
                for j in range(m):
                    agree = np.float32(_sign(wdk[j]) == majority[j])
                    acc[j] += wdk[j] * agree
                    wacc[j] += wk * agree
            for j in range(m):
                v = rnd(wacc[j])
                wacc[j] = one if v == zero else v
        ob = out[t0:t0 + m]
        for j in range(m):
            mixed = rnd(acc[j])
            if normalize:
                mixed = rnd(mixed / wacc[j])
            if lam != one:
                mixed = rnd(mixed * lam)
            ob[j] = f2bf(bf2f(bb[j]) + mixed)
