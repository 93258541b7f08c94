"""The fused task-vector and DELLA Triton kernels against the torch composition, bit for bit: on CUDA
when present, else in Triton's CPU interpreter (TRITON_INTERPRET=1, set by ``tri`` for this module)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch

from streammerge.kernels.della import keep_probability
from streammerge.kernels.philox import bernoulli_keep, philox_words
from streammerge.kernels.vote import mix

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SEED = 0x0123456789ABCDEF
STREAMS = [0xFEDCBA9876543210, 1, 0x00000000FFFFFFFF, 0xFFFFFFFF00000000, 7, 8, 9, 10]
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
NAMES = ["philox", "taskvec", "della"]


@pytest.fixture(scope="module")
def tri():
    """The Triton modules, decorated under the interpreter when there is no GPU.

    Triton reads TRITON_INTERPRET when it decorates a kernel and again at launch, so it stays set
    until the module's last test; the modules are re-imported so no compiled-mode copy is reused.
    """
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    names = [f"streammerge.kernels._triton.{name}" for name in NAMES]
    saved = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
        for name in names:
            sys.modules.pop(name, None)
    try:
        yield dict(zip(NAMES, map(importlib.import_module, names)))
    finally:
        if not CUDA:
            for name in names:
                sys.modules.pop(name, None)
            if saved is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    got = got.cpu()
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if want.dtype == torch.bool:
        return torch.equal(got, want)
    return torch.equal(got.view(BITS[want.dtype]), want.view(BITS[want.dtype]))


def chunk(dtype: torch.dtype, k: int, n: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and k experts whose deltas span six decades and hold exact ties and zeros.

    Expert 0 equals the base at every 5th element; expert 1 copies expert 0 at every 6th; expert 2
    mirrors expert 0's delta at every 4th, so sign votes cancel there; the base has zeros and -0.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g, dtype=torch.float64)
    base[::13] = 0.0
    base[1::13] = -0.0
    spread = 10.0 ** (-6 * torch.rand(k, n, generator=g, dtype=torch.float64))
    deltas = torch.randn(k, n, generator=g, dtype=torch.float64) * spread
    deltas[0, ::5] = 0.0
    if k > 1:
        deltas[1, 1::6] = deltas[0, 1::6]
    if k > 2:
        deltas[2, ::4] = -deltas[0, ::4]
    base = base.to(dtype)
    return base, [(base.double() + d).to(dtype) for d in deltas]


def reference(base, experts, weights, mask=None, *, scale=None, consensus=None, normalize=False, lam=1.0):
    """What ``task_vectors``' map computes: δ in the loaded dtype, mixed, added back."""
    d = torch.stack([x - base for x in experts])
    mixed = mix(d, weights, mask, scale=scale, consensus=consensus, normalize=normalize, lam=lam)
    return (base + mixed).to(base.dtype)


def method_scale(values: list[float], dtype: torch.dtype) -> torch.Tensor:
    """The per-model rescale factors as ``task_vectors`` rounds them (via the work dtype)."""
    work = dtype if dtype == torch.bfloat16 else torch.float32
    return torch.tensor(values, dtype=torch.float64).to(work).to(dtype)


