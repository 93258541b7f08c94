"""Parameter values as the methods declare them: typed, finite, with errors that say where."""

from __future__ import annotations

import math
from typing import Any, Callable

from ..errors import ConfigError
from ..errors import short
from ..methods.registry import Param


def converter(param: Param, where: str) -> Callable[[Any], Any]:
    """A parameter value (YAML scalar or text) as the kind the method declares; a value that cannot be
    one, or a float that is not finite, is a ConfigError naming `where`."""
    def conv(v: Any) -> Any:
        try:
            if param.kind == "float":
                x = float(v)
                if not math.isfinite(x):  # "nan", "inf" or "1e400" as text: YAML's .nan is refused at load
                    raise ConfigError(f"{where}: parameter {param.name!r} must be a finite number, got {short(v)}")
                return x
            if param.kind == "int":
                return int(v)
            if param.kind == "bool":
                if isinstance(v, str):
                    if v.lower() in ("true", "yes", "1"):
                        return True
                    if v.lower() in ("false", "no", "0"):
                        return False
                    raise ValueError(v)
                return bool(v)
            return v
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: parameter {param.name!r} must be a {param.kind}, got {short(v)}") from None
    return conv
