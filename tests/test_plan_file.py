"""A plan round-trips through a file, and an executor given only the file writes the same bytes."""

from __future__ import annotations

import pytest
import torch

from streammerge.errors import StreammergeError
from streammerge.merge import check
from streammerge.options import RunOptions
from streammerge.plan.serialize import plan_from_json, plan_to_json, read_plan, write_plan

from conftest import merge, shard_bytes, write_yaml


def _config(family, method: str) -> dict:
    base, experts = family
    params = {"ties": {"weight": 0.5, "density": 0.4}, "dare_ties": {"weight": 0.5, "density": 0.4},
              "task_arithmetic": {"weight": 0.5}}.get(method, {})
    return {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(e), "parameters": params} for e in experts]}


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "model_stock"])
def test_plan_round_trips_through_json(tiny_family, tmp_path, method):
    cfg = write_yaml(tmp_path / "c.yml", _config(tiny_family, method))
    plan = check(cfg, RunOptions(max_memory=4 << 30, out_shard_size=200_000))
    back = plan_from_json(plan_to_json(plan))
    assert back == plan
    assert back.out_config == plan.out_config  # not part of Plan's equality
    assert all(isinstance(t.shape, tuple) and isinstance(t.inputs[0].info.file.name, str) for t in back.tensors)


def test_one_shard_from_the_plan_file_is_byte_identical(tiny_family, tmp_path):
    from streammerge.execute import Executor

    doc = _config(tiny_family, "ties")
    opts = dict(out_shard_size=200_000, seed=3)
    full = shard_bytes(merge(doc, tmp_path, "full", **opts))
    assert len(full) >= 3
    cfg = write_yaml(tmp_path / "c.yml", doc)
    write_plan(check(cfg, RunOptions(max_memory=2 << 30, **opts)), tmp_path / "plan.json")
    plan = read_plan(tmp_path / "plan.json")
    for i, shard in enumerate(plan.shards):
        out = tmp_path / f"one{i}"
        out.mkdir()
        Executor(plan, out_dir=out, device=torch.device("cpu"), skip_shards=frozenset(set(range(len(plan.shards))) - {i})).run()
        assert shard_bytes(out) == {shard.filename: full[shard.filename]}


def test_a_file_that_is_not_a_plan_is_refused(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"format": "something-else", "plan": {}}')
    with pytest.raises(StreammergeError, match=r"plan.json: not a streammerge plan file .*something-else"):
        read_plan(bad)
    with pytest.raises(StreammergeError, match="unknown node 'os.system'"):
        plan_from_json('{"format": "streammerge-plan/1", "plan": {"__node__": "os.system"}}')
