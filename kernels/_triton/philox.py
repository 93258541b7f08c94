"""Triton Philox 4x32-10 with the torch version's counter layout (imported lazily, never eagerly).

Same contract and bits as ``streammerge.kernels.philox``: element ``e`` of stream ``s`` is word
``e % 4`` of Philox(counter = (q lo, q hi, s lo, s hi) with q = e // 4, key = (seed lo, seed hi)).
One program handles ``BLOCK`` counters and writes their four words to elements ``4q + j``.
The rounds are written out here (not ``tl.randint4x``, whose counter puts zeros in words 2-3).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..contract import MASK32, ceil_scaled, check_args

_BLOCK = 256  # counters per program: 1024 output elements

_WORDS, _UNIFORM, _KEEP = 0, 1, 2


@triton.jit
def philox_rounds(c0, c1, c2, c3, k0, k1):
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = a2 * 0xCD9E8D57
        c3 = a0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


# Every scalar is left unspecialized: Triton turns an int argument equal to 1 into a constant.
@triton.jit(
    do_not_specialize=[
        "seed_lo", "seed_hi", "stream_lo", "stream_hi", "first_block", "start", "count", "limit"
    ]
)
def _philox_kernel(
    out_ptr,
    seed_lo,
    seed_hi,
    stream_lo,
    stream_hi,
    first_block,
    start,
    count,
    limit,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    q = first_block.to(tl.int64) + pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    zero = tl.full([BLOCK], 0, tl.uint32)  # a builtin: tl.zeros is a jit function of Triton's
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = (q >> 32).to(tl.uint32)
    c2 = zero + stream_lo.to(tl.int64).to(tl.uint32)
    c3 = zero + stream_hi.to(tl.int64).to(tl.uint32)
    k0 = seed_lo.to(tl.int64).to(tl.uint32)
    k1 = seed_hi.to(tl.int64).to(tl.uint32)
    w0, w1, w2, w3 = philox_rounds(c0, c1, c2, c3, k0, k1)
    base = q * 4 - start.to(tl.int64)  # output index of word 0 of each counter
    _store_word(out_ptr, base + 0, w0, count, limit, KIND)
    _store_word(out_ptr, base + 1, w1, count, limit, KIND)
    _store_word(out_ptr, base + 2, w2, count, limit, KIND)
    _store_word(out_ptr, base + 3, w3, count, limit, KIND)


@triton.jit
def _store_word(out_ptr, idx, w, count, limit, KIND: tl.constexpr):
    ok = (idx >= 0) & (idx < count)
    if KIND == 0:
        tl.store(out_ptr + idx, w.to(tl.int64), mask=ok)
    elif KIND == 1:
        u = (w >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24, exact
        tl.store(out_ptr + idx, u, mask=ok)
    else:
        tl.store(out_ptr + idx, (w.to(tl.int64) < limit.to(tl.int64)).to(tl.int8), mask=ok)


def _launch(kind: int, seed: int, stream: int, start: int, count: int, device, limit: int = 0):
    check_args(seed, stream, start, count)
    dtype = {_WORDS: torch.int64, _UNIFORM: torch.float32, _KEEP: torch.int8}[kind]
    out = torch.empty(count, dtype=dtype, device=device)
    if count == 0:
        return out
    first, last = start >> 2, (start + count + 3) >> 2
    grid = (triton.cdiv(last - first, _BLOCK),)
    _philox_kernel[grid](
        out,
        seed & MASK32,
        seed >> 32,
        stream & MASK32,
        stream >> 32,
        first,
        start,
        count,
        limit,
        KIND=kind,
        BLOCK=_BLOCK,
    )
    return out


def philox_words(seed: int, stream: int, start: int, count: int, device=None) -> torch.Tensor:
    """Raw uint32 words (as int64), bit-identical to the torch version."""
    return _launch(_WORDS, seed, stream, start, count, _device(device))


def philox_uniform(seed: int, stream: int, start: int, count: int, device=None) -> torch.Tensor:
    """float32 uniforms in ``[0, 1)``, bit-identical to the torch version."""
    return _launch(_UNIFORM, seed, stream, start, count, _device(device))


def bernoulli_keep(
    seed: int, stream: int, start: int, count: int, p: float | torch.Tensor, device=None
) -> torch.Tensor:
    """Keep mask ``u < p``, bit-identical to the torch version."""
    if isinstance(p, torch.Tensor):
        u = philox_uniform(seed, stream, start, count, device if device is not None else p.device)
        return u < p.to(u.device)
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"keep probability p must be in [0, 1], got {p}")
    out = _launch(_KEEP, seed, stream, start, count, _device(device), ceil_scaled(p) << 8)
    return out.view(torch.bool)


def _device(device) -> torch.device:
    return torch.device("cuda" if device is None else device)
