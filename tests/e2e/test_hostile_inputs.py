"""Inputs and configs a hostile (or unlucky) user gives: each is refused with one clear line, before any
tensor data is read, and never hangs; an input that changes during a run stops it before a shard holding
its data is committed.

Anything that could hang on a regression (YAML bombs, FIFOs) runs `streammerge check` in a subprocess
with a timeout, so a regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_yaml
from streammerge import RunOptions, run
from streammerge.merge import check
from streammerge.cli import main
from streammerge.config import load_config_text, read_config_text
from streammerge.errors import CheckpointError, ConfigError
from streammerge.io.header import parse_header_bytes, read_header

MEM = RunOptions(max_memory=2 << 30)
SMALL = dict(hidden=16, intermediate=32, layers=2, vocab=32, heads=2, kv_heads=1)
INDEX = "model.safetensors.index.json"


def _spec(**kw):
    from streammerge import synth

    return synth.SynthSpec(**{**SMALL, **kw})


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A small base and expert in one file each (2 layers)."""
    from streammerge import synth

    base, (expert,) = synth.make_family(tmp_path_factory.mktemp("pair"), _spec(), 1, seed=11)
    return base, expert


def _linear(tmp: Path, *models: Path, name: str = "merge.yml", **extra) -> Path:
    doc = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}
    doc.update(extra)
    return write_yaml(tmp / name, doc)


