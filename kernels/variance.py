"""Per-element population variance across models, as ``torch.var(x, dim=0, unbiased=False)``.

SCE ranks elements by this variance.  torch computes it with Welford's update in float64 and rounds
once to the input dtype; on CPU its strided reduction over a short model dim runs at ~5 M elements/s
per thread, so a whole model took minutes.  The compiled loop does the same float64 arithmetic in
the same order and is tested bit for bit against torch.
"""

from __future__ import annotations

import torch

from . import dispatch

__all__ = ["model_variance"]


def model_variance(x: torch.Tensor) -> torch.Tensor:
    """Variance over dim 0 (population: divides by K), in ``x``'s dtype and shape ``x.shape[1:]``."""
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"model_variance needs a non-empty model dim 0, got shape {tuple(x.shape)}")
    return dispatch.call("model_variance", x.device, x)


def model_variance_fits_numba(x: torch.Tensor) -> bool:
    return x.dtype in (torch.bfloat16, torch.float32) and x[0].numel() > 0


def model_variance_numba(x: torch.Tensor) -> torch.Tensor:
    from ._numba import variance as kernel

    k = x.shape[0]
    out = torch.empty(x.shape[1:], dtype=x.dtype)
    flat = x.contiguous().reshape(k, -1)
    if x.dtype == torch.bfloat16:
        kernel.variance_bf16(out.view(torch.int16).numpy().reshape(-1).view("uint16"),
                             flat.view(torch.int16).numpy().view("uint16"))
    else:
        kernel.variance_f32(out.numpy().reshape(-1), flat.numpy())
    return out


def model_variance_torch(x: torch.Tensor) -> torch.Tensor:
    return torch.var(x, dim=0, unbiased=False)
