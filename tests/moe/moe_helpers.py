"""MoE test helpers and fixtures: a tiny Llama-shaped base and experts (streammerge.synth) with a tiny
BPE tokenizer trained here; the gates cache in a temp folder. Imported by the tests (a second
conftest.py would shadow tests/conftest.py's module name)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from streammerge.synth import SynthSpec, make_family

CORPUS = [
    "the cat sat on the mat", "a dog ran in the park", "merge the model weights", "stream a tensor shard",
    "python code compiles fast", "write a function in rust", "the sea is deep and blue", "count one two three",
    "math proofs need care", "sum the numbers and divide", "poems rhyme in spring", "cooking rice with salt",
] * 4

SPEC = SynthSpec(hidden=64, intermediate=96, layers=3, vocab=128, heads=4, kv_heads=2, dtype="bfloat16")


def train_tokenizer(folder: Path) -> None:
    """A real BPE tokenizer (<unk> <s> </s> first, as Llama numbers them), tokenizer_config with bos <s>."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=SPEC.vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() <= SPEC.vocab
    (folder / "tokenizer.json").write_text(tok.to_str())
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
           "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="session")
def moe_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("moe_family")
    base, experts = make_family(root, SPEC, 4, seed=7, noise=0.05)
    train_tokenizer(base)
    return base, experts


PROMPTS = [
    (["python code compiles fast", "write a function in rust"], None),
    (["math proofs need care", "sum the numbers and divide"], ["count one two three"]),
    (["the cat sat on the mat", "a dog ran in the park"], None),
    (["poems rhyme in spring", "the sea is deep and blue"], None),
]


def moe_config(base: Path, experts: list[Path], n: int = 2, **extra) -> dict:
    exps = []
    for e, (pos, neg) in zip(experts[:n], PROMPTS):
        d = {"source_model": str(e), "positive_prompts": pos}
        if neg:
            d["negative_prompts"] = neg
        exps.append(d)
    return {"base_model": str(base), "experts": exps, **extra}


def write_config(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _gates_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMMERGE_CACHE", str(tmp_path / "cache"))
