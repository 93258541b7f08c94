"""The method registry: a plain dict built from each family module's `SPECS` tuple.

Families are imported on lookup, not when streammerge is imported, and only as far as needed: in order
until one defines the name asked for (all of them for an unknown name). Nothing registers itself as a
side effect of an import: adding a method is adding it to its family's `SPECS`.
"""

from __future__ import annotations

from .registry import METHODS, MethodSpec, ModelPass, Param, Reduce, TensorJob, get_method

FAMILIES = ("basic", "task_vectors", "spherical", "stock", "widen", "selective")
_LOADED: set[str] = set()


def _load(family: str) -> None:
    if family in _LOADED:
        return
    import importlib

    for spec in importlib.import_module(f"{__name__}.{family}").SPECS:
        if spec.name in METHODS:
            raise RuntimeError(f"method {spec.name!r} defined twice")
        METHODS[spec.name] = spec
    _LOADED.add(family)


def find(name: str) -> MethodSpec | None:
    """The method called `name`, importing families in order until one defines it; None if none does."""
    for family in FAMILIES:
        if name in METHODS:
            break
        _load(family)
    return METHODS.get(name)


def load_all() -> dict[str, MethodSpec]:
    for family in FAMILIES:
        _load(family)
    return METHODS


__all__ = ["METHODS", "MethodSpec", "ModelPass", "Param", "Reduce", "TensorJob", "find", "get_method", "load_all"]
