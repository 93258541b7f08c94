"""Triton fused task-vector merge: ``(base + mix(experts - base, ...)).to(base.dtype)`` in one pass.

Bit-identical to ``streammerge.kernels.vote.mix`` composed as in ``methods.task_vectors`` (δ in the
loaded dtype, weights and scales rounded to it).  Each program reads its slice of the base and of
every expert once and writes the result once; nothing is stacked.

Rounding: torch computes every bf16/fp16 elementwise op in fp32 and rounds to nearest even, and
sums over models in fp32 from zero in model order, rounding once.  The kernel works in fp32 and
rounds where torch does.  bf16 is handled as raw int16 bits with the rounding written out, because
Triton's interpreter truncates on fp32 -> bf16 casts; fp16 casts round to nearest even everywhere.

The sign vote needs no second look at the deltas: with majority +1 the agreeing entries are
exactly those with ``w·δ > 0``, so the kernel keeps the model-order sums over positive and over
negative entries (products by a 0/1 factor, as the reference's ``d * agree``) and picks one at the
end.  Launches pass ``enable_fp_fusion=False``: a fused multiply-add would skip a rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..contract import MASK32, Consensus, ceil_scaled, check_args
from ..sums import weight_divisor
from .philox import philox_rounds

__all__ = ["task_vector_mix"]

_BLOCK = 256  # Philox counters per program: 1024 elements, four per counter
MAX_EXPERTS = 8

_F32, _BF16, _F16 = 0, 1, 2
_DTYPES = {torch.float32: _F32, torch.bfloat16: _BF16, torch.float16: _F16}
_NO_MASK, _TENSOR_MASK, _DARE_MASK = 0, 1, 2
_CONSENSUS = {None: 0, "sum": 1, "count": 2}

DareSpec = tuple[int, Sequence[int], int, float | Sequence[float]]  # seed, streams, start, p


@triton.jit
def _widen(x, DT: tl.constexpr):
    """Loaded values as fp32; bf16 arrives as int16 bits."""
    if DT == 1:
        return (x.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _round(x, DT: tl.constexpr):
    """fp32 rounded to the work dtype (nearest even) and held in fp32; identity for fp32."""
    if DT == 1:
        u = x.to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        return tl.where(x != x, x, r.to(tl.float32, bitcast=True))
    elif DT == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _narrow(x, DT: tl.constexpr):
    """An fp32 value already rounded to the work dtype, in the output's storage type."""
    if DT == 1:
        return (x.to(tl.uint32, bitcast=True) >> 16).to(tl.int32).to(tl.int16)
    elif DT == 2:
        return x.to(tl.float16)
    else:
        return x


@triton.jit
def _lane_word(lane, w0, w1, w2, w3):
    """``[BLOCK, 4]`` tile whose column j is Philox word j of each counter."""
    return tl.where(
        lane == 0,
        w0[:, None],
        tl.where(lane == 1, w1[:, None], tl.where(lane == 2, w2[:, None], w3[:, None])),
    )