def _cli_check(cfg: Path, timeout: float = 20) -> subprocess.CompletedProcess:
    """`streammerge check CFG` in its own process: a hang fails the test after `timeout` seconds."""
    code = "import sys; from streammerge.cli import main; sys.exit(main(sys.argv[1:]))"
    try:
        return subprocess.run([sys.executable, "-c", code, "check", str(cfg), "--max-memory", "2GiB"],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`streammerge check {cfg.name}` ran longer than {timeout} s")


def _assert_one_clear_error(proc: subprocess.CompletedProcess, *needles: str, limit: int = 1500) -> str:
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("error:"), proc.stderr[:500]
    flat = " ".join(proc.stderr.split())
    for needle in needles:
        assert needle in flat, f"{needle!r} not in {flat[:2000]!r}"
    assert len(proc.stderr) < limit, f"message of {len(proc.stderr)} characters"
    return flat


def _cli_fails(argv: list[str], capsys, *needles: str) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    flat = " ".join(err.split())
    assert err.startswith("error:") and "Traceback" not in err, err[:2000]
    for needle in needles:
        assert needle in flat, f"{needle!r} not in {flat[:2000]!r}"
    return flat


# -- item 2: a models: merge over models of different depth ---------------------------------------------

def test_models_merge_with_different_layer_counts_is_refused(pair, tmp_path, capsys):
    from streammerge import synth

    base, _ = pair
    deep = synth.write_checkpoint(tmp_path / "deep", _spec(layers=3), seed=5)
    cfg = _linear(tmp_path, base, deep)
    needles = [f"{str(base)!r} has 2 layers", f"{str(deep)!r} has 3 layers", "slices:"]
    with pytest.raises(ConfigError) as e:
        check(cfg, MEM)
    for needle in needles:
        assert needle in str(e.value)
    _cli_fails(["check", str(cfg)], capsys, *needles)
    # the base, not listed under models, counts too
    cfg = write_yaml(tmp_path / "based.yml", {"merge_method": "task_arithmetic", "base_model": str(deep),
                                              "models": [{"model": str(base), "parameters": {"weight": 1.0}}]})
    with pytest.raises(ConfigError, match="has 2 layers"):
        check(cfg, MEM)


def test_slices_still_choose_layers_across_depths(pair, tmp_path):
    from streammerge import synth

    base, _ = pair
    deep = synth.write_checkpoint(tmp_path / "deep", _spec(layers=3), seed=5)
    cfg = write_yaml(tmp_path / "m.yml", {"merge_method": "linear", "slices": [{"sources": [
        {"model": str(base), "layer_range": [0, 2], "parameters": {"weight": 0.5}},
        {"model": str(deep), "layer_range": [1, 3], "parameters": {"weight": 0.5}}]}]})
    assert check(cfg, MEM).out_layers == 2


# -- item 3: an empty model ---------------------------------------------------------------------------

def test_model_without_tensors_is_refused(pair, tmp_path, capsys):
    base, expert = pair
    empty = tmp_path / "empty"
    empty.mkdir()
    save_file({}, empty / "model.safetensors")
    shutil.copy(base / "config.json", empty / "config.json")
    for models in ((empty, expert), (expert, empty)):
        cfg = _linear(tmp_path, *models)
        with pytest.raises(CheckpointError) as e:
            check(cfg, MEM)
        assert f"{empty}: holds no tensors" in str(e.value)
    cfg = write_yaml(tmp_path / "ta.yml", {"merge_method": "task_arithmetic", "base_model": str(empty),
                                           "models": [{"model": str(expert), "parameters": {"weight": 1.0}}]})
    out = tmp_path / "out"
    _cli_fails(["run", str(cfg), str(out), "--no-progress"], capsys, f"{empty}: holds no tensors")
    assert not out.exists()


# -- item 5: an input that changes during the run ----------------------------------------------------

@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny base and expert in five input shards each."""
    from streammerge import synth

    base, (expert,) = synth.make_family(tmp_path_factory.mktemp("sharded"), synth.PRESETS["tiny"], 1, seed=7,
                                        shard_size=100_000)
    assert (expert / "model-00005-of-00005.safetensors").exists()
    return base, expert


def _run_changing(tmp_path: Path, sharded, change) -> tuple[Path, dict[str, bytes], BaseException]:
    """A reference run, then the same run with `change(expert_copy)` called after the first band."""
    base, expert = sharded
    copy = tmp_path / "expert"
    shutil.copytree(expert, copy)
    cfg = write_yaml(tmp_path / "m.yml", {"merge_method": "linear", "models": [
        {"model": str(base), "parameters": {"weight": 0.5}}, {"model": str(copy), "parameters": {"weight": 0.5}}]})
    opts = dict(max_memory=2 << 30, progress=False, chunk_rows=16, out_shard_size=200_000)
    run(cfg, tmp_path / "ref", RunOptions(**opts))
    ref = {f.name: f.read_bytes() for f in (tmp_path / "ref").glob("*.safetensors")}
    assert len(ref) > 2
    calls = []

    def on_progress(n: int) -> None:
        calls.append(n)
        if len(calls) == 1:
            change(copy)

    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as e:
        run(cfg, out, RunOptions(**opts), on_progress=on_progress)
    assert calls, "the run never reported progress"
    return out, ref, e.value


def _assert_no_mixed_shard(out: Path, ref: dict[str, bytes]) -> None:
    committed = {f.name: f.read_bytes() for f in out.glob("*.safetensors")}
    assert len(committed) < len(ref), "every shard was committed although an input changed"
    for name, data in committed.items():
        assert data == ref[name], f"committed shard {name} differs from a run on unchanged inputs"
    assert not (out / INDEX).exists()


def test_input_shard_replaced_during_the_run_stops_it(tmp_path, sharded):
    target = "model-00005-of-00005.safetensors"  # read last: holds lm_head

    def replace(copy: Path) -> None:
        tensors = {k: v * 2 for k, v in load_file(copy / target).items()}
        save_file(tensors, copy / "new.tmp", metadata={"format": "pt"})
        assert (copy / "new.tmp").stat().st_size == (copy / target).stat().st_size
        os.replace(copy / "new.tmp", copy / target)

    out, ref, err = _run_changing(tmp_path, sharded, replace)
    msg = str(err)
    assert f"{tmp_path / 'expert' / target}: changed since the plan was made" in msg
    assert "replaced by another file" in msg and "re-run" in msg
    _assert_no_mixed_shard(out, ref)
    assert max(ref) not in {f.name for f in out.glob("*.safetensors")}, "the shard holding lm_head was committed"


def test_input_rewritten_in_place_at_the_same_size_stops_the_run(tmp_path, sharded):
    target = "model-00001-of-00005.safetensors"  # being read when the change happens: holds the embedding

    def rewrite(copy: Path) -> None:
        f = copy / target
        st = f.stat()
        with open(f, "r+b") as fh:
            fh.seek(st.st_size - 256)
            fh.write(bytes(256))
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert f.stat().st_size == st.st_size and f.stat().st_ino == st.st_ino

    out, ref, err = _run_changing(tmp_path, sharded, rewrite)
    msg = str(err)
    assert f"{tmp_path / 'expert' / target}: changed since the plan was made" in msg
    assert "modified" in msg
    _assert_no_mixed_shard(out, ref)


def test_reader_refuses_a_file_changed_since_its_header_was_read(tmp_path):
    from streammerge.io.reader import RowReader

    f = tmp_path / "a.safetensors"
    save_file({"w": torch.arange(8, dtype=torch.float32).reshape(2, 4)}, f)
    info = read_header(f).tensors["w"]
    assert info.stamp is not None and info.stamp.size == f.stat().st_size
    with RowReader() as reader:
        assert reader.read_rows(info, 0, 1).tolist() == [[0.0, 1.0, 2.0, 3.0]]
        with open(f, "r+b") as fh:  # same size, same inode, rewritten in place
            fh.seek(info.begin)
            fh.write(bytes(info.nbytes))
        os.utime(f, ns=(0, info.stamp.mtime_ns + 10**9))
        with pytest.raises(CheckpointError, match="changed since the plan was made"):
            reader.read_rows(info, 1, 2)
    f.unlink()
    with RowReader() as reader, pytest.raises(CheckpointError, match=r"a\.safetensors: .*no longer exists"):
        reader.read_rows(info, 0, 1)
    fresh = tmp_path / "b.safetensors"
    save_file({"w": torch.arange(8, dtype=torch.float32).reshape(2, 4)}, fresh)
    info = read_header(fresh).tensors["w"]
    with RowReader() as reader:
        reader.read_rows(info, 0, 1)
        save_file({"w": torch.ones(2, 4)}, tmp_path / "c.safetensors")
        os.replace(tmp_path / "c.safetensors", fresh)
        # renamed over a file already open: the reader goes on with the planned bytes, never mixes
        assert reader.read_rows(info, 1, 2).tolist() == [[4.0, 5.0, 6.0, 7.0]]


def test_file_stamps_survive_a_plan_file(pair, tmp_path):
    """An executor given only a plan file (plan.serialize) checks its inputs the same way."""
    from streammerge.io.header import FileStamp
    from streammerge.plan.serialize import plan_from_json, plan_to_json

    plan = check(_linear(tmp_path, *pair), MEM)
    info = plan_from_json(plan_to_json(plan)).tensors[0].inputs[0].info
    assert isinstance(info.stamp, FileStamp) and info.stamp == plan.tensors[0].inputs[0].info.stamp
    assert info.stamp.change(info.stamp._replace(size=1)) == f"size {info.stamp.size} bytes is now 1"


# -- item 6 (part): non-finite parameters -------------------------------------------------------------

@pytest.mark.parametrize("method, params, where", [
    ("linear", {"weight": float("nan")}, "models[0].parameters.weight: nan"),
    ("linear", {"weight": [0.5, float("inf")]}, "models[0].parameters.weight[1]: inf"),
    ("linear", {"weight": [{"filter": "mlp", "value": float("-inf")}, {"value": 1.0}]},
     "models[0].parameters.weight[0].value: -inf"),
    ("linear", {"weight": "nan"}, "parameter 'weight' must be a finite number, got 'nan'"),
    ("linear", {"weight": "1e400"}, "parameter 'weight' must be a finite number, got '1e400'"),
    ("slerp", {"t": float("inf")}, "parameters.t: inf"),
])
def test_non_finite_parameters_are_refused(pair, tmp_path, capsys, method, params, where):
    base, expert = pair
    if method == "slerp":
        doc = {"merge_method": "slerp", "base_model": str(base), "parameters": params,
               "models": [{"model": str(base)}, {"model": str(expert)}]}
    else:
        doc = {"merge_method": "linear", "models": [{"model": str(base), "parameters": params},
                                                    {"model": str(expert), "parameters": {"weight": 1.0}}]}
    cfg = write_yaml(tmp_path / "m.yml", doc)
    with pytest.raises(ConfigError) as e:
        check(cfg, MEM)
    assert where in str(e.value)
    _cli_fails(["check", str(cfg)], capsys, where)


# -- item 10: YAML bombs, depth, text that is not UTF-8, files that are not regular -------------------

def _laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\nmerge_method: linear\nmodels: *a{levels - 1}\n"


BOMBS = {
    "billion_laughs": (_laughs(), "expands to more than 100000 values"),
    "merge_keys": ("k0: &k0 {x0: 1, x1: 2, x2: 3, x3: 4, x4: 5, x5: 6, x6: 7, x7: 8, x8: 9}\n"
                   + "".join(f"k{i}: &k{i} {{<<: [{', '.join([f'*k{i - 1}'] * 9)}]}}\n" for i in range(1, 9))
                   + "merge_method: linear\nmodels: [{model: a, parameters: *k8}]\n",
                   "expands to more than 100000 values"),
    "deep_flow": ("merge_method: linear\nmodels: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested more than 64 levels deep"),
    "deep_block": ("merge_method: linear\nparameters:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(200))
                   + "models: [{model: a}]\n", "nested more than 64 levels deep"),
    "deep_aliases": ("x0: &x0 [1]\n" + "".join(f"x{i}: &x{i} [*x{i - 1}]\n" for i in range(1, 300))
                     + "merge_method: linear\nmodels: [{model: a, parameters: {weight: *x299}}]\n",
                     "nested more than 64 levels deep"),
    "recursive_alias": ("merge_method: linear\nmodels: &m [{model: a, parameters: {weight: *m}}]\n",
                        "refers to itself"),
    "huge_int": ("merge_method: linear\nmodels: [{model: a, parameters: {weight: " + "9" * 5000 + "}}]\n",
                 "models[0].parameters.weight"),
    "bad_date": ("merge_method: linear\nname: 2001-13-45\nmodels: [{model: a}]\n", "not valid YAML"),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_yaml_bombs_and_deep_nesting_fail_fast(tmp_path, name):
    text, needle = BOMBS[name]
    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(text)
    _assert_one_clear_error(_cli_check(cfg), f"{cfg}", needle)


def test_yaml_limits_are_roomy_for_real_configs():
    """A long slices config with aliases well under the limits loads."""
    src = "{model: m%d, layer_range: [0, 2], parameters: &p%d {weight: [0.1, 0.2, 0.3], density: 0.5}}"
    slices = "\n".join(f"  - sources: [{src % (i, i)}, {{model: x, layer_range: [0, 2], parameters: *p{i}}}]"
                       for i in range(500))
    config = load_config_text(f"merge_method: ties\nbase_model: x\nslices:\n{slices}\n")
    assert len(config.slices) == 500 and config.slices[499].sources[1].parameters["density"] == 0.5


def test_config_that_is_not_utf8_is_refused(tmp_path, capsys):
    cfg = tmp_path / "latin1.yml"
    cfg.write_bytes("merge_method: linear\nname: caf\u00e9\nmodels: [{model: a}]\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        read_config_text(cfg)
    assert f"{cfg}: not UTF-8 text" in str(e.value) and "byte 0xe9 at offset" in str(e.value)
    _cli_fails(["check", str(cfg)], capsys, "not UTF-8 text", "save the config as UTF-8")


def _fifo_model(tmp_path: Path, donor: Path, fifo: str) -> Path:
    m = tmp_path / "fifo_model"
    shutil.copytree(donor, m)
    (m / fifo).unlink(missing_ok=True)
    os.mkfifo(m / fifo)
    return m


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("fifo", ["model.safetensors", "config.json", INDEX])
def test_fifo_as_an_input_file_is_refused_without_blocking(pair, tmp_path, fifo):
    base, expert = pair
    m = _fifo_model(tmp_path, expert, fifo)
    if fifo == INDEX:
        (m / "model.safetensors").rename(m / "model-00001-of-00001.safetensors")
    cfg = _linear(tmp_path, base, m)
    _assert_one_clear_error(_cli_check(cfg), f"{m / fifo}: is not a regular file (a FIFO)")


# -- tracebacks that became one-line errors ----------------------------------------------------------

def test_text_config_that_is_not_an_object(pair, tmp_path, capsys):
    base, expert = pair
    odd = tmp_path / "odd"
    shutil.copytree(expert, odd)
    (odd / "config.json").write_text(json.dumps({"text_config": "oops"}))
    cfg = _linear(tmp_path, base, odd)
    needle = f"{odd / 'config.json'}: 'text_config' must be an object, got str"
    with pytest.raises(CheckpointError, match="text_config"):
        check(cfg, MEM)
    _cli_fails(["check", str(cfg)], capsys, needle)


def _one_file_model(tmp_path: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    m = tmp_path / name
    m.mkdir()
    save_file(tensors, m / "model.safetensors")
    return m


def test_layer_index_of_thousands_of_digits(pair, tmp_path, capsys):
    base, _ = pair
    name = "model.layers." + "9" * 5000 + ".mlp.up_proj.weight"
    m = _one_file_model(tmp_path, "digits", {name: torch.zeros(2, 2), "model.norm.weight": torch.ones(2)})
    cfg = _linear(tmp_path, base, m)
    flat = _cli_fails(["check", str(cfg)], capsys, f"{m}: tensor 'model.layers.9999", "layer index of 5000 digits")
    assert len(flat) < 600


def test_a_huge_tensor_name_is_cut_in_every_message(pair, tmp_path, capsys):
    base, _ = pair
    name = "x" * (4 << 20)
    m = _one_file_model(tmp_path, "long", {**load_file(base / "model.safetensors"), name: torch.zeros(2)})
    shutil.copy(base / "config.json", m / "config.json")
    cfg = _linear(tmp_path, m, base)  # m first: its extra tensor is an output that base lacks
    flat = _cli_fails(["check", str(cfg)], capsys, "'xxxxxxxx", "...")
    assert len(flat) < 2000, len(flat)


@pytest.mark.parametrize("ref, needle", [
    ("9" * 5000 + "/model", "not a usable path (File name too long)"),
    ("a\0b", "a path cannot hold a NUL character"),
    ("~no_such_user_here/model", "not a usable path"),
])
def test_unusable_model_paths(pair, tmp_path, capsys, ref, needle):
    """Found by tests/test_config_fuzz.py: each raised OSError, ValueError or RuntimeError."""
    base, _ = pair
    cfg = write_yaml(tmp_path / "m.yml", {"merge_method": "linear", "models": [
        {"model": str(base), "parameters": {"weight": 1.0}}, {"model": ref, "parameters": {"weight": 1.0}}]})
    with pytest.raises(ConfigError, match="fix the model path"):
        check(cfg, MEM)
    assert len(_cli_fails(["check", str(cfg)], capsys, needle)) < 600


def test_missing_config_json_in_the_first_model_uses_another_models(pair, tmp_path):
    base, expert = pair
    bare = tmp_path / "bare"
    shutil.copytree(base, bare)
    (bare / "config.json").unlink()
    cfg = _linear(tmp_path, bare, expert)
    plan = check(cfg, MEM)
    warning = f"{bare} has no config.json; the output's config.json is {expert}'s"
    assert any(warning in w for w in plan.warnings), plan.warnings
    expected = json.loads((expert / "config.json").read_text())
    assert {k: v for k, v in plan.out_config.items() if k not in ("torch_dtype", "dtype")} == \
        {k: v for k, v in expected.items() if k not in ("torch_dtype", "dtype")}
    out = tmp_path / "out"
    run(cfg, out, RunOptions(max_memory=2 << 30, progress=False))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == expected["num_hidden_layers"]


# -- safetensors files with bytes no tensor covers ----------------------------------------------------

def _raw(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _u8(n: int, b: int) -> dict:
    return {"dtype": "U8", "shape": [n], "data_offsets": [b, b + n]}


@pytest.mark.parametrize("header, data, needle", [
    ({"a": _u8(4, 0)}, b"abcdef", "2 bytes after the last tensor (file bytes"),
    ({}, b"xxxx", "4 bytes after the header (file bytes"),
    ({"a": _u8(4, 2)}, b"abcdef", "data region bytes 0..2 (file bytes"),
    ({"a": _u8(2, 0), "b": _u8(2, 4)}, b"abcdef", "data region bytes 2..4"),
    ({"a": _u8(4, 0), "z": {"dtype": "U8", "shape": [0], "data_offsets": [6, 6]}}, b"abcdef", "data region bytes 4..6"),
    ({"a": _u8(4, 0), "z": {"dtype": "U8", "shape": [0], "data_offsets": [2, 2]}}, b"abcd", "overlap"),
])
def test_bytes_no_tensor_covers_are_refused(tmp_path, header, data, needle):
    f = tmp_path / "g.safetensors"
    raw = _raw(header, data)
    with pytest.raises(CheckpointError) as e:
        parse_header_bytes(f, raw, len(raw))
    assert str(f) in str(e.value) and needle in str(e.value), str(e.value)
    assert "re-download or re-export" in str(e.value)


@pytest.mark.parametrize("header, data", [
    ({}, b""),
    ({"__metadata__": {"a": "b"}}, b""),
    ({"a": _u8(4, 0), "z": {"dtype": "U8", "shape": [0], "data_offsets": [4, 4]}}, b"abcd"),
    ({"z": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}, "a": _u8(4, 0)}, b"abcd"),
    ({"a": _u8(2, 0), "z": {"dtype": "U8", "shape": [3, 0], "data_offsets": [2, 2]}, "b": _u8(2, 2)}, b"abcd"),
])
def test_zero_size_tensors_and_empty_files_still_parse(tmp_path, header, data):
    from safetensors import safe_open

    f = tmp_path / "ok.safetensors"
    f.write_bytes(_raw(header, data))
    with safe_open(str(f), "np") as st:  # the reference accepts each of these
        names = set(st.keys())
    assert set(read_header(f).tensors) == names


def test_tiling_rule_matches_safetensors_both_ways(tmp_path):
    """Small random layouts (overlaps, gaps, zero-size tensors anywhere, trailing bytes): read_header
    accepts exactly the files safetensors accepts."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from safetensors import safe_open

    f = tmp_path / "t.safetensors"
    layout = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 8)), max_size=4)

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(spans=layout, data_len=st.integers(0, 12))
    def check_one(spans, data_len):
        header = {f"t{i}": _u8(n, b) for i, (n, b) in enumerate(spans)}
        f.write_bytes(_raw(header, bytes(data_len)))
        try:
            with safe_open(str(f), "np") as ref:
                theirs = set(ref.keys())
        except Exception:  # the reference's error types vary by version
            theirs = None
        try:
            ours = set(read_header(f).tensors)
        except CheckpointError:
            ours = None
        assert ours == theirs, (header, data_len)

    check_one()
