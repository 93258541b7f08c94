"""The scale presets and their fast writer, a slab merge under a small budget, the run chart, gpu_check.sh."""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import write_yaml
from streammerge.synth_spec import FAST_PRESETS, PRESET_SHARD_SIZES, PRESETS, hf_config, tensor_shapes

ROOT = Path(__file__).resolve().parent.parent


def test_the_70b_presets_have_llama_3_70b_shapes_and_config():
    full, slab = PRESETS["70b-full"], PRESETS["70b-slab"]
    assert full.n_params == 70_553_706_496   # Llama-3-70B's parameter count
    assert slab == dataclasses.replace(full, layers=2)
    cfg = hf_config(slab)
    assert {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                "vocab_size", "rope_theta", "head_dim", "max_position_embeddings")} == {
        "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
        "vocab_size": 128256, "rope_theta": 500000.0, "head_dim": 128, "max_position_embeddings": 8192}
    shapes = dict(tensor_shapes(slab))
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (128256, 8192)   # 2.1 GB each in bf16
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (1024, 8192)
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (8192, 28672)
    assert "model.layers.2.mlp.up_proj.weight" not in shapes
    assert PRESETS["8b"].n_params == 8_030_261_248   # Llama-3-8B's
    assert hf_config(PRESETS["8b"])["rope_theta"] == 500000.0
    assert FAST_PRESETS == {"8b", "70b-slab", "70b-full"} and set(PRESET_SHARD_SIZES.values()) == {5 * 10**9}


def test_small_presets_keep_their_config():
    """The new spec fields default to what the small presets always wrote."""
    cfg = hf_config(PRESETS["1b"])
    assert (cfg["rope_theta"], cfg["max_position_embeddings"]) == (10000.0, 2048)


# -- the fast writer --------------------------------------------------------------------------------

# the 70B slab's band structure scaled down: embedding and lm_head several bands wide at the budget
# below, the layers in shards of their own
SLAB = dataclasses.replace(PRESETS["70b-slab"], hidden=512, intermediate=1792, heads=8, kv_heads=1, vocab=24000)
SHARD = 16 * 10**6


@pytest.fixture(scope="module")
def slab_family(tmp_path_factory):
    from streammerge.synth_fast import make_family_fast

    return make_family_fast(tmp_path_factory.mktemp("slab"), SLAB, 2, seed=5, shard_size=SHARD)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_fast_writer_writes_the_spec_sharded_and_experts_near_the_base(slab_family):
    base, experts = slab_family
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {n for n, _ in tensor_shapes(SLAB)}
    b, e = _tensors(base), _tensors(experts[0])
    assert {k: tuple(v.shape) for k, v in b.items()} == dict(tensor_shapes(SLAB))
    assert all(v.dtype == torch.bfloat16 for v in b.values())
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in b.values())
    emb = b["model.embed_tokens.weight"].float()
    assert abs(emb.std().item() - 0.02) < 0.001 and abs(emb.mean().item()) < 0.001
    assert abs(b["model.norm.weight"].float().mean().item() - 1.0) < 0.01
    delta = (e["lm_head.weight"].float() - b["lm_head.weight"].float())
    assert abs(delta.std().item() - 0.02) < 0.002      # expert = base + 0.02 N(0, 1)
    other = _tensors(experts[1])["lm_head.weight"].float() - b["lm_head.weight"].float()
    assert abs(torch.corrcoef(torch.stack([delta.flatten(), other.flatten()]))[0, 1].item()) < 0.05
    assert not torch.equal(b["model.layers.0.mlp.up_proj.weight"][:4], b["model.layers.0.mlp.gate_proj.weight"][:4])
    assert json.loads((base / "config.json").read_text())["vocab_size"] == 24000


def test_fast_writer_is_deterministic_and_reused(slab_family, tmp_path):
    from streammerge.synth_fast import is_complete_fast, make_family_fast, write_checkpoint_fast

    spec = dataclasses.replace(SLAB, vocab=4000, layers=1)
    one = write_checkpoint_fast(tmp_path / "one", spec, seed=5, model_index=1, noise=0.02, shard_size=SHARD)
    two = write_checkpoint_fast(tmp_path / "two", spec, seed=5, model_index=1, noise=0.02, shard_size=SHARD)
    assert [f.read_bytes() for f in sorted(one.glob("*.safetensors"))] == \
           [f.read_bytes() for f in sorted(two.glob("*.safetensors"))]
    assert is_complete_fast(one, spec, 5, model_index=1, noise=0.02, shard_size=SHARD)
    assert not is_complete_fast(one, spec, 6, model_index=1, noise=0.02, shard_size=SHARD)
    base, _ = slab_family
    stamp = base.stat().st_mtime_ns
    make_family_fast(base.parent, SLAB, 2, seed=5, shard_size=SHARD, reuse=True)
    assert base.stat().st_mtime_ns == stamp


