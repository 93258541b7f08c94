"""Damaged and inconsistent inputs: each fails with a typed error that names the file or the tensor,
before any tensor data is read, and the command line says so in one line with exit code 1.

Every model here is a copy made in the test's own folder, so a damaged copy never leaks into another test.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_yaml
from streammerge import RunOptions, run
from streammerge.merge import check
from streammerge.cli import main
from streammerge.errors import CheckpointError, ConfigError
from streammerge.io.reader import RowReader

INDEX = "model.safetensors.index.json"
SHARD2 = "model-00002-of-00005.safetensors"
SHAPE_UP = [176, 64]  # the tiny preset's mlp.up_proj


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny base and expert, each in five shards with an index."""
    from streammerge import synth

    base, (expert,) = synth.make_family(tmp_path_factory.mktemp("sharded"), synth.PRESETS["tiny"], 1, seed=7,
                                        shard_size=100_000)
    assert (base / SHARD2).exists() and (base / INDEX).exists()
    return base, expert


@pytest.fixture
def no_data_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read; the headers alone should have told")

    monkeypatch.setattr(RowReader, "read_rows", refuse)


# -- damage ------------------------------------------------------------------------------------------

def _rewrite_header(f: Path, edit) -> None:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header, len(raw) - 8 - n)
    new = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _tensors_in(f: Path) -> list[str]:
    (n,) = struct.unpack("<Q", f.read_bytes()[:8])
    return [k for k in json.loads(f.read_bytes()[8:8 + n]) if k != "__metadata__"]


def _shard_of(m: Path, name: str) -> str:
    return json.loads((m / INDEX).read_text())["weight_map"][name]


def _replace_tensor(m: Path, name: str, value: torch.Tensor) -> None:
    f = m / _shard_of(m, name)
    tensors = load_file(f)
    tensors[name] = value
    save_file(tensors, f, metadata={"format": "pt"})


def _drop_tensor(m: Path, name: str) -> None:
    index = json.loads((m / INDEX).read_text())
    f = m / index["weight_map"].pop(name)
    tensors = load_file(f)
    del tensors[name]
    save_file(tensors, f, metadata={"format": "pt"})
    (m / INDEX).write_text(json.dumps(index))


def truncated_shard(m: Path) -> list[str]:
    f = m / SHARD2
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return [str(f), "file truncated"]


def header_length_beyond_file(m: Path) -> list[str]:
    f = m / SHARD2
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    return [str(f), f"header length {len(raw)} runs past the end of the file ({len(raw)} bytes)"]


def offsets_out_of_range(m: Path) -> list[str]:
    f = m / SHARD2
    name = _tensors_in(f)[0]

    def edit(h, data_len):
        b, e = h[name]["data_offsets"]
        h[name]["data_offsets"] = [data_len, data_len + e - b]
    _rewrite_header(f, edit)
    return [str(f), f"tensor {name!r}: data ends at byte", "file truncated"]


def overlapping_tensors(m: Path) -> list[str]:
    f = m / SHARD2
    names = _tensors_in(f)
    first, second = [n for n in names if n.endswith("layernorm.weight")][:2]  # same size: [64] each

    def edit(h, data_len):
        h[second]["data_offsets"] = list(h[first]["data_offsets"])
    _rewrite_header(f, edit)
    return [str(f), f"tensors {first!r} and {second!r} overlap in the data region"]


def invalid_json(m: Path) -> list[str]:
    f = m / SHARD2
    raw = bytearray(f.read_bytes())
    raw[8:9] = b"x"  # the header's opening brace
    f.write_bytes(bytes(raw))
    return [str(f), "header is not valid JSON"]


def unknown_dtype(m: Path) -> list[str]:
    f = m / SHARD2
    name = _tensors_in(f)[0]

    def edit(h, data_len):
        h[name]["dtype"] = "U16"  # a real safetensors dtype that nothing here merges
    _rewrite_header(f, edit)
    return [str(f), f"tensor {name!r}: unknown dtype 'U16'", "convert the checkpoint to bf16, fp16 or fp32"]


def shard_missing(m: Path) -> list[str]:
    (m / SHARD2).unlink()
    return [str(m / INDEX), f"lists shard {SHARD2!r}, which is missing", "download the missing shard"]


def tensor_not_in_index(m: Path) -> list[str]:
    index = json.loads((m / INDEX).read_text())
    name = _tensors_in(m / SHARD2)[0]
    del index["weight_map"][name]
    (m / INDEX).write_text(json.dumps(index))
    return [str(m / SHARD2), f"holds tensor {name!r} that {INDEX} does not list"]


