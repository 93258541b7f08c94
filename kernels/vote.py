"""Sign consensus and masked mixing of task vectors, as mergekit 0.1.5's task arithmetic family.

The rule, per element, with deltas ``d[k]`` (``[K, ...]``, in the work dtype) and weights ``w[k]``:

1. ``d[k] = d[k] * mask[k]`` (sparsification), then ``* scale[k]`` (mergekit's L1 ``rescale``), then
   ``* w[k]``: each product rounded in the work dtype, weights first cast to it.
2. Consensus on the *weighted* deltas (a negative weight flips a vote):
   ``sum``: majority = +1 where ``sum_k w d >= 0`` else -1 (a zero sum counts +1, NaN counts -1);
   ``count``: the same on ``sum_k sign(w d)``.  A delta agrees when its sign equals the majority,
   so a zero (or NaN) delta never agrees.
3. With consensus: ``mixed = sum_k w d [agree]``, ``divisor = sum_k w [agree]``; a zero divisor
   becomes 1.  Without: ``mixed = sum_k w d``, ``divisor = sum_k w`` (the sparsification mask is
   *not* in it); ``|divisor| < 1e-8`` becomes 1.
4. ``mixed /= divisor`` only when normalizing; then ``mixed *= lam`` when ``lam != 1``.  The caller
   finishes with ``(base + mixed).to(base.dtype)``.

Sums over models run in a fixed order, k = 0, 1, ..., from zero, accumulating bf16/fp16 in fp32 and
rounding once, which is what torch's CPU ``sum(dim=0)`` does for up to 16 models (mergekit's call).
Writing the loop ourselves keeps every element's result independent of the chunk's shape: torch
switches to a different reduction order when the reduced rows are contiguous (a one-column chunk).
"""

from __future__ import annotations

from collections.abc import Sequence
import numpy as np
import torch

from . import dispatch
from .contract import NO_CONSENSUS_EPS, Consensus
from .philox import KeepDraw
from .sums import sum_models, weight_divisor

__all__ = ["Consensus", "agree_mask", "bf16_bits", "merge_deltas", "mix", "sign_consensus", "sum_models"]

_BAND = 1 << 16  # elements per model per band: keeps the ~10 temporaries of a band in cache


def sign_consensus(weighted_deltas: torch.Tensor, method: Consensus = "sum") -> torch.Tensor:
    """Majority sign per element as int8 +1/-1 over dim 0 of ``[K, ...]`` weighted deltas.

    ``sum``: sign of the sum of the weighted deltas; ``count``: sign of the sum of their signs.
    Zero counts as +1 in both (mergekit's ``>= 0``).
    """
    if method == "sum":
        total = sum_models(weighted_deltas)
    elif method == "count":
        # Float signs, as mergekit sums them: exact small integers, and a NaN vote stays NaN.
        total = sum_models(weighted_deltas.sign())
    else:
        raise ValueError(f"consensus method must be 'sum' or 'count', got {method!r}")
    return torch.where(total >= 0, 1, -1).to(torch.int8)


def agree_mask(deltas: torch.Tensor, majority: torch.Tensor) -> torch.Tensor:
    """Bool ``[K, ...]``: delta k agrees where its sign equals the majority; zero never agrees."""
    return deltas.sign() == majority


