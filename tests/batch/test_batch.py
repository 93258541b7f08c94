"""Batch recipes: sweeps expand to the names a user expects, stages run as a DAG keyed by their plan's
fingerprint (an edited stage and those after it rebuilt, the rest reused), an interrupted batch resumes
mid-DAG, and every output equals the same config run alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from streammerge.batch.recipe import parse_recipe
from streammerge.batch.stages import run_stages
from streammerge.cli import main
from streammerge.errors import ConfigError
from streammerge.options import RunOptions


def _ties(name: str, base, experts, density=0.5, method="ties") -> dict:
    return {"name": name, "merge_method": method, "base_model": str(base), "dtype": "bfloat16",
            "models": [{"model": str(e), "parameters": {"weight": 0.5, "density": density}} for e in experts]}


def _recipe(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_a_grid_sweep_and_a_list_sweep_expand_to_named_variants():
    doc = {"name": "t", "merge_method": "ties", "base_model": "b", "parameters": {"density": 0.5, "weight": 1.0},
           "models": [{"model": "m"}],
           "sweep": {"grid": {"parameters.density": [0.3, 0.7], "parameters.weight": [0.5, 1.0]}}}
    names = [s.name for s in parse_recipe(yaml.safe_dump(doc))]
    assert names == ["t-density=0.3-weight=0.5", "t-density=0.3-weight=1.0", "t-density=0.7-weight=0.5",
                     "t-density=0.7-weight=1.0"]
    stages = parse_recipe(yaml.safe_dump({**doc, "sweep": {"list": [{"merge_method": "dare_ties"},
                                                                    {"models.0.model": "other"}]}}))
    assert [s.name for s in stages] == ["t-merge_method=dare_ties", "t-model=other"]
    assert stages[0].doc["merge_method"] == "dare_ties" and stages[1].doc["models"][0]["model"] == "other"
    assert "sweep" not in stages[0].doc


@pytest.mark.parametrize("sweep, words", [
    ({"grid": {"parameters.densty": [0.3]}}, "no key 'densty' at parameters (keys there: density"),
    ({"grid": {"parameters.density": []}}, "non-empty list"),
    ({"list": []}, "non-empty list"),
    ({"grid": {"models.3.model": ["x"]}}, "models has no entry '3'"),
    ({"axes": {}}, "sweep: takes"),
])
def test_bad_sweeps_are_clear_errors(sweep, words):
    doc = {"name": "t", "merge_method": "ties", "parameters": {"density": 0.5}, "models": [{"model": "m"}],
           "sweep": sweep}
    with pytest.raises(ConfigError) as e:
        parse_recipe(yaml.safe_dump(doc), "r.yml")
    assert words in str(e.value) and "r.yml" in str(e.value), str(e.value)


def test_recipe_mistakes_are_named():
    with pytest.raises(ConfigError, match="document 1 needs a name"):
        parse_recipe("merge_method: linear\nmodels: [{model: a}]\n")
    with pytest.raises(ConfigError, match="named 'a'"):
        parse_recipe("name: a\nmerge_method: linear\n---\nname: a\nmerge_method: linear\n")
    with pytest.raises(ConfigError, match="circle: a -> b -> a"):
        parse_recipe("name: a\nmodels: [{model: b}]\n---\nname: b\nmodels: [{model: a}]\n")


def test_stages_come_after_the_stages_they_read():
    stages = parse_recipe("name: c\nmodels: [{model: b}]\n---\nname: b\nbase_model: a\n---\nname: a\nmodels: [{model: x}]\n")
    assert [(s.name, s.needs) for s in stages] == [("a", ()), ("b", ("a",)), ("c", ("b",))]


def test_each_output_equals_its_config_run_alone(capsys, tmp_path, tiny_family):
    base, experts = tiny_family
    docs = [_ties("ties3", base, experts, 0.3), _ties("dare", base, experts, 0.5, "dare_ties"),
            {"name": "lin", "merge_method": "linear", "dtype": "bfloat16",
             "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts[:2]]}]
    rc = main(["batch", str(_recipe(tmp_path / "r.yml", docs)), str(tmp_path / "out"), "--no-progress",
               "--report", str(tmp_path / "rep.json")])
    assert rc == 0, capsys.readouterr().err
    for doc in docs:
        single = {k: v for k, v in doc.items() if k != "name"}
        (tmp_path / "one.yml").write_text(yaml.safe_dump(single))
        assert main(["run", str(tmp_path / "one.yml"), str(tmp_path / doc["name"]), "--no-progress"]) == 0
        assert _shards(tmp_path / "out" / doc["name"]) == _shards(tmp_path / doc["name"]) != {}
    import json

    rep = json.loads((tmp_path / "rep.json").read_text())
    assert [s["status"] for s in rep["stages"]] == ["built"] * 3 and all(s["bytes_read"] > 0 for s in rep["stages"])


def _three_stages(tmp_path, base, experts, weight2=0.5) -> Path:
    return _recipe(tmp_path / "r.yml", [
        _ties("s1", base, experts, 0.5),
        {"name": "s2", "merge_method": "linear", "dtype": "bfloat16",
         "models": [{"model": "s1", "parameters": {"weight": weight2}}, {"model": str(experts[0]), "parameters": {"weight": 0.5}}]},
        {"name": "s3", "merge_method": "task_arithmetic", "base_model": str(base), "dtype": "bfloat16",
         "models": [{"model": "s2", "parameters": {"weight": 1.0}}]},
    ])


def _statuses(recipe: Path, out: Path, **kw) -> list[str]:
    return [r.status for r in run_stages(recipe, parse_recipe(recipe.read_text()), out,
                                         RunOptions(progress=False), **kw)]


def test_editing_stage_two_rebuilds_two_and_three_only(tmp_path, tiny_family):
    base, experts = tiny_family
    recipe = _three_stages(tmp_path, base, experts)
    assert _statuses(recipe, tmp_path / "out") == ["built", "built", "built"]
    assert _statuses(recipe, tmp_path / "out") == ["reused", "reused", "reused"]
    first = _shards(tmp_path / "out" / "s3")
    _three_stages(tmp_path, base, experts, weight2=0.25)
    assert _statuses(recipe, tmp_path / "out") == ["reused", "built", "built"]
    assert _shards(tmp_path / "out" / "s3") != first
    s2 = yaml.safe_load((tmp_path / "out" / "s2" / "mergekit_config.yml").read_text())
    assert s2["models"][0]["model"] == str((tmp_path / "out" / "s1").resolve())


def test_an_interrupted_batch_resumes_mid_dag(tmp_path, tiny_family):
    from streammerge import merge

    base, experts = tiny_family
    recipe = _three_stages(tmp_path, base, experts)

    def stop_in_s2(config_path, out, options, config_text):
        def boom(n):
            raise KeyboardInterrupt
        return merge.run(config_path, out, options, config_text=config_text,
                         on_progress=boom if Path(out).name == "s2" else None)

    with pytest.raises(KeyboardInterrupt):
        _statuses(recipe, tmp_path / "out", run=stop_in_s2)
    assert (tmp_path / "out" / "s1" / "config.json").is_file() and not (tmp_path / "out" / "s3").exists()
    assert _statuses(recipe, tmp_path / "out") == ["reused", "resumed", "built"]
    _statuses(recipe, tmp_path / "clean")
    for name in ("s1", "s2", "s3"):
        assert _shards(tmp_path / "out" / name) == _shards(tmp_path / "clean" / name)


def test_check_says_what_would_happen_and_runs_nothing(capsys, tmp_path, tiny_family):
    base, experts = tiny_family
    recipe = _three_stages(tmp_path, base, experts)
    assert main(["batch", str(recipe), str(tmp_path / "out"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "s1" in out and "build (after s1; checked then)" in out and not (tmp_path / "out").exists()
