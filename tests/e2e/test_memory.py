"""The memory budget is a ceiling: a tensor 4x the whole --max-memory streams through in row bands.

Measured in a subprocess by the OS's peak RSS (VmHWM of the child's address space; ru_maxrss would
inherit pytest's peak across exec), so the test's own memory does not count. The input is written band by band, so no process ever holds the whole tensor.
"""

import json
import subprocess
import sys
import textwrap

import torch

from conftest import write_yaml
from streammerge.io.writer import OutTensor, ShardWriter

BUDGET = 320 << 20
STATED_OVERHEAD = 64 << 20  # thread stacks and allocator slack beyond what the planner accounts for
ROWS, COLS = 20480, 16384   # fp32: 1280 MiB = 4 x BUDGET


def _child(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_rss_stays_within_budget_plus_overhead(tmp_path):
    d = tmp_path / "m0"
    d.mkdir()
    w = ShardWriter(d / "model.safetensors", [OutTensor("big.weight", "F32", (ROWS, COLS)), OutTensor("small.bias", "F32", (COLS,))])
    band = 1024
    for r0 in range(0, ROWS, band):
        rows = torch.arange(r0 * COLS, (r0 + band) * COLS, dtype=torch.float32).reshape(band, COLS) % 1000.0
        w.write("big.weight", r0 * COLS * 4, rows)
    w.write("small.bias", 0, torch.ones(COLS))
    w.commit()
    assert ROWS * COLS * 4 >= 4 * BUDGET
    cfg = write_yaml(tmp_path / "c.yml", {"merge_method": "linear", "parameters": {"normalize": False},
                                          "models": [{"model": str(d), "parameters": {"weight": 0.5}}]})
    got = _child(f"""
        import json
        from streammerge import RunOptions, run
        from streammerge.report import peak_rss_bytes
        rep = run({str(cfg)!r}, {str(tmp_path / 'out')!r}, RunOptions(max_memory={BUDGET}, progress=False))
        print(json.dumps({{"peak": peak_rss_bytes(), "reported": rep.peak_rss}}))
    """)["peak"]
    assert got <= BUDGET + STATED_OVERHEAD, (
        f"peak RSS {got / 2**20:.0f} MiB > budget {BUDGET >> 20} MiB + {STATED_OVERHEAD >> 20} MiB")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        sl = f.get_slice("big.weight")
        for r0 in (0, ROWS // 2, ROWS - 3):
            expect = (torch.arange(r0 * COLS, (r0 + 3) * COLS, dtype=torch.float32).reshape(3, COLS) % 1000.0) * 0.5
            assert torch.equal(sl[r0:r0 + 3], expect)
