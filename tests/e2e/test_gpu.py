"""CUDA runs: the pipelined copies give the CPU's bytes; the device budget is planned and explained.

Tests marked `gpu` need a CUDA device and are skipped without one; the planning tests and the CPU-path
tests run everywhere (planning reads headers only and never touches a device)."""

import io
from types import SimpleNamespace

import pytest
import torch

from conftest import merge, shard_bytes, write_yaml
from streammerge import RunOptions
from streammerge.merge import check
from streammerge.cli import main
from streammerge.errors import BudgetError
from streammerge.plan import budget as budget_mod

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: torch.cuda.is_available() is False")


def _family(method, base, experts):
    return {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": w, "density": 0.5}}
                       for e, w in zip(experts, (0.5, 0.3, 0.4))]}


def _text(plan) -> str:
    from rich.console import Console

    from streammerge.plan.explain import print_plan

    buf = io.StringIO()
    print_plan(plan, Console(file=buf, width=200))
    return buf.getvalue()


# -- on a GPU ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("chunk_rows", [None, 7])  # 7: many bands per tensor, so both device slots are reused
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_cuda_gives_the_cpu_bytes(method, chunk_rows, tiny_family, tmp_path):
    cfg = _family(method, *tiny_family)
    cpu = shard_bytes(merge(cfg, tmp_path, "cpu"))
    gpu = shard_bytes(merge(cfg, tmp_path, "gpu", device="cuda", chunk_rows=chunk_rows))
    assert gpu == cpu


@pytest.mark.gpu
@needs_cuda
def test_cuda_passthrough_results_that_alias_the_device_slot(tiny_family, tmp_path):
    """passthrough returns its input band itself: a view of the device slot the next upload reuses."""
    base, experts = tiny_family
    cfg = {"merge_method": "passthrough", "models": [{"model": str(experts[1])}]}
    cpu = shard_bytes(merge(cfg, tmp_path, "cpu"))
    assert shard_bytes(merge(cfg, tmp_path, "gpu", device="cuda", chunk_rows=3)) == cpu


@pytest.mark.gpu
@needs_cuda
def test_cuda_reports_stage_seconds_and_the_same_nonfinite_tensors(tiny_family, tmp_path):
    from streammerge import run

    base, experts = tiny_family
    # weights this large overflow bf16 in the norm weights (~1.0): those tensors hold Inf
    models = [{"model": str(e), "parameters": {"weight": 3e38}} for e in experts]
    cfg = write_yaml(tmp_path / "inf.yml", {"merge_method": "linear", "parameters": {"normalize": False}, "models": models})
    reports = {dev: run(cfg, tmp_path / dev, RunOptions(max_memory=2 << 30, device=dev, progress=False, chunk_rows=5))
               for dev in ("cpu", "cuda")}
    assert reports["cuda"].nonfinite_tensors == reports["cpu"].nonfinite_tensors != []
    s = reports["cuda"].shards[0]
    assert reports["cuda"].device.startswith("cuda")
    assert min(s.read_s, s.h2d_s, s.compute_s, s.d2h_s, s.write_s) > 0


# -- planning: runs anywhere -------------------------------------------------------------------------

def test_plan_explains_both_budgets(tiny_family, tmp_path):
    cfg = write_yaml(tmp_path / "t.yml", _family("ties", *tiny_family))
    plan = check(cfg, RunOptions(max_memory=2 << 30, device="cuda", max_gpu_memory=1 << 30))
    assert plan.gpu_budget == 1 << 30 and 0 < plan.gpu_peak_estimate <= 1 << 30
    text = _text(plan)
    assert "memory budget 2.00 GiB" in text
    assert "device memory budget 1.00 GiB (--max-gpu-memory)" in text


def test_device_budget_unchecked_without_the_option_and_unused_on_cpu(tiny_family, tmp_path):
    cfg = write_yaml(tmp_path / "t.yml", _family("ties", *tiny_family))
    plan = check(cfg, RunOptions(max_memory=2 << 30, device="auto"))
    assert plan.gpu_budget == 0 and "device memory budget not checked here" in _text(plan)
    plan = check(cfg, RunOptions(max_memory=2 << 30, device="cpu", max_gpu_memory=1 << 20))
    assert plan.gpu_budget == 0 and "device memory" not in _text(plan)


