"""The budget planner at its edges: a tensor with no elements is one band whatever its row count, and
the floor `check` names is the real one (the smallest budget it accepts), under which a run holds
its ceiling, numba's JIT included.

Peak RSS is measured in a fresh subprocess (VmHWM, as tests/e2e/test_memory.py does), so the test
process's own memory and already-compiled kernels do not count.
"""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from conftest import write_yaml
from streammerge import RunOptions, check

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
