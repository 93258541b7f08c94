"""merge_tensors / merge_state_dicts: in memory, through the same method specs and kernels as a file
merge, and bit for bit equal to `streammerge.run` over the same tensors written as checkpoints."""

from __future__ import annotations

import pytest
import torch

import streammerge
from conftest import load_dir
from streammerge.errors import ConfigError

# method, per-model params (one per input: base, e1, e2), global params, needs a base
CASES = [
    ("linear", {"weight": [0.3, 0.5, 0.2]}, {}, False),
    ("ties", {"weight": [None, 0.6, 0.4], "density": [None, 0.5, 0.3]}, {}, True),
    ("ties", {"weight": [None, 0.6, 0.4], "density": [None, 0.5, 0.5]}, {"scope": "model"}, True),
    ("dare_ties", {"weight": [None, 0.6, 0.4], "density": [None, 0.5, 0.7]}, {}, True),
    ("sce", {}, {"select_topk": 0.5}, True),
    ("widen", {}, {}, True),
]


def _state_dicts(tiny_family) -> dict[str, dict[str, torch.Tensor]]:
    base, experts = tiny_family
    return {"base": load_dir(base), "e1": load_dir(experts[0]), "e2": load_dir(experts[1])}


def _file_config(tiny_family, method, per_model, global_params, needs_base) -> dict:
    base, experts = tiny_family
    paths = [base, experts[0], experts[1]]
    models = []
    for j, p in enumerate(paths):
        params = {k: v[j] for k, v in per_model.items() if v[j] is not None}
        models.append({"model": str(p), **({"parameters": params} if params else {})})
    cfg = {"merge_method": method, "models": models, "parameters": global_params}
    return cfg | ({"base_model": str(base)} if needs_base else {})


@pytest.mark.parametrize("method, per_model, global_params, needs_base", CASES,
                         ids=[f"{c[0]}-{c[2].get('scope', 'tensor')}" for c in CASES])
def test_state_dict_merge_equals_the_file_merge_bit_for_bit(tiny_family, tmp_path, method, per_model, global_params,
                                                            needs_base):
    sds = _state_dicts(tiny_family)
    params = {k: [x for x in v if x is not None] for k, v in per_model.items()} | global_params  # one per non-base
    got = streammerge.merge_state_dicts(sds, method, parameters=params, base="base" if needs_base else None, seed=5)
    cfg = _file_config(tiny_family, method, per_model, global_params, needs_base)
    streammerge.run(cfg, tmp_path / "out", max_memory="2GiB", seed=5, chunk_rows=7)   # bands of 7 rows
    ref = load_dir(tmp_path / "out")
    assert list(got) == list(sds["base"]) and set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k


def test_merge_tensors_is_one_tensor_of_the_state_dict_merge(tiny_family):
    sds = _state_dicts(tiny_family)
    name = "model.layers.1.mlp.up_proj.weight"
    params = {"weight": {"e1": 0.6, "e2": 0.4}, "density": 0.5}
    whole = streammerge.merge_state_dicts(sds, "dare_ties", parameters=params, base="base", seed=3)
    one = streammerge.merge_tensors([sds[i][name] for i in ("base", "e1", "e2")], "dare_ties", parameters=params,
                                    ids=["base", "e1", "e2"], base_index=0, name=name, seed=3)
    assert torch.equal(one, whole[name])
    # the mask is a function of the tensor's name and the seed: another name or seed draws another
    other = streammerge.merge_tensors([sds[i][name] for i in ("base", "e1", "e2")], "dare_ties", parameters=params,
                                      ids=["base", "e1", "e2"], base_index=0, name=name, seed=4)
    assert not torch.equal(other, one)


def test_per_model_values_as_a_list_per_input_per_non_base_input_a_dict_or_a_scalar():
    g = torch.Generator().manual_seed(0)
    base, a, b = (torch.randn(8, 4, generator=g) for _ in range(3))
    forms = [{"weight": [0.0, 0.7, 0.3]}, {"weight": [0.7, 0.3]}, {"weight": {0: 0.0, 1: 0.7, 2: 0.3}}]
    results = [streammerge.merge_tensors([base, a, b], "task_arithmetic", parameters=p, base_index=0) for p in forms]
    expected = base + 0.7 * (a - base) + 0.3 * (b - base)
    for r in results:
        assert torch.equal(r, results[0])
    assert torch.allclose(results[0], expected, atol=1e-6)
    same = streammerge.merge_tensors([base, a, b], "task_arithmetic", parameters={"weight": 0.5}, base_index=0)
    assert torch.allclose(same, base + 0.5 * (a - base) + 0.5 * (b - base), atol=1e-6)


