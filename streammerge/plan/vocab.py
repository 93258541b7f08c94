"""Embeddings whose vocabularies differ, decided from the headers as mergekit 0.1.5 decides at run time.

mergekit refuses them ("Tensor size mismatch") unless a tokenizer section maps each model's rows onto
one vocabulary, or `--unsafe-truncate-embeddings` keeps the first rows common to all (it trusts that
those token ids mean the same everywhere). streammerge refuses in `check`, before any data is read,
with both sizes and the fix; the crop is taken only when asked for, and the tokenizer mapping is not
implemented yet, so a config that asks for it is refused rather than merged differently.
"""

from __future__ import annotations

from ..config import MergeConfig
from ..errors import ConfigError, clip

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
