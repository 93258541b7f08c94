"""The one table of which implementation runs each chunk primitive, and the one call that chooses,
runs and records it, so the run report names every primitive that ran.

``TABLE`` maps each public operation (named as its public function) to the primitive it reports as
and its implementations, tried in order: the first whose backend is available on the device and whose
``applies`` predicate accepts the arguments runs. Backends: ``numba`` on CPU when numba imports and
``STREAMMERGE_NO_NUMBA`` is not set; ``triton`` on CUDA when triton imports and
``STREAMMERGE_NO_TRITON`` is not set (environment read on every call); ``torch`` always, last: the
reference, and the only path for dtypes a kernel does not cover.

Targets and predicates are ``"module:function"`` strings under ``streammerge.kernels``, imported at
the first call that needs them: importing streammerge never imports numba or triton, and this module
imports no other kernel module (they import it).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

__all__ = ["PRIMITIVES", "TABLE", "Impl", "Op", "call", "choose", "ran", "reset", "used"]

BACKENDS = ("numba", "triton", "torch")


@dataclass(frozen=True)
class Impl:
    """One implementation of an operation: its backend, ``"module:function"``, and the predicate over
    the call's arguments that says whether it takes them (None: any arguments)."""

    backend: str
    target: str
    applies: str | None = None


@dataclass(frozen=True)
class Op:
    """A public operation: the primitive it reports as (the report's key) and its implementations."""

    primitive: str
    impls: tuple[Impl, ...]


def _op(primitive: str, module: str, name: str, numba: str | None = None, triton: str | None = None) -> Op:
    """The usual row, all in the torch module ``module``: a Triton target where there is one, the numba
    adapter ``name_numba`` (or the compiled module's own ``numba`` target), each where
    ``name_fits_<backend>`` takes the arguments, then the reference ``name_torch``."""
    impls = []
    if triton is not None:
        impls.append(Impl("triton", triton, f"{module}:{name}_fits_triton"))
    impls.append(Impl("numba", numba or f"{module}:{name}_numba", f"{module}:{name}_fits_numba"))
    return Op(primitive, (*impls, Impl("torch", f"{module}:{name}_torch")))


TABLE: dict[str, Op] = {
    # Philox: the Triton launchers take the public signature as it is.
    "philox_words": Op("philox", (Impl("numba", "philox:philox_words_numba"),
                                  Impl("triton", "_triton.philox:philox_words"),
                                  Impl("torch", "philox:philox_words_torch"))),
    "philox_uniform": Op("philox", (Impl("numba", "philox:philox_uniform_numba"),
                                    Impl("triton", "_triton.philox:philox_uniform"),
                                    Impl("torch", "philox:philox_uniform_torch"))),
    "bernoulli_keep": Op("philox", (Impl("numba", "philox:bernoulli_keep_numba"),
                                    Impl("triton", "_triton.philox:bernoulli_keep"),
                                    Impl("torch", "philox:bernoulli_keep_torch"))),
    "sample_positions": _op("philox", "sample", "sample_positions"),
    "merge_deltas": _op("taskvec", "vote", "merge_deltas", triton="vote:merge_deltas_triton"),
    "row_l1": _op("row_l1", "norms", "row_l1"),
    "dare_row_l1": _op("row_l1", "norms", "dare_row_l1"),
    "della_keep": _op("della_keep", "della", "della_keep", triton="_triton.della:della_keep"),
    "count_keys": _op("histogram", "threshold", "count_keys", numba="_numba.threshold:count_keys"),
    "topk_mask": _op("histogram", "threshold", "topk_mask", numba="_numba.threshold:topk_mask"),
    "equal_per_row": _op("histogram", "threshold", "equal_per_row", numba="_numba.threshold:equal_per_row"),
    "model_variance": _op("variance", "variance", "model_variance"),
    "segment_dots": _op("dots", "dots", "segment_dots"),
    "gram_segments": _op("dots", "dots", "gram_segments"),
    "column_products": _op("dots", "dots", "column_products"),
    "stock_mix": _op("blend", "blend", "stock_mix"),
    "nearswap_mix": _op("blend", "blend", "nearswap_mix"),
    "fusion_mix": _op("blend", "blend", "fusion_mix"),
    "pair_mix": _op("blend", "blend", "pair_mix"),
    "multislerp_fused": _op("blend", "blend", "multislerp_fused"),
    "slerp_fused": _op("blend", "blend", "slerp_fused"),
    "ram_fused": _op("blend", "blend", "ram_fused"),
    "ram_counts_fused": _op("blend", "blend", "ram_counts_fused"),
}

PRIMITIVES = tuple(dict.fromkeys(op.primitive for op in TABLE.values()))

_lock = threading.Lock()
_used: dict[str, set[str]] = {}


def call(op: str, device: torch.device | str | None, *args: Any, **kw: Any) -> Any:
    """Run ``op`` with the first implementation that is available on ``device`` (None: the CPU) and
    takes the arguments, and record what ran under the op's primitive."""
    entry = _entry(op)
    kind = _kind(device)
    for impl in entry.impls:
        if _available(impl.backend, kind) and (impl.applies is None or _resolve(impl.applies)(*args, **kw)):
            out = _resolve(impl.target)(*args, **kw)
            ran(entry.primitive, impl.backend, kind)
            return out
    raise RuntimeError(f"no implementation of {op!r} takes these arguments (the torch one must be last)")


def choose(primitive: str, device: torch.device | str | None) -> str:
    """The backend a primitive (or an op) would run on ``device`` when its kernel takes the arguments."""
    ops = [TABLE[primitive]] if primitive in TABLE else [op for op in TABLE.values() if op.primitive == primitive]
    if not ops:
        raise ValueError(f"unknown primitive {primitive!r}; known: {', '.join(PRIMITIVES)}")
    have = {impl.backend for op in ops for impl in op.impls}
    kind = _kind(device)
    return next(b for b in BACKENDS if b in have and _available(b, kind))


def ran(primitive: str, impl: str, device: torch.device | str | None) -> None:
    """Record that ``impl`` ran ``primitive`` on ``device``: ``call`` does it; a fused kernel that also
    does another primitive's work (DARE's draws inside the mix) records that one too."""
    name = f"{impl}-{_kind(device)}"
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


def _entry(op: str) -> Op:
    try:
        return TABLE[op]
    except KeyError:
        raise ValueError(f"unknown kernel operation {op!r}; known: {', '.join(TABLE)}") from None


def _kind(device: torch.device | str | None) -> str:
    if device is None:
        return "cpu"
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def _available(backend: str, kind: str) -> bool:
    if backend == "numba":
        return kind == "cpu" and not _disabled("STREAMMERGE_NO_NUMBA") and _importable("numba")
    if backend == "triton":
        return kind == "cuda" and not _disabled("STREAMMERGE_NO_TRITON") and _importable("triton")
    return True


def _disabled(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() not in ("", "0", "false", "no")


@lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _resolve(target: str) -> Any:
    """The function a ``"module:function"`` string names (looked up on every call, so a test can wrap it)."""
    module, _, name = target.partition(":")
    return getattr(_module(module), name)


@lru_cache(maxsize=None)
def _module(module: str) -> Any:
    return importlib.import_module(f"{__package__}.{module}")
