"""`chat_template:` resolved as mergekit 0.1.5 resolves it, so the word `chatml` is never written literally.

- a name of a template we ship (`streammerge/data/chat_templates/<name>.jinja`: alpaca, chatml, exaone,
  llama3, mistral): that template; mergekit takes a value as a name when it is under 256 characters with
  no newline and no `{`;
- `auto`: the template most common among the input models' tokenizers (compared stripped); among equally
  common ones the first in the config's order (mergekit's set order changes between runs); none found:
  the tokenizer keeps its own;
- anything else is a literal Jinja template, refused when under 20 characters or without a `{`.

The shipped templates are our own text, written to render exactly as mergekit's do (tests compare them).
"""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path

from ..errors import ConfigError, clip

AUTO = "auto"
_NAME_LIMIT = 256
_MAX_FILE_BYTES = 64 << 20


def template_names() -> list[str]:
    folder = resources.files("streammerge") / "data" / "chat_templates"
    return sorted(f.name.removesuffix(".jinja") for f in folder.iterdir() if f.name.endswith(".jinja"))


def _named(value: str) -> str | None:
    if len(value) >= _NAME_LIMIT or "\n" in value or "{" in value or "/" in value or "\\" in value:
        return None
    f = resources.files("streammerge") / "data" / "chat_templates" / f"{value}.jinja"
    return f.read_text(encoding="utf-8") if f.is_file() else None


def check_chat_template(value: str | None) -> str | None:
    """Why `value` is not a usable `chat_template` (None: it is); needs no model files."""
    if value is None or value == AUTO or _named(value) is not None:
        return None
    if len(value) < 20 or "{" not in value:
        return (f"{clip(repr(value), 80)} is neither a template name ({', '.join(template_names())} or auto) nor a "
                "Jinja template (at least 20 characters with a '{'); name one of those or give the template's text")
    return None


def resolve_chat_template(value: str | None, model_dirs: list[Path]) -> str | None:
    """The template text to write for `value`; None leaves the copied tokenizer's own template."""
    if value is None:
        return None
    if value == AUTO:
        found = [t for t in (model_chat_template(d) for d in model_dirs) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    problem = check_chat_template(value)
    if problem:
        raise ConfigError(f"chat_template: {problem}")
    return _named(value) or value


def model_chat_template(model_dir: Path) -> str | None:
    """A model's default chat template, stripped, where transformers would find it: `chat_template.jinja`
    first, then `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates whose
    `default` is taken). A file that cannot be read counts as no template (mergekit skips such a model)."""
    try:
        jinja, config = model_dir / "chat_template.jinja", model_dir / "tokenizer_config.json"
        if _readable(jinja):
            text = jinja.read_text(encoding="utf-8")
        elif not _readable(config):
            return None
        else:
            cfg = json.loads(config.read_text(encoding="utf-8"))
            text = cfg.get("chat_template") if isinstance(cfg, dict) else None
            if isinstance(text, list):
                text = next((t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"), None)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return text.strip() if isinstance(text, str) and text.strip() else None


def _readable(f: Path) -> bool:
    """A regular file of sane size: a FIFO would block the read, a huge file is no tokenizer's."""
    return f.is_file() and f.stat().st_size <= _MAX_FILE_BYTES
