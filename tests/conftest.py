"""Shared fixtures: tiny seeded checkpoints made by the tests themselves, in temporary folders."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml

# `python -m pytest` puts the repo root on sys.path, where `kernels/` would be importable as a
# top-level package (transformers probes for one named `kernels`); streammerge.kernels is the only name.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

# Without a GPU the Triton kernels are tested in Triton's interpreter. Triton decides at decoration
# time, its own standard library (tl.sum, tl.max) included, so the variable must be set before
# anything in the session imports triton (transformers and torch may, long before kernel_tests).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def checkout_kernels_on_path() -> bool:
    """Whether a top-level `import kernels` would load this checkout's `kernels/` folder.

    The name is also Hugging Face's `kernels` distribution (transformers >= 5.25 depends on it and
    imports it); that one is fine, a second copy of ours is not.
    """
    import importlib.util

    mod = sys.modules.get("kernels")
    spec = getattr(mod, "__spec__", None) if mod is not None else importlib.util.find_spec("kernels")
    places = [spec.origin or "", *(spec.submodule_search_locations or [])] if spec else []
    return any(Path(p).resolve().is_relative_to(_ROOT / "kernels") for p in places if p)


@pytest.fixture(autouse=True, scope="session")
def _no_second_kernels_copy():
    """`kernels/` is installed as streammerge.kernels; a bare `import kernels` of it would load a second copy."""
    yield
    assert not ("kernels" in sys.modules and checkout_kernels_on_path()), (
        "something imported the checkout's 'kernels/' folder as a top-level package; use streammerge.kernels")


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    from streammerge import synth

    root = tmp_path_factory.mktemp("tiny")
    return synth.make_family(root, synth.PRESETS["tiny"], 3, seed=1)


@pytest.fixture(scope="session")
def tiny_family_fp32(tmp_path_factory) -> tuple[Path, list[Path]]:
    import dataclasses

    from streammerge import synth

    root = tmp_path_factory.mktemp("tiny32")
    return synth.make_family(root, dataclasses.replace(synth.PRESETS["tiny"], dtype="float32"), 2, seed=2)


def write_yaml(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(str(Path(d) / "*.safetensors"))):
        out.update(load_file(f))
    return out


def shard_bytes(d: Path) -> dict[str, bytes]:
    return {Path(f).name: Path(f).read_bytes() for f in sorted(glob.glob(str(Path(d) / "*.safetensors")))}


def merge(config: dict, tmp: Path, name: str = "out", **opts) -> Path:
    """Run streammerge on a config dict; returns the output folder."""
    from streammerge import RunOptions, run

    cfg = write_yaml(tmp / f"{name}.yml", config)
    out = tmp / name
    run(cfg, out, RunOptions(max_memory=opts.pop("max_memory", 2 << 30), progress=False, overwrite=True, **opts))
    return out


def assert_band_invariant(config: dict, tmp: Path) -> None:
    """Bands of 1 row, 7 rows and whole tensors must give identical output bytes."""
    outs = [shard_bytes(merge(config, tmp, f"rows{n}", chunk_rows=n)) for n in (1, 7, None)]
    assert outs[0] == outs[1] == outs[2]


@contextlib.contextmanager
def no_hang(seconds: float, what: str):
    """A real alarm around code that must not hang: hypothesis's deadline only measures an example after
    it returns, so a hang would never end without one."""
    def fire(signum, frame):
        raise TimeoutError(f"{what} ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def _fresh_process_rss() -> int:
    import subprocess

    code = "import psutil, torch, streammerge.merge; print(psutil.Process().memory_info().rss)"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              timeout=300).stdout.split()[-1])


@pytest.fixture
def fresh_baseline(monkeypatch, _fresh_process_rss):
    """Plan in this process as a fresh `streammerge` process would. The planner takes the process's own
    resident memory as its baseline, and a test process late in the suite (mergekit, transformers and
    every earlier test loaded) holds far more than a CLI run does, so budgets near the floor would plan
    differently depending on which tests ran first."""
    from streammerge.plan import budget

    def baseline(method: str = "", device: str = "cpu") -> int:
        return _fresh_process_rss + (budget.numba_rss(method, device) if method else 0)

    monkeypatch.setattr(budget, "baseline_rss", baseline)
