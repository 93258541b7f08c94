"""The run report's ``kernels`` names every primitive that ran, and with what.

What "ran" means is measured here, not taken from the report: every implementation in the dispatch
table is wrapped to note its primitive and backend when called, and the report must say exactly that.
"""

from __future__ import annotations

import functools
import importlib
import threading

import pytest
import torch

from conftest import write_yaml
from streammerge.kernels import dispatch

METHODS = {
    "ties": {"weight": 0.4, "density": 0.5},
    "dare_ties": {"weight": 0.4, "density": 0.5},
    "model_stock": {},
}


@pytest.fixture
def observed(monkeypatch) -> dict[str, set[str]]:
    """primitive -> {"<backend>-cpu"} of every table implementation called (Triton ones cannot run on CPU)."""
    seen: dict[str, set[str]] = {}
    lock = threading.Lock()

    def wrap(fn, primitive: str, backend: str):
        @functools.wraps(fn)
        def noted(*args, **kw):
            with lock:
                seen.setdefault(primitive, set()).add(f"{backend}-cpu")
            return fn(*args, **kw)
        return noted

    for op in dispatch.TABLE.values():
        for impl in op.impls:
            if impl.backend == "triton":
                continue
            module, _, name = impl.target.partition(":")
            mod = importlib.import_module(f"streammerge.kernels.{module}")
            monkeypatch.setattr(mod, name, wrap(getattr(mod, name), op.primitive, impl.backend))
    return seen


def _run(method: str, family, tmp_path, name: str):
    from streammerge import RunOptions, run

    base, experts = family
    cfg = {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
           "models": [{"model": str(e), "parameters": dict(METHODS[method])} for e in experts]}
    path = write_yaml(tmp_path / f"{name}.yml", cfg)
    return run(path, tmp_path / name, RunOptions(max_memory=2 << 30, progress=False))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_report_names_every_primitive_that_ran(tiny_family, tmp_path, monkeypatch, observed, method):
    pytest.importorskip("numba")
    monkeypatch.delenv("STREAMMERGE_NO_NUMBA", raising=False)
    report = _run(method, tiny_family, tmp_path, f"{method}-numba")
    assert observed, "no kernel ran"
    got = {p: set(v) for p, v in report.kernels.items()}
    if method == "dare_ties":
        # The fused mix and the rescale sums draw DARE's masks inside their loops: no philox call to
        # observe, and the report says the compiled path drew them.
        assert "numba-cpu" in got.get("philox", set()), report.kernels
        observed.setdefault("philox", set()).add("numba-cpu")
    assert got == observed, (report.kernels, observed)
    assert "taskvec" in got if method != "model_stock" else "blend" in got and "dots" in got


@pytest.mark.parametrize("method", sorted(METHODS))
def test_without_numba_the_report_says_torch(tiny_family, tmp_path, monkeypatch, observed, method):
    monkeypatch.setenv("STREAMMERGE_NO_NUMBA", "1")
    report = _run(method, tiny_family, tmp_path, f"{method}-torch")
    assert report.kernels, "no kernel ran"
    assert {p: set(v) for p, v in report.kernels.items()} == observed
    assert all(v == ["torch-cpu"] for v in report.kernels.values()), report.kernels


def test_every_table_row_ends_in_torch_and_names_real_functions():
    """The torch reference is last (it takes anything), and every target and predicate exists."""
    for name, op in dispatch.TABLE.items():
        assert op.primitive in dispatch.PRIMITIVES
        assert op.impls[-1].backend == "torch" and op.impls[-1].applies is None, name
        for impl in op.impls:
            assert impl.backend in dispatch.BACKENDS, (name, impl)
            for target in (impl.target, impl.applies):
                if target is None or (impl.backend == "triton" and target.startswith("_triton")):
                    continue
                module, _, attr = target.partition(":")
                assert callable(getattr(importlib.import_module(f"streammerge.kernels.{module}"), attr)), target


def test_unknown_operation_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown kernel operation 'fft'; known: philox_words"):
        dispatch.call("fft", "cpu", torch.zeros(1))