# Scalars stay unspecialized: Triton turns an int argument equal to 1 into a constant.
@triton.jit(do_not_specialize=["n", "first_block", "offset"])
def _taskvec_kernel(
    base_ptr,
    experts,
    out_ptr,
    mask_ptr,
    fpar_ptr,
    ipar_ptr,
    n,
    first_block,
    offset,
    DT: tl.constexpr,
    MASK: tl.constexpr,
    SCALE: tl.constexpr,
    CONSENSUS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    LAM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    K: tl.constexpr = len(experts)
    row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    lane = tl.arange(0, 4)
    # Element i of the chunk is element offset + i of the stream: word (offset + i) % 4 of counter
    # first_block + (offset + i) // 4, so column j of tile row r is chunk element 4r + j - offset.
    idx = row[:, None] * 4 + lane[None, :].to(tl.int64) - offset.to(tl.int64)
    ok = (idx >= 0) & (idx < n)
    b = _widen(tl.load(base_ptr + idx, mask=ok, other=0), DT)
    zero = tl.full([BLOCK, 4], 0.0, tl.float32)
    total = zero
    pos = zero
    neg = zero
    wpos = zero
    wneg = zero
    if MASK == 2:
        q = first_block.to(tl.int64) + row
        c0 = (q & 0xFFFFFFFF).to(tl.uint32)
        c1 = (q >> 32).to(tl.uint32)
        zero_u = tl.full([BLOCK], 0, tl.uint32)
        key0 = tl.load(ipar_ptr).to(tl.uint32)
        key1 = tl.load(ipar_ptr + 1).to(tl.uint32)
    for k in tl.static_range(K):
        d = _round(_widen(tl.load(experts[k] + idx, mask=ok, other=0), DT) - b, DT)
        if MASK == 1:
            m = tl.load(mask_ptr + k * n.to(tl.int64) + idx, mask=ok, other=0)
            d = d * (m != 0).to(tl.float32)
        elif MASK == 2:
            s0 = zero_u + tl.load(ipar_ptr + 2 + 3 * k).to(tl.uint32)
            s1 = zero_u + tl.load(ipar_ptr + 3 + 3 * k).to(tl.uint32)
            w0, w1, w2, w3 = philox_rounds(c0, c1, s0, s1, key0, key1)
            word = _lane_word(lane[None, :], w0, w1, w2, w3)
            keep = word.to(tl.int64) < tl.load(ipar_ptr + 4 + 3 * k)
            d = d * keep.to(tl.float32)
        if SCALE:
            d = _round(d * tl.load(fpar_ptr + K + k), DT)
        w = tl.load(fpar_ptr + k)
        wd = _round(d * w, DT)
        if CONSENSUS == 2:  # torch.sign: a NaN votes 0
            total += tl.where(wd > 0, 1.0, tl.where(wd < 0, -1.0, 0.0))
        else:
            total += wd
        if CONSENSUS != 0:
            up = (wd > 0).to(tl.float32)
            down = (wd < 0).to(tl.float32)
            pos += wd * up
            neg += wd * down
            wpos += w * up
            wneg += w * down
    if CONSENSUS == 0:
        mixed = _round(total, DT)
        divisor = tl.load(fpar_ptr + 2 * K + 1)
    else:
        majority_up = _round(total, DT) >= 0  # a NaN total votes -1
        mixed = _round(tl.where(majority_up, pos, neg), DT)
        divisor = _round(tl.where(majority_up, wpos, wneg), DT)
        divisor = tl.where(divisor == 0, 1.0, divisor)
    if NORMALIZE:
        mixed = _round(tl.math.div_rn(mixed, divisor), DT)
    if LAM:
        mixed = _round(mixed * tl.load(fpar_ptr + 2 * K), DT)
    out = _round(b + mixed, DT)
    tl.store(out_ptr + idx, _narrow(out, DT), mask=ok)


def task_vector_mix(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float] | torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    dare: DareSpec | None = None,
    scale: Sequence[float] | torch.Tensor | None = None,
    consensus: Consensus | None = None,
    normalize: bool = False,
    lam: float = 1.0,
) -> torch.Tensor:
    """``(base + mix(stack(experts) - base, weights, keep, ...)).to(base.dtype)`` in one launch.

    ``experts``: up to ``MAX_EXPERTS`` tensors shaped like ``base`` (or one ``[K, ...]`` tensor).
    ``mask``: a precomputed keep mask ``[K, ...]`` (bool or uint8); ``dare``: ``(seed, streams,
    start, p)`` draws it in-kernel instead, expert k's keep bit of chunk element i being
    ``bernoulli_keep(seed, streams[k], start + i, ., p_k)``; ``p`` is one float or one per expert.
    Weights and scales are rounded to the dtype first, as the method does.
    """
    dt = _DTYPES.get(base.dtype)
    if dt is None:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {base.dtype}")
    if consensus not in _CONSENSUS:
        raise ValueError(f"consensus must be None, 'sum' or 'count', got {consensus!r}")
    if mask is not None and dare is not None:
        raise ValueError("give either a precomputed mask or a DARE draw, not both")
    xs = list(experts.unbind(0)) if isinstance(experts, torch.Tensor) else list(experts)
    k = len(xs)
    if not 0 < k <= MAX_EXPERTS:
        raise ValueError(f"need 1 to {MAX_EXPERTS} experts per launch, got {k}")
    for x in xs:
        if x.shape != base.shape or x.dtype != base.dtype or x.device != base.device:
            raise ValueError(
                f"experts must match the base ({tuple(base.shape)}, {base.dtype}, {base.device}); "
                f"got {tuple(x.shape)}, {x.dtype}, {x.device}"
            )
    n = base.numel()
    w = _per_model(weights, k, base.dtype, "weights")
    s = None if scale is None else _per_model(scale, k, base.dtype, "scale")
    divisor = weight_divisor(w)
    lam32 = torch.tensor([lam], dtype=torch.float64).float()
    fpar = torch.cat(
        [w.float(), (w if s is None else s).float(), lam32, divisor.float().reshape(1)]
    ).to(base.device)

    kind, first_block, offset, ipar, keep = _NO_MASK, 0, 0, [0, 0], base
    if mask is not None:
        if mask.shape[0] != k or mask[0].numel() != n:
            raise ValueError(f"mask must be [{k}, ...] with {n} elements per expert, got {tuple(mask.shape)}")
        kind = _TENSOR_MASK
        keep = mask.to(device=base.device).contiguous()
        keep = keep.view(torch.uint8) if keep.dtype == torch.bool else keep.to(torch.uint8)
    elif dare is not None:
        kind = _DARE_MASK
        seed, streams, start, p = dare
        ps = [float(p)] * k if isinstance(p, (int, float)) else [float(v) for v in p]
        if len(streams) != k or len(ps) != k:
            raise ValueError(f"dare needs one stream and one p per expert ({k}), got {len(streams)}, {len(ps)}")
        ipar = [seed & MASK32, seed >> 32]
        for stream, pk in zip(streams, ps):
            check_args(seed, stream, start, n)
            if not 0.0 <= pk <= 1.0:
                raise ValueError(f"keep probability p must be in [0, 1], got {pk}")
            ipar += [stream & MASK32, stream >> 32, ceil_scaled(pk) << 8]
        first_block, offset = start >> 2, start & 3

    out = torch.empty_like(base, memory_format=torch.contiguous_format)
    if n == 0:
        return out
    bits = _int16_view if dt == _BF16 else _same
    grid = (triton.cdiv(offset + n, 4 * _BLOCK),)
    _taskvec_kernel[grid](
        bits(base.contiguous()),
        tuple(bits(x.contiguous()) for x in xs),
        bits(out),
        keep,
        fpar,
        torch.tensor(ipar, dtype=torch.int64, device=base.device),
        n,
        first_block,
        offset,
        DT=dt,
        MASK=kind,
        SCALE=s is not None,
        CONSENSUS=_CONSENSUS[consensus],
        NORMALIZE=bool(normalize),
        LAM=lam != 1,
        BLOCK=_BLOCK,
        enable_fp_fusion=False,
    )
    return out


def _int16_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _per_model(value: Sequence[float] | torch.Tensor, k: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    """One value per model on the CPU, rounded to ``dtype`` as ``vote.mix`` rounds it."""
    t = value.detach().to("cpu", dtype) if isinstance(value, torch.Tensor) else torch.tensor(list(value), dtype=dtype)
    t = t.reshape(-1)
    if t.numel() == 1 and k > 1:
        t = t.expand(k)
    if t.numel() != k:
        raise ValueError(f"{name} needs one value per expert ({k}), got shape {tuple(t.shape)}")
    return t
