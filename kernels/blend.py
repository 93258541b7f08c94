"""Elementwise maps of model_stock, nearswap, nuslerp, multislerp, ram and ramplus_tl in fused bf16 loops
on CPU, with the bits of the eager torch expressions (mergekit 0.1.5's order of operations). model_stock's
and nearswap's eager expressions live here; the others stay in their method modules and these functions
return None where there is no fused path."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import dispatch
from .vote import _bits

__all__ = ["NEARSWAP_FLOOR", "multislerp_fused", "nearswap_mix", "ram_counts_fused", "ram_fused", "slerp_fused", "stock_mix"]

NEARSWAP_FLOOR = 1e-6


def _stacked(xs: Sequence[torch.Tensor]):
    """The models' bits as one [K, n] array: a loop indexing a tuple of arrays by model stays scalar."""
    return _bits(torch.stack(list(xs))).reshape(len(xs), -1)


def _fused(*xs: torch.Tensor) -> bool:
    return (all(x.dtype == torch.bfloat16 and x.device.type == "cpu" for x in xs)
            and dispatch.choose("blend", "cpu") == "numba")


def stock_mix(w0: torch.Tensor, ws: Sequence[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """``t * (sum(ws) / len(ws)) + (1 - t) * w0``; ``t`` a one-element tensor or per-row ``[rows, 1]``."""
    if t.numel() == 1 and _fused(w0, *ws, t) and all(w.shape == w0.shape for w in ws):
        import numpy as np

        from ._numba import blend as kernel

        out = torch.empty(w0.shape, dtype=w0.dtype)
        kernel.stock_bf16(_bits(out), _bits(w0), _stacked(ws), np.float32(t.float().item()),
                          np.float32((1 - t).float().item()), np.float32(len(ws)))
        dispatch.ran("blend", "numba", w0.device)
        return out
    dispatch.ran("blend", "torch", w0.device)
    return t * (sum(ws) / len(ws)) + (1 - t) * w0


def nearswap_mix(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """``w = clamp(t / max(|a - b|, 1e-6), 0, 1)``; ``w * b + (1 - w) * a``."""
    if _fused(a, b) and a.shape == b.shape:
        import numpy as np

        from ._numba import blend as kernel

        out = torch.empty(a.shape, dtype=a.dtype)
        kernel.nearswap_bf16(_bits(out), _bits(a), _bits(b), np.float32(t), _bf16_bound(NEARSWAP_FLOOR))
        dispatch.ran("blend", "numba", a.device)
        return out
    dispatch.ran("blend", "torch", a.device)
    weight = (t / (a - b).abs().clamp(min=NEARSWAP_FLOOR)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


def multislerp_fused(xs: Sequence[torch.Tensor], base: torch.Tensor | None,
                     sc: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """multislerp's map from its per-tensor scalars ``sc`` in one loop, or None where there is no fused
    path (the eager reference is ``methods.spherical._multislerp_map``, bit for bit the same)."""
    inputs = [*xs] if base is None else [*xs, base]
    if not (_fused(*inputs) and all(x.shape == xs[0].shape for x in inputs)
            and all(v.dtype == torch.bfloat16 for v in sc.values())):
        return None
    import numpy as np

    from ._numba import blend as kernel

    f32 = {k: v.float().reshape(-1).numpy() for k, v in sc.items()}
    out = torch.empty(xs[0].shape, dtype=torch.bfloat16)
    kernel.multislerp_bf16(_bits(out), _stacked(xs),
                           np.empty(0, np.uint16) if base is None else _bits(base), base is not None,
                           f32["denom"], f32["w"], f32["dots"], f32["mean_norm"][0], f32["cos_s"][0],
                           f32["sinc_s"][0], f32["avg_norm"][0])
    dispatch.ran("blend", "numba", xs[0].device)
    return out


def slerp_fused(x0: torch.Tensor, x1: torch.Tensor, base: torch.Tensor | None, s0: torch.Tensor, s1: torch.Tensor,
                sin_theta: torch.Tensor) -> torch.Tensor | None:
    """nuslerp's map for one angle per tensor, or None where there is no fused path (the eager reference
    is ``methods.spherical._slerp_mix``)."""
    inputs = [x0, x1] if base is None else [x0, x1, base]
    if not (_fused(*inputs, s0, s1, sin_theta) and all(x.shape == x0.shape for x in inputs)):
        return None
    import numpy as np

    from ._numba import blend as kernel

    out = torch.empty(x0.shape, dtype=torch.bfloat16)
    kernel.slerp_bf16(_bits(out), _bits(x0), _bits(x1), np.empty(0, np.uint16) if base is None else _bits(base),
                      base is not None, *(np.float32(v.float().item()) for v in (s0, s1, sin_theta)))
    dispatch.ran("blend", "numba", x0.device)
    return out


def _ram_inputs(base: torch.Tensor, xs: Sequence[torch.Tensor]) -> bool:
    return _fused(base, *xs) and all(x.shape == base.shape for x in xs)


def ram_fused(base: torch.Tensor, xs: Sequence[torch.Tensor], eps: float,
              lam: torch.Tensor | None = None) -> torch.Tensor | None:
    """RAM's map (RAM+ with the fp32 factors ``lam``) in one loop, or None where there is no fused path
    (the eager reference is ``methods.stock._ram_map`` / ``_ramplus_map``, bit for bit the same)."""
    if not _ram_inputs(base, xs) or (lam is not None and lam.dtype != torch.float32):
        return None
    import numpy as np

    from ._numba import blend as kernel

    plus = lam is not None
    out = torch.empty(base.shape, dtype=torch.float32 if plus else torch.bfloat16)
    empty16, empty32 = np.empty(0, np.uint16), np.empty(0, np.float32)
    kernel.ram_bf16(empty16 if plus else _bits(out), out.reshape(-1).numpy() if plus else empty32, _bits(base),
                    _stacked(xs), _bf16_bound(eps), lam.reshape(-1).numpy() if plus else empty32, plus)
    dispatch.ran("blend", "numba", base.device)
    return out


def ram_counts_fused(base: torch.Tensor, xs: Sequence[torch.Tensor], eps: float) -> tuple[list[int], list[int]] | None:
    """Per model, (shared, unique) counts of task-vector entries above ``eps`` (RAM+'s reduce), or None."""
    if not _ram_inputs(base, xs):
        return None
    import numpy as np

    from ._numba import blend as kernel

    shared, unique = np.zeros(len(xs), np.int64), np.zeros(len(xs), np.int64)
    kernel.ram_counts_bf16(_bits(base), _stacked(xs), _bf16_bound(eps), shared, unique)
    dispatch.ran("blend", "numba", base.device)
    return shared.tolist(), unique.tolist()


@functools.lru_cache(maxsize=64)
def _bf16_bound(value: float):
    """A Python float as the bound of an eager op on a bf16 tensor sees it: `clamp(min=...)` and `>` round
    the float to bf16 first (measured: using the float32 value changes results). Cached: called per block."""
    import numpy as np

    return np.float32(torch.tensor(value, dtype=torch.bfloat16).float().item())
