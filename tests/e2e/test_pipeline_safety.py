"""The pipeline never writes a wrong shard and never hangs: zero-size and 0-d tensors merge like any
other, every shard is committed exactly once with its checksum, and a failure in any thread (reader,
compute, writer: a full disk among them) stops the run promptly with that failure as the error.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load_dir, merge, shard_bytes, write_yaml
from streammerge import RunOptions, run
from streammerge.errors import OutputError

NAMES_ZERO = ("z.empty_rows", "z.empty_cols", "z.empty_1d")  # reversed: the order they sort in


def _model(path: Path, seed: int, scalar: str | None = None) -> dict[str, torch.Tensor]:
    """Integer-valued fp32 tensors (so 0.5·a + 0.5·b is exact), three zero-size ones that sort last in
    every shard's data, and with `scalar` ("0d" or "1d") a tensor `s.scale` of shape () or [1]."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)

    def ints(*shape):
        return torch.randint(-8, 8, shape, generator=g).float()

    t = {"a.weight": ints(6, 5), "b.weight": ints(4, 3), "c.bias": ints(7),
         "z.empty_rows": torch.zeros(0, 4), "z.empty_cols": torch.zeros(3, 0), "z.empty_1d": torch.zeros(0)}
    if scalar is not None:
        t["s.scale"] = ints(1) if scalar == "1d" else ints(1).reshape(())
    save_file(t, path / "model.safetensors", metadata={"format": "pt"})
    return t


@pytest.fixture
def pair(tmp_path) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    paths = [tmp_path / "m0", tmp_path / "m1"]
    return paths, [_model(p, i) for i, p in enumerate(paths)]


def _linear(paths: list[Path]) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in paths]}


def _expected(tensors: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: tensors[0][k] * 0.5 + tensors[1][k] * 0.5 for k in tensors[0]}


