"""Reduce passes computed once for several outputs of a shared run (`batch/reuse.py`): TIES at several
densities and breadcrumbs over the same models count one |δ| histogram, each output is still
byte-identical to its config run alone, an output whose masked models differ counts its own, and a
failure in the output that computes a shared pass stops the run instead of leaving the others waiting."""

from __future__ import annotations

import json
import threading

import pytest
import yaml

from streammerge import api
from streammerge.batch.recipe import parse_recipe
from streammerge.batch.stages import run_stages
from streammerge.cli import main
from streammerge.kernels.threshold import KthMagnitude
from streammerge.options import RunOptions

from conftest import shard_bytes


def _doc(name: str, method: str, base, experts, densities, **extra) -> dict:
    return {"name": name, "merge_method": method, "base_model": str(base), "dtype": "bfloat16",
            "models": [{"model": str(e), "parameters": {"weight": 0.5, "density": d, **extra}}
                       for e, d in zip(experts, densities)]}


def _docs(base, experts) -> list[dict]:
    return [_doc("ties3", "ties", base, experts, [0.3] * 3),
            _doc("ties7", "ties", base, experts, [0.7] * 3),
            _doc("crumbs", "breadcrumbs", base, experts, [0.5] * 3, gamma=0.05),
            _doc("partial", "ties", base, experts, [0.5, 1.0, 0.5])]   # another set of masked models


@pytest.fixture
def histogram_calls(monkeypatch) -> list[int]:
    """One entry per chunk counted into a first-pass |δ| histogram (its element count)."""
    calls: list[int] = []
    real = KthMagnitude.update

    def spy(self, chunk, pass_index, **kw):
        if pass_index == 0:
            calls.append(chunk.numel())
        return real(self, chunk, pass_index, **kw)

    monkeypatch.setattr(KthMagnitude, "update", spy)
    return calls


def test_a_density_sweep_counts_one_histogram_and_each_output_equals_its_run_alone(tmp_path, tiny_family,
                                                                                  histogram_calls):
    base, experts = tiny_family
    docs = _docs(base, experts)
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    stages = parse_recipe(recipe.read_text())

    alone: dict[str, int] = {}
    for stage in stages:
        histogram_calls.clear()
        run_stages(recipe, [stage], tmp_path / "alone", RunOptions(progress=False))
        alone[stage.name] = sum(histogram_calls)
    assert all(alone.values())

    histogram_calls.clear()
    assert main(["batch", str(recipe), str(tmp_path / "out"), "--no-progress", "--report",
                 str(tmp_path / "b.json")]) == 0
    # ties7 and breadcrumbs adopt ties3's counts; "partial" masks two models, so it counts its own
    assert sum(histogram_calls) == alone["ties3"] + alone["partial"]
    for stage in stages:
        assert shard_bytes(tmp_path / "out" / stage.name) == shard_bytes(tmp_path / "alone" / stage.name) != {}

    rep = {s["name"]: s for s in json.loads((tmp_path / "b.json").read_text())["stages"]}
    ties7 = {k: v for k, v in docs[1].items() if k != "name"}
    with_histogram = sum("histogram" in t.reduces for t in api.check(ties7).plan.tensors)
    assert with_histogram > 0
    assert rep["ties7"]["passes_adopted"] == rep["crumbs"]["passes_adopted"] == with_histogram
    assert rep["ties3"]["passes_adopted"] == rep["partial"]["passes_adopted"] == 0
    assert sum(sh["passes_adopted"] for sh in rep["ties7"]["shards"]) == with_histogram


def test_a_failure_computing_a_shared_pass_stops_the_outputs_waiting_for_it(tmp_path, tiny_family, monkeypatch):
    base, experts = tiny_family
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump_all(_docs(base, experts)[:2], sort_keys=False))
    stages = parse_recipe(recipe.read_text())
    real, calls = KthMagnitude.update, [0]

    def flaky(self, chunk, pass_index, **kw):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("boom while counting the shared histogram")
        return real(self, chunk, pass_index, **kw)

    monkeypatch.setattr(KthMagnitude, "update", flaky)
    result: dict = {}

    def go():
        try:
            run_stages(recipe, stages, tmp_path / "out", RunOptions(progress=False, out_shard_size=200_000))
        except BaseException as e:
            result["error"] = e

    worker = threading.Thread(target=go, daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "an output waiting for a shared pass hung after the computing one failed"
    assert "boom while counting the shared histogram" in str(result.get("error"))
    for name in ("ties3", "ties7"):
        assert not (tmp_path / "out" / name / "config.json").exists()


def test_fp32_shares_its_first_histogram_pass_and_refines_with_its_own_ranks(tmp_path, tiny_family_fp32):
    """fp32 thresholds take two passes; the second follows each output's own ranks, so only the first is
    adopted, and the outputs still equal their runs alone."""
    base, experts = tiny_family_fp32
    docs = [{**_doc(n, "ties", base, experts, [d] * 2), "dtype": "float32"} for n, d in (("a", 0.2), ("b", 0.6))]
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    stages = parse_recipe(recipe.read_text())
    results = run_stages(recipe, stages, tmp_path / "out", RunOptions(progress=False))
    run_stages(recipe, stages, tmp_path / "alone", RunOptions(progress=False), shared=False)
    plan = api.check({k: v for k, v in docs[1].items() if k != "name"}).plan
    assert all("histogram_refine1" in t.reduces for t in plan.tensors if "histogram" in t.reduces)
    assert results[1].passes_adopted == sum("histogram" in t.reduces for t in plan.tensors) > 0
    for s in stages:
        assert shard_bytes(tmp_path / "out" / s.name) == shard_bytes(tmp_path / "alone" / s.name) != {}, s.name
