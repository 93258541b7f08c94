"""A batch recipe: mergekit-multi's multi-document YAML, each document a merge config with a `name:`,
a later document naming an earlier one as a model, and `sweep:` blocks expanding one document into
named variants.

    name: ties
    merge_method: ties
    ...
    sweep:
      grid:                          # every combination: ties-density=0.3, ties-density=0.5, ...
        parameters.density: [0.3, 0.5]
      # or  list: [{parameters.density: 0.3}, {merge_method: dare_ties}]   (one variant each)

A sweep path is dotted keys (and list positions: `models.0.parameters.weight`) into the document; it
must name a key the document has, so a typo is an error, not a variant that changes nothing.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, clip
from ..yaml_limits import load_yaml_all

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,127}$")
MAX_VARIANTS = 1024
MODEL_KEYS = ("model", "base_model", "tokenizer_source", "path", "source")  # where a stage name may stand


@dataclass(frozen=True)
class Stage:
    """One merge of the batch: its output name, its config (intermediate names not yet replaced by
    paths) and the names of the earlier stages it reads."""

    name: str
    doc: dict
    needs: tuple[str, ...]


def load_recipe(path: str | Path) -> list[Stage]:
    """The recipe's stages in an order where every stage comes after those it reads."""
    from ..config import read_config_text

    path = Path(path)
    return parse_recipe(read_config_text(path), str(path))


def parse_recipe(text: str, source: str = "recipe") -> list[Stage]:
    docs = load_yaml_all(text, source)
    if not docs:
        raise ConfigError(f"{source}: holds no documents; a recipe is one merge config per YAML document ('---')")
    expanded: list[tuple[str, dict]] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ConfigError(f"{source}: document {i + 1} is not a mapping; each document is a merge config")
        name = doc.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{source}: document {i + 1} needs a name: (letters, digits, '.', '_', '-'), got "
                              f"{clip(repr(name), 60)}; each output goes to OUTDIR/NAME")
        expanded += expand_sweep(doc, f"{source}: document {name!r}")
    seen: set[str] = set()
    for name, _ in expanded:
        if name in seen:
            raise ConfigError(f"{source}: two documents (or sweep variants) are named {name!r}; names must be unique")
        seen.add(name)
    stages = [Stage(name, doc, tuple(sorted(_references(doc, seen - {name})))) for name, doc in expanded]
    return _ordered(stages, source)


def expand_sweep(doc: dict, where: str) -> list[tuple[str, dict]]:
    """(name, document) of each variant; a document without `sweep:` is its own single variant."""
    doc = dict(doc)
    sweep = doc.pop("sweep", None)
    name = doc["name"]
    if sweep is None:
        return [(name, doc)]
    if not isinstance(sweep, dict) or set(sweep) - {"grid", "list"} or not sweep:
        raise ConfigError(f"{where}: sweep: takes 'grid: {{PATH: [values]}}' or 'list: [{{PATH: value}}, ...]'")
    variants: list[dict[str, Any]] = []
    grid = sweep.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: sweep.grid must map a path to a list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: sweep.grid.{key}: give a non-empty list of values")
    if grid:
        keys = list(grid)
        variants += [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    listed = sweep.get("list")
    if listed is not None:
        if not isinstance(listed, list) or not listed or not all(isinstance(v, dict) and v for v in listed):
            raise ConfigError(f"{where}: sweep.list: give a non-empty list of {{PATH: value}} mappings")
        variants += listed
    if len(variants) > MAX_VARIANTS:
        raise ConfigError(f"{where}: the sweep expands to {len(variants)} variants, more than {MAX_VARIANTS}")
    out = []
    for settings in variants:
        variant = copy.deepcopy(doc)
        for key, value in settings.items():
            _set(variant, str(key), value, f"{where}: sweep path {key!r}")
        suffix = "-".join(f"{str(k).split('.')[-1]}={_label(v)}" for k, v in settings.items())
        variant["name"] = f"{name}-{suffix}"
        out.append((variant["name"], variant))
    return out


def _label(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)[:40]


def _set(doc: Any, path: str, value: Any, where: str) -> None:
    parts = path.split(".")
    node = doc
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, dict):
            if part not in node:
                have = ", ".join(map(str, node)) or "none"
                raise ConfigError(f"{where}: no key {part!r} at {'.'.join(parts[:depth]) or 'the top'} "
                                  f"(keys there: {clip(have, 120)}); a sweep changes values the document has")
            if last:
                node[part] = value
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            if last:
                node[int(part)] = value
            node = node[int(part)]
        else:
            raise ConfigError(f"{where}: {'.'.join(parts[:depth]) or 'the top'} has no entry {part!r}")


def _references(doc: Any, names: set[str]) -> set[str]:
    """The stage names this document uses as a model (a string equal to a name, in a model field)."""
    found: set[str] = set()

    def walk(node: Any, key: str | None) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and key in MODEL_KEYS:
            if node.partition("@")[0] in names:
                found.add(node.partition("@")[0])

    walk(doc, None)
    return found


def _ordered(stages: list[Stage], source: str) -> list[Stage]:
    by_name = {s.name: s for s in stages}
    done: list[Stage] = []
    state: dict[str, str] = {}

    def visit(s: Stage, chain: list[str]) -> None:
        if state.get(s.name) == "done":
            return
        if state.get(s.name) == "active":
            raise ConfigError(f"{source}: the stages depend on each other in a circle: {' -> '.join(chain + [s.name])}")
        state[s.name] = "active"
        for n in s.needs:
            visit(by_name[n], chain + [s.name])
        state[s.name] = "done"
        done.append(s)

    for s in stages:
        visit(s, [])
    return done
