"""mergekit's YAML schema, accepted as mergekit 0.1.5 accepts it, with errors that name the key.

A parameter value is a scalar, a gradient (a list of numbers interpolated across the layers of a slice),
or a list of `{filter, value}` conditions matched in order against the tensor name (a substring match;
`*` or no filter matches everything). Lookups go from the most specific place to the least: the slice
source, the model's entry in `models`, the output slice, then the global `parameters`.
The YAML is loaded within limits (`yaml_limits`), so a "billion laughs" or deeply nested document fails
at once.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, clip
from .hub.refs import normalize_model_field
from .unsupported import UNIMPLEMENTED_KEYS, did_you_mean, unimplemented
from .yaml_limits import load_yaml

Scalar = Union[bool, int, float, str]

MAX_CONFIG_BYTES = 16 << 20
MAX_LISTED_ERRORS = 20


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    value: Any
    filter: Optional[str] = None


ParamValue = Any  # scalar | list[number] (gradient) | list[Condition] | Condition

# a path, `org/name[@revision]`, or mergekit's mapping form ({model: {path, revision}}) as that string
ModelRef = Annotated[str, BeforeValidator(normalize_model_field)]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: ModelRef
    parameters: Optional[dict[str, ParamValue]] = None


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)  # mergekit ignores unknown keys: see unsupported.ignored_keys
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: Optional[dict[str, ParamValue]] = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] < v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start <= end")
        return v


class OutputSlice(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    sources: list[SliceSource]
    base_model: Optional[ModelRef] = None
    residual_weight: Optional[float] = None
    parameters: Optional[dict[str, ParamValue]] = None


class TokenizerSpec(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    source: Optional[str] = None
    tokens: Optional[dict[str, Any]] = None
    pad_to_multiple_of: Optional[int] = None


DTYPE_NAMES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float64": "float64", "fp64": "float64",
}


class MergeConfig(BaseModel):
    """A merge as written in YAML, validated; model paths are resolved relative to the config file.

    Unknown keys are kept (mergekit 0.1.5's pydantic models ignore them at every level, so a config it
    runs must run here too) and `unsupported.ignored_keys` names them as warnings; a key mergekit acts on
    that streammerge does not implement is an error (`unsupported.unimplemented`), never ignored."""

    model_config = ConfigDict(extra="allow", frozen=True)
    merge_method: str
    models: Optional[list[ModelEntry]] = None
    slices: Optional[list[OutputSlice]] = None
    base_model: Optional[ModelRef] = None
    parameters: Optional[dict[str, ParamValue]] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[ModelRef] = None
    tokenizer: Optional[TokenizerSpec] = None
    chat_template: Optional[str] = None
    name: Optional[str] = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        if v not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {v!r}; use one of bfloat16, float16, float32")
        return DTYPE_NAMES[v]

    @model_validator(mode="after")
    def _models_or_slices(self) -> "MergeConfig":
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' or 'slices'")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty; list at least one model")
        if self.slices is not None and not self.slices:
            raise ValueError("'slices' is empty; list at least one slice")
        return self

    # -- helpers used by the planner --------------------------------------------------------------
    def referenced_models(self) -> list[str]:
        """Every model path in first-mention order, base first when there is one."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for m in self.models or []:
            seen[m.model] = None
        for s in self.slices or []:
            if s.base_model:
                seen[s.base_model] = None
            for src in s.sources:
                seen[src.model] = None
        return list(seen)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_ordered(), tuple[int, int]]",):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _format_validation(err: ValidationError, source: str, doc: dict) -> str:
    lines = []
    for e in err.errors():
        key = _loc(tuple(p for p in e["loc"] if not str(p).startswith("function-")))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(e["loc"])
            close = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; allowed keys: {', '.join(allowed)}"
            msg = f"unknown key{hint}"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {clip(key, 120)}: {clip(msg, 300)}")
    lines += [f"  {clip(str(key), 120)}: unknown key (ignored){did_you_mean(str(key), list(MergeConfig.model_fields))}"
              for key in doc if key not in MergeConfig.model_fields and key not in UNIMPLEMENTED_KEYS]
    lines += [f"  {key}: {why}" for key, why in UNIMPLEMENTED_KEYS.items() if key in doc]
    return f"{source}: invalid merge config:\n" + _listed(lines)


def _listed(lines: list[str]) -> str:
    more = len(lines) - MAX_LISTED_ERRORS
    return "\n".join(lines[:MAX_LISTED_ERRORS] + ([f"  ... and {more} more"] if more > 0 else []))


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = MergeConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            break
        ann = str(field.annotation)
        for cand in (ModelEntry, SliceSource, OutputSlice, TokenizerSpec):
            if cand.__name__ in ann:
                model = cand
                break
    return list(model.model_fields)


