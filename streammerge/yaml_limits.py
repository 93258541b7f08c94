"""YAML loaded within limits: a merge config is a small tree (a few hundred values, a few levels), so a
"billion laughs" document, a deeply nested one or one that refers to itself fails at once, naming the limit,
instead of validating for minutes, exhausting memory or ending in a RecursionError.
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import ConfigError, clip

MAX_YAML_VALUES = 100_000   # after alias expansion: a real config holds a few hundred
MAX_YAML_DEPTH = 64         # a real config nests 6 deep
MAX_INT_DIGITS = 100        # int() of thousands of digits is slow, then refused by Python


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses nesting deeper than MAX_YAML_DEPTH while composing: PyYAML's composer
    recurses once per level, so deeper input would end in a RecursionError."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise _Limit(f"the YAML is nested more than {MAX_YAML_DEPTH} levels deep (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Limit(Exception):
    """A YAML document over one of the limits (turned into a ConfigError naming the config)."""


def load_yaml(text: str, source: str = "config") -> Any:
    """The YAML document of a config, refused (ConfigError) when it is nested too deeply, expands to too
    many values through aliases or merge keys, refers to itself, or holds an absurdly long integer."""
    docs = _load(text, source, single=True)
    return docs[0] if docs else None


def load_yaml_all(text: str, source: str = "recipe") -> list[Any]:
    """Every document of a multi-document YAML file (a batch recipe), each within the same limits."""
    return _load(text, source, single=False)


def _load(text: str, source: str, single: bool) -> list[Any]:
    loader = None
    try:
        loader = _ConfigLoader(text)  # the reader refuses control characters here, already
        nodes = [loader.get_single_node()] if single else []
        while not single and loader.check_node():
            nodes.append(loader.get_node())
        docs = []
        for node in nodes:
            if node is None:
                continue
            _measure(node, "", 1, {}, set())
            docs.append(loader.construct_document(node))
        return docs
    except _Limit as e:
        raise ConfigError(f"{source}: {e}; a merge config is a small tree of keys and values") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {clip(str(e), 600)}") from None
    except (ValueError, OverflowError) as e:  # a timestamp like 2001-13-45 passes the resolver, not datetime
        raise ConfigError(f"{source}: not valid YAML: {clip(str(e), 300)}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _measure(node: yaml.Node, where: str, level: int, memo: dict[int, tuple[int, int]], active: set[int]) -> tuple[int, int]:
    """(values, height) of a composed node with every alias expanded, computed once per node (so a bomb
    is measured in microseconds); raises _Limit past MAX_YAML_VALUES or MAX_YAML_DEPTH, or on a cycle."""
    key = id(node)
    at = f" (at {clip(where, 120)})" if where else ""
    if key in active:
        raise _Limit(f"an alias refers to itself: the value{at} contains itself")
    hit = memo.get(key)
    if hit is not None:
        if level + hit[1] - 1 > MAX_YAML_DEPTH:
            raise _Limit(f"the YAML is nested more than {MAX_YAML_DEPTH} levels deep once aliases are expanded{at}")
        return hit
    if level > MAX_YAML_DEPTH:
        raise _Limit(f"the YAML is nested more than {MAX_YAML_DEPTH} levels deep once aliases are expanded{at}")
    count, height = 1, 1
    if isinstance(node, yaml.ScalarNode):
        if node.tag == "tag:yaml.org,2002:int" and len(node.value) > MAX_INT_DIGITS:
            raise _Limit(f"{where or 'the document'}: an integer of {len(node.value)} characters; "
                         "no parameter takes a number that large")
    else:
        active.add(key)
        if isinstance(node, yaml.MappingNode):
            children = []
            for k, v in node.value:
                name = k.value if isinstance(k, yaml.ScalarNode) else "?"
                children += [(k, where), (v, f"{where}.{name}" if where else str(name))]
        else:
            children = [(v, f"{where}[{i}]") for i, v in enumerate(node.value)]
        for child, child_where in children:
            n, h = _measure(child, child_where, level + 1, memo, active)
            count += n
            height = max(height, h + 1)
            if count > MAX_YAML_VALUES:
                raise _Limit(f"the YAML expands to more than {MAX_YAML_VALUES} values once aliases are expanded{at}")
        active.discard(key)
    memo[key] = (count, height)
    return count, height