def mix(
    deltas: torch.Tensor,
    weights: torch.Tensor | Sequence[float],
    mask: torch.Tensor | None = None,
    *,
    scale: torch.Tensor | Sequence[float] | None = None,
    consensus: Consensus | None = None,
    normalize: bool = False,
    lam: float = 1.0,
) -> torch.Tensor:
    """Merged delta of ``[K, ...]`` deltas by the module's rule, in the deltas' dtype.

    ``weights``, ``scale`` (per-model factor applied after the mask) and ``mask`` have dim 0 over
    models and broadcast against ``deltas`` once trailing singleton dims are added, as mergekit
    unsqueezes its weights.  The work runs in cache-sized bands of dim 1; every step is
    elementwise across the other dims, so banding never changes a bit.
    """
    if consensus not in (None, "sum", "count"):
        raise ValueError(f"consensus must be None, 'sum' or 'count', got {consensus!r}")
    if deltas.dim() < 1 or deltas.shape[0] == 0:
        raise ValueError(f"deltas need a non-empty model dim 0, got shape {tuple(deltas.shape)}")
    w = _per_model(weights, deltas, deltas.dtype)
    s = None if scale is None else _per_model(scale, deltas, deltas.dtype)
    m = None if mask is None else _per_model(mask, deltas, torch.bool)
    out = torch.empty(deltas.shape[1:], dtype=deltas.dtype, device=deltas.device)
    if deltas.dim() == 1:  # one scalar per model
        out.copy_(_mix_band(deltas, w, m, s, consensus, normalize, lam))
        return out
    row = max(1, deltas[0, 0].numel())
    step = max(1, _BAND // row)
    for lo in range(0, deltas.shape[1], step):
        band = [_band(t, lo, step) for t in (deltas, w, m, s)]
        out[lo : lo + step] = _mix_band(*band, consensus, normalize, lam)
    return out


def merge_deltas(
    base: torch.Tensor,
    deltas: torch.Tensor | None,
    weights: Sequence[float],
    mask: torch.Tensor | KeepDraw | None = None,
    *,
    scale: torch.Tensor | Sequence[float] | None = None,
    consensus: Consensus | None = None,
    normalize: bool = False,
    lam: float = 1.0,
    experts: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(base + mix(deltas, ...)).to(base.dtype)``, in one fused pass where ``dispatch`` has a kernel.

    ``experts`` are the inputs the deltas come from (δ = expert - base): with them ``deltas`` may be
    None, and the fused kernels form δ from one read of each input instead. ``mask`` has the deltas'
    shape, or is a ``KeepDraw`` (DARE's masks, which the numba kernel draws tile by tile). Same bits
    on every path; the torch one is the reference.
    """
    if deltas is None and experts is None:
        raise ValueError("merge_deltas needs deltas or the experts they come from")
    if consensus not in (None, "sum", "count"):
        raise ValueError(f"consensus must be None, 'sum' or 'count', got {consensus!r}")
    return dispatch.call("merge_deltas", base.device, base, deltas, weights, mask, scale=scale, consensus=consensus,
                         normalize=normalize, lam=lam, experts=experts)


def merge_deltas_fits_triton(base: torch.Tensor, deltas: torch.Tensor | None, weights: Sequence[float],
                             mask: torch.Tensor | KeepDraw | None, **kw) -> bool:
    """The Triton launch takes up to 8 experts (not stacked deltas)."""
    experts = kw["experts"]
    return experts is not None and 1 <= len(experts) <= 8


def merge_deltas_triton(base: torch.Tensor, deltas: torch.Tensor | None, weights: Sequence[float],
                        mask: torch.Tensor | KeepDraw | None, *, scale, consensus, normalize, lam,
                        experts) -> torch.Tensor:
    from ._triton.taskvec import task_vector_mix

    if isinstance(mask, KeepDraw):
        mask = mask.tensor((len(experts), *base.shape), base.device)
    return task_vector_mix(base, list(experts), weights, mask=mask, scale=scale, consensus=consensus,
                           normalize=normalize, lam=lam)


def merge_deltas_fits_numba(base: torch.Tensor, deltas: torch.Tensor | None, weights: Sequence[float],
                            mask: torch.Tensor | KeepDraw | None, **kw) -> bool:
    """The fused loop takes bf16 on the CPU, deltas or experts shaped like the base."""
    experts = kw["experts"]
    k = len(experts) if deltas is None else deltas.shape[0]
    inputs = list(experts) if deltas is None else [deltas]
    return (
        base.dtype == torch.bfloat16 and base.device.type == "cpu"
        and all(x.dtype == torch.bfloat16 for x in inputs)
        and (all(x.shape == base.shape for x in inputs) if deltas is None else deltas.shape[1:] == base.shape)
        and (not isinstance(mask, torch.Tensor) or mask.shape == (k, *base.shape))
    )


def merge_deltas_torch(base: torch.Tensor, deltas: torch.Tensor | None, weights: Sequence[float],
                       mask: torch.Tensor | KeepDraw | None, *, scale, consensus, normalize, lam,
                       experts) -> torch.Tensor:
    """The reference: stack δ, draw the masks, ``mix``, add the base."""
    if deltas is None:
        deltas = torch.stack([e - base for e in experts])
    if isinstance(mask, KeepDraw):
        mask = mask.tensor(tuple(deltas.shape), base.device)
    mixed = mix(deltas, weights, mask, scale=scale, consensus=consensus, normalize=normalize, lam=lam)
    return (base + mixed).to(base.dtype)


def merge_deltas_numba(base: torch.Tensor, deltas: torch.Tensor | None, weights: Sequence[float],
                       mask: torch.Tensor | KeepDraw | None, *, scale, consensus, normalize, lam,
                       experts) -> torch.Tensor:
    from ._numba import taskvec as kernel

    k = len(experts) if deltas is None else deltas.shape[0]
    per_model = torch.empty(k, 1)   # the [K, ...] shape _per_model checks values against
    w = _per_model(weights, per_model, torch.bfloat16).reshape(k)
    s = None if scale is None else _per_model(scale, per_model, torch.bfloat16).reshape(k)
    divisor = weight_divisor(w)
    codes = {None: kernel.NO_CONSENSUS, "sum": kernel.SUM, "count": kernel.COUNT}
    out = torch.empty(base.shape, dtype=base.dtype)
    sources = tuple(bf16_bits(x) for x in experts) if deltas is None else tuple(bf16_bits(deltas).reshape(k, -1))
    draw = mask if isinstance(mask, KeepDraw) else None
    none = np.empty(0, np.uint8)
    cached = (draw is not None and draw.packed is not None and len(draw.packed) == k
              and all(b is None or b.size * 8 >= base.numel() for b in draw.packed))
    packed = tuple(none if b is None else b for b in draw.packed) if cached else (none,) * k
    keep = mask.contiguous().reshape(k, -1) if isinstance(mask, torch.Tensor) else torch.empty((0, 0), dtype=torch.bool)
    kernel.mix_bf16(
        bf16_bits(out), bf16_bits(base), sources, deltas is None, keep.numpy(),
        np.uint64(draw.seed if draw else 0), np.array(draw.streams if draw else [], dtype=np.uint64),
        np.uint64(draw.start if draw else 0), np.array(draw.limits() if draw else [], dtype=np.uint64), packed, cached,
        (torch.empty(0) if s is None else s.float()).numpy(), w.float().numpy(),
        codes[consensus], bool(normalize), np.float32(lam), np.float32(divisor.float().item()),
    )
    if draw is not None and not cached:
        dispatch.ran("philox", "numba", base.device)  # the loop drew DARE's masks itself
    return out


def bf16_bits(t: torch.Tensor):
    """A uint16 numpy view of a contiguous bf16 tensor's bits (shares memory)."""
    return t.contiguous().view(torch.int16).numpy().view("uint16").reshape(-1)


def _mix_band(
    d: torch.Tensor,
    w: torch.Tensor,
    mask: torch.Tensor | None,
    scale: torch.Tensor | None,
    consensus: Consensus | None,
    normalize: bool,
    lam: float,
) -> torch.Tensor:
    one = torch.ones((), dtype=d.dtype, device=d.device)
    if mask is not None:
        d = d * mask
    if scale is not None:
        d = d * scale
    d = d * w
    if consensus is not None:
        agree = agree_mask(d, sign_consensus(d, consensus)).to(d.dtype)  # 0/1: same products, one bool conversion
        mixed = sum_models(d * agree)
        divisor = sum_models(w * agree)
        divisor = torch.where(divisor == 0, one, divisor)
    else:
        mixed = sum_models(d)
        divisor = sum_models(w)
        divisor = torch.where(divisor.abs() < NO_CONSENSUS_EPS, one, divisor)
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return mixed


def _band(t: torch.Tensor | None, lo: int, step: int) -> torch.Tensor | None:
    if t is None or t.shape[1] == 1:
        return t
    return t[:, lo : lo + step]


def _per_model(
    value: torch.Tensor | Sequence[float], deltas: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``value`` in ``dtype``, dim 0 over models, unsqueezed on the right to ``deltas.dim()``."""
    if isinstance(value, torch.Tensor):
        t = value.to(device=deltas.device, dtype=dtype)
    else:
        t = torch.tensor(list(value), dtype=dtype, device=deltas.device)
    if t.dim() == 0 or t.dim() > deltas.dim() or t.shape[0] not in (1, deltas.shape[0]):
        raise ValueError(
            f"per-model values need dim 0 of size {deltas.shape[0]} (one per model) and at most "
            f"{deltas.dim()} dims, got shape {tuple(t.shape)}"
        )
    while t.dim() < deltas.dim():
        t = t.unsqueeze(-1)
    # A plain check: torch.broadcast_shapes imports torch._refs (and sympy) on first use, ~1 s.
    if any(a not in (1, b) for a, b in zip(t.shape, deltas.shape)):
        raise ValueError(
            f"shape {tuple(t.shape)} does not broadcast to deltas {tuple(deltas.shape)}"
        )
    return t
