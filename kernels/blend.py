"""Elementwise maps of model_stock, nearswap, slerp, nuslerp, multislerp, ram and ramplus_tl in fused bf16 loops
on CPU, with the bits of the eager torch expressions (mergekit 0.1.5's order of operations). model_stock's,
nearswap's and slerp's eager expressions live here; the others stay in their method modules and these functions
return None where there is no fused path."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import dispatch
from .vote import bf16_bits

__all__ = ["NEARSWAP_FLOOR", "fusion_mix", "multislerp_fused", "nearswap_mix", "pair_mix", "ram_counts_fused",
           "ram_fused", "slerp_fused", "stock_mix"]

NEARSWAP_FLOOR = 1e-6


def _stacked(xs: Sequence[torch.Tensor]):
    """The models' bits as one [K, n] array: a loop indexing a tuple of arrays by model stays scalar.
    Copied into this thread's reused buffer (a fresh one per block faulted in every page); the
    kernels read it within the call."""
    from .scratch import scratch

    flat = [x.reshape(-1) for x in xs]
    buf = scratch("blend_stacked", (len(flat), flat[0].numel()), xs[0].dtype, xs[0].device)
    torch.stack(flat, out=buf)
    return bf16_bits(buf).reshape(len(xs), -1)


def _fused(*xs: torch.Tensor) -> bool:
    return all(x.dtype == torch.bfloat16 and x.device.type == "cpu" for x in xs)


def stock_mix(w0: torch.Tensor, ws: Sequence[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """``t * (sum(ws) / len(ws)) + (1 - t) * w0``; ``t`` a one-element tensor or per-row ``[rows, 1]``."""
    return dispatch.call("stock_mix", w0.device, w0, ws, t)


def stock_mix_fits_numba(w0: torch.Tensor, ws: Sequence[torch.Tensor], t: torch.Tensor) -> bool:
    return t.numel() == 1 and _fused(w0, *ws, t) and all(w.shape == w0.shape for w in ws)


def stock_mix_numba(w0: torch.Tensor, ws: Sequence[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    import numpy as np

    from ._numba import blend as kernel

    out = torch.empty(w0.shape, dtype=w0.dtype)
    kernel.stock_bf16(bf16_bits(out), bf16_bits(w0), _stacked(ws), np.float32(t.float().item()),
                      np.float32((1 - t).float().item()), np.float32(len(ws)))
    return out


def stock_mix_torch(w0: torch.Tensor, ws: Sequence[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    return t * (sum(ws) / len(ws)) + (1 - t) * w0


def nearswap_mix(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """``w = clamp(t / max(|a - b|, 1e-6), 0, 1)``; ``w * b + (1 - w) * a``."""
    return dispatch.call("nearswap_mix", a.device, a, b, t)


def nearswap_mix_fits_numba(a: torch.Tensor, b: torch.Tensor, t: float) -> bool:
    return _fused(a, b) and a.shape == b.shape


def nearswap_mix_numba(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    import numpy as np

    from ._numba import blend as kernel

    out = torch.empty(a.shape, dtype=a.dtype)
    kernel.nearswap_bf16(bf16_bits(out), bf16_bits(a), bf16_bits(b), np.float32(t), _bf16_bound(NEARSWAP_FLOOR))
    return out


def nearswap_mix_torch(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    weight = (t / (a - b).abs().clamp(min=NEARSWAP_FLOOR)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


def pair_mix(a: torch.Tensor, b: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """slerp's map: ``ca * a + cb * b`` in the coefficients' dtype (fp32 or fp64), rounded to ``a``'s."""
    return dispatch.call("pair_mix", a.device, a, b, ca, cb)


def pair_mix_fits_numba(a: torch.Tensor, b: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor) -> bool:
    return _fused(a, b) and a.shape == b.shape and ca.dtype == cb.dtype == torch.float32


