"""Embeddings whose vocabularies differ, decided from the headers as mergekit 0.1.5 decides at run time.

mergekit refuses them ("Tensor size mismatch") unless a tokenizer section maps each model's rows onto
one vocabulary, or `--unsafe-truncate-embeddings` keeps the first rows common to all (it trusts that
those token ids mean the same everywhere). streammerge refuses in `check`, before any data is read,
with both sizes and the fix; the crop is taken only when asked for, and the tokenizer mapping is not
implemented yet, so a config that asks for it is refused rather than merged differently, unless the
mapping provably changes nothing (`check_tokenizer_source`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..arch import Arch
from ..config import MergeConfig
from ..errors import ConfigError, clip
from ..io.reader import ModelFiles

_MAX_TOKENIZER_BYTES = 256 << 20  # the largest tokenizer.json files are tens of MB
_SAME_IDS = "right only when those token ids mean the same in every model"


def cropped_vocabulary(out_name: str, rows: list[int], refs: list[str], config: MergeConfig,
                       unsafe_truncate: bool) -> tuple[int, str]:
    """The rows an embedding or lm_head keeps when the models' vocabularies differ, and the warning that
    says so; a ConfigError when the merge may not crop."""
    common = min(rows)
    sizes = ", ".join(f"{clip(str(r), 120)}: {n}" for r, n in zip(refs, rows))
    crop = f"--unsafe-truncate-embeddings to keep the first {common} rows of each model ({_SAME_IDS})"
    if config.tokenizer_source is not None or config.tokenizer is not None:
        raise ConfigError(f"{clip(out_name)}: vocabulary sizes differ ({sizes}); mapping each model's rows onto the "
                          "tokenizer named by 'tokenizer_source' is not implemented yet; remove it and pass " + crop)
    if not unsafe_truncate:
        raise ConfigError(f"{clip(out_name)}: vocabulary sizes differ ({sizes}); mergekit 0.1.5 refuses this too. "
                          "mergekit's fix is 'tokenizer_source', which maps each model's rows onto one tokenizer by "
                          "token (not implemented in streammerge yet); or pass " + crop)
    return common, f"{clip(out_name)}: vocabulary sizes differ ({sizes}); --unsafe-truncate-embeddings: cropping to " \
                   f"the first {common} rows"


def check_tokenizer_source(models: dict[str, ModelFiles], archs: dict[str, Arch]) -> None:
    """With `tokenizer_source` (base or a model), mergekit 0.1.5 rebuilds every embedding on that tokenizer's
    vocabulary, row by token: the output has as many rows as the tokenizer has tokens, and a model whose
    ids differ is permuted. streammerge copies the tokenizer and merges the rows as they are, which is
    the same model only when every model's tokenizer.json has the same tokens at the same ids, numbered
    0..n-1, with n the embedding's rows; anything else is refused until the mapping is implemented."""
    embeddings = {ref: mf.tensors.get(archs[ref].embed_name() or "") for ref, mf in models.items()}
    rows_of = {ref: info.shape[0] for ref, info in embeddings.items() if info is not None and len(info.shape) == 2}
    if len(set(rows_of.values())) > 1:
        return  # vocabulary sizes that differ: `cropped_vocabulary` refuses them, once
    first: tuple[str, dict[str, int]] | None = None
    for ref, rows in rows_of.items():
        mf = models[ref]
        vocab = tokenizer_vocab(mf.path / "tokenizer.json")
        if vocab is None:
            problem = f"{clip(str(mf.path), 120)} has no readable tokenizer.json to compare"
        elif missing := special_tokens(mf.path) - set(vocab):
            problem = (f"{clip(str(mf.path), 120)} names special tokens its tokenizer.json lacks "
                       f"({clip(', '.join(sorted(missing)), 120)}), which transformers would add")
        elif sorted(vocab.values()) != list(range(len(vocab))):
            problem = f"{clip(str(mf.path), 120)}'s tokenizer.json leaves gaps in its token ids"
        elif len(vocab) != rows:
            problem = (f"{clip(str(mf.path), 120)}'s tokenizer has {len(vocab)} tokens for {rows} embedding rows, so "
                       f"mergekit's output would have {len(vocab)} rows")
        elif first is not None and vocab != first[1]:
            problem = f"the tokenizers of {clip(first[0], 120)} and {clip(str(mf.path), 120)} number their tokens differently"
        else:
            first = first or (str(mf.path), vocab)
            continue
        raise ConfigError(f"tokenizer_source: mergekit 0.1.5 rebuilds the embeddings on the source tokenizer's "
                          f"vocabulary, which here is not merging the rows as they are ({problem}); that mapping is "
                          "not implemented yet: remove tokenizer_source to merge the rows as they are with the base "
                          "model's tokenizer copied")


def tokenizer_vocab(path: Path) -> dict[str, int] | None:
    """token -> id of a Hugging Face tokenizer.json, added tokens included (what transformers' get_vocab
    gives); None when there is no such file or it cannot be read."""
    try:
        if not path.is_file() or path.stat().st_size > _MAX_TOKENIZER_BYTES:
            return None
        doc = json.loads(path.read_text(encoding="utf-8"))
        vocab = doc["model"]["vocab"]
        ids = ({tok: i for i, (tok, _score) in enumerate(vocab)} if isinstance(vocab, list)  # Unigram
               else {str(tok): int(i) for tok, i in vocab.items()})
        ids.update({str(t["content"]): int(t["id"]) for t in doc.get("added_tokens") or []})
        return ids
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return None


_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def special_tokens(model_dir: Path) -> set[str]:
    """The special tokens tokenizer_config.json and special_tokens_map.json name (transformers adds any
    that the vocabulary lacks, after its last id)."""
    found: set[str] = set()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            f = model_dir / name
            if not f.is_file() or f.stat().st_size > _MAX_TOKENIZER_BYTES:  # (a FIFO would block the read)
                continue
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if not isinstance(doc, dict):
            continue
        values = [doc.get(k) for k in _SPECIAL_KEYS] + list(doc.get("additional_special_tokens") or [])
        values += list((doc.get("added_tokens_decoder") or {}).values())
        for v in values:
            text = v.get("content") if isinstance(v, dict) else v
            if isinstance(text, str):
                found.add(text)
    return found