# -- the slab merges under a small budget -----------------------------------------------------------

BUDGET_MIB = 600   # a fresh process's baseline (Python, torch, numba: 300-500 MiB) + the bands
STATED_OVERHEAD = 64 << 20   # = tests/e2e/test_memory.py's tolerance: thread stacks, allocator slack


def _cli(*argv: str) -> tuple[int, str, int]:
    code = textwrap.dedent("""
        import sys
        from streammerge.cli import main
        rc = main(sys.argv[1:])
        print("HWM", next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
        sys.exit(rc)
    """)
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=600)
    hwm = int(r.stdout.split("HWM")[-1]) if "HWM" in r.stdout else 0
    return r.returncode, r.stdout + r.stderr, hwm


def test_the_slab_merges_in_bands_within_its_budget(slab_family, tmp_path, fresh_baseline):
    from streammerge import RunOptions
    from streammerge.merge import check

    base, experts = slab_family
    cfg = write_yaml(tmp_path / "ties.yml", {
        "merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
        "models": [{"model": str(e), "parameters": {"weight": 0.5, "density": 0.5}} for e in experts]})
    plan = check(cfg, RunOptions(max_memory=BUDGET_MIB << 20))
    try:
        import matplotlib  # noqa: F401
        plot = ["--plot", str(tmp_path / "run.png")]   # run's chart, drawn while the budget is measured
    except ImportError:
        plot = []
    emb = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    assert emb.rows_per_chunk < emb.rows, (emb.rows_per_chunk, emb.rows)   # two bands wide or more
    rc, out, peak = _cli("run", str(cfg), str(tmp_path / "out"), "--max-memory", f"{BUDGET_MIB}MiB", "--no-progress",
                         "--report", str(tmp_path / "r.json"), *plot)
    assert rc == 0, out
    assert peak <= (BUDGET_MIB << 20) + STATED_OVERHEAD, f"peak RSS {peak >> 20} MiB over {BUDGET_MIB} MiB + 64 MiB"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["bytes_read"] >= sum(f.stat().st_size for p in (base, *experts) for f in p.glob("*.safetensors")) * 0.99
    merged = _tensors(tmp_path / "out")
    assert set(merged) == {n for n, _ in tensor_shapes(SLAB)}
    if plot:
        assert _png_size(tmp_path / "run.png") == (1200, 800)


