"""Exact magnitude thresholds from histograms, checked against sort-based references."""

from __future__ import annotations

import pytest
import torch

from streammerge.kernels.threshold import KthMagnitude, Threshold, find_thresholds, topk_mask

INT_VIEW = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
DTYPES = list(INT_VIEW)


def keys_of(x: torch.Tensor) -> torch.Tensor:
    """|x| bit patterns as int64, the reference's notion of magnitude order."""
    bits = x.reshape(-1).view(INT_VIEW[x.dtype]).to(torch.int64)
    return bits & ((1 << (x.element_size() * 8 - 1)) - 1)


def reference(x: torch.Tensor, k: int) -> tuple[int, torch.Tensor]:
    """k-th largest key and the top-k mask with ties in flat order, via a stable sort."""
    keys = keys_of(x)
    order = torch.sort(keys, descending=True, stable=True).indices
    mask = torch.zeros(keys.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    kth = int(keys[order[k - 1]]) if k else -1
    return kth, mask.reshape(x.shape)


def tied_tensor(dtype: torch.dtype, shape=(30, 20), seed=0) -> torch.Tensor:
    """Values from a small set (many exact ties), random signs, zeros of both signs."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 1e-3, 0.25, 0.5, 1.0, 3.0, 1e3], dtype=torch.float64)
    idx = torch.randint(0, len(levels), shape, generator=g)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    x = (levels[idx] * sign).to(dtype)  # sign * 0.0 gives -0.0 half the time
    # A sprinkle of distinct values so bins other than the tied ones are populated too.
    noise = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    pick = torch.rand(shape, generator=g) < 0.2
    return torch.where(pick, noise, x)


def run_mask(chunks, th: Threshold) -> torch.Tensor:
    seen, parts = 0, []
    for c in chunks:
        m, n_eq = topk_mask(c, th, seen)
        assert m.shape == c.shape and m.dtype == torch.bool
        seen += n_eq
        parts.append(m.reshape(-1))
    assert seen == th.n_equal
    return torch.cat(parts)


def flat_chunks(x: torch.Tensor, size: int):
    return lambda: x.reshape(-1).split(size)


def check_every_rank(x: torch.Tensor, chunkings: dict) -> None:
    dtype, n = x.dtype, x.numel()
    ks = [0, 1, 2, n // 2, n - 1, n]
    for name, chunks in chunkings.items():
        ths = find_thresholds(chunks, dtype, n, ks)
        for k, th in zip(ks, ths):
            want_bits, want_mask = reference(x, k)
            assert (th.k, th.bits) == (k, want_bits), (name, k)
            if k:
                keys = keys_of(x)
                assert th.n_above == int((keys > want_bits).sum())
                assert th.n_equal == int((keys == want_bits).sum())
            assert th.n_above + th.n_equal_keep == k
            mask = run_mask(chunks(), th)
            assert int(mask.sum()) == k
            assert torch.equal(mask, want_mask.reshape(-1)), (name, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threshold_and_mask_match_sort_reference_for_every_chunking(dtype):
    x = tied_tensor(dtype)
    chunkings = {
        "7": flat_chunks(x, 7),
        "500": flat_chunks(x, 500),
        "whole": lambda: [x],
        "rows3": lambda: x.split(3),  # 2-D row bands, as the executor feeds them
    }
    check_every_rank(x, chunkings)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_element_chunks(dtype):
    x = tied_tensor(dtype, shape=(8, 20), seed=11)
    check_every_rank(x, {"1": flat_chunks(x, 1)})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_distinct_values_threshold_value(dtype):
    x = torch.randn(777, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    for k in (1, 50, 777):
        (th,) = find_thresholds(flat_chunks(x, 100), dtype, x.numel(), [k])
        assert th.value == x.abs().to(torch.float64).sort(descending=True).values[k - 1].item()
        assert th.n_equal >= 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_zeros_of_both_signs_keeps_the_first_k(dtype):
    x = torch.zeros(100, dtype=dtype)
    x[::3] = -0.0
    for k in (1, 37, 100):
        (th,) = find_thresholds(flat_chunks(x, 9), dtype, 100, [k])
        assert (th.bits, th.n_above, th.n_equal, th.n_equal_keep) == (0, 0, 100, k)
        assert th.value == 0.0
        mask = run_mask(flat_chunks(x, 9)(), th)
        assert torch.equal(mask, torch.arange(100) < k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_nan_counts_as_largest(dtype):
    x = torch.tensor([1.0, float("nan"), float("inf"), -2.0, float("nan"), 0.0], dtype=dtype)
    th2, th3, th4 = find_thresholds(lambda: [x], dtype, 6, [2, 3, 4])
    assert torch.isnan(torch.tensor(th2.value))
    assert run_mask([x], th2).tolist() == [False, True, False, False, True, False]
    assert th3.value == float("inf")
    assert run_mask([x], th4).tolist() == [False, True, True, True, True, False]


def test_several_thresholds_from_one_histogram_and_breadcrumbs_band():
    x = tied_tensor(torch.bfloat16, seed=5)
    n = x.numel()
    finder = KthMagnitude(torch.bfloat16, n, 10)
    assert finder.passes == 1
    finder.update(x, 0)
    finder.finish_pass(0)
    # One-pass dtypes answer any rank from the stored histogram.
    for k in (0, 1, 10, 333, n):
        assert finder.threshold_for(k).bits == reference(x, k)[0]
    # Breadcrumbs: drop the top 10, keep the next 300 by rank (ties in flat order).
    top, keep = finder.threshold_for(10), finder.threshold_for(310)
    band = run_mask([x], keep) & ~run_mask([x], top)
    want = reference(x, 310)[1] & ~reference(x, 10)[1]
    assert int(band.sum()) == 300
    assert torch.equal(band, want.reshape(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_multi_pass_dtype_refines_several_ranks_in_one_pass(dtype):
    x = tied_tensor(dtype, seed=7)
    n = x.numel()
    ks = [3, 310, 590]
    finder = KthMagnitude(dtype, n, ks)
    for p in range(finder.passes):
        for c in x.split(4):
            finder.update(c, p)
        finder.finish_pass(p)
    assert finder.passes == (2 if dtype == torch.float32 else 4)
    for k in ks:
        assert finder.threshold_for(k).bits == reference(x, k)[0]
    with pytest.raises(ValueError, match="k=5 was not declared"):
        finder.threshold_for(5)


def test_model_scope_spans_tensors_in_caller_order():
    a = tied_tensor(torch.float16, shape=(10, 30), seed=1)
    b = tied_tensor(torch.float16, shape=(300,), seed=2)
    both = torch.cat([a.reshape(-1), b])
    k = 250
    (th,) = find_thresholds(lambda: [*a.split(4), *b.split(64)], torch.float16, both.numel(), [k])
    want_bits, want_mask = reference(both, k)
    assert th.bits == want_bits
    # equal_seen_before carries from tensor a into tensor b.
    mask_a, seen = topk_mask(a, th, 0)
    mask_b, _ = topk_mask(b, th, seen)
    assert torch.equal(torch.cat([mask_a.reshape(-1), mask_b]), want_mask)


def test_threshold_is_frozen_and_hashable():
    th = Threshold(5, torch.bfloat16, 1, 2, 3, 3)
    with pytest.raises(AttributeError):
        th.bits = 6  # type: ignore[misc]
    assert hash(th) == hash(Threshold(5, torch.bfloat16, 1, 2, 3, 3))


def test_protocol_errors_are_explicit():
    x = torch.ones(10, dtype=torch.float32)
    with pytest.raises(ValueError, match="support"):
        KthMagnitude(torch.int32, 10, 1)
    with pytest.raises(ValueError, match=r"rank k must be an int in \[0, n=10\]"):
        KthMagnitude(torch.float32, 10, 11)
    with pytest.raises(ValueError, match="rank k must be an int, got 2.5"):
        KthMagnitude(torch.float32, 10, [1, 2.5])
    with pytest.raises(ValueError, match="backend must be 'torch' or 'triton'"):
        KthMagnitude(torch.float32, 10, 1, backend="cuda")
    finder = KthMagnitude(torch.float32, 10, 3)
    with pytest.raises(ValueError, match="pass 0 is open"):
        finder.update(x, 1)
    with pytest.raises(ValueError, match="chunk dtype torch.float16"):
        finder.update(x.half(), 0)
    finder.update(x[:6], 0)
    with pytest.raises(ValueError, match="saw 6 elements but the scope has n=10"):
        finder.finish_pass(0)
    with pytest.raises(ValueError, match="ready after all 2 passes"):
        finder.threshold_for(3)
    th = Threshold(0, torch.bfloat16, 0, 1, 1, 1)
    with pytest.raises(ValueError, match="differs from the threshold's"):
        topk_mask(x, th)


def test_empty_scope_and_k_zero():
    (th,) = find_thresholds(lambda: [], torch.bfloat16, 0, [0])
    assert th.k == 0 and th.n_equal_keep == 0
    mask, n_eq = topk_mask(torch.ones(4, dtype=torch.bfloat16), th, 0)
    assert not mask.any() and n_eq == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU histogram path untested")
def test_cuda_matches_cpu():
    x = tied_tensor(torch.float32, shape=(64, 64), seed=9)
    ks = [1, 100, 4096]
    cpu = find_thresholds(lambda: x.split(5), torch.float32, x.numel(), ks)
    xc = x.cuda()
    gpu = find_thresholds(lambda: xc.split(5), torch.float32, x.numel(), ks)
    assert cpu == gpu
    for th in gpu:
        assert torch.equal(run_mask(xc.split(5), th).cpu(), run_mask(x.split(5), th))