def test_device_budget_bounds_the_bands(tiny_family, tmp_path):
    cfg = write_yaml(tmp_path / "t.yml", _family("dare_ties", *tiny_family))
    gpu_budget = budget_mod.GPU_ALLOCATOR_SLACK + (64 << 10)
    free = check(cfg, RunOptions(max_memory=2 << 30, device="cuda"))
    tight = check(cfg, RunOptions(max_memory=2 << 30, device="cuda", max_gpu_memory=gpu_budget))
    assert any(t.rows_per_chunk < f.rows_per_chunk for t, f in zip(tight.tensors, free.tensors))
    for t in tight.tensors:
        infos = [s.info for s in t.inputs]
        assert t.rows_per_chunk * budget_mod.gpu_row_cost(infos, t.row_elems, t.compute_dtype, t.out_dtype) <= 64 << 10
    assert tight.gpu_peak_estimate <= gpu_budget


def test_too_small_device_budget_names_the_tensor(tiny_family, tmp_path):
    cfg = write_yaml(tmp_path / "t.yml", _family("ties", *tiny_family))
    with pytest.raises(BudgetError) as e:
        check(cfg, RunOptions(max_memory=2 << 30, device="cuda", max_gpu_memory=1 << 20))
    msg = str(e.value)
    assert "tensor 'model.embed_tokens.weight'" in msg and "raise --max-gpu-memory to at least" in msg


def test_cli_parses_max_gpu_memory(tiny_family, tmp_path, capsys):
    cfg = str(write_yaml(tmp_path / "t.yml", _family("ties", *tiny_family)))
    assert main(["check", cfg, "--device", "cuda", "--max-memory", "2GiB", "--max-gpu-memory", "1.5GiB"]) == 0
    assert "device memory budget 1.50 GiB" in capsys.readouterr().out
    assert main(["check", cfg, "--cuda", "--max-gpu-memory", "1MiB"]) == 1
    assert "raise --max-gpu-memory" in capsys.readouterr().err
    assert main(["check", cfg, "--cuda", "--max-gpu-memory", "lots"]) == 2  # a bad flag value: a usage error
    assert "--max-gpu-memory: cannot read 'lots'" in capsys.readouterr().err


def test_run_defaults_the_device_budget_to_80_percent(monkeypatch):
    from streammerge import merge as merge_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=10 << 30))
    assert merge_mod._with_gpu_budget(RunOptions(device="cuda")).max_gpu_memory == 8 << 30
    assert merge_mod._with_gpu_budget(RunOptions(device="auto", max_gpu_memory=1 << 30)).max_gpu_memory == 1 << 30
    assert merge_mod._with_gpu_budget(RunOptions(device="cpu")).max_gpu_memory == 0


# -- the CPU path takes none of it -------------------------------------------------------------------

def test_cpu_run_creates_no_streams_and_pins_nothing(tiny_family, tmp_path, monkeypatch):
    from streammerge import run
    from streammerge.execute import Executor
    from streammerge.stage import HostStage

    def no_cuda(*a, **k):
        raise AssertionError("the CPU path touched CUDA")

    for name in ("Stream", "Event", "current_stream", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    cfg = write_yaml(tmp_path / "t.yml", _family("ties", *tiny_family))
    ex = Executor(check(cfg, RunOptions(max_memory=2 << 30)), out_dir=tmp_path / "x", device=torch.device("cpu"))
    assert isinstance(ex.stage, HostStage)
    assert not any(b.is_pinned() for b in ex.pool.buffers + ex.out_pool.buffers)
    report = run(cfg, tmp_path / "out", RunOptions(max_memory=2 << 30, progress=False))
    s = report.shards[0]
    assert min(s.read_s, s.compute_s, s.write_s) > 0 and s.h2d_s == s.d2h_s == 0
    assert {"read_s", "h2d_s", "compute_s", "d2h_s", "write_s"} <= set(report.to_json()["shards"][0])
