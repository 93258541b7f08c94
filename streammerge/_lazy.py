"""Imports deferred to first use, so that planning (`streammerge check`) need not load torch.

`torch = lazy_module("torch")` stands for the module and imports it on the first attribute read;
`f, g = lazy_names("pkg.mod", "f", "g")` stand for callables of a module, imported on the first call.
Neither touches `sys.modules` before then: a process that only plans never imports the module.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any, Callable


class _LazyModule(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:  # every name but the stand-in's own __name__, __doc__, ...
        name = self.__name__
        return getattr(sys.modules.get(name) or importlib.import_module(name), attr)


def lazy_module(name: str) -> types.ModuleType:
    """A stand-in for module `name` (absolute) that imports it on the first attribute read."""
    return _LazyModule(name)


class _LazyName:
    __slots__ = ("_module", "_name", "_target")

    def __init__(self, module: str, name: str) -> None:
        self._module, self._name, self._target = module, name, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        target = self._target
        if target is None:
            target = self._target = getattr(importlib.import_module(self._module), self._name)
        return target(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<lazy {self._module}.{self._name}>"


def lazy_names(module: str, *names: str) -> tuple[Callable[..., Any], ...]:
    """Stand-ins for callables (functions, classes to instantiate) of module `module` (absolute),
    imported on the first call."""
    return tuple(_LazyName(module, n) for n in names)