# (K, weights, mask kind, scale, consensus, normalize, lambda, DARE p); n and start vary below.
CASES = {
    "task_arithmetic": (1, [0.8], None, None, None, False, 1.0, None),
    "linear_normalized_negative_weight": (3, [0.7, -0.3, 1.1], None, None, None, True, 1.0, None),
    "weights_cancel_divisor_guard": (2, [0.5, -0.5], None, [1.5, 0.25], None, True, 0.3, None),
    "ties_sum_tensor_mask": (3, [1.0, 0.6, -0.45], "tensor", None, "sum", True, 1.0, None),
    "ties_count_lambda": (4, [0.3, 0.3, 0.9, 0.25], "tensor", [1.2, 1.0, 3.0, 0.7], "count", False, 0.85, None),
    "dare_ties_in_kernel": (4, [0.9, 0.5, -0.2, 1.3], "dare", [2.5, 1.0 / 0.3, 1.7, 1.0], "sum", False, 1.0,
                            [0.4, 0.3, 0.0, 1.0]),
    "dare_linear_count_all_negative": (2, [-0.6, -0.4], "dare", [1.9, 2.1], "count", True, 1.5, 0.55),
    "eight_experts": (8, [0.1, 0.2, 0.3, 0.4, -0.5, 0.6, 0.7, 0.8], "dare", None, "sum", True, 1.0, 0.7),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_task_vector_mix_matches_torch(tri, dtype, case):
    k, weights, mask_kind, scale, consensus, normalize, lam, p = CASES[case]
    n = 1500 + 3 * k  # two programs, the last one partial
    start = 4 * 10**9 + k if k % 2 else (1 << 64) - n - 2  # unaligned; counter high word set
    base, experts = chunk(dtype, k, n, seed=k * 31 + len(case))
    s = None if scale is None else method_scale(scale, dtype)
    mask, dare = None, None
    if mask_kind == "tensor":
        mask = torch.rand(k, n, generator=torch.Generator().manual_seed(k)) < 0.6
    elif mask_kind == "dare":
        dare = (SEED, STREAMS[:k], start, p)
        ps = p if isinstance(p, list) else [p] * k
        mask = torch.stack([bernoulli_keep(SEED, STREAMS[j], start, n, ps[j]) for j in range(k)])
    want = reference(base, experts, weights, mask, scale=s, consensus=consensus, normalize=normalize, lam=lam)
    dev = [x.to(DEVICE) for x in experts]
    got = tri["taskvec"].task_vector_mix(
        base.to(DEVICE),
        dev if k % 2 else torch.stack(dev),  # a list, or one [K, n] tensor
        weights,
        mask=None if dare is not None or mask is None else mask.to(DEVICE),
        dare=dare,
        scale=s,
        consensus=consensus,
        normalize=normalize,
        lam=lam,
    )
    assert same_bits(got, want)
    assert not torch.equal(want, base)


@pytest.mark.parametrize("consensus", [None, "sum", "count"])
def test_task_vector_mix_float16_and_uint8_mask(tri, consensus):
    base, experts = chunk(torch.float16, 3, 700, seed=5)
    mask = (torch.arange(3 * 700).reshape(3, 700) % 3 != 1).to(torch.uint8)
    s = method_scale([1.4, 0.9, 2.2], torch.float16)
    want = reference(base, experts, [0.5, 1.25, -0.75], mask.bool(), scale=s, consensus=consensus,
                     normalize=True, lam=0.6)
    got = tri["taskvec"].task_vector_mix(
        base.to(DEVICE), [x.to(DEVICE) for x in experts], torch.tensor([0.5, 1.25, -0.75]),
        mask=mask.to(DEVICE), scale=s, consensus=consensus, normalize=True, lam=0.6,
    )
    assert same_bits(got, want)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("consensus", [None, "sum", "count"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_task_vector_mix_inf_and_nan(tri, dtype, consensus):
    # Same NaN positions and same bits elsewhere.  NaN payloads are not compared: torch itself rounds
    # a NaN to bf16 as 0xFFFF on its vectorized path and 0x7FC0 on its scalar one.
    base, experts = chunk(dtype, 3, 300, seed=8)
    experts[0][10:20] = float("inf")
    experts[1][15:25] = float("-inf")
    experts[2][20:30] = float("nan")
    experts[1][40] = float("nan")
    want = reference(base, experts, [0.5, 1.0, 0.75], consensus=consensus, normalize=True)
    got = tri["taskvec"].task_vector_mix(
        base.to(DEVICE), [x.to(DEVICE) for x in experts], [0.5, 1.0, 0.75], consensus=consensus, normalize=True
    ).cpu()
    nan = want.isnan()
    assert nan.any() and torch.equal(got.isnan(), nan)
    assert same_bits(got[~nan], want[~nan])


def test_dare_keep_rule_at_the_exact_threshold(tri):
    # p equal to an element's uniform drops it (u < p is false); one step of 2**-24 above keeps it.
    n, start = 40, 6
    w0, w1 = int(philox_words(SEED, STREAMS[0], start + 3, 1)), int(philox_words(SEED, STREAMS[1], start + 7, 1))
    ps = [(w0 >> 8) * 2.0**-24, ((w1 >> 8) + 1) * 2.0**-24]
    mask = torch.stack([bernoulli_keep(SEED, STREAMS[j], start, n, ps[j]) for j in range(2)])
    assert not mask[0, 3] and mask[1, 7]
    base, experts = chunk(torch.float32, 2, n, seed=3)
    want = reference(base, experts, [1.0, 0.5], mask, consensus="sum")
    got = tri["taskvec"].task_vector_mix(
        base.to(DEVICE), [x.to(DEVICE) for x in experts], [1.0, 0.5], dare=(SEED, STREAMS[:2], start, ps),
        consensus="sum",
    )
    assert same_bits(got, want)
    assert not same_bits(got, reference(base, experts, [1.0, 0.5], torch.ones_like(mask), consensus="sum"))


def test_task_vector_mix_shapes_and_errors(tri):
    tv = tri["taskvec"]
    base, experts = chunk(torch.bfloat16, 2, 60, seed=9)
    base2, experts2 = base.reshape(6, 10), [x.reshape(6, 10) for x in experts]
    got = tv.task_vector_mix(base2.to(DEVICE), [x.to(DEVICE) for x in experts2], [1.0, 1.0])
    assert same_bits(got, reference(base2, experts2, [1.0, 1.0]))
    with pytest.raises(ValueError, match="1 to 8 experts"):
        tv.task_vector_mix(base, [base] * 9, [1.0] * 9)
    with pytest.raises(ValueError, match="not both"):
        tv.task_vector_mix(base, experts, [1, 1], mask=torch.ones(2, 60, dtype=torch.bool), dare=(1, [1, 2], 0, 0.5))
    with pytest.raises(ValueError, match="must match the base"):
        tv.task_vector_mix(base, [experts[0].float()], [1.0])
    with pytest.raises(ValueError, match="one value per expert"):
        tv.task_vector_mix(base, experts, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="consensus must be"):
        tv.task_vector_mix(base, experts, [1.0, 1.0], consensus="max")


def della_rows(dtype: torch.dtype, rows: int, n: int, seed: int) -> torch.Tensor:
    """Rows with magnitude ties (±0.5, ±0 and repeats), an all-zero row, and noise with inf and NaNs
    of several payloads and signs (torch sorts every NaN last, equal among themselves)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64) * 10.0 ** (-3 * torch.rand(rows, n, generator=g))
    x[0, ::3] = 0.5
    x[0, 1::3] = -0.5
    x[0, 2::7] = -0.0
    if rows > 1:
        x[1] = 0.0
    if rows > 2:
        x[2, 1::2] = x[2, 0 : n - 1 : 2]  # adjacent equal pairs
    x = x.to(dtype)
    if rows > 2 and n > 100:
        bits = x.view(BITS[dtype])
        quiet, signalling = (0x7FC0, 0x7F81) if dtype == torch.bfloat16 else (0x7FC00000, 0x7F800001)
        bits[2, 5], bits[2, 50], bits[2, 80] = quiet, signalling, quiet | (-1 << (8 * x.element_size() - 1))
        x[2, 100] = float("-inf")
    return x


def della_reference(
    rows: torch.Tensor, density: float, eps: float, stream: int, start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch keep probabilities and the mask ``bernoulli_keep`` draws from them (both flat)."""
    p = keep_probability(rows, density, eps)
    return p, bernoulli_keep(SEED, stream, start, rows.numel(), p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_della_keep_matches_torch(tri, dtype):
    keep, prob = tri["della"].della_keep, tri["della"].della_probability
    for rows, n, density, eps, start in [(3, 333, 0.6, 0.15, 13), (2, 200, 0.3, 0.29, (1 << 40) + 2),
                                         (1, 150, 0.45, 0.1, 7)]:
        delta = della_rows(dtype, rows, n, seed=n)
        want_p, want = della_reference(delta, density, eps, STREAMS[0], start)
        assert same_bits(prob(delta.to(DEVICE), density, eps), want_p)
        assert same_bits(keep(delta.to(DEVICE), density, eps, SEED, STREAMS[0], start), want)
        assert 0 < int(want.sum()) < want.numel()
    single = torch.tensor([[0.25], [-1.0]], dtype=dtype)  # n = 1: rank / max(n - 1, 1)
    assert same_bits(keep(single.to(DEVICE), 0.5, 0.2, SEED, 5, 0), della_reference(single, 0.5, 0.2, 5, 0)[1])


def test_della_keep_probability_extremes(tri):
    # eps at its limits puts p at 0 for the smallest |δ| and 1 for the largest of each row.
    delta = della_rows(torch.float32, 2, 100, seed=2)
    got = tri["della"].della_keep(delta.to(DEVICE), 0.5, 0.5, SEED, 11, 0).cpu()
    assert torch.equal(got, della_reference(delta, 0.5, 0.5, 11, 0)[1])
    got, order = got.reshape(2, 100), delta.abs().argsort(dim=1, stable=True)
    assert not got.gather(1, order[:, :1]).any() and got.gather(1, order[:, -1:]).all()
    with pytest.raises(ValueError, match="dtype must be"):
        tri["della"].della_keep(delta.double(), 0.5, 0.1, SEED, 1, 0)
    with pytest.raises(ValueError, match=r"\[rows, n\] band"):
        tri["della"].della_keep(delta.reshape(-1), 0.5, 0.1, SEED, 1, 0)
