"""The Python API's run and check: a config as a path, YAML text or a dict, options as keywords."""

from __future__ import annotations

import sys

import pytest
import yaml

import streammerge
from conftest import shard_bytes, write_yaml
from streammerge import CheckResult, RunOptions
from streammerge.errors import CheckpointError, ConfigError, ProblemsError


def _cfg(base, experts) -> dict:
    return {"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16", "parameters": {"density": 0.5},
            "models": [{"model": str(e), "parameters": {"weight": w}} for e, w in zip(experts, (0.7, 0.3))]}


def test_a_path_yaml_text_and_a_dict_merge_to_the_same_bytes(tiny_family, tmp_path):
    cfg = _cfg(*tiny_family)
    path = write_yaml(tmp_path / "c.yml", cfg)
    streammerge.run(path, tmp_path / "from_path", max_memory="2GiB")
    streammerge.run(str(path), tmp_path / "from_str_path", max_memory=2 << 30)
    streammerge.run(path.read_text(), tmp_path / "from_text", max_memory="2GiB")
    report = streammerge.run(cfg, tmp_path / "from_dict", max_memory="2GiB", out_shard_size="40KB")
    ref = shard_bytes(tmp_path / "from_path")
    assert len(ref) == 1 and shard_bytes(tmp_path / "from_str_path") == ref
    assert shard_bytes(tmp_path / "from_text") == ref
    assert len(shard_bytes(tmp_path / "from_dict")) > 1 == len(ref)   # out_shard_size as text took effect
    assert report.method == "ties" and report.out_dir == str(tmp_path / "from_dict")
    # what the folder says about the config is the config that ran
    assert yaml.safe_load((tmp_path / "from_dict" / "README.md").read_text().split("```yaml")[1].split("```")[0]) == cfg


def test_a_dict_may_hold_paths_and_relative_model_paths_are_taken_from_the_working_directory(tiny_family, tmp_path,
                                                                                              monkeypatch):
    base, experts = tiny_family
    monkeypatch.chdir(base.parent)
    cfg = {"merge_method": "linear", "models": [{"model": experts[0].name, "parameters": {"weight": 1.0}},
                                                {"model": base, "parameters": {"weight": 1.0}}]}
    result = streammerge.check(cfg, max_memory="2GiB")
    assert result.ok and result.plan.models[0].name == experts[0].name


def test_the_old_call_with_run_options_still_works_and_keywords_apply_over_it(tiny_family, tmp_path):
    cfg = write_yaml(tmp_path / "c.yml", _cfg(*tiny_family))
    streammerge.run(cfg, tmp_path / "a", RunOptions(max_memory=2 << 30, out_shard_size=40_000))
    streammerge.run(cfg, tmp_path / "b", RunOptions(max_memory=2 << 30), out_shard_size="40KB")
    assert len(shard_bytes(tmp_path / "a")) > 1 and shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    seen = []
    streammerge.run(cfg, tmp_path / "c", max_memory="2GiB", on_start=lambda plan: seen.append(plan.method),
                    on_progress=lambda n: seen.append(n))
    assert seen[0] == "ties" and sum(seen[1:]) > 0


def test_an_unknown_option_is_a_type_error_naming_it_and_the_valid_names(tiny_family):
    with pytest.raises(TypeError, match=r"unknown option 'max_memroy'; did you mean 'max_memory'.*valid options: "
                                        r"max_memory, max_gpu_memory, device"):
        streammerge.check(_cfg(*tiny_family), max_memroy="1GiB")
    with pytest.raises(TypeError, match="unknown option 'colour'"):
        streammerge.run(_cfg(*tiny_family), "/nonexistent/out", colour=True)
    with pytest.raises(TypeError, match="expected a streammerge.RunOptions, got dict"):
        streammerge.check(_cfg(*tiny_family), {"max_memory": 1})


def test_option_values_are_checked_as_the_flags_check_them(tiny_family):
    cfg = _cfg(*tiny_family)
    with pytest.raises(ConfigError, match="max_memory: cannot read 'lots' as a size"):
        streammerge.check(cfg, max_memory="lots")
    with pytest.raises(ConfigError, match="device: 'tpu' is not one of cpu, cuda, auto"):
        streammerge.check(cfg, device="tpu")
    with pytest.raises(ConfigError, match="device: 0 is not one of cpu, cuda, auto"):
        streammerge.check(cfg, device=0)
    with pytest.raises(ConfigError, match="overwrite: expected True or False"):
        streammerge.check(cfg, overwrite="yes")
    with pytest.raises(ConfigError, match="seed: .* is out of range"):
        streammerge.check(cfg, seed=-1)
    assert streammerge.check(cfg, max_memory="2GiB", device="cuda:0", seed="12").plan.seed == 12


def test_check_returns_the_plan_and_prints_nothing(tiny_family, capsys):
    result = streammerge.check(_cfg(*tiny_family), max_memory="2GiB")
    assert isinstance(result, CheckResult) and result.ok and result.problems == ()
    assert result.plan.method == "ties" and len(result.plan.tensors) == 39
    assert result.raise_problems() is result.plan and result.warnings == ()
    assert capsys.readouterr() == ("", "")


def test_check_returns_every_problem_instead_of_raising(tiny_family, tmp_path):
    base, experts = tiny_family
    cfg = _cfg(base, experts)
    cfg["models"].append({"model": str(tmp_path / "missing")})
    cfg["parameters"]["densty"] = 0.5
    result = streammerge.check(cfg, max_memory="2GiB")
    assert not result.ok and result.plan is None and len(result.problems) == 2
    assert "densty" in str(result.problems[0]) and "did you mean 'density'" in str(result.problems[0])
    assert isinstance(result.problems[1], CheckpointError) and "missing" in str(result.problems[1])
    with pytest.raises(ProblemsError, match="2 problems found"):
        result.raise_problems()
    one = streammerge.check("merge_method: linear\nmodels: []\n")
    assert len(one.problems) == 1 and isinstance(one.problems[0], ConfigError)
    with pytest.raises(ConfigError):
        one.raise_problems()


def test_run_raises_what_check_returns(tiny_family, tmp_path):
    cfg = dict(_cfg(*tiny_family), merge_method="tie")
    problem = streammerge.check(cfg).problems[0]
    with pytest.raises(ConfigError) as e:
        streammerge.run(cfg, tmp_path / "out", max_memory="2GiB")
    assert str(e.value) == str(problem) and "did you mean 'ties'" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_config_that_is_neither_path_text_nor_dict_is_a_type_error():
    with pytest.raises(TypeError, match="config: expected a path, YAML text or a dict, got int"):
        streammerge.check(42)


def test_importing_streammerge_loads_no_torch():
    import subprocess

    code = ("import sys, streammerge; from streammerge import run, check, CheckResult, merge_tensors; "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_the_package_is_typed():
    from importlib.resources import files

    assert files("streammerge").joinpath("py.typed").is_file()
