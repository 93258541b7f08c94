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
from streammerge import RunOptions, run
from streammerge.merge import check
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


# -- tokenizer_source: taken only where mergekit's mapping by token would change nothing ----------------------

def _tokenizer_json(d: Path, tokens: list[str]) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    # BPE: the only kind mergekit 0.1.5's tokenizer code takes
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[],
                                                     unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    (d / "tokenizer.json").write_text(tok.to_str())


@pytest.fixture(scope="module")
def full_vocab(tmp_path_factory, tiny_family) -> tuple[Path, list[Path]]:
    """Copies of the tiny family whose tokenizers number exactly the embeddings' 256 rows."""
    import shutil

    base, experts = tiny_family
    root = tmp_path_factory.mktemp("fullvocab")
    out = []
    for m in (base, *experts[:2]):
        shutil.copytree(m, root / m.name)
        _tokenizer_json(root / m.name, ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(253)])
        out.append(root / m.name)
    return out[0], out[1:]


def _ta(base: Path, experts: list[Path], **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base), **extra,
            "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(experts, (0.6, 0.3))]}


def test_tokenizer_source_with_fewer_tokens_than_rows_is_refused(tiny_family, tmp_path):
    base, experts = tiny_family  # the synthetic tokenizer has 19 tokens for 256 rows
    cfg = write_yaml(tmp_path / "c.yml", _ta(base, experts[:2], tokenizer_source="base"))
    with pytest.raises(ConfigError) as e:
        check(cfg, RunOptions(max_memory=2 << 30))
    assert f"{base}'s tokenizer has 19 tokens for 256 embedding rows, so mergekit's output would have 19 rows" in str(e.value)
    assert "remove tokenizer_source" in str(e.value)


def test_tokenizer_source_with_differently_numbered_tokens_is_refused(full_vocab, tmp_path):
    import shutil

    base, experts = full_vocab
    other = tmp_path / "other"
    shutil.copytree(experts[1], other)
    _tokenizer_json(other, ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in reversed(range(253))])
    cfg = write_yaml(tmp_path / "c.yml", _ta(base, [experts[0], other], tokenizer={"source": "base"}))
    with pytest.raises(ConfigError, match="number their tokens differently"):
        check(cfg, RunOptions(max_memory=2 << 30))


def test_tokenizer_source_of_identical_full_tokenizers_is_mergekits(full_vocab, tmp_path):
    """Where the mapping changes nothing, streammerge runs tokenizer_source and matches mergekit bit for
    bit; with the 19-token tokenizers mergekit writes 19 rows, which is why that case is refused."""
    base, experts = full_vocab
    doc = _ta(base, experts, tokenizer_source=str(experts[1]))
    run(write_yaml(tmp_path / "c.yml", doc), tmp_path / "ours", RunOptions(max_memory=2 << 30, progress=False))
    assert (tmp_path / "ours" / "tokenizer.json").read_text() == (experts[1] / "tokenizer.json").read_text()
    from e2e.parity import mergekit_or_skip

    mergekit_or_skip()
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(doc))), str(tmp_path / "mk"),
              MergeOptions(lazy_unpickle=True, quiet=True, write_model_card=False))
    theirs, ours = load_file(tmp_path / "mk" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors")
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_tokenizer_source_writes_the_tokenizer_even_with_no_copy_tokenizer(full_vocab, tmp_path):
    """As mergekit saves the tokenizer it builds for tokenizer_source whatever --no-copy-tokenizer says."""
    base, experts = full_vocab
    cfg = write_yaml(tmp_path / "c.yml", _ta(base, experts, tokenizer_source="base"))
    run(cfg, tmp_path / "o", RunOptions(max_memory=2 << 30, progress=False, copy_tokenizer=False))
    assert (tmp_path / "o" / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    run(write_yaml(tmp_path / "d.yml", _ta(base, experts)), tmp_path / "p",
        RunOptions(max_memory=2 << 30, progress=False, copy_tokenizer=False))
    assert not (tmp_path / "p" / "tokenizer.json").exists()


def test_tokenizer_vocab_reads_every_kind_and_the_added_tokens(tmp_path):
    from streammerge.plan.vocab import special_tokens, tokenizer_vocab

    f = tmp_path / "tokenizer.json"
    f.write_text(json.dumps({"model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["a", -1.0]]},
                             "added_tokens": [{"id": 2, "content": "<|im_end|>"}]}))
    assert tokenizer_vocab(f) == {"<unk>": 0, "a": 1, "<|im_end|>": 2}
    f.write_text("[1, 2]")
    assert tokenizer_vocab(f) is None and tokenizer_vocab(tmp_path / "missing.json") is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>",
                                                                "added_tokens_decoder": {"5": {"content": "<x>"}}}))
    assert special_tokens(tmp_path) == {"<s>", "</s>", "<x>"}
