"""Welford's variance over the model dim in float64, torch's CPU arithmetic, one pass per element."""

from __future__ import annotations

import numba as nb
import numpy as np

from ._bits import bf2f, f2bf


@nb.njit(inline="always", nogil=True, cache=True)
def _welford(x, j, load):
    mean = 0.0
    m2 = 0.0
    for k in range(x.shape[0]):
        v = np.float64(load(x[k, j]))
        delta = v - mean
        mean += delta / (k + 1)
        m2 += delta * (v - mean)
    return m2 / x.shape[0]


@nb.njit(inline="always", nogil=True, cache=True)
def _identity(v):
    return v


@nb.njit(nogil=True, cache=True, error_model="numpy")
def variance_bf16(out, x):
    """``out[j]`` = bf16 bits of Var_k(x[k, j]); the float64 result rounds via float32, as c10 does."""
    for j in range(x.shape[1]):
        out[j] = f2bf(np.float32(_welford(x, j, bf2f)))


@nb.njit(nogil=True, cache=True, error_model="numpy")
def variance_f32(out, x):
    for j in range(x.shape[1]):
        out[j] = np.float32(_welford(x, j, _identity))
