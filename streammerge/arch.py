"""The tensor inventory of a model, inferred from its headers and config.json (no per-family lists).

Per-layer tensors are recognised by a `<prefix>.<block>.<i>.<rest>` name (`model.layers.3.mlp.up_proj.weight`,
`transformer.h.3.attn.c_attn.weight`, ...). Every other tensor is a "pre" tensor (input embeddings:
named like an embedding) or a "post" tensor (final norm, lm_head). The layer count comes from
config.json when it says, else from the names. Tied output embeddings are an alias of the input ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import CheckpointError, clip, short
from .io.reader import ModelFiles

LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|block|layer|decoder_layers))\.(?P<idx>\d+)\.(?P<rest>.+)$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
MAX_LAYER_DIGITS = 6  # a million layers: any longer index is damage (and int() of 5000 digits raises)
EMBED_HINTS = ("embed_tokens", "embed_in", "wte", "wpe", "word_embeddings", "tok_embeddings", "embeddings")
HEAD_HINTS = ("lm_head", "embed_out", "output.weight")


@dataclass(frozen=True)
class Arch:
    """What one model holds, in a canonical order: pre tensors, layers, post tensors."""

    layer_prefix: str | None
    num_layers: int
    layer_suffixes: tuple[str, ...]
    pre: tuple[str, ...]
    post: tuple[str, ...]
    vocab_size: int | None
    tied: bool

    def layer_tensor(self, index: int, suffix: str) -> str:
        return f"{self.layer_prefix}.{index}.{suffix}"

    def kind_of(self, name: str) -> str:
        if any(h in name for h in HEAD_HINTS):
            return "lm_head"
        if name in self.pre and any(h in name for h in EMBED_HINTS):
            return "embedding"
        if LAYER_RE.match(name):
            return "layer"
        return "other"

    def embed_name(self) -> str | None:
        return next((n for n in self.pre if any(h in n for h in EMBED_HINTS[:4]) or "embed_tokens" in n), None)


def config_layer_count(config: dict | None) -> int | None:
    if not config:
        return None
    text = config.get("text_config")
    for cfg in (config, text if isinstance(text, dict) else {}):
        for key in LAYER_COUNT_KEYS:
            if isinstance(cfg.get(key), int) and not isinstance(cfg.get(key), bool):
                return cfg[key]
    return None


def _check_config(model: ModelFiles) -> None:
    """A config.json whose text_config is not an object is damaged: say so, not a traceback."""
    cfg = model.config or {}
    where = model.path / "config.json"
    text = cfg.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise CheckpointError(f"{where}: 'text_config' must be an object, got {type(text).__name__} "
                              f"({short(text, 40)}); fix config.json or take it from the original model")


def infer_arch(model: ModelFiles) -> Arch:
    _check_config(model)
    prefixes: dict[str, dict[int, list[str]]] = {}
    others: list[str] = []
    for name in model.tensors:
        m = LAYER_RE.match(name)
        if m:
            if len(m["idx"]) > MAX_LAYER_DIGITS:
                raise CheckpointError(f"{model.path}: tensor {short(name)} has a layer index of {len(m['idx'])} "
                                      "digits, which no model has; the checkpoint is damaged, re-download or re-export it")
            prefixes.setdefault(m["prefix"], {}).setdefault(int(m["idx"]), []).append(m["rest"])
        else:
            others.append(name)
    prefix = None
    layers: dict[int, list[str]] = {}
    if prefixes:
        prefix = max(prefixes, key=lambda p: len(prefixes[p]))
        layers = prefixes[prefix]
        for p, ls in prefixes.items():
            if p != prefix:
                others.extend(f"{p}.{i}.{r}" for i, rs in ls.items() for r in rs)
    count = max(layers) + 1 if layers else 0
    declared = config_layer_count(model.config)
    if declared is not None and layers and declared != count:
        raise CheckpointError(f"{model.path}: config.json says {declared} layers but the weights hold "
                              f"{count} ('{clip(prefix)}.0' .. '{clip(prefix)}.{count - 1}'); the checkpoint is incomplete "
                              "or config.json belongs to another model")
    suffixes: tuple[str, ...] = ()
    if layers:
        first = layers.get(0)
        if first is None:
            raise CheckpointError(f"{model.path}: layer 0 ('{clip(prefix)}.0.*') is missing")
        suffixes = tuple(sorted(first, key=_suffix_order))
        for i in range(count):
            got = set(layers.get(i, ()))
            if got != set(suffixes):
                missing = sorted(set(suffixes) - got)
                extra = sorted(got - set(suffixes))
                detail = clip(f"missing {prefix}.{i}.{missing[0]}" if missing else f"unexpected {prefix}.{i}.{extra[0]}",
                               200)
                raise CheckpointError(f"{model.path}: layer {i} does not hold the same tensors as layer 0 ({detail}); "
                                      "the checkpoint is incomplete or damaged")
    pre = tuple(sorted((n for n in others if any(h in n for h in EMBED_HINTS) and not any(h in n for h in HEAD_HINTS))))
    post = tuple(sorted((n for n in others if n not in pre), key=lambda n: (any(h in n for h in HEAD_HINTS), n)))
    cfg = model.config or {}
    vocab = cfg.get("vocab_size") if isinstance(cfg.get("vocab_size"), int) else None
    tied = bool(cfg.get("tie_word_embeddings", False)) and not any(any(h in n for h in HEAD_HINTS) for n in others)
    return Arch(prefix, count, suffixes, pre, post, vocab, tied)


def _suffix_order(rest: str) -> tuple[int, str]:
    """Attention before MLP before norms, then by name: the order HF models write a layer in."""
    for rank, key in enumerate(("input_layernorm", "self_attn", "attn", "post_attention_layernorm", "mlp")):
        if rest.startswith(key):
            return (rank, rest)
    return (9, rest)

