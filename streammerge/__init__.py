"""streammerge: out-of-core merging of LLM checkpoints that share a backbone, speaking mergekit's YAML.

Public API: `run(config, out, options)`, `check(config, options)`, `RunOptions`. Importing this package
is cheap: torch and the rest load when a function is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .merge import check, run
    from .options import RunOptions


def __getattr__(name: str) -> Any:
    if name in ("run", "check"):
        from . import merge

        return getattr(merge, name)
    if name == "RunOptions":
        from .options import RunOptions

        return RunOptions
    raise AttributeError(name)


__all__ = ["run", "check", "RunOptions", "__version__"]
