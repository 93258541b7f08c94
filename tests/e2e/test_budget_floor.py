"""The budget planner at its edges: a tensor with no elements is one band whatever its row count, and
the floor `check` names is the real one (the smallest budget it accepts), under which a run holds
its ceiling, numba's JIT included.

Peak RSS is measured in a fresh subprocess (VmHWM, as tests/e2e/test_memory.py does), so the test
process's own memory and already-compiled kernels do not count.
"""

import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from conftest import write_yaml
from streammerge import RunOptions
from streammerge.merge import check

# -- a tensor with no elements is one band ------------------------------------------------------------


def _empty_tensor_models(tmp_path):
    paths = []
    for i in range(2):
        p = tmp_path / f"h{i}"
        p.mkdir()
        save_file({"a": torch.full((3, 2), float(i)), "z": torch.zeros(2**62, 0), "y": torch.zeros(0, 64),
                   "x": torch.zeros(0)}, p / "model.safetensors")
        paths.append(p)
    return write_yaml(tmp_path / "c.yml", {"merge_method": "linear",
                                           "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in paths]})


@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_a_tensor_with_no_elements_is_planned_as_one_band(tmp_path, chunk_rows):
    plan = check(_empty_tensor_models(tmp_path), RunOptions(max_memory=2 << 30, chunk_rows=chunk_rows))
    by_name = {t.name: t for t in plan.tensors}
    z = by_name["z"]
    assert (z.rows, z.row_elems, z.rows_per_chunk) == (2**62, 0, 2**62)  # one band, not 2^37 of them
    assert by_name["y"].rows_per_chunk >= 1 and by_name["y"].rows == 0
    assert by_name["x"].rows_per_chunk == 1
    assert by_name["a"].rows_per_chunk == (chunk_rows and min(chunk_rows, 3) or 3)


@pytest.mark.parametrize("shape, rows", [((2**62, 0), 2**62), ((0, 2**40), 0), ((0,), 1)])
@pytest.mark.parametrize("override", [None, 1, 5])
def test_rows_per_chunk_of_an_empty_tensor_is_all_its_rows(shape, rows, override):
    from pathlib import Path

    from streammerge.io.header import TensorInfo
    from streammerge.plan.budget import rows_per_chunk

    info = TensorInfo("z", "F32", shape, 0, 0, Path("m.safetensors"))
    row_elems = shape[1] if len(shape) > 1 else shape[0]
    rpc = rows_per_chunk("z", rows, [info, info], row_elems, "F32", "F32", 2, 1 << 30, 2 << 30, override)
    assert rpc == max(1, rows)


def test_a_run_over_empty_tensors_finishes_and_keeps_their_shapes(tmp_path):
    import time

    from conftest import load_dir
    from streammerge import run

    cfg = _empty_tensor_models(tmp_path)
    t0 = time.perf_counter()
    run(cfg, tmp_path / "out", RunOptions(max_memory=2 << 30, progress=False))
    assert time.perf_counter() - t0 < 30
    out = load_dir(tmp_path / "out")
    assert {k: tuple(v.shape) for k, v in out.items()} == {"a": (3, 2), "z": (2**62, 0), "y": (0, 64), "x": (0,)}
    assert torch.equal(out["a"], torch.full((3, 2), 0.5))


# -- the floor check names is real, and a run at it holds its ceiling ---------------------------------

STATED_OVERHEAD = 64 << 20  # = tests/e2e/test_memory.py's tolerance: thread stacks, allocator slack
FLOOR = re.compile(r"raise --max-memory to at least (\d+)MiB")


def _cli(*argv: str, env: dict | None = None) -> tuple[int, str, int]:
    """`streammerge ARGV` in a fresh interpreter: exit code, stdout + stderr, peak RSS (VmHWM) in bytes."""
    code = textwrap.dedent("""
        import sys
        from streammerge.cli import main
        rc = main(sys.argv[1:])
        hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        print("HWM", hwm)
        sys.exit(rc)
    """)
    import os

    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=600,
                       env={**os.environ, **(env or {})})
    hwm = int(r.stdout.split("HWM")[-1]) if "HWM" in r.stdout else 0
    return r.returncode, r.stdout.rsplit("HWM", 1)[0] + r.stderr, hwm


def _floor_of(cfg, *extra: str) -> int:
    rc, err, _ = _cli("check", str(cfg), "--max-memory", "1MiB", *extra)
    assert rc == 1, err
    m = FLOOR.search(err.replace("\n", " "))
    assert m, err
    return int(m[1]) << 20


@pytest.fixture(scope="module")
def small_family(tmp_path_factory):
    import dataclasses

    from streammerge import synth

    spec = dataclasses.replace(synth.PRESETS["tiny"], hidden=256, intermediate=704, layers=2, vocab=2048)
    return synth.make_family(tmp_path_factory.mktemp("floor"), spec, 2, seed=3)


def _config(tmp_path, method, family):
    base, experts = family
    params = {"weight": 0.5, "density": 0.5, **({"epsilon": 0.1} if method == "della" else {})}
    return write_yaml(tmp_path / f"{method}.yml", {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
                                                   "models": [{"model": str(e), "parameters": params} for e in experts]})


def test_the_floor_check_names_is_accepted_and_just_below_it_is_refused(small_family, tmp_path):
    cfg = _config(tmp_path, "della", small_family)
    floor = _floor_of(cfg)
    rc, err, _ = _cli("check", str(cfg), "--max-memory", f"{floor >> 20}MiB")
    assert rc == 0, err
    rc, err, _ = _cli("check", str(cfg), "--max-memory", f"{(floor >> 20) - 8}MiB")
    assert rc == 1 and "below the smallest budget this merge can run in" in err, err
    again = int(FLOOR.search(err.replace("\n", " "))[1]) << 20
    assert abs(again - floor) <= 4 << 20, (again >> 20, floor >> 20)
    assert "Traceback" not in err


@pytest.mark.parametrize("method", ["della", "ties"])
def test_a_run_at_the_floor_stays_within_its_budget(method, small_family, tmp_path):
    cfg = _config(tmp_path, method, small_family)
    floor = _floor_of(cfg)
    rc, err, peak = _cli("run", str(cfg), str(tmp_path / "out"), "--max-memory", f"{floor >> 20}MiB", "--no-progress")
    assert rc == 0, err
    assert "numba-cpu" in err  # the compiled kernels ran: their code is what the old baseline missed
    assert peak <= floor + STATED_OVERHEAD, f"peak RSS {peak / 2**20:.0f} MiB > floor {floor >> 20} MiB + 64 MiB"


def test_numba_share_is_planned_only_where_numba_kernels_run(monkeypatch):
    from streammerge.plan import budget

    assert budget.numba_rss("della", "cpu") >= budget.NUMBA_RSS - budget.NUMBA_IMPORT_RSS > 0
    assert budget.numba_rss("della", "auto") > 0  # auto without a GPU is a CPU run
    assert budget.numba_rss("della", "cuda") == 0
    assert budget.numba_rss("linear", "cpu") == 0
    monkeypatch.setenv("STREAMMERGE_NO_NUMBA", "1")
    assert budget.numba_rss("della", "cpu") == 0


@pytest.mark.parametrize("family", ["tiny_family", "tiny_family_fp32"])
def test_the_methods_planned_without_numba_run_no_numba_kernel(family, request, tmp_path):
    """NUMBA_FREE is a claim about the methods' code: a method in it that starts calling a numba kernel
    would run past the budget its plan reserved."""
    from streammerge import run
    from streammerge.plan.budget import NUMBA_FREE

    base, experts = request.getfixturevalue(family)
    b, e = str(base), [str(x) for x in experts]
    configs = {
        "linear": {"models": [{"model": m, "parameters": {"weight": 0.5}} for m in e]},
        "passthrough": {"models": [{"model": e[0], "parameters": {"scale": 0.5}}]},
    }
    assert set(configs) == NUMBA_FREE
    for method, cfg in configs.items():
        path = write_yaml(tmp_path / f"{method}.yml", {"merge_method": method, **cfg})
        report = run(path, tmp_path / method, RunOptions(max_memory=2 << 30, progress=False))
        ran = {impl for impls in report.kernels.values() for impl in impls}
        assert "numba-cpu" not in ran, (method, report.kernels)


@pytest.mark.parametrize("loose, blocked, cap", [(0, 5 << 20, 1 << 19), (3 << 20, 1 << 20, 1 << 17),
                                                 (1 << 10, 0, 1 << 19), (0, 200 << 20, 1 << 19)])
def test_floor_is_the_smallest_data_budget_from_which_every_larger_one_fits(loose, blocked, cap):
    import random

    from streammerge.plan import budget as b

    f = b.Floor(budget=0, baseline=0, block_cap=cap, widest_k=3, threads=2)
    if loose:
        f.add("loose", loose, False, 2, "BF16")
    if blocked:
        f.add("blocked", blocked, True, 3, "F32")
    d0 = f.data_floor()
    starts = [b.BLOCK_SHARE * 2 * e * b._per_elem(3, "F32") for e in (1 << i for i in range(13, 20))]
    probes = {d0, d0 + 1, *(s + o for s in starts for o in (-1, 0, 1) if s + o >= d0)}
    probes |= {random.Random(i).randrange(d0, 4 * max(starts)) for i in range(200)}
    assert all(f.fits(d) for d in probes), sorted(d for d in probes if not f.fits(d))[:5]
    assert d0 == 1 or not f.fits(d0 - 1)
    # the budget the error names is accepted by the planner's own test, and one MiB less is not
    f = b.Floor(budget=1, baseline=300 << 20, block_cap=cap, widest_k=3, threads=2)
    if loose:
        f.add("loose", loose, False, 2, "BF16")
    if blocked:
        f.add("blocked", blocked, True, 3, "F32")
    need = f.minimum()
    assert f.error() is not None and f"at least {need >> 20}MiB" in str(f.error())
    assert b.Floor(need, 300 << 20, cap, 3, 2, f.loose, dict(f.blocked)).error() is None
