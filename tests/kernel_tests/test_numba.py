"""The numba CPU kernels against their torch references, and the dispatch that picks between them.

Each kernel must give the reference's bits (NaN payloads aside: torch's own bf16 rounding writes
0xFFFF on its vector path and 0x7FC0 on its scalar path), so every test runs both paths on the same
inputs by toggling STREAMMERGE_NO_NUMBA.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("numba")

from conftest import merge, shard_bytes  # noqa: E402
from streammerge.kernels import dispatch  # noqa: E402
from streammerge.kernels.blend import fusion_mix, nearswap_mix, pair_mix, stock_mix  # noqa: E402
from streammerge.kernels.della import della_keep  # noqa: E402
from streammerge.kernels.dots import SEGMENT, segment_dots  # noqa: E402
from streammerge.kernels.norms import dare_row_l1, row_l1  # noqa: E402
from streammerge.kernels.philox import bernoulli_keep, philox_uniform, philox_words  # noqa: E402
from streammerge.kernels.sample import sample_positions  # noqa: E402
from streammerge.kernels.vote import merge_deltas  # noqa: E402


def both(monkeypatch, fn):
    """(torch result, numba result) of ``fn()``, checking dispatch chose what each run asked for."""
    monkeypatch.setenv("STREAMMERGE_NO_NUMBA", "1")
    assert dispatch.choose("taskvec", "cpu") == "torch"
    ref = fn()
    monkeypatch.setenv("STREAMMERGE_NO_NUMBA", "0")
    assert dispatch.choose("taskvec", "cpu") == "numba"
    return ref, fn()


def bits(x: torch.Tensor) -> torch.Tensor:
    """Bit pattern with every NaN folded to one value."""
    view = x.view(torch.int16 if x.element_size() == 2 else torch.int32)
    return torch.where(x.isnan(), torch.zeros_like(view), view)


@pytest.mark.parametrize("start,count", [(0, 1), (3, 5), (1, 1000), (2**40 + 3, 4099), (2**64 - 70, 70)])
def test_philox_words_uniforms_and_masks_match_torch(monkeypatch, start, count):
    seed, stream = 2**64 - 5, 0x0123456789ABCDEF
    for fn in (lambda: philox_words(seed, stream, start, count),
               lambda: philox_uniform(seed, stream, start, count),
               lambda: bernoulli_keep(seed, stream, start, count, 0.37),
               lambda: bernoulli_keep(seed, stream, start, count, 1.0)):
        ref, got = both(monkeypatch, fn)
        assert ref.dtype == got.dtype and torch.equal(ref, got)


# n: one radix pass (a 1-bit digit, 16 bits), two (17, 27, 32 bits), three (33 bits), four (62 bits)
@pytest.mark.parametrize("n", [1, 2, 65536, 65537, 131_072_000, 2**32, 2**32 + 1, 2**62 - 1])
def test_sampled_positions_are_the_torch_draws_sorted(monkeypatch, n):
    ref, got = both(monkeypatch, lambda: sample_positions(2**64 - 5, 0x0123456789ABCDEF, n, 50_000))
    assert got.dtype == torch.int64 and torch.equal(ref, got)
    assert bool((got[1:] >= got[:-1]).all()) and 0 <= int(got[0]) and int(got[-1]) < n
    assert n < 2**20 or got.unique().numel() > 45_000   # spread over the range, not piled up


def _mix_inputs(k: int, n: int = 3001):
    g = torch.Generator().manual_seed(k)
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    d = (torch.randn(k, n, generator=g) * torch.rand(k, 1, generator=g)).to(torch.bfloat16)
    d[:, :40] = 0
    d[:, 40:45] = -0.0
    d[0, 50:90] = -d[-1, 50:90]  # exact cancellations: zero sums
    d[:, 100:110] = 1e-39  # subnormal
    d[0, 200], d[-1, 201], d[0, 202] = float("nan"), float("inf"), -float("inf")
    mask = torch.rand(k, n, generator=g) < 0.5
    return base, d, mask


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_fused_mix_is_bit_identical_to_the_eager_chain(monkeypatch, k):
    base, d, mask = _mix_inputs(k)
    grid = itertools.product([None, "sum", "count"], [False, True], [1.0, 0.37], [False, True], [False, True],
                             [False, True])
    for consensus, normalize, lam, use_mask, use_scale, negative in grid:
        weights = [0.3 * (i + 1) * (-1 if negative and i == 0 else 1) for i in range(k)]
        scale = torch.tensor([1.7 + i for i in range(k)]).to(torch.bfloat16) if use_scale else None

        def run():
            return merge_deltas(base, d, weights, mask if use_mask else None, scale=scale, consensus=consensus,
                                normalize=normalize, lam=lam)

        ref, got = both(monkeypatch, run)
        case = (consensus, normalize, lam, use_mask, use_scale, negative)
        assert torch.equal(bits(ref), bits(got)), case
        assert torch.equal(ref.isnan(), got.isnan()), case


def test_fused_mix_handles_weights_summing_to_zero(monkeypatch):
    base, d, mask = _mix_inputs(2)
    for consensus in (None, "sum"):
        ref, got = both(monkeypatch, lambda: merge_deltas(base, d, [0.5, -0.5], mask, consensus=consensus,
                                                          normalize=True))
        assert torch.equal(bits(ref), bits(got))


@pytest.mark.parametrize("start", [0, 3, 2**33 + 1])
def test_fused_mix_forms_deltas_and_draws_dare_masks_per_tile(monkeypatch, start):
    """δ formed from the experts and the keep drawn tile by tile (odd starts, a model without a mask)
    give the bits of stacking δ and drawing whole masks first, on both paths."""
    from streammerge.kernels.philox import KeepDraw

    g = torch.Generator().manual_seed(start % 89)
    n = 3001
    base = torch.randn(n, generator=g).bfloat16()
    experts = [(base.float() + 0.05 * torch.randn(n, generator=g)).bfloat16() for _ in range(3)]
    experts[1][:7] = base[:7]          # zero deltas
    draw = KeepDraw(5, (11, 2**63 + 12, 13), (0.5, None, 0.3), start)
    d = torch.stack([e - base for e in experts])
    mask = draw.tensor(tuple(d.shape))
    assert mask[1].all() and 0.4 < mask[0].float().mean() < 0.6 and not mask[2].all()
    for consensus in (None, "sum"):
        kw = dict(scale=torch.tensor([2.0, 1.0, 3.3]).bfloat16(), consensus=consensus, normalize=consensus is None)
        ref, got = both(monkeypatch, lambda: merge_deltas(base, None, [0.3, 0.5, 0.2], draw, experts=experts, **kw))
        monkeypatch.setenv("STREAMMERGE_NO_NUMBA", "1")
        eager = merge_deltas(base, d, [0.3, 0.5, 0.2], mask, **kw)
        assert torch.equal(bits(ref), bits(eager)) and torch.equal(bits(got), bits(eager)), consensus


def test_the_map_reads_the_rescale_pass_keep_bits_instead_of_drawing(monkeypatch):
    """The rescale pass packs the keep bits it drew (both paths); the fused mix given them writes the
    bits of drawing, and really reads them (wrong bits change the result)."""
    import dataclasses

    import numpy as np

    from streammerge.kernels.philox import KeepDraw

    g = torch.Generator().manual_seed(3)
    rows, n = 3, 1000                     # 3000 elements: the last byte is partly used
    base = torch.randn(rows, n, generator=g).bfloat16()
    experts = [(base.float() + 0.05 * torch.randn(rows, n, generator=g)).bfloat16() for _ in range(2)]
    draw = KeepDraw(5, (11, 12), (0.5, 0.3), 7)
    want = [np.packbits(draw.tensor((2, rows * n))[k].numpy(), bitorder="little") for k in range(2)]
    for flag in ("1", "0"):
        monkeypatch.setenv("STREAMMERGE_NO_NUMBA", flag)
        for k in range(2):
            packed = np.full(want[k].size, 0xAA, np.uint8)
            dare_row_l1(experts[k], base, 5, draw.streams[k], 7, draw.ps[k], packed)
            assert np.array_equal(packed, want[k]), (flag, k)
    monkeypatch.setenv("STREAMMERGE_NO_NUMBA", "0")

    def mixed(d):
        return merge_deltas(base, None, [0.6, 0.4], d, scale=torch.tensor([2.0, 3.0]).bfloat16(), consensus="sum",
                            experts=experts)

    drawn = mixed(draw)
    assert torch.equal(bits(mixed(dataclasses.replace(draw, packed=tuple(want)))), bits(drawn))
    wrong = tuple(np.zeros_like(w) for w in want)
    assert not torch.equal(bits(mixed(dataclasses.replace(draw, packed=wrong))), bits(drawn))


@pytest.mark.parametrize("rows,n", [(3, 2048), (1, 1), (2, 5), (4, 777)])
def test_della_keep_matches_the_argsort_reference(monkeypatch, rows, n):
    g = torch.Generator().manual_seed(n)
    d = (torch.randn(rows, n, generator=g) * 0.01).to(torch.bfloat16)
    if n >= 6:
        d[:, : n // 3] = d[:, n // 3 : 2 * (n // 3)]  # many exact ties: stable order decides
        d[0, 3], d[0, 4], d[0, 5] = float("nan"), float("inf"), -0.0
        d[-1, :3] = -float("nan")
    ref, got = both(monkeypatch, lambda: della_keep(d, 0.5, 0.2, 7, 99, 12345))
    assert torch.equal(ref, got)
    if rows * n > 1000:
        assert 0.45 < got.float().mean().item() < 0.55


def test_row_l1_matches_torch_to_float64_rounding(monkeypatch):
    g = torch.Generator().manual_seed(0)
    d = (torch.randn(3, 16, 700, generator=g) * torch.logspace(-6, 2, 700)).to(torch.bfloat16)
    mask = torch.rand(3, 16, 700, generator=g) < 0.5
    for m in (None, mask):
        ref, got = both(monkeypatch, lambda: row_l1(d, m))
        for a, b in zip(ref, got):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,m", [(5, 33), (3, SEGMENT), (4, 2 * SEGMENT + 7), (1, 1)])
def test_segment_dots_match_torch_and_ignore_banding(monkeypatch, dtype, rows, m):
    g = torch.Generator().manual_seed(rows * m)
    a = (torch.randn(rows, m, generator=g) * torch.logspace(-4, 3, m)).to(dtype)
    b = torch.randn(rows, m, generator=g).to(dtype)
    for rounded in (False, True):
        ref, got = both(monkeypatch, lambda: segment_dots(a, b, rounded))
        assert got.shape == (rows * -(-m // SEGMENT),)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))
        banded = torch.cat([segment_dots(a[r : r + 1], b[r : r + 1], rounded) for r in range(rows)])
        assert torch.equal(banded, got)
    want = sum((a[0, c].double() * b[0, c].double()).item() for c in range(min(m, SEGMENT)))
    assert segment_dots(a, b)[0].item() == pytest.approx(want, rel=1e-12, abs=1e-300)
    rounded_first = (a[0, : min(m, SEGMENT)] * b[0, : min(m, SEGMENT)]).double()
    assert segment_dots(a, b, True)[0].item() == pytest.approx(rounded_first.sum().item(), rel=1e-12, abs=1e-300)


def _close_pairs(n: int, seed: int, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 pairs over many magnitudes, some equal, some signed zeros."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g) * torch.logspace(lo, hi, n)
    b = a + torch.randn(n, generator=g) * torch.logspace(lo, hi, n)[torch.randperm(n, generator=g)]
    a, b = a.bfloat16(), b.bfloat16()
    b[: n // 50] = a[: n // 50]
    a[n // 50 : n // 25] = -0.0
    return a, b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,m", [(3, 5000), (2, 700), (1, 8192 + 64 * 3 + 5)])
def test_fused_gram_equals_the_pairwise_dots_of_the_differences(monkeypatch, dtype, rows, m):
    """Differences formed per tile and every pair summed from it: the bits of materialising x - base
    and calling segment_dots per pair (the same lane order), with and without a base; torch agrees."""
    from streammerge.kernels.dots import gram_segments

    g = torch.Generator().manual_seed(rows * m)
    base = torch.randn(rows, m, generator=g).to(dtype)
    xs = [(base.float() + 0.1 * torch.randn(rows, m, generator=g)).to(dtype) for _ in range(3)]
    pairs = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
    rounded = {(0, 1), (0, 2), (1, 2)}
    for b in (base, None):
        vs = xs if b is None else [x - b for x in xs]
        want = torch.stack([segment_dots(vs[i], vs[j], p in rounded) for p in pairs for i, j in [p]])
        ref, got = both(monkeypatch, lambda: gram_segments(xs, b, pairs, rounded))
        assert torch.equal(got, want)
        torch.testing.assert_close(ref, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
    assert dispatch.choose("dots", "cpu") == "numba"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_column_products_add_rows_in_order_like_the_cumsum(monkeypatch, dtype):
    """WIDEN's per-column sums: the compiled pass gives the cumulative sum's bits, in one band or in
    bands fed in row order."""
    from streammerge.methods._stats import ColumnProducts

    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(700, 333, generator=g).to(dtype) for _ in range(3)]
    pairs = [(0, 0), (1, 1), (1, 0), (2, 2), (2, 0)]

    def run(cuts):
        acc = ColumnProducts(333, pairs)
        for lo, hi in zip(cuts, cuts[1:]):
            acc.add([x[lo:hi] for x in xs])
        return acc.acc

    ref, got = both(monkeypatch, lambda: run([0, 700]))
    assert torch.equal(got, ref)
    assert torch.equal(run([0, 1, 8, 300, 700]), ref)
    assert dispatch.choose("dots", "cpu") == "numba"


@pytest.mark.parametrize("t", [0.0, 0.3, 0.7314, 1.0, 1.3, -0.2])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_stock_blend_is_bit_identical_to_the_eager_chain(monkeypatch, t, k):
    w0, _ = _close_pairs(20011, k, -8, 2)
    ws = [_close_pairs(20011, k * 10 + i, -8, 2)[1] for i in range(k)]
    for w in ws:
        w[:300] = -0.0
    tt = torch.tensor([t], dtype=torch.bfloat16)
    ref, got = both(monkeypatch, lambda: stock_mix(w0, ws, tt))
    assert torch.equal(bits(got), bits(ref))
    assert dispatch.used()["blend"] == ["numba-cpu", "torch-cpu"]


@pytest.mark.parametrize("t", [5e-8, 1e-7, 3e-7, 1e-3, 0.5, 3.0, 0.0])
def test_nearswap_blend_is_bit_identical_to_the_eager_chain(monkeypatch, t):
    a, b = _close_pairs(30011, 7, -9, 1)
    ref, got = both(monkeypatch, lambda: nearswap_mix(a, b, t))
    assert torch.equal(bits(got), bits(ref))


@pytest.mark.parametrize("quantile", [0.0, 0.5, 0.9, 1.0])
def test_fusion_blend_is_bit_identical_to_the_eager_chain(monkeypatch, quantile):
    rows, n = 37, 541
    b, f = _close_pairs(rows * n, 11, -9, 1)
    b, f = b.reshape(rows, n), f.reshape(rows, n)
    f[0, :50] = b[0, :50]                      # d = 0 (and -0.0 where b is negative)
    f[1, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(f.dtype)
    g = torch.Generator().manual_seed(5)
    kl = (torch.rand(rows, 1, generator=g) * 1e-3).to(torch.bfloat16)
    kl[2], kl[3] = 0.0, -1e-5                  # a zero and a (rounding-)negative divergence
    imp = ((f - b).abs() * kl).float().flatten()
    threshold = imp[~imp.isnan()].quantile(quantile).reshape(1).to(torch.bfloat16)
    ref, got = both(monkeypatch, lambda: fusion_mix(b, f, kl, threshold))
    assert got.dtype == torch.float32 and torch.equal(bits(got), bits(ref))
    kept = (got != b.float()).sum().item()
    assert (quantile == 1.0 or kept > 0) and kept < rows * n   # both sides of the threshold are exercised


@pytest.mark.parametrize("ca,cb", [(0.7, 0.3), (-0.25, 1.25), (1.0, 0.0), (3e-5, 0.99997)])
def test_pair_blend_is_bit_identical_to_the_eager_chain(monkeypatch, ca, cb):
    a, b = _close_pairs(30011, 13, -30, 30)
    a[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38]).to(a.dtype)
    b[4:6] = torch.tensor([float("inf"), 3e38]).to(b.dtype)
    cas, cbs = torch.tensor(ca, dtype=torch.float32), torch.tensor(cb, dtype=torch.float32)
    ref, got = both(monkeypatch, lambda: pair_mix(a, b, cas, cbs))
    assert got.dtype == torch.bfloat16 and torch.equal(bits(got), bits(ref))


FUSED_MAPS = {
    "nuslerp": ({"weight": 0.3}, {"weight": 0.7}),
    "multislerp": ({"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}),
    "model_stock": ({}, {}, {}),
    "nearswap": ({},),
    "slerp": ({},),
    "ram": ({}, {}, {}),
    "ramplus_tl": ({}, {}, {}),
}
GLOBALS = {"nearswap": {"t": 0.002}, "slerp": {"t": 0.3}, "ram": {"epsilon": 0.01}, "ramplus_tl": {"epsilon": 0.01, "r": 0.5, "alpha": 0.9}}


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("method", sorted(FUSED_MAPS))
def test_fused_spherical_and_stock_maps_write_the_torch_bytes(tiny_family, tmp_path, monkeypatch, method, with_base):
    base, experts = tiny_family
    if method in ("model_stock", "nearswap", "slerp", "ram", "ramplus_tl") and not with_base:
        pytest.skip(f"{method} needs a base")
    models = [{"model": str(e), "parameters": p} for e, p in zip(experts, FUSED_MAPS[method])]
    cfg = {"merge_method": method, "dtype": "bfloat16", "models": models,
           **({"base_model": str(base)} if with_base else {}),
           **({"parameters": GLOBALS[method]} if method in GLOBALS else {})}
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("STREAMMERGE_NO_NUMBA", flag)
        dispatch.reset()
        out[flag] = shard_bytes(merge(cfg, tmp_path, f"{method}-{flag}"))
        assert ("numba-cpu" in dispatch.used().get("blend", [])) == (flag == "0")
    assert out["0"] == out["1"]


@pytest.mark.parametrize("start", [0, 3, 2**33 + 5])
def test_dare_rescale_sums_from_the_inputs_equal_the_mask_then_sum_path(start):
    """δ and the Philox mask formed row by row inside the loop (odd starts) = drawing them first."""
    g = torch.Generator().manual_seed(start % 97)
    rows, n = 5, 1301
    base = torch.randn(rows, n, generator=g).bfloat16()
    experts = [(base.float() + 0.05 * torch.randn(rows, n, generator=g)).bfloat16() for _ in range(3)]
    for e, p, s in zip(experts, [0.5, None, 0.3], [11, 12, 2**63 + 13]):
        d = (e - base).unsqueeze(0)
        mask = None if p is None else bernoulli_keep(9, s, start, rows * n, p).reshape(d.shape)
        ref_l1, ref_kept = row_l1(d, mask)
        l1, kept = dare_row_l1(e, base, 9, s, start, p)
        assert torch.equal(l1, ref_l1[0]) and torch.equal(kept, ref_kept[0])


def test_dispatch_falls_back_to_torch(monkeypatch):
    monkeypatch.delenv("STREAMMERGE_NO_NUMBA", raising=False)
    monkeypatch.delenv("STREAMMERGE_NO_TRITON", raising=False)
    assert dispatch.choose("philox", "cpu") == "numba"
    monkeypatch.setattr(dispatch, "_importable", lambda name: name != "numba")
    assert dispatch.choose("philox", "cpu") == "torch"
    assert dispatch.choose("philox", "cuda") == "triton"  # deciding needs no device, only the module
    monkeypatch.setenv("STREAMMERGE_NO_TRITON", "1")
    assert dispatch.choose("taskvec", "cuda") == "torch"
    monkeypatch.setattr(dispatch, "_importable", lambda name: False)
    monkeypatch.delenv("STREAMMERGE_NO_TRITON")
    assert dispatch.choose("taskvec", "cuda") == "torch"
    with pytest.raises(ValueError, match="unknown primitive"):
        dispatch.choose("fft", "cpu")


def test_run_report_names_the_kernels_and_both_paths_write_the_same_bytes(tiny_family, tmp_path, monkeypatch):
    from streammerge import RunOptions, run
    from conftest import write_yaml

    base, experts = tiny_family
    for method, extra in (("ties", {}), ("dare_ties", {}), ("della", {"epsilon": 0.1})):
        cfg = {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
               "models": [{"model": str(e), "parameters": {"weight": 0.4, "density": 0.5, **extra}} for e in experts]}
        monkeypatch.setenv("STREAMMERGE_NO_NUMBA", "1")
        ref = shard_bytes(merge(cfg, tmp_path, f"{method}-torch"))
        monkeypatch.setenv("STREAMMERGE_NO_NUMBA", "0")
        path = write_yaml(tmp_path / f"{method}.yml", cfg)
        report = run(path, tmp_path / f"{method}-numba", RunOptions(max_memory=2 << 30, progress=False))
        assert shard_bytes(tmp_path / f"{method}-numba") == ref, method
        assert report.kernels["taskvec"] == ["numba-cpu"], report.kernels
        if method != "ties":
            assert "numba-cpu" in report.kernels["philox" if method == "dare_ties" else "della_keep"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_threshold_loops_match_torch(monkeypatch, dtype):
    from streammerge.kernels.threshold import KthMagnitude, equal_per_row, topk_mask

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(40, 333, generator=g) * 4).round().to(dtype)  # few distinct values: many ties
    n = x.numel()

    def thresholds():
        f = KthMagnitude(dtype, n, [1, n // 3, n - 1])
        for rows in x.split(7):
            f.update(rows, 0)
        f.finish_pass(0)
        return [f.threshold_for(k) for k in f.ks]

    ref_th, got_th = both(monkeypatch, thresholds)
    assert ref_th == got_th
    for th in got_th:
        def masks():
            seen, out = 0, []
            for rows in x.split(7):
                m, eq = topk_mask(rows, th, seen)
                seen += eq
                out.append(m)
            return torch.cat(out), seen

        (ref_m, ref_seen), (got_m, got_seen) = both(monkeypatch, masks)
        assert torch.equal(ref_m, got_m) and ref_seen == got_seen == th.n_equal
        assert int(got_m.sum()) == th.k
    ref_eq, got_eq = both(monkeypatch, lambda: equal_per_row(x, [th.bits for th in got_th]))
    assert torch.equal(ref_eq, got_eq)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_model_variance_is_bit_identical_to_torch_var(monkeypatch, dtype, k):
    from streammerge.kernels.variance import model_variance

    g = torch.Generator().manual_seed(k)
    x = (torch.randn(k, 257, 129, generator=g) * torch.logspace(-5, 3, 129)).to(dtype)
    x[:, 0] = 0
    x[:, 1] = x[0, 1].clone()  # identical models: variance exactly 0
    ref, got = both(monkeypatch, lambda: model_variance(x))
    assert ref.shape == got.shape == x.shape[1:]
    assert torch.equal(bits(ref), bits(got))
