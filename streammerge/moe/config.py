"""mergekit-moe 0.1.5's YAML schema, parsed and checked with errors that name the key.

The schema: `base_model`, `experts: [{source_model, positive_prompts, negative_prompts, noise_scale,
residual_scale}]`, `gate_mode`, `dtype`, `experts_per_token`, `shared_experts`, `architecture`. The
checks are mergekit's `is_bad_config` (at least `experts_per_token` experts, prompts for every expert
unless the gates are random, prompts not all the same) made into errors, plus what we do not
implement (DeepSeek outputs), which is refused rather than silently dropped.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ..errors import ConfigError, clip, short
from ..yaml_limits import load_yaml

GATE_MODES = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random")
PROMPTED = ("hidden", "hidden_avg", "cheap_embed")   # gate modes that read the prompts
DTYPES = ("bfloat16", "float16", "float32")
ARCHITECTURES = ("mixtral", "qwen")                   # mergekit matches a prefix of the output's name


class Expert(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    source_model: str
    positive_prompts: Optional[list[str]] = None
    negative_prompts: Optional[list[str]] = None
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None


class MoEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: Optional[str] = None
    experts_per_token: int = 2
    shared_experts: Optional[list[Expert]] = None
    architecture: Optional[str] = None

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in DTYPES:
            raise ValueError(f"dtype {v!r} is not one of {', '.join(DTYPES)}")
        return v

    def all_experts(self) -> list[tuple[str, Expert]]:
        """Every expert with the key it came from (experts[i] / shared_experts[i])."""
        out = [(f"experts[{i}]", e) for i, e in enumerate(self.experts)]
        return out + [(f"shared_experts[{i}]", e) for i, e in enumerate(self.shared_experts or [])]

    def referenced_models(self) -> list[str]:
        """The base first, then each distinct expert model, in order."""
        return list(dict.fromkeys([self.base_model, *(e.source_model for _, e in self.all_experts())]))


def is_moe_document(doc: Any) -> bool:
    """A mergekit-moe config is a mapping with `experts:` (a merge config never has that key)."""
    return isinstance(doc, dict) and "experts" in doc


def parse_moe_text(text: str, source: str = "config") -> MoEConfig:
    """Parse and validate a mergekit-moe YAML text; a ConfigError names the key and the fix."""
    doc = load_yaml(text, source)
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: a mergekit-moe config is a mapping with base_model and experts")
    try:
        cfg = MoEConfig.model_validate(doc)
    except ValidationError as err:
        lines = []
        for e in err.errors()[:20]:
            where = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(f"{where}: {e['msg']}")
        raise ConfigError(f"{source}: invalid mergekit-moe config:\n  " + "\n  ".join(lines)) from None
    validate(cfg, source)
    return cfg


def validate(cfg: MoEConfig, source: str = "config") -> None:
    """mergekit-moe's own checks, and ours for what we refuse; every problem at once."""
    problems: list[str] = []
    if cfg.gate_mode not in GATE_MODES:
        problems.append(f"gate_mode: {short(cfg.gate_mode)} is not a gate mode; use one of {', '.join(GATE_MODES)}"
                        " (hidden_last is not in mergekit-moe 0.1.5's documented set)")
    if not cfg.experts:
        problems.append("experts: the list is empty; give at least experts_per_token experts")
    if cfg.experts_per_token < 1:
        problems.append(f"experts_per_token: {cfg.experts_per_token} must be at least 1")
    elif len(cfg.experts) < cfg.experts_per_token:
        problems.append(f"experts_per_token: {cfg.experts_per_token} is more than the {len(cfg.experts)} experts "
                        "listed; lower experts_per_token or add experts")
    if cfg.architecture is not None and not any(a.startswith(cfg.architecture.lower()) for a in ARCHITECTURES):
        extra = " (DeepSeek-style outputs are not implemented)" if cfg.architecture.lower().startswith("deep") else ""
        problems.append(f"architecture: {short(cfg.architecture)} is not an output streammerge writes{extra}; "
                        "use mixtral or qwen (Qwen2-MoE), or leave it out to choose automatically")
    prompted = cfg.gate_mode in PROMPTED
    for where, e in cfg.all_experts():
        if e.noise_scale is not None and not (isinstance(e.noise_scale, (int, float)) and 0 <= e.noise_scale < 1e3):
            problems.append(f"{where}.noise_scale: {e.noise_scale!r}: give a standard deviation >= 0")
        if prompted and not e.positive_prompts and not where.startswith("shared"):
            problems.append(f"{where}.positive_prompts: gate_mode {cfg.gate_mode} computes each router row from its "
                            f"expert's prompts, and {clip(e.source_model)} has none; add positive_prompts (or use "
                            "gate_mode: random)")
        for key in ("positive_prompts", "negative_prompts"):
            for j, p in enumerate(getattr(e, key) or []):
                if not p.strip():
                    problems.append(f"{where}.{key}[{j}]: the prompt is empty; write a prompt or remove the entry")
    if prompted and len(cfg.experts) > 1:
        tups = {(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())) for e in cfg.experts}
        if len(tups) == 1:
            problems.append("experts: every expert has the same prompts, so every router row is the same and the "
                            "MoE routes nowhere in particular; give each expert prompts of its own")
    shared = cfg.shared_experts or []
    if shared and prompted:
        has = [bool(e.positive_prompts) for e in shared]
        if any(has) != all(has):
            problems.append("shared_experts: give prompts to every shared expert or to none (as mergekit requires)")
    if problems:
        if len(problems) == 1:
            raise ConfigError(f"{source}: {problems[0]}")
        raise ConfigError(f"{source}: {len(problems)} problems:\n  " + "\n  ".join(problems))