def layer_tensor_missing(m: Path) -> list[str]:
    _drop_tensor(m, "model.layers.2.mlp.up_proj.weight")
    return [str(m), "layer 2 does not hold the same tensors as layer 0 (missing model.layers.2.mlp.up_proj.weight)"]


def final_norm_missing(m: Path) -> list[str]:
    _drop_tensor(m, "model.norm.weight")
    return [str(m), "tensor 'model.norm.weight' (needed for output 'model.norm.weight') is missing"]


def shape_differs(m: Path) -> list[str]:
    _replace_tensor(m, "model.layers.1.mlp.up_proj.weight", torch.zeros(100, 64, dtype=torch.bfloat16))
    return ["tensor 'model.layers.1.mlp.up_proj.weight' has different shapes across models",
            f"{m}: [100, 64]", "do not share a backbone"]


def index_not_utf8(m: Path) -> list[str]:
    (m / INDEX).write_bytes(b'\xff\xfe{"weight_map": {}}')
    return [str(m / INDEX), "not valid JSON"]


def index_names_a_path_outside(m: Path) -> list[str]:
    index = json.loads((m / INDEX).read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../base/" + SHARD2
    (m / INDEX).write_text(json.dumps(index))
    return [str(m / INDEX), f"weight_map names shard '../base/{SHARD2}', which is not a file name inside {m}"]


def index_value_not_a_string(m: Path) -> list[str]:
    index = json.loads((m / INDEX).read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = [SHARD2]
    (m / INDEX).write_text(json.dumps(index))
    return [str(m / INDEX), "which is not a file name"]


def same_tensor_in_two_unindexed_files(m: Path) -> list[str]:
    (m / INDEX).unlink()
    shutil.copy(m / SHARD2, m / "extra.safetensors")
    name = sorted(_tensors_in(m / SHARD2))[0]
    return [f"tensor {name!r} is in both extra.safetensors and {SHARD2}", f"no {INDEX}"]


DAMAGE = [truncated_shard, header_length_beyond_file, offsets_out_of_range, overlapping_tensors, invalid_json,
          unknown_dtype, shard_missing, tensor_not_in_index, layer_tensor_missing, final_norm_missing, shape_differs,
          index_not_utf8, index_names_a_path_outside, index_value_not_a_string, same_tensor_in_two_unindexed_files]


def _config(tmp_path: Path, base: Path, other: Path) -> Path:
    return write_yaml(tmp_path / "merge.yml", {"merge_method": "linear", "models": [
        {"model": str(base), "parameters": {"weight": 0.5}}, {"model": str(other), "parameters": {"weight": 0.5}}]})


def _flat(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _assert_cli_fails(argv: list[str], needles: list[str], capsys) -> None:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("error:")
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_damaged_input_fails_check_and_run_before_reading_data(damage, family, tmp_path, capsys, no_data_reads):
    base, expert = family
    damaged = tmp_path / "damaged"
    shutil.copytree(expert, damaged)
    needles = damage(damaged)
    if damage is shape_differs:
        needles.append(f"{base}: {SHAPE_UP}")
    cfg = _config(tmp_path, base, damaged)
    with pytest.raises(CheckpointError) as e:
        check(cfg, RunOptions(max_memory=2 << 30))
    for needle in needles:
        assert needle in str(e.value)
    _assert_cli_fails(["check", str(cfg), "--max-memory", "2GiB"], needles, capsys)
    out = tmp_path / "out"
    _assert_cli_fails(["run", str(cfg), str(out), "--no-progress", "--max-memory", "2GiB"], needles, capsys)
    assert not out.exists(), "a run that cannot start must not create its output folder"


def test_layer_range_outside_a_model(family, tmp_path, capsys, no_data_reads):
    base, expert = family
    cfg = write_yaml(tmp_path / "merge.yml", {"merge_method": "linear", "slices": [{"sources": [
        {"model": str(base), "layer_range": [2, 6], "parameters": {"weight": 0.5}},
        {"model": str(expert), "layer_range": [2, 6], "parameters": {"weight": 0.5}}]}]})
    needles = [f"slices[0].sources[0].layer_range: [2, 6] is outside {str(base)!r}, which has 4 layers (valid: 0 to 4)"]
    with pytest.raises(ConfigError) as e:
        check(cfg, RunOptions(max_memory=2 << 30))
    assert needles[0] in str(e.value)
    _assert_cli_fails(["check", str(cfg)], needles, capsys)


def test_errors_with_brackets_print_verbatim(family, tmp_path, capsys, no_data_reads):
    """rich markup must not eat or choke on a path that looks like a tag."""
    base, expert = family
    odd = tmp_path / "[bold]model[/x]"
    shutil.copytree(expert, odd)
    (odd / SHARD2).unlink()
    _assert_cli_fails(["check", str(_config(tmp_path, base, odd))], [str(odd / INDEX)], capsys)


# vocabulary sizes that differ: tests/test_vocab.py

def test_overflow_to_inf_is_reported(tmp_path, capsys):
    from streammerge import synth

    spec = dataclasses.replace(synth.PRESETS["tiny"], dtype="float16")
    base, (expert,) = synth.make_family(tmp_path / "fp16", spec, 1, seed=3)
    name = "model.layers.1.mlp.down_proj.weight"
    for m in (base, expert):
        tensors = load_file(m / "model.safetensors")
        tensors[name] = torch.full_like(tensors[name], 60000.0)  # finite in fp16 (max 65504); twice is not
        save_file(tensors, m / "model.safetensors", metadata={"format": "pt"})
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    cfg = write_yaml(tmp_path / "merge.yml", {"merge_method": "linear", "parameters": {"normalize": False},
                                              "models": [{"model": str(base), "parameters": {"weight": 1.0}},
                                                         {"model": str(expert), "parameters": {"weight": 1.0}}]})
    report = run(cfg, tmp_path / "out", RunOptions(max_memory=2 << 30, progress=False))
    assert report.nonfinite_tensors == [name]
    assert torch.isinf(load_file(tmp_path / "out" / "model.safetensors")[name]).all()
    json_report = tmp_path / "report.json"
    assert main(["run", str(cfg), str(tmp_path / "out2"), "--no-progress", "--report", str(json_report)]) == 0
    assert _flat(f"NaN or Inf in the output of 1 tensor(s): {name}") in _flat(capsys.readouterr().err)
    assert json.loads(json_report.read_text())["nonfinite_tensors"] == [name]


def test_check_reports_five_different_mistakes_at_once(tmp_path, capsys):
    """A config mixing five mistakes: all five in one `check`, before any tensor data is read."""
    import shutil

    from streammerge import synth
    from streammerge.cli import main as cli_main

    base, experts = synth.make_family(tmp_path / "fam", synth.PRESETS["tiny"], 3, seed=3)
    truncated = tmp_path / "truncated"
    shutil.copytree(experts[1], truncated)
    shard = next(truncated.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    no_shard = tmp_path / "no_shard"
    shutil.copytree(experts[2], no_shard)
    (no_shard / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {"model.norm.weight": "model-00009-of-00009.safetensors"}}')
    cfg = {"merge_method": "ties", "base_model": str(base), "parameters": {"lamda": 1.0},
           "models": [{"model": str(experts[0]), "parameters": {"weight": 1.0, "densty": 0.5}},
                      {"model": str(tmp_path / "nowhere"), "parameters": {"weight": 1.0}},
                      {"model": str(truncated), "parameters": {"weight": 1.0}},
                      {"model": str(no_shard), "parameters": {"weight": 1.0}}]}
    path = tmp_path / "five.yml"
    path.write_text(__import__("yaml").safe_dump(cfg))
    assert cli_main(["check", str(path)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "5 problems found" in err
    for needle in ("parameters.lamda", "did you mean 'lambda'", "models[0].parameters.densty", "did you mean 'density'",
                   "nowhere: model path does not exist", "truncated", "model-00009-of-00009.safetensors"):
        assert needle in err, needle
    assert "Traceback" not in err


def test_the_same_problem_on_many_tensors_is_reported_once(tmp_path):
    from streammerge import RunOptions, synth
    from streammerge.merge import check
    from streammerge.errors import ProblemsError

    base, experts = synth.make_family(tmp_path / "fam", synth.PRESETS["tiny"], 2, seed=4)
    cfg = {"merge_method": "linear", "parameters": {"normalize": True},
           "models": [{"model": str(experts[0])}, {"model": str(experts[1]), "parameters": {"weight": 1.5}}],
           "tokenizer_source": str(tmp_path / "elsewhere")}
    path = tmp_path / "c.yml"
    path.write_text(__import__("yaml").safe_dump(cfg))
    with pytest.raises(ProblemsError) as e:
        check(path, RunOptions(max_memory=2 << 30))
    assert len(e.value.problems) == 2
    assert "needs parameter 'weight'" in str(e.value) and "more like it" in str(e.value)
    assert "tokenizer_source" in str(e.value)