# a fresh process replays della's rescale pass on embedding-shaped blocks (64 rows of 8192, the 70B
# slab's), the states kept as the band runner keeps them, and reports glibc's main-arena growth
_HEAP_REPLAY = textwrap.dedent("""
    import ctypes, sys
    import torch
    from streammerge.methods import get_method
    from streammerge.methods.registry import TensorJob
    from streammerge.pipeline import bound_malloc

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                   "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    bound_malloc()
    rows, n, block, blocks = 4096, 8192, 64, int(sys.argv[1])
    expert = {"density": 0.5, "epsilon": 0.1, "weight": 0.5}
    job = TensorJob(name="model.embed_tokens.weight", shape=(rows, n), rows=rows, compute_code="BF16", base=0,
                    params={"rescale": True, "rescale_mode": "l1", "normalize": True, "lambda": 1.0},
                    model_params=({}, expert, expert), model_ids=(0, 1, 2), seed=0, row_elems=n)
    (red,) = get_method("della").reduces_for(job)
    g = torch.Generator().manual_seed(0)
    band = [(torch.randn(block, n, generator=g) * 0.02).to(torch.bfloat16) for _ in range(3)]
    state = red.init(job, [])
    for b in range(blocks):
        if b == blocks // 4:   # past the first calls' one-off allocations
            start = libc.mallinfo2().arena
        part = red.init(job, [])
        red.update(part, job, band, b * block)
        red.merge(state, part)
    print("GROWTH", libc.mallinfo2().arena - start)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
def test_della_rescale_pass_does_not_grow_the_heap_per_block():
    """The 70B slab's della run peaked at up to 1.9 GiB under a 1 GiB budget: each block's keep mask was a
    fresh 512 KiB aligned allocation, and with the pass's small per-block sums kept alive beside them,
    glibc (before 2.38) reused none of the freed masks, so the heap grew by a mask per block."""
    r = subprocess.run([sys.executable, "-c", _HEAP_REPLAY, "800"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    growth = int(r.stdout.split("GROWTH")[-1])
    assert growth < 16 << 20, f"the heap grew {growth >> 20} MiB over 600 blocks of della's rescale pass"


def test_trim_heap_returns_freed_heap_pages(tmp_path):
    """The compute loop's safety net: free blocks pinned inside the heap by live ones go back to the OS."""
    code = textwrap.dedent("""
        import ctypes
        from streammerge.pipeline import bound_malloc, trim_heap

        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        bound_malloc()
        blocks = []
        for _ in range(400):   # 200 MiB in 512 KiB heap blocks; every other one stays live and pins the
            p = libc.malloc(1 << 19)   # freed one beside it inside the heap, out of the top's reach
            ctypes.memset(p, 1, 1 << 19)
            blocks.append(p)
        for p in blocks[::2]:
            libc.free(p)
        before = rss()
        trim_heap()
        print("FREED", before - rss())
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split("FREED")[-1]) > 75 << 20


# -- the chart ------------------------------------------------------------------------------------------

def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_chart_series_come_from_the_report_and_the_samples():
    from streammerge.plot import chart_series
    from streammerge.report import RunReport, ShardReport

    shards = [ShardReport("a", bytes_read=4e9, bytes_written=1e9, read_s=2.0, compute_s=1.0, write_s=0.5,
                          started=10.0, finished=12.0),
              ShardReport("b", bytes_read=2e9, bytes_written=1e9, read_s=1.0, compute_s=4.0, write_s=2.0,
                          started=12.0, finished=15.0),
              ShardReport("c", skipped=True)]
    report = RunReport("ties", "out", 6.0, 3 << 29, 1 << 30, "cpu", shards)
    data = chart_series(report, [(9.0, 1 << 29), (12.0, 3 << 29), (15.5, 1 << 28)])
    assert data["shard"] == ["a", "b"]
    assert data["t_s"] == [3.0, 6.0]
    assert data["read_gbps"] == [2.0, 2.0] and data["compute_gbps"] == [4.0, 0.5] and data["write_gbps"] == [2.0, 0.5]
    assert data["mem_t_s"] == [0.0, 3.0, 6.5] and data["mem_gib"] == [0.5, 1.5, 0.25]
    assert data["budget_gib"] == 1.0 and data["peak_rss_gib"] == 1.5


def test_bench_plot_writes_a_png_with_every_series(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from streammerge.cli import main

    png = tmp_path / "run.png"
    assert main(["bench", "--preset", "tiny", "--method", "linear", "--plot", str(png), "--data", str(tmp_path / "d"),
                 ]) == 0
    assert _png_size(png) == (1200, 800) and png.stat().st_size > 20_000
    captured = capsys.readouterr()
    assert f"chart: {png}" in captured.out + captured.err


def test_write_chart_returns_what_it_drew(tmp_path):
    pytest.importorskip("matplotlib")
    from streammerge.memwatch import MemWatch
    from streammerge.plot import write_chart
    from streammerge.report import RunReport, ShardReport

    with MemWatch(interval=0.01) as w:
        block = bytearray(64 << 20)   # resident while sampled
        import time

        time.sleep(0.1)
        del block
    assert len(w.samples) >= 3 and w.peak >= 64 << 20
    shard = ShardReport("a", bytes_read=10**9, bytes_written=10**9, read_s=1, compute_s=1, write_s=1,
                        started=w.started, finished=w.samples[-1][0])
    data = write_chart(tmp_path / "c.png", RunReport("linear", "o", 1.0, w.peak, 1 << 30, "cpu", [shard]), w.samples)
    assert _png_size(tmp_path / "c.png") == (1200, 800)
    assert len(data["mem_gib"]) == len(w.samples) and max(data["mem_gib"]) == w.peak / 2**30


def test_plot_without_matplotlib_is_refused_before_the_run(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from streammerge.cli import main; "
            f"sys.exit(main(['bench', '--preset', 'tiny', '--plot', {str(tmp_path / 'x.png')!r}, "
            f"'--data', {str(tmp_path / 'd')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--plot needs matplotlib" in r.stdout + r.stderr and "streammerge[plot]" in r.stdout + r.stderr
    assert not (tmp_path / "d").exists()   # refused before making any data


# -- gpu_check.sh -----------------------------------------------------------------------------------------

def test_gpu_check_dry_run_lists_its_steps_and_runs_none(tmp_path):
    out = tmp_path / "gc"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                        "--preset", "3b", "--minutes", "7"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    steps = [line for line in r.stdout.splitlines() if line.startswith("would run: [")]
    assert [s.split("]")[0][len("would run: ["):] for s in steps] == ["machine", "install", "cuda", "gpu_tests", "bench"]
    bench = steps[-1]
    assert "scripts/bench_gpu.py --preset 3b" in bench and "timeout 420" in bench
    assert all(f"--method {m}" in bench for m in ("linear", "ties", "dare_ties", "della"))
    assert "--no-index" in steps[1] and "pytest -m gpu" in steps[3]
    assert f"would write: {out}/gpu_check.json {out}/gpu_check.md" in r.stdout
    assert not out.exists()
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument '--bogus'" in bad.stderr
