"""streammerge: out-of-core merging of LLM checkpoints that share a backbone, speaking mergekit's YAML.

Public API (docs/api.md): `run(config, out, **options)` and `check(config, **options)` for a config
given as a path, YAML text or a dict; `merge_tensors` and `merge_state_dicts` for merges in memory;
`RunOptions`, `CheckResult`, `RunReport`, `StreammergeError`. Importing this package is cheap: torch
and the rest load when a function is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import CheckResult, check, run
    from .errors import StreammergeError
    from .inprocess import merge_state_dicts, merge_tensors
    from .options import RunOptions
    from .report import RunReport

_EXPORTS = {
    "run": "api", "check": "api", "CheckResult": "api",
    "merge_tensors": "inprocess", "merge_state_dicts": "inprocess",
    "RunOptions": "options", "RunReport": "report", "StreammergeError": "errors",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'streammerge' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [*_EXPORTS, "__version__"]