def _assert_same(out: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert out.keys() == expected.keys()
    for k, v in expected.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype, k
        assert torch.equal(out[k], v), k


# -- item 1: zero-size tensors -------------------------------------------------------------------------

def test_zero_size_tensor_last_in_a_shard_leaves_the_shard_whole(pair, tmp_path):
    """The empty tensors' bands come after the shard's last real bytes: they must not reopen and
    recommit the shard (it came out all zeros)."""
    paths, tensors = pair
    out = merge(_linear(paths), tmp_path)
    _assert_same(load_dir(out), _expected(tensors))


@pytest.mark.parametrize("shard_size,chunk_rows", [(20, None), (100, 1), (100, None)])
def test_zero_size_tensors_with_several_shards_and_resume(pair, tmp_path, shard_size, chunk_rows):
    """Several shards, then --resume after the loss of every shard but the first: the same bytes, every
    tensor (empty ones too) where the index says. At 20 bytes the empty tensors get a shard of their
    own; at 100 they end the second shard, after its real tensors."""
    from streammerge.merge import check

    paths, tensors = pair
    cfg = write_yaml(tmp_path / "c.yml", _linear(paths))
    opts = dict(max_memory=2 << 30, progress=False, out_shard_size=shard_size, chunk_rows=chunk_rows)
    plan = check(cfg, RunOptions(**opts))
    groups = [s.tensors for s in plan.shards]
    if shard_size == 20:
        assert groups[-1] == ("z.empty_1d", "z.empty_cols", "z.empty_rows") and plan.shards[-1].nbytes == 0, groups
    else:
        assert groups == [("a.weight",), ("b.weight", "c.bias", *NAMES_ZERO[::-1])], groups
    out = tmp_path / "out"
    run(cfg, out, RunOptions(**opts))
    _assert_same(load_dir(out), _expected(tensors))
    import json

    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for name, f in weight_map.items():
        assert name in load_file(out / f), (name, f)
    expected = shard_bytes(out)
    shards = sorted(expected)
    for f in shards[1:]:
        (out / f).unlink()
    (out / "model.safetensors.index.json").unlink()
    run(cfg, out, RunOptions(**opts, resume=True))
    assert shard_bytes(out) == expected


def test_a_zero_size_tensor_of_2_to_the_62_rows_is_never_read_or_computed(tmp_path):
    """[2**62, 0] holds no bytes: the executor skips it whatever rows_per_chunk the plan gives it."""
    paths = [tmp_path / "h0", tmp_path / "h1"]
    for i, p in enumerate(paths):
        p.mkdir()
        save_file({"a": torch.full((3, 2), float(i)), "z": torch.zeros(2**62, 0)}, p / "model.safetensors")
    box = {}
    err, _ = _within(20, lambda: box.setdefault("out", load_dir(merge(_linear(paths), tmp_path))))
    assert err is None, repr(err)
    assert box["out"]["z"].shape == (2**62, 0) and torch.equal(box["out"]["a"], torch.full((3, 2), 0.5))


def test_zero_size_tensors_with_sce_and_arcee_fusion(tmp_path):
    paths = [tmp_path / f"m{i}" for i in range(3)]
    tensors = [_model(p, i) for i, p in enumerate(paths)]
    for method in ("sce", "arcee_fusion"):
        models = paths[1:2] if method == "arcee_fusion" else paths[1:]
        cfg = {"merge_method": method, "base_model": str(paths[0]), "models": [{"model": str(p)} for p in models]}
        out = load_dir(merge(cfg, tmp_path, method))
        for name in NAMES_ZERO:
            assert out[name].shape == tensors[0][name].shape, (method, name)
        assert out.keys() == tensors[0].keys()


# -- item 3: 0-d tensors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "slerp", "task_arithmetic"])
def test_scalar_merges_like_a_one_element_vector(tmp_path, method):
    """The same model twice, once with `s.scale` 0-d and once with shape [1]: the same value out."""
    outs = {}
    for kind, shape in (("scalar", "0d"), ("vector", "1d")):
        paths = [tmp_path / kind / f"m{i}" for i in range(3)]
        for i, p in enumerate(paths):
            _model(p, i, scalar=shape)
        if method == "linear":
            cfg = _linear(paths[:2])
        elif method == "slerp":
            cfg = {"merge_method": "slerp", "base_model": str(paths[0]), "parameters": {"t": 0.3},
                   "models": [{"model": str(p)} for p in paths[:2]]}
        else:
            params = {"weight": 0.7} | ({"density": 0.5} if method != "task_arithmetic" else {})
            cfg = {"merge_method": method, "base_model": str(paths[0]),
                   "models": [{"model": str(p), "parameters": params} for p in paths[1:]]}
        outs[kind] = load_dir(merge(cfg, tmp_path / kind, "out"))
    assert outs["scalar"]["s.scale"].shape == ()
    assert outs["vector"]["s.scale"].shape == (1,)
    assert torch.equal(outs["scalar"]["s.scale"].reshape(1), outs["vector"]["s.scale"])
    for k in outs["vector"]:
        if k != "s.scale":
            assert torch.equal(outs["scalar"][k], outs["vector"][k]), k


# -- item 9: a failure in any thread stops the run, promptly, as itself -------------------------------------

def _within(seconds: float, fn):
    """fn() on a thread: (its exception or None, the perf_counter() when it returned); fails the test if
    it is still running after `seconds`."""
    box: dict = {}

    def target():
        try:
            fn()
        except BaseException as e:  # handed to the test
            box["error"] = e
        box["end"] = time.perf_counter()

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), f"the run hung: still running after {seconds} s"
    return box.get("error"), box["end"]


FAILED_AT: list[float] = []   # when the injected fault was raised


def _stopped_promptly(end: float) -> None:
    """Every thread stopped, and the run returned, within a second of the fault."""
    assert FAILED_AT and end - FAILED_AT[-1] < 1.0, end - FAILED_AT[-1]


def _family_run(tiny_family, tmp_path, **opts):
    from e2e.test_methods_basic import config_for

    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("task_arithmetic", base, experts))
    options = RunOptions(max_memory=2 << 30, progress=False, out_shard_size=60_000, chunk_rows=1, **opts)
    return lambda: run(cfg, tmp_path / "out", options)


def _full_disk_after(monkeypatch, limit: int) -> list[int]:
    """pwrite in the writer fails with ENOSPC once `limit` bytes are written, as a full disk does, and
    slowly (the compute fills the writer's queue meanwhile: that is when it used to hang)."""
    from streammerge.io import writer

    written = [0]
    real = writer.os.pwrite

    def pwrite(fd, data, offset):
        n = memoryview(data).nbytes
        if written[0] + n > limit:
            time.sleep(0.5)
            FAILED_AT.append(time.perf_counter())
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written[0] += n
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", pwrite)
    return written


