"""A module imported on first use, so that planning (`streammerge check`) need not load torch.

`torch = lazy_module("torch")` stands for the module and imports it on the first attribute read;
it does not touch `sys.modules` before then, so a process that only plans never imports torch.
Functions that call a kernel import it where they call it (plain imports, visible to readers).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _LazyModule(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:  # every name but the stand-in's own __name__, __doc__, ...
        name = self.__name__
        return getattr(sys.modules.get(name) or importlib.import_module(name), attr)


def lazy_module(name: str) -> types.ModuleType:
    """A stand-in for module `name` (absolute) that imports it on the first attribute read."""
    return _LazyModule(name)
