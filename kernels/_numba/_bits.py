"""bf16 <-> float32 bit conversions with torch's rounding (nearest even), for fused bf16 loops.

torch computes each bf16 elementwise op in float32 and rounds the result to bf16; a fused loop is
bit-identical to the eager chain when it rounds at the same points with the same rule.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

_SIXTEEN = np.uint32(16)
_ONE = np.uint32(1)
_BIAS = np.uint32(0x7FFF)
_NAN32 = np.uint32(0x7FC0)
_ALL = np.uint32(0xFFFFFFFF)


@intrinsic
def _as_u32(typingctx, x):
    """Reinterpret float32 bits as uint32: one LLVM bitcast (numba's scalar ``.view`` allocates)."""
    if x != types.float32:
        return None
    return types.uint32(types.float32), lambda ctx, builder, sig, args: builder.bitcast(args[0], ir.IntType(32))


@intrinsic
def as_f32(typingctx, x):
    """Reinterpret uint32 bits as float32."""
    if x != types.uint32:
        return None
    return types.float32(types.uint32), lambda ctx, builder, sig, args: builder.bitcast(args[0], ir.FloatType())


@nb.njit(inline="always", nogil=True, cache=True)
def bf2f(h):
    """The float32 value of bf16 bits ``h`` (uint16): exact."""
    return as_f32(np.uint32(np.uint32(h) << _SIXTEEN))


@nb.njit(inline="always", nogil=True, cache=True)
def f2bf(x):
    """float32 -> bf16 bits, round to nearest even (NaN -> the canonical quiet NaN).

    Branch-free (the NaN case is a bit mask): a branch here kept the loops that call it scalar."""
    u = _as_u32(np.float32(x))
    r = (u + _BIAS + ((u >> _SIXTEEN) & _ONE)) >> _SIXTEEN
    nan = np.uint32(0) - np.uint32(x != x)
    return np.uint16((r & (nan ^ _ALL)) | (_NAN32 & nan))


@nb.njit(inline="always", nogil=True, cache=True)
def rnd(x):
    """Round a float32 to the nearest bf16 value, kept as float32."""
    return bf2f(f2bf(x))
