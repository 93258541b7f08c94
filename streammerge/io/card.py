"""What a merge's folder says about itself: `mergekit_config.yml` and the model card (README.md).

mergekit users look for both: the config as run (the text the run planned from, read once, never a
re-serialisation), and a card whose YAML front matter lists the hub models merged under `base_model`,
which the Hugging Face hub reads to link a merge to its parents. Only hub repositories go there: a local
path means nothing on the hub, so it is listed in the card's text instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import clip
from .writer import write_text_atomic

HOMEPAGE = "https://github.com/streammerge/streammerge"  # pyproject's [project.urls] Homepage (a test holds them equal)
CONFIG_FILE = "mergekit_config.yml"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_CACHE_DIR = re.compile(r"models--([^/]+?)--([^/]+)")


@dataclass(frozen=True)
class Input:
    """One merged model as the card names it: the reference written in the config, where it was read
    from, and, for a hub model, its repository and revision."""

    ref: str
    path: str
    repo: str | None = None
    revision: str | None = None


def describe_input(ref: str, path: str | Path) -> Input:
    """A hub repository is recognised from the hub cache's layout (`models--org--name/snapshots/REV`,
    which gives the exact revision read) or from a reference written `org/name[@revision]` that is no
    local folder; anything else is a local path."""
    p = Path(path)
    m = _CACHE_DIR.fullmatch(p.parent.parent.name) if p.parent.name == "snapshots" else None
    if m:
        return Input(ref, str(path), f"{m[1]}/{m[2]}", p.name)
    name, _, rev = ref.partition("@")
    if _REPO_ID.fullmatch(name) and not Path(ref).exists() and not ref.startswith((".", "~")):
        return Input(ref, str(path), name, rev or None)
    return Input(ref, str(path))


def write_config_copy(out_dir: Path, config_text: str) -> None:
    """The config exactly as run (mergekit's name for it, which also marks the folder as a merge)."""
    write_text_atomic(out_dir / CONFIG_FILE, config_text)


def write_model_card(out_dir: Path, config_text: str, method: str, inputs: list[Input], base: str | None,
                     config: dict[str, Any]) -> None:
    """README.md: front matter (base_model, tags), the method, each input with repo and revision or its
    path, the parameters set, and the config as run. `config` is the parsed config (plain values). The
    heading is the config's `name`, not the folder's (mergekit's): the same merge gives the same bytes
    wherever it is written, which resume and the crash tests rely on."""
    hub = list(dict.fromkeys(i.repo for i in inputs if i.repo))
    meta: dict[str, Any] = {}
    if hub:
        meta["base_model"] = hub
        meta["base_model_relation"] = "merge"
    meta |= {"library_name": "transformers", "tags": ["merge", "mergekit", "streammerge"]}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", f"# {clip(str(config.get('name') or 'Merged model'), 120)}", "",
             f"This model is a merge of pre-trained language models made with [streammerge]({HOMEPAGE}), which "
             "runs mergekit's YAML configs out of core.", "",
             "## Method", "",
             f"`{method}`" + (f", with {_name(base, inputs)} as the base model." if base else "."), "",
             "## Models merged", "", "| model | revision | read from |", "|---|---|---|"]
    for i in inputs:
        link = f"[{i.repo}](https://huggingface.co/{i.repo})" if i.repo else f"`{_cell(i.ref)}`"
        lines.append(f"| {link} | {_cell(i.revision or '-')} | `{_cell(i.path)}` |")
    lines += ["", "## Parameters", "", *_parameters(config), "",
              "## Configuration", "", f"The configuration as run (also in `{CONFIG_FILE}`):", "",
              "```yaml", config_text.rstrip(), "```", ""]
    write_text_atomic(out_dir / "README.md", "\n".join(lines))


def _name(ref: str, inputs: list[Input]) -> str:
    found = next((i for i in inputs if i.ref == ref), None)
    return f"`{found.repo or found.ref}`" if found else f"`{ref}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'").replace("\n", " ")


def _inline(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip().removesuffix("...").strip()


def _parameters(config: dict[str, Any]) -> list[str]:
    """Every place the config sets parameters, most general first, one line each."""
    out = []
    if config.get("parameters"):
        out.append(f"- all models: `{_cell(_inline(config['parameters']))}`")
    for m in config.get("models") or []:
        if m.get("parameters"):
            out.append(f"- `{_cell(str(m.get('model')))}`: `{_cell(_inline(m['parameters']))}`")
    for i, s in enumerate(config.get("slices") or []):
        if s.get("parameters"):
            out.append(f"- slice {i}: `{_cell(_inline(s['parameters']))}`")
        for src in s.get("sources") or []:
            if src.get("parameters"):
                out.append(f"- slice {i}, `{_cell(str(src.get('model')))}` layers {src.get('layer_range')}: "
                           f"`{_cell(_inline(src['parameters']))}`")
    for key in ("dtype", "out_dtype", "tokenizer_source", "chat_template"):
        if config.get(key) is not None:
            out.append(f"- {key}: `{_cell(clip(str(config[key])))}`")
    return out or ["(the method's defaults)"]