@pytest.mark.parametrize("prefetch", [1, 2])
def test_full_disk_stops_the_run_with_the_space_it_needs(tiny_family, tmp_path, monkeypatch, prefetch):
    fn = _family_run(tiny_family, tmp_path, prefetch=prefetch)
    _full_disk_after(monkeypatch, 150_000)
    err, end = _within(20, fn)
    assert isinstance(err, OutputError), repr(err)
    _stopped_promptly(end)
    msg = str(err)
    assert msg.startswith(f"No space left on device: {tmp_path / 'out'}/model-0000"), msg
    assert msg.endswith("; free space and run with --resume"), msg
    import re

    need = int(re.search(r"\(need (\d+) more bytes\)", msg).group(1))
    name = re.search(r"/(model-\d+-of-\d+\.safetensors) ", msg).group(1)
    assert 0 < need <= 60_000 + 4096
    assert not (tmp_path / "out" / name).exists()
    assert not list((tmp_path / "out").glob("*.partial"))  # the space it took is given back


def test_full_disk_then_resume_gives_the_same_bytes(tiny_family, tmp_path, monkeypatch):
    fn = _family_run(tiny_family, tmp_path)
    err, _ = _within(20, fn)
    assert err is None
    expected = shard_bytes(tmp_path / "out")
    import shutil

    shutil.rmtree(tmp_path / "out")
    with monkeypatch.context() as m:
        _full_disk_after(m, 200_000)
        err, _ = _within(20, fn)
    assert isinstance(err, OutputError)
    err, _ = _within(20, _family_run(tiny_family, tmp_path, resume=True))
    assert err is None
    assert shard_bytes(tmp_path / "out") == expected


def test_reader_failure_stops_the_run_as_itself(tiny_family, tmp_path, monkeypatch):
    from streammerge.io.reader import RowReader

    fn = _family_run(tiny_family, tmp_path)
    calls = [0]
    real = RowReader.read_rows

    def read_rows(self, *a, **k):
        calls[0] += 1
        if calls[0] == 40:
            FAILED_AT.append(time.perf_counter())
            raise RuntimeError("the disk under the inputs went away")
        return real(self, *a, **k)

    monkeypatch.setattr(RowReader, "read_rows", read_rows)
    err, end = _within(20, fn)
    assert isinstance(err, RuntimeError) and str(err) == "the disk under the inputs went away", repr(err)
    _stopped_promptly(end)


@pytest.mark.parametrize("threads", [1, 2])
def test_compute_failure_stops_the_run_as_itself(tiny_family, tmp_path, monkeypatch, threads):
    """A method's map failing, on the main thread (one torch thread) or on a compute worker."""
    import dataclasses

    from streammerge import execute

    calls = [0]
    real_get = execute.get_method

    def get_method(name):
        spec = real_get(name)

        def bad_map(job, chunks, stats, row0):
            calls[0] += 1
            if calls[0] == 40:
                FAILED_AT.append(time.perf_counter())
                raise ValueError("map failed on purpose")
            return spec.map(job, chunks, stats, row0)

        return dataclasses.replace(spec, map=bad_map)

    monkeypatch.setattr(execute, "get_method", get_method)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        err, end = _within(20, _family_run(tiny_family, tmp_path))
    finally:
        torch.set_num_threads(before)
    assert isinstance(err, ValueError) and str(err) == "map failed on purpose", repr(err)
    _stopped_promptly(end)


def test_shard_done_failure_stops_the_run_as_itself(pair, tmp_path):
    """`on_shard_done` (the manifest update) runs on the writer thread: its failure is the run's."""
    from streammerge.merge import check
    from streammerge.execute import Executor

    paths, _ = pair
    cfg = write_yaml(tmp_path / "c.yml", _linear(paths))
    plan = check(cfg, RunOptions(max_memory=2 << 30, out_shard_size=20, chunk_rows=1))
    (tmp_path / "out").mkdir()

    def done(i, stats):
        raise OSError(errno.EIO, "manifest write failed")

    ex = Executor(plan, out_dir=tmp_path / "out", device=torch.device("cpu"), on_shard_done=done)
    err, _ = _within(20, ex.run)
    assert isinstance(err, OSError) and "manifest write failed" in str(err)


