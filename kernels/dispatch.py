"""One place that decides which implementation runs each chunk primitive, and remembers what ran.

On CPU the numba kernels (``kernels/_numba``) run when numba imports and ``STREAMMERGE_NO_NUMBA``
is not set; on CUDA the Triton kernels (``kernels/_triton``) run when triton imports and
``STREAMMERGE_NO_TRITON`` is not set.  Otherwise the torch implementation runs: it is the reference,
and the only path for dtypes a kernel does not cover.  Primitives call ``choose`` and then ``ran``
with what actually ran, so the run report can say it.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from functools import lru_cache

import torch

__all__ = ["choose", "ran", "reset", "used"]

PRIMITIVES = ("philox", "taskvec", "row_l1", "della_keep", "histogram", "variance", "dots", "blend")

_lock = threading.Lock()
_used: dict[str, set[str]] = {}


def _disabled(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() not in ("", "0", "false", "no")


@lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def choose(primitive: str, device: torch.device | str) -> str:
    """``'numba'``, ``'triton'`` or ``'torch'`` for a primitive on a device (env read on every call)."""
    if primitive not in PRIMITIVES:
        raise ValueError(f"unknown primitive {primitive!r}; known: {', '.join(PRIMITIVES)}")
    kind = torch.device(device).type
    if kind == "cpu" and not _disabled("STREAMMERGE_NO_NUMBA") and _importable("numba"):
        return "numba"
    if kind == "cuda" and not _disabled("STREAMMERGE_NO_TRITON") and _importable("triton"):
        return "triton"
    return "torch"


def ran(primitive: str, impl: str, device: torch.device | str) -> None:
    """Record that ``impl`` ran ``primitive`` on ``device`` (for the run report)."""
    name = f"{impl}-{device.type if isinstance(device, torch.device) else torch.device(device).type}"
    if name in _used.get(primitive, ()):
        return
    with _lock:
        _used.setdefault(primitive, set()).add(name)


def used() -> dict[str, list[str]]:
    """What ran each primitive since the last ``reset``, e.g. ``{'philox': ['numba-cpu']}``."""
    with _lock:
        return {p: sorted(v) for p, v in sorted(_used.items())}


def reset() -> None:
    with _lock:
        _used.clear()
