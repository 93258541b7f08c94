"""Triton key histogram for ``KthMagnitude(..., backend="triton")``; imported lazily, never eagerly.

Mirrors ``streammerge.kernels.threshold.count_keys``: counts are integers, so the atomic adds give
exactly the torch reference's histogram in any order.  One launch per prefix of a refine pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

_BLOCK = 1024


# Scalars stay unspecialized: Triton turns an int argument equal to 1 into a constant.
@triton.jit(do_not_specialize=["n", "key_mask", "shift", "width_mask", "high_shift", "prefix"])
def _count_kernel(
    bits_ptr,
    hist_ptr,
    n,
    key_mask,
    shift,
    width_mask,
    high_shift,
    prefix,
    HAS_PREFIX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    # Widening sign-extends int16/int32 bits; the key mask clears the sign bit and everything above.
    key = tl.load(bits_ptr + offs, mask=ok, other=0).to(tl.int64) & key_mask.to(tl.int64)
    if HAS_PREFIX:
        ok = ok & ((key >> high_shift) == prefix.to(tl.int64))
    b = (key >> shift) & width_mask
    tl.atomic_add(hist_ptr + b, tl.full([BLOCK], 1, tl.int64), mask=ok)


def count_keys(
    hists: list[torch.Tensor],
    bits: torch.Tensor,
    key_mask: int,
    shift: int,
    width: int,
    high_shift: int,
    prefixes: Sequence[int] | None,
) -> None:
    """Same contract as the torch ``count_keys``; ``hists`` must be int64 on ``bits``' device."""
    n = bits.numel()
    if n == 0:
        return
    bits = bits.contiguous()
    grid = (triton.cdiv(n, _BLOCK),)
    for hist, prefix in zip(hists, [0] if prefixes is None else prefixes):
        if hist.dtype != torch.int64 or hist.device != bits.device:
            raise ValueError(
                f"histograms must be int64 on {bits.device}, got {hist.dtype} on {hist.device}"
            )
        _count_kernel[grid](
            bits,
            hist,
            n,
            key_mask,
            shift,
            (1 << width) - 1,
            high_shift,
            prefix,
            HAS_PREFIX=prefixes is not None,
            BLOCK=_BLOCK,
        )
