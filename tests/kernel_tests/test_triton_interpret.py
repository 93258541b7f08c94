"""Triton kernels against their torch references, exactly: on CUDA when present, else in Triton's
CPU interpreter (TRITON_INTERPRET=1, set by the ``tri`` fixture for this module only)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys

import pytest
import torch

from streammerge.kernels import philox as torch_philox
from streammerge.kernels.threshold import KthMagnitude, count_keys, find_thresholds

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SEED, STREAM = 0x0123456789ABCDEF, 0xFEDCBA9876543210


class _NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ImportError(f"importing streammerge.kernels imported {name}")
        return None


def test_importing_kernels_never_imports_triton(monkeypatch):
    # A fresh import of the package with every triton import refused (in-process: a subprocess
    # would pay for a second torch import).
    import streammerge

    for name in [n for n in sys.modules if n.split(".")[0] == "triton" or n.startswith("streammerge.kernels")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(streammerge, "kernels", None, raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoTriton(), *sys.meta_path])
    fresh = importlib.import_module("streammerge.kernels")
    assert fresh.stream_id(0, "x") == torch_philox.stream_id(0, "x")
    assert not any(n.split(".")[0] == "triton" for n in sys.modules)


@pytest.fixture(scope="module")
def tri():
    """The Triton modules; without a GPU, run under the interpreter for this module's tests.

    Triton reads TRITON_INTERPRET when it decorates a kernel and again while launching one, so it
    stays set until the module's last test and is restored afterwards.
    """
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    names = ["streammerge.kernels._triton.philox", "streammerge.kernels._triton.histogram"]
    saved = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
        for name in names:  # re-decorate if a compiled-mode copy was imported earlier
            sys.modules.pop(name, None)
    try:
        yield dict(zip(("philox", "histogram"), map(importlib.import_module, names)))
    finally:
        if not CUDA:
            for name in names:
                sys.modules.pop(name, None)
            if saved is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved


RANGES = [
    (0, 0, 0, 4),  # the all-zero known answer
    (1, 1, 1, 5),  # scalars equal to 1 (Triton's specialization trap)
    (SEED, STREAM, 13, 3001),  # unaligned start and end, several programs
    (SEED, STREAM, (1 << 34) + 2, 700),  # counter high word != 0
    (SEED, STREAM, (1 << 64) - 77, 77),  # the top of the element space
]


@pytest.mark.parametrize("seed,stream,start,count", RANGES)
def test_philox_matches_torch(tri, seed, stream, start, count):
    tp = tri["philox"]
    want_w = torch_philox.philox_words(seed, stream, start, count)
    want_u = torch_philox.philox_uniform(seed, stream, start, count)
    want_k = torch_philox.bernoulli_keep(seed, stream, start, count, 0.37)
    assert torch.equal(tp.philox_words(seed, stream, start, count, DEVICE).cpu(), want_w)
    assert torch.equal(tp.philox_uniform(seed, stream, start, count, DEVICE).cpu(), want_u)
    got_k = tp.bernoulli_keep(seed, stream, start, count, 0.37, DEVICE)
    assert got_k.dtype == torch.bool
    assert torch.equal(got_k.cpu(), want_k)


def test_philox_edge_probabilities_and_tensor_p(tri):
    tp = tri["philox"]
    for p in (0.0, 1.0, 1 - 2**-24):
        want = torch_philox.bernoulli_keep(SEED, STREAM, 3, 500, p)
        assert torch.equal(tp.bernoulli_keep(SEED, STREAM, 3, 500, p, DEVICE).cpu(), want)
    p = torch.linspace(0, 1, 500)
    want = torch_philox.bernoulli_keep(SEED, STREAM, 3, 500, p)
    assert torch.equal(tp.bernoulli_keep(SEED, STREAM, 3, 500, p.to(DEVICE)).cpu(), want)
    assert tp.philox_words(SEED, STREAM, 9, 0, DEVICE).shape == (0,)
    with pytest.raises(ValueError, match="seed must be"):
        tp.philox_words(-1, 0, 0, 4, DEVICE)


def tied(dtype: torch.dtype, n: int = 2000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    x[torch.rand(n, generator=g) < 0.4] = 0.5
    x[::11] = -0.0
    return x.to(dtype)


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str
)
def test_threshold_with_triton_histograms_matches_torch(tri, dtype):
    x = tied(dtype)
    ks = [0, 1, 77, 1000, 1999, 2000]
    want = find_thresholds(lambda: x.split(333), dtype, x.numel(), ks)
    xd = x.to(DEVICE)
    got = find_thresholds(lambda: xd.split(333), dtype, x.numel(), ks, backend="triton")
    assert got == want


def test_count_keys_matches_torch_per_prefix(tri):
    x = tied(torch.float32, n=3000, seed=4)
    bits = x.view(torch.int32)
    prefixes = [0, 0x7E00, 0x1234]  # key >> 15 of: zeros, 0.5 (0x3F000000), nothing
    want = [torch.zeros(1 << 15, dtype=torch.int64) for _ in prefixes]
    count_keys(want, bits, 0x7FFFFFFF, 0, 15, 15, prefixes)
    got = [torch.zeros(1 << 15, dtype=torch.int64, device=DEVICE) for _ in prefixes]
    tri["histogram"].count_keys(got, bits.to(DEVICE), 0x7FFFFFFF, 0, 15, 15, prefixes)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)
    assert int(want[1].sum()) > 0  # the 0.5 bin was hit


def test_triton_backend_rejects_a_misplaced_histogram(tri):
    bits = torch.zeros(10, dtype=torch.int16, device=DEVICE)
    with pytest.raises(ValueError, match="histograms must be int64"):
        tri["histogram"].count_keys(
            [torch.zeros(8, dtype=torch.int32, device=DEVICE)], bits, 0x7FFF, 0, 3, 3, None
        )
    assert KthMagnitude(torch.bfloat16, 1, 1, backend="triton").passes == 1
