"""The method registry: a plain dict built from each family module's `SPECS` tuple.

Families are imported on first lookup, not when streammerge is imported, and nothing registers itself
as a side effect of an import: adding a method is adding it to its family's `SPECS`.
"""

from __future__ import annotations

from .registry import METHODS, MethodSpec, ModelPass, Param, Reduce, TensorJob, get_method

FAMILIES = ("basic", "task_vectors", "spherical", "stock", "widen", "selective")


def load_all() -> dict[str, MethodSpec]:
    if not METHODS:
        import importlib

        for fam in FAMILIES:
            for spec in importlib.import_module(f"{__name__}.{fam}").SPECS:
                if spec.name in METHODS:
                    raise RuntimeError(f"method {spec.name!r} defined twice")
                METHODS[spec.name] = spec
    return METHODS


__all__ = ["METHODS", "MethodSpec", "ModelPass", "Param", "Reduce", "TensorJob", "get_method", "load_all"]
