"""Triton DELLA keep mask: Bernoulli draws whose probability rises with |δ|'s rank in its row.

Same contract and bits as ``streammerge.kernels.della`` (``keep_probability``, then
``philox.bernoulli_keep`` with that tensor ``p``):

* rank of element i in its row = #{j : |δ_j| < |δ_i|} + #{j < i : |δ_j| = |δ_i|}, which is where a
  stable ascending argsort puts it (NaNs last, equal among themselves, as torch sorts them);
* ``p = fp32(density - eps) + fp32(rank / max(n - 1, 1)) * fp32(2 eps)`` in float32, as the torch
  expression evaluates with its Python-float scalars;
* keep = ``(word >> 8) * 2**-24 < p``, word from the same Philox stream layout.

Ranks compare every pair in the row (tiles of ``BI x BJ``): quadratic, fine for rows of a few
thousand elements.  Launches pass ``enable_fp_fusion=False`` so ``p`` is rounded twice, as in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..contract import MASK32, check_args
from .philox import philox_rounds

__all__ = ["della_keep", "della_probability"]

_BI, _BJ = 64, 128
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _magnitude_key(x, DT: tl.constexpr):
    """|x| as int32 bits, ordered as floats; every NaN gets one key above +inf."""
    if DT == 1:
        bits = x.to(tl.int32) << 16
    elif DT == 2:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    else:
        bits = x.to(tl.int32, bitcast=True)
    key = bits & 0x7FFFFFFF
    return tl.where(key > 0x7F800000, 0x7FC00000, key)


@triton.jit(do_not_specialize=["n", "first_block", "offset"])
def _della_kernel(
    x_ptr,
    out_ptr,
    fpar_ptr,
    ipar_ptr,
    n,
    first_block,
    offset,
    DT: tl.constexpr,
    KEEP: tl.constexpr,
    BI: tl.constexpr,
    BJ: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    n64 = n.to(tl.int64)
    i = tl.program_id(1).to(tl.int64) * BI + tl.arange(0, BI).to(tl.int64)
    ok = i < n64
    row_ptr = x_ptr + r * n64
    ki = _magnitude_key(tl.load(row_ptr + i, mask=ok, other=0), DT)
    rank = tl.full([BI], 0, tl.int32)
    for j0 in range(0, n, BJ):
        j = tl.arange(0, BJ).to(tl.int64) + j0
        okj = j < n64
        kj = _magnitude_key(tl.load(row_ptr + j, mask=okj, other=0), DT)
        before = (kj[None, :] < ki[:, None]) | ((kj[None, :] == ki[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((before & okj[None, :]).to(tl.int32), axis=1)
    rn = tl.math.div_rn(rank.to(tl.float32), tl.maximum(n64 - 1, 1).to(tl.float32))
    p = tl.load(fpar_ptr) + rn * tl.load(fpar_ptr + 1)
    if KEEP:
        e = offset.to(tl.int64) + r * n64 + i  # stream element, less 4 * first_block
        q = first_block.to(tl.int64) + (e >> 2)
        zero = tl.full([BI], 0, tl.uint32)
        w0, w1, w2, w3 = philox_rounds(
            (q & 0xFFFFFFFF).to(tl.uint32),
            (q >> 32).to(tl.uint32),
            zero + tl.load(ipar_ptr + 2).to(tl.uint32),
            zero + tl.load(ipar_ptr + 3).to(tl.uint32),
            tl.load(ipar_ptr).to(tl.uint32),
            tl.load(ipar_ptr + 1).to(tl.uint32),
        )
        lane = e & 3
        word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
        u = (word >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24, exact
        tl.store(out_ptr + r * n64 + i, (u < p).to(tl.int8), mask=ok)
    else:
        tl.store(out_ptr + r * n64 + i, p, mask=ok)


def della_keep(
    rows: torch.Tensor, density: float, epsilon: float, seed: int, stream: int, start: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep mask (bool, flat) of a ``[rows, n]`` δ band whose first element is ``start`` of the stream
    (copied into ``out`` when given, as the CPU kernels write it there)."""
    check_args(seed, stream, start, rows.numel())
    keep = _launch(rows, density, epsilon, (seed, stream, start))
    return keep if out is None else out.view(-1).copy_(keep)


def della_probability(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """The float32 keep probabilities (flat) behind ``della_keep``, as ``keep_probability`` gives them.

    One ulp of ``p`` moves a keep bit with chance 2**-24, so masks alone cannot pin this arithmetic.
    """
    return _launch(rows, density, epsilon, None)


def _launch(rows: torch.Tensor, density: float, epsilon: float, draw: tuple[int, int, int] | None) -> torch.Tensor:
    if rows.dim() != 2:
        raise ValueError(f"della_keep needs a [rows, n] band, got shape {tuple(rows.shape)}")
    dt = _DTYPES.get(rows.dtype)
    if dt is None:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {rows.dtype}")
    rows = rows.contiguous()
    n_rows, n = rows.shape
    seed, stream, start = draw if draw is not None else (0, 0, 0)
    out = torch.empty((n_rows, n), dtype=torch.int8 if draw is not None else torch.float32, device=rows.device)
    if out.numel() > 0:
        # The torch expression's Python-float scalars become float32 when they meet the fp32 ranks.
        fpar = torch.tensor([density - epsilon, 2 * epsilon], dtype=torch.float64).float().to(rows.device)
        ipar = torch.tensor(
            [seed & MASK32, seed >> 32, stream & MASK32, stream >> 32], dtype=torch.int64, device=rows.device
        )
        _della_kernel[(n_rows, triton.cdiv(n, _BI))](
            rows.view(torch.int16) if dt == 1 else rows,
            out,
            fpar,
            ipar,
            n,
            start >> 2,
            start & 3,
            DT=dt,
            KEEP=draw is not None,
            BI=_BI,
            BJ=_BJ,
            enable_fp_fusion=False,
        )
    return (out.view(torch.bool) if draw is not None else out).reshape(-1)
