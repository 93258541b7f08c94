"""The Python API: `run` and `check` for a config given as a path, YAML text or a dict, with options as
keywords.

The engine's own entry points (`merge.run`, `merge.check`) take a `RunOptions`; this layer is what a
notebook or a script calls: keywords named as the `RunOptions` fields (sizes as "1GiB" or an int),
checked here so that a misspelt option is a TypeError naming it rather than a silent default.
`check` does not raise on a bad config: it returns the plan or the problems, for the caller to show.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

from .errors import ConfigError, ProblemsError, StreammergeError
from .options import RunOptions, check_int, parse_size

if TYPE_CHECKING:
    from .plan.ir import Plan
    from .report import RunReport

ConfigLike = Union[str, "os.PathLike[str]", Mapping[str, Any]]
"""A config: a path to a YAML file, YAML text (a string holding a newline or starting with '{'), or a
dict as `yaml.safe_load` would give. Relative model paths in text or a dict are taken from the working
directory; in a file, also from the file's folder."""


@dataclass(frozen=True)
class CheckResult:
    """What `check` found: the plan when the config and checkpoints are sound, else the problems (every
    one the headers show, each naming its file, tensor or key). Nothing is printed."""

    plan: Plan | None
    problems: tuple[StreammergeError, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the plan does differently from what a reader might expect (unknown keys ignored,
        vocabularies cropped by unsafe_truncate_embeddings, ...)."""
        return self.plan.warnings if self.plan is not None else ()

    def raise_problems(self) -> Plan:
        """The plan, or the problems raised as `run` would raise them."""
        if self.plan is None:
            raise self.problems[0] if len(self.problems) == 1 else ProblemsError(list(self.problems))
        return self.plan


def check(config: ConfigLike, options: RunOptions | None = None, **option_values: Any) -> CheckResult:
    """Validate `config` against the checkpoints' headers (no tensor data is read) and plan the merge.

    `option_values` are `RunOptions` fields (`max_memory="4GiB"`, `out_shard_size=...`) applied over
    `options`; an unknown name is a TypeError, a bad value a ConfigError (raised: they are the caller's
    arguments). Problems of the config or the checkpoints are returned in the result, not raised."""
    from . import merge

    opts = make_options(options, option_values)
    path, text = _config_source(config)
    try:
        return CheckResult(merge.check(path, opts, config_text=text))
    except ProblemsError as e:
        return CheckResult(None, tuple(e.problems))
    except StreammergeError as e:
        return CheckResult(None, (e,))


def run(config: ConfigLike, out: str | os.PathLike[str], options: RunOptions | None = None, *,
        on_start: Callable[[Plan], None] | None = None, on_progress: Callable[[int], None] | None = None,
        **option_values: Any) -> RunReport:
    """Merge as `config` says into the folder `out` and return the run report (shards, seconds, peak
    memory, warnings). Options as in `check` (`overwrite=True`, `max_memory="2GiB"`, `device="cuda"`);
    `on_start(plan)` is called once planned, `on_progress(nbytes)` as bands finish. A bad config raises
    the `StreammergeError` that `check` would have returned."""
    from . import merge

    opts = make_options(options, option_values)
    path, text = _config_source(config)
    return merge.run(path, out, opts, on_start, on_progress, config_text=text)


def option_names() -> list[str]:
    """Every keyword `run` and `check` take as an option: the `RunOptions` field names."""
    return [f.name for f in dataclasses.fields(RunOptions)]


def make_options(options: RunOptions | None = None, values: Mapping[str, Any] | None = None) -> RunOptions:
    """`options` (default: `RunOptions()`) with `values` replaced; sizes may be text ("1GiB", mergekit's
    "5B") or ints, and a device "cuda:0". An unknown name is a TypeError listing the valid ones."""
    if options is not None and not isinstance(options, RunOptions):
        raise TypeError(f"options: expected a streammerge.RunOptions, got {type(options).__name__}; pass options "
                        "as keywords instead (e.g. max_memory='2GiB')")
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(RunOptions)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        close = difflib.get_close_matches(unknown[0], fields, n=2)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise TypeError(f"unknown option {unknown[0]!r}; {hint}valid options: {', '.join(fields)}")
    for name, value in values.items():
        flag = fields[name].metadata.get("flag")
        if flag is None or value is None:
            continue
        if flag.kind == "size":
            values[name] = parse_size(value, name)
        elif flag.kind == "int":
            values[name] = check_int(value, name, *fields[name].metadata["range"])
        elif flag.kind == "choice":
            if isinstance(value, str) and flag.convert:
                value = flag.convert(value)
            if value not in flag.choices:
                raise ConfigError(f"{name}: {value!r} is not one of {', '.join(flag.choices)}")
            values[name] = value
        elif flag.kind == "switch" and not isinstance(value, bool):
            raise ConfigError(f"{name}: expected True or False, got {value!r}")
    return dataclasses.replace(options or RunOptions(), **values)


def _config_source(config: ConfigLike) -> tuple[str | os.PathLike[str] | None, str | None]:
    """(path, None) for a file, (None, text) for YAML text or a dict: what `merge.run` takes."""
    if isinstance(config, Mapping):
        import yaml

        try:
            return None, yaml.safe_dump(_plain(config), sort_keys=False)
        except yaml.YAMLError as e:
            raise ConfigError(f"config: the dict cannot be written as YAML ({e}); use plain str, int, float, bool, "
                              "list and dict values") from None
    if isinstance(config, str) and ("\n" in config or config.lstrip().startswith("{")):
        return None, config
    if isinstance(config, (str, os.PathLike)):
        return Path(config), None
    raise TypeError(f"config: expected a path, YAML text or a dict, got {type(config).__name__}")


def _plain(value: Any) -> Any:
    """A dict config with `Path` values (`{"model": base_dir}`) as the plain data YAML writes."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return os.fspath(value) if isinstance(value, os.PathLike) else value
