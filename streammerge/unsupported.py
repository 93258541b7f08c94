"""What of mergekit 0.1.5's schema streammerge refuses, and what it ignores as mergekit does.

A key or value mergekit acts on that streammerge does not implement is an error: ignoring it would give
a different model than mergekit's with exit 0. A key mergekit's pydantic models ignore (they ignore
unknown keys at every level) is ignored here too, so a config mergekit runs runs here, but each one is
named in a warning with the key it probably meant: a typo ('paramters') is seen, not merged silently.
Works on a parsed `config.MergeConfig` (duck-typed: this module is imported by `config`).
"""

from __future__ import annotations

import difflib
from typing import Any

from .errors import clip
from .io.chat_templates import check_chat_template


def did_you_mean(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=3)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; allowed keys: {', '.join(allowed)}"


UNIMPLEMENTED_KEYS = {
    "modules": "mergekit's multi-module merges are not implemented; write one config per module with 'models' or "
               "'slices'",
}


def unimplemented(config: Any) -> list[tuple[str, str]]:
    """Keys and values mergekit 0.1.5 acts on that streammerge does not implement: each an error, since
    ignoring one would give a different model than mergekit's."""
    found = [(key, why) for key, why in UNIMPLEMENTED_KEYS.items() if key in (config.model_extra or {})]
    tok = config.tokenizer
    if tok is not None and config.tokenizer_source is not None:
        found.append(("tokenizer", "give either 'tokenizer_source' or 'tokenizer', not both (mergekit refuses both)"))
    source = config.tokenizer_source or ((tok.source or "union") if tok is not None else None)  # mergekit's default
    if source == "union":
        where = "tokenizer_source" if config.tokenizer_source else "tokenizer.source"
        found.append((where, "'union' (mergekit's default for a 'tokenizer:' section) is not implemented yet; use "
                             "'base' or a model's path, which copies that tokenizer"))
    if tok is not None and tok.tokens:
        found.append(("tokenizer.tokens", "per-token embedding sources are not implemented yet; remove 'tokens'"))
    if tok is not None and tok.pad_to_multiple_of is not None:
        found.append(("tokenizer.pad_to_multiple_of", "padding the vocabulary is not implemented yet; remove "
                                                      "'pad_to_multiple_of'"))
    problem = check_chat_template(config.chat_template)
    if problem:
        found.append(("chat_template", problem))
    return found


def ignored_keys(config: Any) -> list[str]:
    """One warning per unknown key: mergekit ignores it and so do we, but a typo ('paramters') should be
    seen, with the key it probably meant."""
    levels: list[tuple[str, Any]] = [("", config)]
    levels += [(f"slices[{i}].", s) for i, s in enumerate(config.slices or [])]
    levels += [(f"slices[{i}].sources[{j}].", src) for i, s in enumerate(config.slices or [])
               for j, src in enumerate(s.sources)]
    if config.tokenizer is not None:
        levels.append(("tokenizer.", config.tokenizer))
    out = []
    for prefix, level in levels:
        for key in level.model_extra or {}:
            if prefix or key not in UNIMPLEMENTED_KEYS:
                hint = did_you_mean(str(key), list(type(level).model_fields))
                out.append(f"{clip(prefix + str(key), 120)}: unknown key, ignored as mergekit 0.1.5 ignores it{hint}")
    return out


def config_warnings(config: Any, copy_tokenizer: bool) -> list[str]:
    """What a run ignores in this config, as mergekit would: unknown keys, and a chat template with no
    tokenizer to hold it."""
    out = ignored_keys(config)
    if config.chat_template and not copy_tokenizer and config.tokenizer_source is None and config.tokenizer is None:
        out.append("chat_template: --no-copy-tokenizer writes no tokenizer, so the chat template is not saved "
                   "(as in mergekit)")
    return out