def pair_mix_numba(a: torch.Tensor, b: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    import numpy as np

    from ._numba import blend as kernel

    out = torch.empty(a.shape, dtype=a.dtype)
    kernel.pair_bf16(bf16_bits(out), bf16_bits(a), bf16_bits(b), np.float32(ca.item()), np.float32(cb.item()))
    return out


def pair_mix_torch(a: torch.Tensor, b: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    dt = ca.dtype
    return (ca * a.to(dt) + cb * b.to(dt)).to(a.dtype)


def fusion_mix(b: torch.Tensor, f: torch.Tensor, kl: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """arcee_fusion's map: ``d = f - b``; ``b + d * (|d| * kl >= threshold)`` in float32, with ``kl``
    one value per row (``[*f.shape[:-1], 1]``) and ``threshold`` a one-element tensor."""
    return dispatch.call("fusion_mix", f.device, b, f, kl, threshold)


def fusion_mix_fits_numba(b: torch.Tensor, f: torch.Tensor, kl: torch.Tensor, threshold: torch.Tensor) -> bool:
    return (_fused(b, f, kl, threshold) and f.dim() >= 1 and b.shape == f.shape and threshold.numel() == 1
            and kl.numel() * f.shape[-1] == f.numel())


def fusion_mix_numba(b: torch.Tensor, f: torch.Tensor, kl: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    import numpy as np

    from ._numba import blend as kernel

    out = torch.empty(f.shape, dtype=torch.float32)
    kernel.fusion_bf16(out.numpy().reshape(-1, f.shape[-1]), bf16_bits(b).reshape(-1, f.shape[-1]),
                       bf16_bits(f).reshape(-1, f.shape[-1]), bf16_bits(kl).reshape(-1),
                       np.float32(threshold.float().item()))
    return out


def fusion_mix_torch(b: torch.Tensor, f: torch.Tensor, kl: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    d = f - b
    return b + d * (d.abs() * kl >= threshold).float()


# The *_fused maps return None from their torch row: the caller then runs its eager reference (in the
# method module), which the report counts as the torch path of this primitive.

def multislerp_fused(xs: Sequence[torch.Tensor], base: torch.Tensor | None,
                     sc: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """multislerp's map from its per-tensor scalars ``sc`` in one loop, or None where there is no fused
    path (the eager reference is ``methods.spherical._multislerp_map``, bit for bit the same)."""
    return dispatch.call("multislerp_fused", xs[0].device, xs, base, sc)


def multislerp_fused_fits_numba(xs: Sequence[torch.Tensor], base: torch.Tensor | None,
                                sc: dict[str, torch.Tensor]) -> bool:
    inputs = [*xs] if base is None else [*xs, base]
    return (_fused(*inputs) and all(x.shape == xs[0].shape for x in inputs)
            and all(v.dtype == torch.bfloat16 for v in sc.values()))


def multislerp_fused_numba(xs: Sequence[torch.Tensor], base: torch.Tensor | None,
                           sc: dict[str, torch.Tensor]) -> torch.Tensor:
    import numpy as np

    from ._numba import blend as kernel

    f32 = {k: v.float().reshape(-1).numpy() for k, v in sc.items()}
    out = torch.empty(xs[0].shape, dtype=torch.bfloat16)
    kernel.multislerp_bf16(bf16_bits(out), _stacked(xs),
                           np.empty(0, np.uint16) if base is None else bf16_bits(base), base is not None,
                           f32["denom"], f32["w"], f32["dots"], f32["mean_norm"][0], f32["cos_s"][0],
                           f32["sinc_s"][0], f32["avg_norm"][0])
    return out


def multislerp_fused_torch(*args: object) -> None:
    return None


def slerp_fused(x0: torch.Tensor, x1: torch.Tensor, base: torch.Tensor | None, s0: torch.Tensor, s1: torch.Tensor,
                sin_theta: torch.Tensor) -> torch.Tensor | None:
    """nuslerp's map for one angle per tensor, or None where there is no fused path (the eager reference
    is ``methods.spherical._slerp_mix``)."""
    return dispatch.call("slerp_fused", x0.device, x0, x1, base, s0, s1, sin_theta)


def slerp_fused_fits_numba(x0: torch.Tensor, x1: torch.Tensor, base: torch.Tensor | None, s0: torch.Tensor,
                           s1: torch.Tensor, sin_theta: torch.Tensor) -> bool:
    inputs = [x0, x1] if base is None else [x0, x1, base]
    return _fused(*inputs, s0, s1, sin_theta) and all(x.shape == x0.shape for x in inputs)


def slerp_fused_numba(x0: torch.Tensor, x1: torch.Tensor, base: torch.Tensor | None, s0: torch.Tensor,
                      s1: torch.Tensor, sin_theta: torch.Tensor) -> torch.Tensor:
    import numpy as np

    from ._numba import blend as kernel

    out = torch.empty(x0.shape, dtype=torch.bfloat16)
    kernel.slerp_bf16(bf16_bits(out), bf16_bits(x0), bf16_bits(x1),
                      np.empty(0, np.uint16) if base is None else bf16_bits(base),
                      base is not None, *(np.float32(v.float().item()) for v in (s0, s1, sin_theta)))
    return out


def slerp_fused_torch(*args: object) -> None:
    return None


def _ram_inputs(base: torch.Tensor, xs: Sequence[torch.Tensor]) -> bool:
    return _fused(base, *xs) and all(x.shape == base.shape for x in xs)


def ram_fused(base: torch.Tensor, xs: Sequence[torch.Tensor], eps: float,
              lam: torch.Tensor | None = None) -> torch.Tensor | None:
    """RAM's map (RAM+ with the fp32 factors ``lam``) in one loop, or None where there is no fused path
    (the eager reference is ``methods.stock._ram_map`` / ``_ramplus_map``, bit for bit the same)."""
    return dispatch.call("ram_fused", base.device, base, xs, eps, lam)


def ram_fused_fits_numba(base: torch.Tensor, xs: Sequence[torch.Tensor], eps: float, lam: torch.Tensor | None) -> bool:
    return _ram_inputs(base, xs) and (lam is None or lam.dtype == torch.float32)


def ram_fused_numba(base: torch.Tensor, xs: Sequence[torch.Tensor], eps: float,
                    lam: torch.Tensor | None) -> torch.Tensor:
    import numpy as np

    from ._numba import blend as kernel

    plus = lam is not None
    out = torch.empty(base.shape, dtype=torch.float32 if plus else torch.bfloat16)
    empty16, empty32 = np.empty(0, np.uint16), np.empty(0, np.float32)
    kernel.ram_bf16(empty16 if plus else bf16_bits(out), out.reshape(-1).numpy() if plus else empty32,
                    bf16_bits(base), _stacked(xs), _bf16_bound(eps), lam.reshape(-1).numpy() if plus else empty32,
                    plus)
    return out


def ram_fused_torch(*args: object) -> None:
    return None


def ram_counts_fused(base: torch.Tensor, xs: Sequence[torch.Tensor], eps: float) -> tuple[list[int], list[int]] | None:
    """Per model, (shared, unique) counts of task-vector entries above ``eps`` (RAM+'s reduce), or None."""
    return dispatch.call("ram_counts_fused", base.device, base, xs, eps)


def ram_counts_fused_fits_numba(base: torch.Tensor, xs: Sequence[torch.Tensor], eps: float) -> bool:
    return _ram_inputs(base, xs)


def ram_counts_fused_numba(base: torch.Tensor, xs: Sequence[torch.Tensor], eps: float) -> tuple[list[int], list[int]]:
    import numpy as np

    from ._numba import blend as kernel

    shared, unique = np.zeros(len(xs), np.int64), np.zeros(len(xs), np.int64)
    kernel.ram_counts_bf16(bf16_bits(base), _stacked(xs), _bf16_bound(eps), shared, unique)
    return shared.tolist(), unique.tolist()


def ram_counts_fused_torch(*args: object) -> None:
    return None


@functools.lru_cache(maxsize=64)
def _bf16_bound(value: float):
    """A Python float as the bound of an eager op on a bf16 tensor sees it: `clamp(min=...)` and `>` round
    the float to bf16 first (measured: using the float32 value changes results). Cached: called per block."""
    import numpy as np

    return np.float32(torch.tensor(value, dtype=torch.bfloat16).float().item())