@pytest.mark.parametrize("method", ["sce", "arcee_fusion"])
def test_sce_and_arcee_fusion_merge_a_zero_size_tensor_to_the_empty_tensor(tmp_path, method):
    """The methods themselves (the executor skips empty tensors): their reduce passes and map, fed the
    empty bands of each zero-size tensor, give the empty tensor."""
    from streammerge.merge import check
    from streammerge.methods import TensorJob, get_method

    paths = [tmp_path / f"m{i}" for i in range(3)]
    tensors = [_model(p, i) for i, p in enumerate(paths)]
    models = paths[1:2] if method == "arcee_fusion" else paths[1:]
    cfg = write_yaml(tmp_path / "c.yml", {"merge_method": method, "base_model": str(paths[0]),
                                          "parameters": {"select_topk": 0.5} if method == "sce" else {},
                                          "models": [{"model": str(p)} for p in models]})
    plan = check(cfg, RunOptions(max_memory=2 << 30))
    spec = get_method(method)
    for t in plan.tensors:
        if t.name not in NAMES_ZERO:
            continue
        job = TensorJob.from_plan(t, plan.seed)
        chunks = [tensors[int(s.info.file.parent.name[1:])][t.name] for s in t.inputs]   # folders m0, m1, m2
        assert len(chunks) == len(models) + 1 and all(c.numel() == 0 for c in chunks)
        stats: list = []
        for red in spec.reduces_for(job):
            state = red.init(job, stats)
            red.update(state, job, chunks, 0)
            stats.append(red.finish(state, job, stats))
        out = spec.map(job, chunks, stats, 0)
        assert tuple(out.shape) == tensors[0][t.name].shape and out.numel() == 0, t.name


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a size-limited tmpfs to fill: {e}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs to fill (needs root): {proc.stderr.strip()}")


def test_a_real_full_filesystem_is_a_one_line_error_and_resume_finishes(tiny_family, tmp_path, monkeypatch, capsys):
    """On a 256 KiB tmpfs the run (about 1.2 MB of shards) fills the disk part way: exit 1, the message,
    no .partial left. merge.py's free-space check would refuse up front, so it is switched off here."""
    from e2e.test_methods_basic import config_for
    from streammerge import merge as merge_mod
    from streammerge.cli import main

    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("task_arithmetic", base, experts))
    flags = ["--out-shard-size", "60000", "--no-progress"]
    assert main(["run", str(cfg), str(tmp_path / "ref"), *flags]) == 0
    expected = shard_bytes(tmp_path / "ref")
    mnt = tmp_path / "small"
    _tmpfs(mnt, "256k")
    try:
        monkeypatch.setattr(merge_mod, "_check_free_disk", lambda *a, **k: None)
        out = mnt / "out"
        result: dict = {}
        err, _ = _within(60, lambda: result.setdefault("rc", main(["run", str(cfg), str(out), *flags])))
        assert err is None and result["rc"] == 1
        lines = capsys.readouterr().err.strip().splitlines()
        import re

        assert re.fullmatch(rf"error: No space left on device: {re.escape(str(out))}/model-\d{{5}}-of-\d{{5}}"
                            r"\.safetensors \(need \d+ more bytes\); free space and run with --resume", lines[-1]), lines
        assert not list(out.glob("*.partial"))
        done = sorted(f.name for f in out.glob("*.safetensors"))
        assert done and all((out / f).read_bytes() == expected[f] for f in done)
        # free space (here: remount bigger) and resume
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True, timeout=30)
        assert main(["run", str(cfg), str(out), *flags, "--resume"]) == 0
        assert shard_bytes(out) == expected
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_each_shard_carries_its_checksum_before_on_shard_done(pair, tmp_path):
    from streammerge.merge import check
    from streammerge.execute import Executor
    from streammerge.io.checksum import file_digest

    paths = [tmp_path / "s0", tmp_path / "s1"]
    for i, p in enumerate(paths):
        _model(p, i, scalar="0d")
    cfg = write_yaml(tmp_path / "c.yml", _linear(paths))
    plan = check(cfg, RunOptions(max_memory=2 << 30, out_shard_size=3, chunk_rows=2))
    assert len(plan.shards) == 5 and plan.shards[-1].nbytes == 0, plan.shards
    out = tmp_path / "out"
    out.mkdir()
    seen = {}

    def done(i, stats):
        seen[i] = (stats.checksum, file_digest(out / stats.filename))

    result = Executor(plan, out_dir=out, device=torch.device("cpu"), on_shard_done=done).run()
    assert sorted(seen) == list(range(len(plan.shards)))   # each shard once, the empty ones included
    for i, s in enumerate(result.shards):
        assert s.checksum.startswith("crc32-sha256:") and seen[i] == (s.checksum, s.checksum), s.filename
