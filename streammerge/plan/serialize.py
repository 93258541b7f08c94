"""A plan to a file and back, so that another process (another machine, a Ray task) can execute it.

The format is JSON: each frozen node is an object tagged with its class name, tuples and paths are
tagged so they come back as they went in (a plan compares equal to its round trip), and floats are
written exactly (JSON's repr of a float reads back to the same float). Only the plan's own node types
are accepted on the way back in, so a plan file cannot name an arbitrary class.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ..errors import StreammergeError
from ..io.header import TensorInfo
from .ir import Plan, ShardPlan, Source, TensorPlan

FORMAT = "streammerge-plan/1"
_NODES = {cls.__name__: cls for cls in (Plan, ShardPlan, Source, TensorPlan, TensorInfo)}


def _encode(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        name = type(obj).__name__
        if name not in _NODES:
            raise TypeError(f"internal: {name} is not a plan node")
        return {"__node__": name, **{f.name: _encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    if isinstance(obj, Path):
        return {"__path__": str(obj)}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError("internal: a plan dict must have string keys")
        if any(k.startswith("__") and k.endswith("__") for k in obj):
            return {"__dict__": {k: _encode(v) for k, v in obj.items()}}
        return {k: _encode(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"internal: cannot write {type(obj).__name__} into a plan file")


def _decode(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__node__" in obj:
        cls = _NODES.get(obj["__node__"])
        if cls is None:
            raise ValueError(f"unknown node {obj['__node__']!r}")
        return cls(**{k: _decode(v) for k, v in obj.items() if k != "__node__"})
    if "__tuple__" in obj:
        return tuple(_decode(v) for v in obj["__tuple__"])
    if "__path__" in obj:
        return Path(obj["__path__"])
    if "__dict__" in obj:
        return {k: _decode(v) for k, v in obj["__dict__"].items()}
    return {k: _decode(v) for k, v in obj.items()}


def plan_to_json(plan: Plan) -> str:
    return json.dumps({"format": FORMAT, "plan": _encode(plan)}, allow_nan=False)


def plan_from_json(text: str, source: str = "plan") -> Plan:
    """The plan `plan_to_json` wrote; a file of another format or version is refused with its name."""
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"expected format {FORMAT!r}, found {found!r}")
        plan = _decode(doc["plan"])
        if not isinstance(plan, Plan):
            raise ValueError("the file does not hold a Plan")
    except (ValueError, KeyError, TypeError) as e:
        raise StreammergeError(f"{source}: not a streammerge plan file ({str(e)[:200]}); write one with "
                               "streammerge.plan.serialize.write_plan") from None
    return plan


def write_plan(plan: Plan, path: str | os.PathLike) -> None:
    from ..io.writer import write_text_atomic

    write_text_atomic(Path(path), plan_to_json(plan))


def read_plan(path: str | os.PathLike) -> Plan:
    path = Path(path)
    return plan_from_json(path.read_text(), str(path))
