"""Synthetic checkpoints: deterministic, HF-shaped, sharded like transformers, loadable by transformers."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from streammerge.errors import CheckpointError, OutputError
from streammerge.synth import (
    MANIFEST_NAME,
    PRESETS,
    SynthSpec,
    is_complete,
    make_family,
    tensor_shapes,
    write_checkpoint,
)

TINY = PRESETS["tiny"]


def _load(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _weight_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.glob("*.safetensors"))}


def test_presets_have_the_advertised_sizes() -> None:
    assert PRESETS["1b"].n_params == 1_100_048_384  # TinyLlama-1.1B's count
    assert 20e6 < PRESETS["small"].n_params < 30e6
    assert PRESETS["3b"].n_params == 3_426_473_600  # OpenLLaMA-3B's count
    assert 6.8e9 < PRESETS["3b"].n_bytes < 6.9e9
    assert TINY == SynthSpec(hidden=64, intermediate=176, layers=4, vocab=256, heads=4, kv_heads=2)


def test_same_call_gives_the_same_bytes(tmp_path: Path) -> None:
    a_base, a_exp = make_family(tmp_path / "a", TINY, 2, seed=7, shard_size=100_000)
    b_base, b_exp = make_family(tmp_path / "b", TINY, 2, seed=7, shard_size=100_000)
    for a, b in zip([a_base, *a_exp], [b_base, *b_exp]):
        assert _weight_bytes(a) == _weight_bytes(b)
        assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
        assert (a / "model.safetensors.index.json").read_bytes() == (b / "model.safetensors.index.json").read_bytes()


def test_thread_count_does_not_change_bytes(tmp_path: Path) -> None:
    one = write_checkpoint(tmp_path / "one", TINY, seed=3, threads=1)
    two = write_checkpoint(tmp_path / "two", TINY, seed=3, threads=2)
    assert _weight_bytes(one) == _weight_bytes(two)


def test_seed_and_model_index_change_the_weights(tmp_path: Path) -> None:
    a = _load(write_checkpoint(tmp_path / "a", TINY, seed=0))
    b = _load(write_checkpoint(tmp_path / "b", TINY, seed=1))
    c = _load(write_checkpoint(tmp_path / "c", TINY, seed=0, model_index=1))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[name], b[name])
    assert not torch.equal(a[name], c[name])


def test_base_statistics(tmp_path: Path) -> None:
    t = _load(write_checkpoint(tmp_path / "m", TINY, seed=0))
    w = t["model.embed_tokens.weight"].float()
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.001
    norm = t["model.norm.weight"].float()
    assert abs(norm.mean().item() - 1.0) < 0.01


def test_experts_are_base_plus_noise_and_differ(tmp_path: Path) -> None:
    base, experts = make_family(tmp_path, TINY, 3, seed=0, noise=0.01)
    b = _load(base)
    e = [_load(p) for p in experts]
    for name in b:
        for k, ek in enumerate(e):
            delta = ek[name].float() - b[name].float()
            # bf16 rounding of base + delta blurs the std a little; 1e-2 noise is far above it.
            assert 0.008 < delta.std().item() < 0.012, (name, k)
        assert not torch.equal(e[0][name], e[1][name])
        assert not torch.equal(e[1][name], e[2][name])
    manifest = json.loads((experts[0] / MANIFEST_NAME).read_text())
    assert manifest["model_index"] == 1 and manifest["noise"] == 0.01
    assert manifest["base"] == str(base.resolve())


def test_names_shapes_and_order_match_llama(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "m", TINY, seed=0)
    got = _load(path)
    expected = dict(tensor_shapes(TINY))
    assert {k: tuple(v.shape) for k, v in got.items()} == expected
    assert len(expected) == 2 + 9 * TINY.layers + 1
    assert expected["model.layers.3.self_attn.k_proj.weight"] == (2 * 16, 64)
    assert expected["model.layers.0.mlp.down_proj.weight"] == (64, 176)
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    assert not (path / "model.safetensors.index.json").exists()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 176, 4)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (4, 2, 256)
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == "bfloat16"
    for f in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", MANIFEST_NAME):
        assert (path / f).is_file(), f


def test_sharding_index_covers_every_tensor_in_layer_order(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "m", TINY, seed=0, shard_size=60_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shapes = tensor_shapes(TINY)
    assert set(index["weight_map"]) == {name for name, _ in shapes}
    n_bytes = sum(torch.Size(s).numel() * 2 for _, s in shapes)
    assert index["metadata"]["total_size"] == n_bytes == TINY.n_bytes
    files = sorted({f for f in index["weight_map"].values()})
    n = len(files)
    assert n > 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (path / "model.safetensors").exists()
    # Files are filled in layer order: the shard number never decreases along the HF order.
    shard_of = [files.index(index["weight_map"][name]) for name, _ in shapes]
    assert shard_of == sorted(shard_of)
    for f in files:
        with safe_open(str(path / f), framework="pt") as h:
            assert set(h.keys()) == {k for k, v in index["weight_map"].items() if v == f}
            assert h.metadata() == {"format": "pt"}
        nbytes = sum(torch.Size(s).numel() * 2 for k, s in shapes if index["weight_map"][k] == f)
        assert nbytes <= 60_000 or len([1 for v in index["weight_map"].values() if v == f]) == 1


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_other_dtypes_and_tied_embeddings(tmp_path: Path, dtype: str) -> None:
    spec = replace(TINY, dtype=dtype, tie_embeddings=True)
    base, (expert,) = make_family(tmp_path, spec, 1, seed=0)
    t = _load(expert)
    assert "lm_head.weight" not in t
    assert all(v.dtype == getattr(torch, dtype) for v in t.values())
    cfg = json.loads((expert / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == dtype


def test_refuses_to_overwrite_and_checks_the_base(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "m", TINY, seed=0)
    with pytest.raises(OutputError, match="already exists and is not empty; pass overwrite=True"):
        write_checkpoint(path, TINY, seed=0)
    write_checkpoint(path, TINY, seed=1, overwrite=True)
    assert not list(tmp_path.glob(".m.partial-*"))
    with pytest.raises(CheckpointError, match="has shape .* the spec needs"):
        write_checkpoint(tmp_path / "e", replace(TINY, hidden=128, heads=8), seed=0, base=path)
    with pytest.raises(CheckpointError, match="found neither model.safetensors"):
        write_checkpoint(tmp_path / "e2", TINY, seed=0, base=tmp_path)
    with pytest.raises(ValueError, match="SynthSpec.dtype"):
        replace(TINY, dtype="int8")


@pytest.fixture
def transformers(monkeypatch: pytest.MonkeyPatch):
    """transformers, kept from importing the repo's `kernels/` folder as the HF `kernels` package.

    transformers probes for a package named `kernels` (Hugging Face's, a dependency from 5.25 on);
    where the only one it would find is our checkout's folder, a None entry in sys.modules hides it.
    """
    from conftest import checkout_kernels_on_path

    if "kernels" not in sys.modules and checkout_kernels_on_path():
        monkeypatch.setitem(sys.modules, "kernels", None)
    return pytest.importorskip("transformers", reason="transformers is not installed")


def test_loads_in_transformers_and_runs_forward(tmp_path: Path, transformers) -> None:
    base, (expert,) = make_family(tmp_path, TINY, 1, seed=0, shard_size=100_000)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(expert, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 4, TINY.vocab) and torch.isfinite(logits).all()
    loaded = dict(model.state_dict())
    on_disk = _load(expert)
    assert torch.equal(loaded["model.layers.2.mlp.up_proj.weight"], on_disk["model.layers.2.mlp.up_proj.weight"])


def test_tokenizer_files_load(tmp_path: Path, transformers) -> None:
    pytest.importorskip("tokenizers", reason="tokenizers is not installed: no tokenizer.json is written")
    path = write_checkpoint(tmp_path / "m", TINY, seed=0)
    assert (path / "tokenizer.json").is_file()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert tok("the merge model")["input_ids"] == [1, 3, 5, 6]
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)


def test_make_family_reuse_keeps_complete_models_and_rewrites_others(tmp_path: Path) -> None:
    base, experts = make_family(tmp_path, TINY, 2, seed=0, reuse=True)
    assert is_complete(base, TINY, 0) and is_complete(experts[1], TINY, 0, base=base, model_index=2)
    assert not is_complete(experts[1], TINY, 0, base=base, model_index=1)
    stamp = {p: (p / "config.json").stat().st_mtime_ns for p in [base, *experts]}
    before = _weight_bytes(experts[0])
    (experts[0] / MANIFEST_NAME).unlink()  # as if interrupted: expert_1 is incomplete
    make_family(tmp_path, TINY, 2, seed=0, reuse=True)
    assert (base / "config.json").stat().st_mtime_ns == stamp[base]
    assert (experts[1] / "config.json").stat().st_mtime_ns == stamp[experts[1]]
    assert is_complete(experts[0], TINY, 0, base=base, model_index=1)
    assert _weight_bytes(experts[0]) == before


def test_the_spec_module_does_not_import_torch() -> None:
    """The command line lists the presets from ``synth_spec`` at parse time, so it must stay torch-free."""
    import subprocess

    code = ("import sys; from streammerge.synth_spec import PRESETS; "
            "print(PRESETS['1b'].n_bytes, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(PRESETS["1b"].n_params * 2), "False"]