def parse_config(doc: Any, source: str = "config") -> MergeConfig:
    """Validate a parsed YAML document."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping with at least 'merge_method' and 'models' or 'slices'")
    try:
        config = MergeConfig.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, source, doc)) from None
    bad = [f"  {clip(where, 120)}: {value} is not a finite number; give a finite value" for where, value in _non_finite(config)]
    bad += [f"  {clip(where, 120)}: {clip(msg, 300)}" for where, msg in unimplemented(config)]
    if bad:
        raise ConfigError(f"{source}: invalid merge config:\n" + _listed(bad))
    return config


def _parameter_places(config: MergeConfig) -> list[tuple[str, dict | None]]:
    places: list[tuple[str, dict | None]] = [("parameters", config.parameters)]
    places += [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(config.models or [])]
    for i, s in enumerate(config.slices or []):
        places.append((f"slices[{i}].parameters", s.parameters))
        places += [(f"slices[{i}].sources[{j}].parameters", src.parameters) for j, src in enumerate(s.sources)]
    return places


def _non_finite(config: MergeConfig) -> list[tuple[str, float]]:
    """Every NaN or infinity among the parameters (scalars, gradients, filter values), with its key path:
    a NaN weight would merge into an all-NaN model with exit 0."""
    found: list[tuple[str, float]] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            found.append((where, value))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}")
        elif isinstance(value, Condition):
            walk(value.value, f"{where}.value")

    for where, params in _parameter_places(config):
        for key, value in (params or {}).items():
            walk(value, f"{where}.{key}")
    for i, s in enumerate(config.slices or []):
        walk(s.residual_weight, f"slices[{i}].residual_weight")
    return found


def load_config(path: str | os.PathLike) -> MergeConfig:
    """Read and validate a config file (read once: see `read_config_text`)."""
    path = Path(path)
    return load_config_text(read_config_text(path), str(path))


def read_config_text(path: str | os.PathLike) -> str:
    """The config file's text, read once: the run plans from it and the output folder documents it, so
    a file edited or deleted during the run changes neither."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; give the path of a YAML merge config") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, which no merge config is; "
                          "check that this is the config file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          "save the config as UTF-8") from None


def load_config_text(text: str, source: str = "config") -> MergeConfig:
    """Parse and validate config text; `source` names it in errors."""
    return parse_config(load_yaml(text, source), source)


def resolve_model_path(ref: str, config_dir: Path | None) -> Path:
    """Paths are used as given; a relative path that does not exist from the working directory is
    also tried relative to the config file's folder."""
    if "\0" in ref:
        raise ConfigError(f"model {clip(repr(ref), 120)}: a path cannot hold a NUL character; fix the model path")
    try:
        if "+" in ref and not Path(ref).exists():
            raise ConfigError(f"model {clip(repr(ref), 120)}: LoRA references ('model+lora') are not supported yet; "
                              "merge the adapter into the model first")
        p = Path(ref).expanduser()
        if not p.is_absolute() and not p.exists() and config_dir is not None and (config_dir / p).exists():
            p = config_dir / p
    except (OSError, RuntimeError) as e:  # a name too long, a folder we may not enter, ~nosuchuser
        raise ConfigError(f"model {clip(repr(ref), 120)}: not a usable path ({getattr(e, 'strerror', None) or e}); "
                          "fix the model path") from None
    return p


# -- evaluating a parameter for one tensor --------------------------------------------------------

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_condition(v: Any) -> Condition | None:
    if isinstance(v, Condition):
        return v
    if isinstance(v, dict) and "value" in v and set(v) <= {"value", "filter"}:
        return Condition(**v)
    return None


def evaluate(value: ParamValue, tensor_name: str, t: float, convert: Callable[[Any], Any] = lambda v: v) -> Any:
    """A parameter's value for one tensor at position t in [0, 1] through its slice; None when a
    filter list matches nothing (the lookup then falls through to the next, less specific, place)."""
    cond = _as_condition(value)
    if cond is not None:
        value = [cond]
    if isinstance(value, (bool, int, float, str)):
        return convert(value)
    if not isinstance(value, list):
        raise ValueError(f"unexpected parameter value {clip(repr(value), 120)}")
    if not value:
        return None
    if all(isinstance(v, (bool, int, float, str)) for v in value):
        vals = [convert(v) for v in value]
        if not all(_is_number(v) for v in vals):
            return vals[int(t * (len(vals) - 1))]
        return convert(interpolate(vals, t))
    for item in value:
        c = _as_condition(item)
        if c is None:
            raise ValueError(f"a list must be all scalars (a gradient) or all {{filter, value}} entries, "
                             f"got {clip(repr(item), 120)}")
        if c.filter is None or c.filter == "*" or (tensor_name and c.filter in tensor_name):
            return evaluate(c.value, tensor_name, t, convert)
    return None


def interpolate(values: list[float], t: float) -> float:
    """Piecewise-linear gradient: values spaced evenly over t in [0, 1]."""
    if len(values) == 1:
        return float(values[0])
    scaled = t * (len(values) - 1)
    i0 = min(int(scaled), len(values) - 1)
    i1 = min(i0 + 1, len(values) - 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def check_value_shape(value: ParamValue, key: str) -> None:
    """Reject malformed parameter values at load time, with the key path."""
    if isinstance(value, dict):
        if _as_condition(value) is None:
            raise ConfigError(f"{key}: a mapping value must be {{filter: ..., value: ...}}, got keys {clip(str(list(value)), 120)}")
        return
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{key}: empty list; give a number, a gradient list of numbers, or filter entries")
        nums = [v for v in value if _is_number(v)]
        conds = [v for v in value if isinstance(v, dict)]
        if nums and conds or (not nums and not conds and not all(isinstance(v, (bool, str)) for v in value)):
            raise ConfigError(f"{key}: a list must be all numbers (a gradient) or all {{filter, value}} entries")
        for i, c in enumerate(conds):
            if _as_condition(c) is None:
                raise ConfigError(f"{key}[{i}]: expected {{filter: ..., value: ...}}, got keys {clip(str(list(c)), 120)}")
            check_value_shape(c["value"], f"{key}[{i}].value")
