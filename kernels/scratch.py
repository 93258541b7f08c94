"""Per-thread reusable work buffers for block-sized temporaries.

A block's δ and masks are a few MB: each fresh allocation of that size is an mmap, page faults and
an munmap (glibc's threshold is kept low so freed memory goes back to the OS and RSS stays within
the budget).  Reusing one buffer per thread and purpose removes that churn.  A buffer stays valid
until the same thread asks for the same name again, so callers use it within one block's work.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["scratch"]

_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` backed by this thread's buffer ``name`` (grown on demand)."""
    buffers: dict[tuple[str, torch.device], torch.Tensor] = _local.__dict__.setdefault("buffers", {})
    n = 1
    for s in shape:
        n *= s
    nbytes = n * dtype.itemsize
    buf = buffers.get((name, device))
    if buf is None or buf.numel() < nbytes:
        buf = buffers[(name, device)] = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    return buf[:nbytes].view(dtype).view(shape)
