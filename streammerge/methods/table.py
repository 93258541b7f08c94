"""The method table: every method name and the spec that runs it, written out.

A plain dict, so a reader (or a type checker) sees every method and the module that defines it.
Importing it imports every family module, none of which loads torch or a kernel at import time:
planning (`streammerge check`) stays torch-free. Adding a method is adding its spec here.
"""

from __future__ import annotations

import difflib

from ..errors import ConfigError
from . import basic, karcher, selective, spherical, stock, task_vectors, widen
from .registry import MethodSpec

METHODS: dict[str, MethodSpec] = {
    "linear": basic.LINEAR,
    "passthrough": basic.PASSTHROUGH,
    "slerp": basic.SLERP,
    "task_arithmetic": task_vectors.TASK_ARITHMETIC,
    "ties": task_vectors.TIES,
    "dare_ties": task_vectors.DARE_TIES,
    "dare_linear": task_vectors.DARE_LINEAR,
    "breadcrumbs": task_vectors.BREADCRUMBS,
    "breadcrumbs_ties": task_vectors.BREADCRUMBS_TIES,
    "della": task_vectors.DELLA,
    "della_linear": task_vectors.DELLA_LINEAR,
    "nuslerp": spherical.NUSLERP,
    "multislerp": spherical.MULTISLERP,
    "karcher": karcher.KARCHER,
    "model_stock": stock.MODEL_STOCK,
    "nearswap": stock.NEARSWAP,
    "ram": stock.RAM,
    "ramplus_tl": stock.RAMPLUS_TL,
    "widen": widen.WIDEN,
    "sce": selective.SCE,
    "arcee_fusion": selective.ARCEE_FUSION,
}


def get_method(name: str) -> MethodSpec:
    """The spec of method `name`; a miss is a ConfigError with close names and the full list."""
    spec = METHODS.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, METHODS, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise ConfigError(f"merge_method: unknown method {name!r}; {hint}known methods: {', '.join(sorted(METHODS))}")
    return spec