def test_dtype_and_out_dtype():
    x = torch.randn(6, 3, dtype=torch.float32)
    y = torch.randn(6, 3, dtype=torch.bfloat16)
    mixed = streammerge.merge_tensors([x, y], "linear", parameters={"weight": 1.0})
    assert mixed.dtype == torch.float32   # promoted, as mergekit promotes
    assert torch.equal(mixed, (x + y.float()) / 2)
    low = streammerge.merge_tensors([x, y], "linear", parameters={"weight": 1.0}, dtype="bfloat16", out_dtype="fp32")
    assert low.dtype == torch.float32 and torch.equal(low, ((x.bfloat16() + y) / 2).float())


def test_inputs_are_never_modified_or_aliased():
    g = torch.Generator().manual_seed(1)
    base, a, b = (torch.randn(16, 8, generator=g) for _ in range(3))
    before = [t.clone() for t in (base, a, b)]
    for method, params in (("ties", {"weight": 0.5, "density": 0.5}), ("passthrough", {}), ("sce", {})):
        inputs = [base] if method == "passthrough" else [base, a, b]
        out = streammerge.merge_tensors(inputs, method, parameters=params, base_index=None if method == "passthrough"
                                        else 0)
        out.add_(1)
    assert all(torch.equal(t, u) for t, u in zip((base, a, b), before))


def test_non_float_tensors_are_copied_when_equal_and_refused_when_not():
    idx = torch.arange(4)
    m1 = {"w": torch.ones(2, 2), "position_ids": idx}
    m2 = {"w": torch.zeros(2, 2), "position_ids": idx.clone()}
    out = streammerge.merge_state_dicts([m1, m2], "linear", parameters={"weight": 1.0})
    assert torch.equal(out["position_ids"], idx) and torch.equal(out["w"], torch.full((2, 2), 0.5))
    m2["position_ids"] = idx + 1
    with pytest.raises(ConfigError, match="tensor 'position_ids' is not floating point and differs"):
        streammerge.merge_state_dicts([m1, m2], "linear", parameters={"weight": 1.0})


def test_modules_and_strict():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    out = streammerge.merge_state_dicts({"a": a, "b": b}, "linear", parameters={"weight": {"a": 1.0, "b": 3.0}})
    assert torch.allclose(out["weight"], (a.weight + 3 * b.weight) / 4) and not out["weight"].requires_grad
    extra = dict(b.state_dict(), scale=torch.ones(2))
    with pytest.raises(ConfigError, match="model 'b' does not hold the same tensors as model 'a'.*'scale'"):
        streammerge.merge_state_dicts({"a": a, "b": extra}, "linear", parameters={"weight": 1.0})
    loose = streammerge.merge_state_dicts({"a": a, "b": extra}, "linear", parameters={"weight": 1.0}, strict=False)
    assert set(loose) == {"weight", "bias"}


def test_mistakes_are_clear_errors():
    x, y = torch.ones(2, 2), torch.zeros(2, 2)
    with pytest.raises(ConfigError, match="unknown method 'tie'; did you mean 'ties'"):
        streammerge.merge_tensors([x, y], "tie")
    with pytest.raises(ConfigError, match="method 'ties' needs a base model; pass base_index="):
        streammerge.merge_tensors([x, y], "ties", parameters={"weight": 1.0})
    with pytest.raises(ConfigError, match="parameters.densty: method 'ties' has no parameter 'densty'; did you mean "
                                          "'density'"):
        streammerge.merge_tensors([x, y], "ties", parameters={"weight": 1.0, "densty": 0.5}, base_index=0)
    with pytest.raises(ConfigError, match="needs parameter 'weight' for input 1"):
        streammerge.merge_tensors([x, y], "ties", base_index=0)
    with pytest.raises(ConfigError, match="parameters.weight: 3 values for 2 inputs"):
        streammerge.merge_tensors([x, y], "linear", parameters={"weight": [1, 2, 3]})
    with pytest.raises(ConfigError, match="parameters.density: parameter 'density' must be in"):
        streammerge.merge_tensors([x, y], "ties", parameters={"weight": 1.0, "density": 1.5}, base_index=0)
    with pytest.raises(ConfigError, match="'t' is a global parameter of 'slerp' and takes one value here; gradients"):
        streammerge.merge_tensors([x, y], "slerp", parameters={"t": [0, 1]}, base_index=0)
    with pytest.raises(ConfigError, match="different shapes"):
        streammerge.merge_tensors([x, torch.zeros(3, 2)], "linear", parameters={"weight": 1.0})
    with pytest.raises(ConfigError, match="method 'slerp' takes exactly 1 model"):
        streammerge.merge_tensors([x, y, y], "slerp", parameters={"t": 0.5}, base_index=0)
    with pytest.raises(TypeError, match="model 0: expected a state dict"):
        streammerge.merge_state_dicts([[x]], "linear")
