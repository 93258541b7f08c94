"""The input models as the planner sees them: opened from headers, checked as a set (no empty model, one
depth for a `models:` merge), and the config.json the output is given.

Kept apart from `build` so that what makes a set of inputs mergeable is in one place, with its errors.
"""

from __future__ import annotations

from pathlib import Path

from ..arch import LAYER_COUNT_KEYS, Arch, infer_arch
from ..config import MergeConfig
from ..errors import CheckpointError, ConfigError, StreammergeError
from ..hub.open import open_ref
from ..io.reader import ModelFiles
from .ir import TensorPlan


def open_inputs(refs: list[str], config_dir: Path | None) -> tuple[dict[str, ModelFiles], dict[str, Arch],
                                                                    list[StreammergeError]]:
    """Every referenced model's inventory, and the problems of those that cannot be merged."""
    models: dict[str, ModelFiles] = {}
    archs: dict[str, Arch] = {}
    problems: list[StreammergeError] = []
    for ref in refs:
        try:
            mf = open_ref(ref, config_dir)
            if not mf.tensors:  # it would merge into an output with no weights, exit 0
                raise CheckpointError(f"{mf.path}: holds no tensors (its safetensors headers list none); the "
                                      "download or export is incomplete, or this is not the model folder meant")
            archs[ref] = infer_arch(mf)
            models[ref] = mf
        except (CheckpointError, ConfigError) as e:
            problems.append(e)
    return models, archs, problems


def check_same_depth(config: MergeConfig, archs: dict[str, Arch]) -> None:
    """A `models:` merge takes every layer of every model (the base too): models of different depths
    would lose the deeper one's extra layers without a word, so they are refused."""
    if config.models is None:
        return
    refs = list(dict.fromkeys([m.model for m in config.models] + ([config.base_model] if config.base_model else [])))
    depths = {ref: archs[ref].num_layers for ref in refs}
    if len(set(depths.values())) > 1:
        listed = ", ".join(f"{ref!r} has {n} layers" for ref, n in depths.items())
        raise ConfigError(f"models: the models have different layer counts ({listed}); a 'models:' merge takes "
                          "every layer of every model, so use 'slices:' with a layer_range per model to choose "
                          "which layers to merge")


def config_source(models: dict[str, ModelFiles], refs: list[str], ref_name: str) -> tuple[str, str | None]:
    """The model whose config.json the output gets: the reference model's, else the first model that has
    one (they share a backbone: every tensor's shape was checked), with a warning saying so."""
    if models[ref_name].config is not None:
        return ref_name, None
    other = next((r for r in refs if models[r].config is not None), None)
    if other is None:
        return ref_name, None
    return other, (f"{models[ref_name].path} has no config.json; the output's config.json is {models[other].path}'s "
                   "(its layer count, vocabulary and dtype adjusted to the merge)")


def embedding_rows(tensors: list[TensorPlan], arch: Arch) -> int | None:
    """The output vocabulary: the input embedding's rows (smaller than config.json's when cropped)."""
    name = arch.embed_name()
    return next((t.shape[0] for t in tensors if t.name == name and len(t.shape) == 2), None)


def out_config(config: dict | None, layers: int, dtype: str | None, arch: Arch, vocab: int | None = None) -> dict | None:
    """config.json of the output: the source's, with the merge's layer count, vocabulary and dtype."""
    if config is None:
        return None
    out = dict(config)
    if vocab is not None and isinstance(out.get("vocab_size"), int) and out["vocab_size"] > vocab:
        out["vocab_size"] = vocab
    for key in LAYER_COUNT_KEYS:
        if key in out and isinstance(out[key], int) and arch.num_layers:
            out[key] = layers
    if dtype:
        out["torch_dtype"] = dtype  # transformers < 5 reads this key
        out["dtype"] = dtype        # transformers >= 5 reads this one
    return out
