"""linear / task_arithmetic / passthrough / slerp: identities, chunk invariance, slices."""

import json

import pytest
import torch

from conftest import assert_band_invariant, load_dir, merge, shard_bytes
from streammerge.io.reader import open_model

METHODS = ["linear", "task_arithmetic", "passthrough", "slerp"]


def config_for(method, base, experts):
    b, e = str(base), [str(x) for x in experts]
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(e, (0.5, 0.3, 0.2))]}
    if method == "task_arithmetic":
        return {"merge_method": "task_arithmetic", "base_model": b, "parameters": {"lambda": 0.9},
                "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(e, (0.7, [0.1, 0.6], 0.3))]}
    if method == "passthrough":
        return {"merge_method": "passthrough", "models": [{"model": e[0], "parameters": {"scale": 0.5}}]}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": b, "parameters": {"t": [0.0, 0.3, 1.0]},
                "models": [{"model": b}, {"model": e[0]}]}
    raise KeyError(method)


@pytest.mark.parametrize("method", METHODS)
def test_chunk_size_does_not_change_a_byte(method, tiny_family, tmp_path):
    base, experts = tiny_family
    cfg = config_for(method, base, experts)
    assert_band_invariant(cfg, tmp_path)


def test_linear_weight_one_zero_gives_the_first_model(tiny_family, tmp_path):
    base, experts = tiny_family
    cfg = {"merge_method": "linear", "models": [{"model": str(experts[0]), "parameters": {"weight": 1.0}},
                                                 {"model": str(experts[1]), "parameters": {"weight": 0.0}}]}
    out = load_dir(merge(cfg, tmp_path))
    ref = load_dir(experts[0])
    assert out.keys() == ref.keys()
    assert all(torch.equal(out[k], ref[k]) for k in ref)


@pytest.mark.parametrize("t, which", [(0.0, "base"), (1.0, "other")])
def test_slerp_endpoints(t, which, tiny_family, tmp_path):
    base, experts = tiny_family
    cfg = {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": t},
           "models": [{"model": str(base)}, {"model": str(experts[0])}]}
    out = load_dir(merge(cfg, tmp_path))
    ref = load_dir(base if which == "base" else experts[0])
    for k in ref:
        torch.testing.assert_close(out[k].float(), ref[k].float(), atol=0, rtol=2 ** -7)
    exact = sum(torch.equal(out[k], ref[k]) for k in ref)
    assert exact >= len(ref) * 0.9


def test_single_model_passthrough_is_itself(tiny_family, tmp_path):
    base, experts = tiny_family
    out = load_dir(merge({"merge_method": "passthrough", "models": [{"model": str(experts[1])}]}, tmp_path))
    ref = load_dir(experts[1])
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_task_arithmetic_zero_weights_give_the_base(tiny_family, tmp_path):
    base, experts = tiny_family
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base),
           "models": [{"model": str(e), "parameters": {"weight": 0.0}} for e in experts]}
    out, ref = load_dir(merge(cfg, tmp_path)), load_dir(base)
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_slices_stack_layers_and_renumber(tiny_family, tmp_path):
    base, experts = tiny_family
    n = open_model(base).config["num_hidden_layers"]
    cfg = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, n]}]},
        {"sources": [{"model": str(experts[0]), "layer_range": [1, n]}]},
    ]}
    out_dir = merge(cfg, tmp_path)
    out = load_dir(out_dir)
    total = n + n - 1
    assert json.loads((out_dir / "config.json").read_text())["num_hidden_layers"] == total
    layers = {int(k.split(".")[2]) for k in out if k.startswith("model.layers.")}
    assert layers == set(range(total))
    e0, b = load_dir(experts[0]), load_dir(base)
    assert torch.equal(out[f"model.layers.{n}.mlp.up_proj.weight"], e0["model.layers.1.mlp.up_proj.weight"].float())
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"].float())
    assert torch.equal(out["lm_head.weight"], e0["lm_head.weight"].float())  # post tensors from the last slice
    assert torch.equal(out["model.embed_tokens.weight"], b["model.embed_tokens.weight"].float())
    assert out["model.norm.weight"].dtype == torch.float32


def test_output_folder_is_a_complete_hf_checkpoint(tiny_family, tmp_path):
    base, experts = tiny_family
    out = merge(config_for("linear", base, experts), tmp_path, out_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((out / f).exists() for f in files)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in open_model(out).tensors.values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    assert "merge_method: linear" in (out / "README.md").read_text()
    assert (out / "tokenizer_config.json").exists()
    assert not list(out.glob("*.partial"))
