"""The files around the weights: index, config.json, tokenizer and generation files, chat template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from .writer import write_json_atomic, write_text_atomic

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
GENERATION_FILES = ("generation_config.json",)
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    write_json_atomic(out_dir / "model.safetensors.index.json",
                      {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})


def copy_tokenizer(src: Path, out_dir: Path, chat_template: str | None = None) -> list[str]:
    """Copy tokenizer and generation files; never reads or runs code from the model folder.

    `chat_template` (the template's text, resolved by `chat_templates`) replaces the source's: it is
    written to `chat_template.jinja`, which transformers reads first, and to tokenizer_config.json's
    `chat_template`, which older versions read; the source's own template files are not copied, so no
    loader finds a second, different template."""
    copied = []
    for name in TOKENIZER_FILES + GENERATION_FILES:
        if chat_template is not None and name in _TEMPLATE_FILES:
            continue
        f = src / name
        if f.is_file() and not f.is_symlink() or (f.is_symlink() and f.resolve().is_file()):
            tmp = out_dir / (name + ".partial")
            shutil.copyfile(f, tmp)
            tmp.replace(out_dir / name)
            copied.append(name)
    if chat_template is not None:
        _set_chat_template(out_dir, chat_template)
    return copied


def _set_chat_template(out_dir: Path, template: str) -> None:
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg["chat_template"] = template
    write_text_atomic(out_dir / "chat_template.jinja", template)
    write_json_atomic(cfg_path, cfg)


def write_config(out_dir: Path, config: dict) -> None:
    write_json_atomic(out_dir / "config.json", config)


def dump_yaml(doc: dict) -> str:
    return yaml.safe_dump(doc, sort_keys=False)
