"""Vocabulary sizes that differ: an error from `check` (headers only) where mergekit 0.1.5 errors, and
mergekit's crop with --unsafe-truncate-embeddings."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_yaml
from streammerge import RunOptions, check, run
from streammerge.cli import main
from streammerge.errors import ConfigError
from streammerge.io.reader import RowReader


@pytest.fixture(scope="module")
def vocab_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny base (256 rows) and a model of the same backbone with 300 rows."""
    from streammerge import synth

    root = tmp_path_factory.mktemp("vocab")
    base = synth.write_checkpoint(root / "base", synth.PRESETS["tiny"], seed=3)
    big = synth.write_checkpoint(root / "big", dataclasses.replace(synth.PRESETS["tiny"], vocab=300), seed=9)
    return base, big


@pytest.fixture
def no_data_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read; the headers alone should have told")

    monkeypatch.setattr(RowReader, "read_rows", refuse)


def _config(tmp_path: Path, big: Path, base: Path, w_big: float = 0.5, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(big), "parameters": {"weight": w_big}},
                                                  {"model": str(base), "parameters": {"weight": 1 - w_big}}], **extra}


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_mismatch_is_a_check_error_naming_sizes_models_and_fix(vocab_pair, tmp_path, capsys, no_data_reads):
    base, big = vocab_pair
    cfg = write_yaml(tmp_path / "m.yml", _config(tmp_path, big, base))
    with pytest.raises(ConfigError) as e:
        check(cfg, RunOptions(max_memory=2 << 30))
    msg = str(e.value)
    assert f"vocabulary sizes differ ({big}: 300, {base}: 256)" in msg
    assert "tokenizer_source" in msg and "--unsafe-truncate-embeddings to keep the first 256 rows" in msg
    assert "(and 1 more like it)" in msg  # lm_head too, reported once
    assert main(["check", str(cfg)]) == 1
    err = _flat(capsys.readouterr().err)
    assert err.startswith("error:") and "vocabulary sizes differ" in err and "--unsafe-truncate-embeddings" in err


def test_unsafe_truncate_crops_to_the_smallest_with_a_warning(vocab_pair, tmp_path, capsys):
    base, big = vocab_pair
    cfg = write_yaml(tmp_path / "m.yml", _config(tmp_path, big, base, w_big=1.0))
    warning = (f"model.embed_tokens.weight: vocabulary sizes differ ({big}: 300, {base}: 256); "
               "--unsafe-truncate-embeddings: cropping to the first 256 rows")
    assert warning in check(cfg, RunOptions(max_memory=2 << 30, unsafe_truncate_embeddings=True)).warnings
    assert main(["check", str(cfg), "--unsafe-truncate-embeddings"]) == 0
    assert _flat(warning) in _flat(capsys.readouterr().err)  # a diagnostic: stderr
    out = tmp_path / "out"
    assert main(["run", str(cfg), str(out), "--no-progress", "--unsafe-truncate-embeddings", "--max-memory", "2GiB"]) == 0
    merged, source = load_file(out / "model.safetensors"), load_file(big / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape == (256, 64)
        assert torch.equal(merged[name], source[name][:256])  # weight 1 on the big model: its first rows
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 256


def test_no_unsafe_truncate_undoes_the_flag(vocab_pair, tmp_path):
    base, big = vocab_pair
    cfg = write_yaml(tmp_path / "m.yml", _config(tmp_path, big, base))
    assert main(["check", str(cfg), "--unsafe-truncate-embeddings", "--no-unsafe-truncate-embeddings"]) == 1


def test_tokenizer_source_with_differing_vocabularies_is_refused(vocab_pair, tmp_path):
    """mergekit maps rows by token for tokenizer_source (the tokenizer-union work); until streammerge does,
    cropping instead would be a different model, so it is an error, with or without the crop flag."""
    base, big = vocab_pair
    cfg = write_yaml(tmp_path / "m.yml", _config(tmp_path, big, base, tokenizer_source="base", base_model=str(base)))
    for unsafe in (False, True):
        with pytest.raises(ConfigError, match="mapping each model's rows onto the tokenizer named by 'tokenizer_source' "
                                              "is not implemented yet"):
            check(cfg, RunOptions(max_memory=2 << 30, unsafe_truncate_embeddings=unsafe))


@pytest.mark.parity
def test_mergekit_refuses_and_crops_the_same(vocab_pair, tmp_path):
    from e2e.parity import mergekit_or_skip

    mergekit_or_skip()
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    base, big = vocab_pair
    doc = _config(tmp_path, big, base, w_big=0.3)

    def mergekit(out: Path, unsafe: bool) -> None:
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(doc))), str(out),
                  MergeOptions(lazy_unpickle=True, copy_tokenizer=False, write_model_card=False, quiet=True,
                               unsafe_truncate_embeddings=unsafe))

    with pytest.raises(ValueError, match="Tensor size mismatch"):
        mergekit(tmp_path / "mk0", unsafe=False)
    with pytest.raises(ConfigError, match="vocabulary sizes differ"):
        check(write_yaml(tmp_path / "m.yml", doc), RunOptions(max_memory=2 << 30))
    mergekit(tmp_path / "mk", unsafe=True)
    run(tmp_path / "m.yml", tmp_path / "ours", RunOptions(max_memory=2 << 30, progress=False,
                                                          unsafe_truncate_embeddings=True))
    theirs, ours = load_file(tmp_path / "mk" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors")
    assert set(theirs) == set(ours)
    for name in theirs:
        assert torch.equal(theirs[name], ours[name]), name
    # mergekit leaves config.json's vocab_size as its donor's (chosen in set order: 256 or 300); ours matches
    # the tensors written (docs/compatibility.md)
    assert json.loads((tmp_path / "mk" / "config.json").read_text())["vocab_size"] in (256, 300)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"] == 256
