"""The plan's shape: passes, chunking, shards, and that planning reads no tensor data."""

import pytest

from conftest import write_yaml
from streammerge import RunOptions
from streammerge.merge import check
from streammerge.errors import BudgetError, ConfigError


def _linear(base, experts):
    return {"merge_method": "linear", "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts]}


def test_linear_is_one_map_pass_and_slerp_a_reduce_then_map(tiny_family, tmp_path):
    base, experts = tiny_family
    plan = check(write_yaml(tmp_path / "l.yml", _linear(base, experts)), RunOptions(max_memory=2 << 30))
    assert {t.passes for t in plan.tensors} == {1}
    assert all(len(t.inputs) == 3 for t in plan.tensors)
    slerp = {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.5},
             "models": [{"model": str(base)}, {"model": str(experts[0])}]}
    plan = check(write_yaml(tmp_path / "s.yml", slerp), RunOptions(max_memory=2 << 30))
    assert {t.passes for t in plan.tensors} == {2}


def test_check_reads_no_tensor_data(tiny_family, tmp_path, monkeypatch):
    from streammerge.io import reader

    def boom(*a, **k):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(reader.RowReader, "read_rows", boom)
    monkeypatch.setattr(reader.RowReader, "pread_into", boom)
    base, experts = tiny_family
    plan = check(write_yaml(tmp_path / "l.yml", _linear(base, experts)), RunOptions(max_memory=2 << 30))
    assert plan.tensors


def test_shards_respect_the_size_limit_and_cover_every_tensor(tiny_family, tmp_path):
    base, experts = tiny_family
    plan = check(write_yaml(tmp_path / "l.yml", _linear(base, experts)), RunOptions(max_memory=2 << 30, out_shard_size=60_000))
    assert len(plan.shards) > 1
    names = [n for s in plan.shards for n in s.tensors]
    assert sorted(names) == sorted(t.name for t in plan.tensors)
    by_name = {t.name: t for t in plan.tensors}
    for s in plan.shards:
        assert s.nbytes <= 60_000 or len(s.tensors) == 1
        assert s.nbytes == sum(by_name[n].bytes_out for n in s.tensors)
    assert plan.shards[0].filename == f"model-00001-of-{len(plan.shards):05d}.safetensors"


def test_small_budget_gives_smaller_bands_and_a_too_small_one_is_an_error(tiny_family, tmp_path):
    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "l.yml", _linear(base, experts))
    forced = check(cfg, RunOptions(max_memory=2 << 30, chunk_rows=7))
    assert max(t.rows_per_chunk for t in forced.tensors) == 7
    with pytest.raises(BudgetError) as e:
        check(cfg, RunOptions(max_memory=10 << 20))
    assert "--max-memory" in str(e.value)


def test_method_contract_errors_before_any_data(tiny_family, tmp_path):
    base, experts = tiny_family
    slerp_no_base = {"merge_method": "slerp", "parameters": {"t": 0.5},
                     "models": [{"model": str(experts[0])}, {"model": str(experts[1])}]}
    with pytest.raises(ConfigError, match="needs a base model"):
        check(write_yaml(tmp_path / "a.yml", slerp_no_base), RunOptions(max_memory=2 << 30))
    slerp_three = {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.5},
                   "models": [{"model": str(base)}] + [{"model": str(e)} for e in experts[:2]]}
    with pytest.raises(ConfigError, match="exactly 1 model"):
        check(write_yaml(tmp_path / "b.yml", slerp_three), RunOptions(max_memory=2 << 30))
    missing_weight = {"merge_method": "linear", "models": [{"model": str(e)} for e in experts]}
    with pytest.raises(ConfigError, match="needs parameter 'weight'"):
        check(write_yaml(tmp_path / "c.yml", missing_weight), RunOptions(max_memory=2 << 30))
    typo = _linear(base, experts) | {"parameters": {"normalise": True}}
    with pytest.raises(ConfigError, match="did you mean 'normalize'"):
        check(write_yaml(tmp_path / "d.yml", typo), RunOptions(max_memory=2 << 30))


def test_missing_model_path_is_named(tmp_path):
    cfg = {"merge_method": "linear", "models": [{"model": str(tmp_path / "nope"), "parameters": {"weight": 1}}]}
    from streammerge.errors import CheckpointError

    with pytest.raises(CheckpointError, match="nope: model path does not exist"):
        check(write_yaml(tmp_path / "x.yml", cfg), RunOptions(max_memory=2 << 30))


def test_per_model_params_beat_slice_and_global_params(tiny_family, tmp_path):
    base, experts = tiny_family
    cfg = {"merge_method": "linear", "parameters": {"weight": 0.25, "normalize": False},
           "models": [{"model": str(experts[0]), "parameters": {"weight": [0.0, 1.0]}},
                      {"model": str(experts[1])},
                      {"model": str(experts[2]), "parameters": {"weight": [{"filter": "mlp", "value": 2.0}]}}]}
    plan = check(write_yaml(tmp_path / "p.yml", cfg), RunOptions(max_memory=2 << 30))
    by = {t.name: t for t in plan.tensors}
    last = plan.out_layers - 1
    w = lambda name: [dict(m)["weight"] for m in by[name].model_params]
    assert w(f"model.layers.0.mlp.up_proj.weight") == [0.0, 0.25, 2.0]
    assert w(f"model.layers.{last}.self_attn.q_proj.weight") == [1.0, 0.25, 0.25]
    assert w("model.embed_tokens.weight") == [0.0, 0.25, 0.25]  # pre/post tensors sit at t = 0
    assert dict(by["model.norm.weight"].params)["normalize"] is False
