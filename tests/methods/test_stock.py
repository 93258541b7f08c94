"""model_stock, nearswap, ram, ramplus_tl, sce, arcee_fusion: identities, band independence, errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import assert_band_invariant, load_dir, merge, shard_bytes
from streammerge.errors import ConfigError
from test_spherical import mini_family, no_reads, run_method  # noqa: F401  (fixtures)


def config_for(method: str, base, experts) -> dict:
    b, e = str(base), [str(x) for x in experts]
    every = [{"model": m} for m in e]
    if method == "model_stock":
        return {"merge_method": "model_stock", "base_model": b, "models": every}
    if method == "model_stock_filter_wise":
        return {"merge_method": "model_stock", "base_model": b, "parameters": {"filter_wise": True}, "models": every}
    if method == "nearswap":
        return {"merge_method": "nearswap", "base_model": b, "parameters": {"t": 0.01}, "models": [{"model": b}, every[0]]}
    if method == "ram":
        return {"merge_method": "ram", "base_model": b, "parameters": {"epsilon": 0.02}, "models": every}
    if method == "ramplus_tl":
        return {"merge_method": "ramplus_tl", "base_model": b, "parameters": {"epsilon": 0.02, "r": 0.5, "alpha": 0.9},
                "models": every}
    if method == "sce":
        return {"merge_method": "sce", "base_model": b, "models": every}
    if method == "sce_topk":
        return {"merge_method": "sce", "base_model": b, "parameters": {"select_topk": 0.3}, "models": every}
    if method == "arcee_fusion":
        return {"merge_method": "arcee_fusion", "base_model": b, "models": [{"model": b}, every[0]]}
    raise KeyError(method)


METHODS = ["model_stock", "model_stock_filter_wise", "nearswap", "ram", "ramplus_tl", "sce", "sce_topk", "arcee_fusion"]


@pytest.mark.parametrize("method", METHODS)
def test_chunk_size_does_not_change_a_byte(method, mini_family, tmp_path):
    base, experts = mini_family
    cfg = config_for(method, base, experts)
    assert_band_invariant(cfg, tmp_path)


@pytest.mark.parametrize("name, params, dtype", [
    ("model_stock", {}, torch.bfloat16), ("model_stock", {}, torch.float32), ("ramplus_tl", {"epsilon": 0.5}, torch.bfloat16),
    ("sce", {}, torch.float32), ("sce", {"select_topk": 0.3}, torch.bfloat16), ("sce", {"select_topk": 0.3}, torch.float32),
    ("arcee_fusion", {}, torch.bfloat16)])
def test_wide_rows_give_the_same_bits_in_any_bands(name, params, dtype):
    g = torch.Generator().manual_seed(9)
    xs = [(torch.randn(3, 33000, generator=g)).to(dtype) for _ in range(4)]
    tensors = xs[:2] if name == "arcee_fusion" else xs
    whole = run_method(name, tensors, base=0, params=params)
    for band, split in ((1, False), (2, True)):
        assert torch.equal(run_method(name, tensors, base=0, params=params, band=band, split=split), whole)


# -- model_stock ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_with_orthogonal_task_vectors_is_the_base(filter_wise):
    """cos = 0 gives t = 0: exactly the base."""
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(6, 40, generator=g).bfloat16()
    d = torch.randn(6, 40, generator=g).bfloat16()
    left = torch.zeros_like(d)
    left[:, :20] = d[:, :20]
    right = torch.zeros_like(d)
    right[:, 20:] = d[:, 20:]
    out = run_method("model_stock", [w0, w0 + left, w0 + right], base=0, params={"filter_wise": filter_wise})
    assert torch.equal(out, w0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_of_identical_experts_is_the_expert(dtype, filter_wise):
    """cos = 1 gives t = 1. The cosine of rounded norms can miss 1 by an ulp (mergekit's arithmetic,
    kept), leaving t = 1 − O(eps): the result is the expert up to eps × |task vector| plus rounding."""
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(6, 40, generator=g).to(dtype)
    w1 = (w0.double() + 0.1 * torch.randn(6, 40, generator=g, dtype=torch.float64)).to(dtype)
    out = run_method("model_stock", [w0, w1, w1.clone()], base=0, params={"filter_wise": filter_wise})
    eps = torch.finfo(dtype).eps
    assert bool(((out.double() - w1.double()).abs() <= eps * ((w1.double() - w0.double()).abs() + w1.double().abs())).all())


def test_model_stock_of_identical_experts_through_a_merge(mini_family, tmp_path):
    base, experts = mini_family
    twin = tmp_path / "twin"
    shutil.copytree(experts[0], twin)
    out = load_dir(merge({"merge_method": "model_stock", "base_model": str(base),
                          "models": [{"model": str(experts[0])}, {"model": str(twin)}]}, tmp_path))
    ref, b = load_dir(experts[0]), load_dir(base)
    for k in ref:
        x, r, w0 = out[k].double(), ref[k].double(), b[k].double()
        assert bool(((x - r).abs() <= 2 ** -7 * ((r - w0).abs() + r.abs())).all()), k


# -- nearswap ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t, which", [(10.0, "other"), (0.0, "base")])
def test_nearswap_endpoints(t, which, mini_family, tmp_path):
    """t >= max|base − model| takes the model everywhere; t = 0 keeps the base."""
    base, experts = mini_family
    cfg = {"merge_method": "nearswap", "base_model": str(base), "parameters": {"t": t},
           "models": [{"model": str(base)}, {"model": str(experts[1])}]}
    out = load_dir(merge(cfg, tmp_path))
    ref = load_dir(experts[1] if which == "other" else base)
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_nearswap_blends_by_t_over_the_distance():
    a = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    b = torch.tensor([0.5, 2.0, -4.0, 1.0], dtype=torch.float64)
    out = run_method("nearswap", [a, b], base=0, params={"t": 1.0})
    assert out.tolist() == [0.5, 1.0, -1.0, 1.0]


# -- ram / ramplus_tl ------------------------------------------------------------------------------------

def _ram_case():
    """Exactly representable values: unique entries, a two-model overlap and an entry below epsilon."""
    base = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    m1 = base + torch.tensor([0.5, 0.0, 1.0, 0.0, 0.0, 0.25])
    m2 = base + torch.tensor([0.0, 0.75, 3.0, 0.0, 0.0, 0.0])
    m3 = base + torch.tensor([0.0, 0.0, 0.0, 2**-20, 0.0, 0.0])
    return base, m1, m2, m3


def test_ram_keeps_unique_entries_and_averages_overlaps():
    base, m1, m2, m3 = _ram_case()
    out = run_method("ram", [base, m1, m2, m3], base=0)
    assert out.tolist() == [1.5, 2.75, 5.0, 4.0, 5.0, 6.25]
    assert torch.equal(run_method("ram", [base, m1, m2, m3], base=0, params={"epsilon": 10.0}), base)


def test_ramplus_tl_boosts_unique_entries_by_the_overlap_ratio():
    """m1 has 1 overlapping and 2 unique entries: ρ = 1/2, λ = 1 + r·min(ρ, α); m2 has 1 and 1: ρ = 1."""
    base, m1, m2, m3 = _ram_case()
    out = run_method("ramplus_tl", [base, m1, m2, m3], base=0, params={"r": 0.5, "alpha": 0.75})
    assert out.dtype == torch.float32
    lam1, lam2 = 1 + 0.5 * 0.5, 1 + 0.5 * 0.75
    assert out.tolist() == [1 + 0.5 * lam1, 2 + 0.75 * lam2, 5.0, 4.0, 5.0, 6 + 0.25 * lam1]


def test_ram_of_the_base_alone_is_the_base(mini_family, tmp_path):
    base, _ = mini_family
    for method in ("ram", "ramplus_tl", "sce"):
        out = load_dir(merge({"merge_method": method, "base_model": str(base), "models": [{"model": str(base)}]},
                             tmp_path, method))
        ref = load_dir(base)
        assert all(torch.equal(out[k], ref[k]) for k in ref)


# -- sce ----------------------------------------------------------------------------------------------------

def test_sce_of_one_model_is_that_model():
    """One task vector: weight 1, every nonzero entry agrees with its own sign."""
    base = torch.arange(-12, 12, dtype=torch.bfloat16).reshape(4, 6) / 8
    model = base + torch.tensor([0.25, 0.0, -0.5, 1.0, 0.0, -0.125]).bfloat16()
    assert torch.equal(run_method("sce", [base, model], base=0), model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_sce_top_k_keeps_exactly_k_elements_ties_first_in_flat_order(dtype):
    """Variances drawn from four values, so the k-th is tied many times: exactly k elements take part,
    the tied ones first in flat order, in any banding."""
    g = torch.Generator().manual_seed(5)
    rows, cols = 8, 25
    level = torch.randint(1, 5, (rows, cols), generator=g).to(dtype)        # variance ∝ level²
    base = torch.zeros(rows, cols, dtype=dtype)
    models = [base + level, base - level]                                     # var = level², mean 0 ...
    models.append(base + 0 * level)                                           # ... a third model at the base
    topk = 0.3
    var = torch.var(torch.stack([m - base for m in models]).double(), dim=0, unbiased=False)
    k = int(torch.tensor(int(torch.count_nonzero(var))) * topk)
    order = torch.argsort(var.reshape(-1), descending=True, stable=True)
    expected = torch.zeros(rows * cols, dtype=torch.bool)
    expected[order[:k]] = True
    for band in (None, 1, 3):
        out = run_method("sce", [base] + models, base=0, params={"select_topk": topk}, band=band)
        # the two ±level models cancel in the sign vote's sum (>= 0 wins): kept elements move to +level·w
        kept = (out != base).reshape(-1)
        assert int(kept.sum()) == k
        assert torch.equal(kept, expected)


def test_sce_select_topk_zero_gives_the_base(mini_family, tmp_path):
    base, experts = mini_family
    out = load_dir(merge({"merge_method": "sce", "base_model": str(base), "parameters": {"select_topk": 0.0},
                          "models": [{"model": str(e)} for e in experts]}, tmp_path))
    ref = load_dir(base)
    assert all(torch.equal(out[k], ref[k]) for k in ref)


# -- arcee_fusion -------------------------------------------------------------------------------------------

def test_arcee_fusion_of_the_base_with_itself_is_the_base_in_fp32(mini_family, tmp_path):
    base, _ = mini_family
    twin = tmp_path / "twin"
    shutil.copytree(base, twin)
    out = load_dir(merge({"merge_method": "arcee_fusion", "base_model": str(base), "out_dtype": "float32",
                          "models": [{"model": str(twin)}]}, tmp_path))
    ref = load_dir(base)
    assert all(out[k].dtype == torch.float32 and torch.equal(out[k], ref[k].float()) for k in ref)


def test_arcee_fusion_keeps_only_the_outlying_changes():
    """Importance = |change| × the row's KL divergence; the threshold is median + 1.5·IQR."""
    g = torch.Generator().manual_seed(3)
    b = torch.randn(40, 30, generator=g, dtype=torch.float64)
    f = b + 0.01 * torch.randn(40, 30, generator=g, dtype=torch.float64)
    f[7, 3] += 3.0
    out = run_method("arcee_fusion", [b, f], base=0)
    p, q = torch.softmax(f, -1) + 1e-8, torch.softmax(b, -1) + 1e-8
    imp = (f - b).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    s = imp.reshape(-1).sort().values
    q1, med, q3 = (s[int(x * (s.numel() - 1))] for x in (0.25, 0.5, 0.75))
    keep = imp >= med + 1.5 * (q3 - q1)
    assert keep[7, 3] and 0 < int(keep.sum()) < keep.numel() // 4
    assert torch.equal(out, torch.where(keep, f, b))


def test_arcee_fusion_samples_large_tensors_reproducibly():
    """Above 10^6 elements the quantiles come from 10^6 Philox-sampled importances: the same seed gives
    the same bits in any banding, another seed a threshold within sampling error of the exact one."""
    g = torch.Generator().manual_seed(8)
    b = torch.randn(1001, 1000, generator=g)
    f = b + 0.01 * torch.randn(1001, 1000, generator=g)
    one = run_method("arcee_fusion", [b, f], base=0, seed=1)
    assert torch.equal(one, run_method("arcee_fusion", [b, f], base=0, seed=1, band=300, split=True))
    other = run_method("arcee_fusion", [b, f], base=0, seed=2)
    kept_one, kept_other = int((one != b).sum()), int((other != b).sum())
    assert kept_one != 0 and abs(kept_one - kept_other) < 0.02 * kept_one


# -- errors before any tensor is read -----------------------------------------------------------------------

@pytest.mark.parametrize("cfg, message", [
    (lambda b, e: {"merge_method": "model_stock", "base_model": str(b), "models": [{"model": str(e[0])}]},
     "'model_stock' takes at least 2 model(s) besides the base, got 1"),
    (lambda b, e: {"merge_method": "model_stock", "models": [{"model": str(m)} for m in e]}, "needs a base model"),
    (lambda b, e: {"merge_method": "nearswap", "base_model": str(b), "models": [{"model": str(m)} for m in e[:1]]},
     "needs parameter 't'"),
    (lambda b, e: {"merge_method": "nearswap", "base_model": str(b), "parameters": {"t": 0.1},
                   "models": [{"model": str(m)} for m in e[:2]]}, "'nearswap' takes exactly 1 model(s) besides the base, got 2"),
    (lambda b, e: {"merge_method": "ram", "base_model": str(b), "parameters": {"epsilon": -1},
                   "models": [{"model": str(e[0])}]}, "parameter 'epsilon' must be in [0, inf], got -1"),
    (lambda b, e: {"merge_method": "ramplus_tl", "base_model": str(b), "parameters": {"epsilon": 0},
                   "models": [{"model": str(e[0])}]}, "parameter 'epsilon' must be in (0, inf], got 0"),
    (lambda b, e: {"merge_method": "ramplus_tl", "base_model": str(b), "parameters": {"alpha": -0.5},
                   "models": [{"model": str(e[0])}]}, "parameter 'alpha' must be in [0, inf], got -0.5"),
    (lambda b, e: {"merge_method": "sce", "base_model": str(b), "parameters": {"select_topk": 1.5},
                   "models": [{"model": str(e[0])}]}, "parameter 'select_topk' must be in [0, 1], got 1.5"),
    (lambda b, e: {"merge_method": "sce", "models": [{"model": str(m)} for m in e]}, "'sce' needs a base model"),
    (lambda b, e: {"merge_method": "arcee_fusion", "base_model": str(b), "models": [{"model": str(m)} for m in e]},
     "'arcee_fusion' takes exactly 1 model(s) besides the base, got 3"),
])
def test_config_errors_come_before_any_data(cfg, message, mini_family, tmp_path, no_reads):
    base, experts = mini_family
    with pytest.raises(ConfigError) as e:
        merge(cfg(base, experts), tmp_path)
    assert message in str(e.value)


@pytest.mark.parametrize("method, extra, passes", [
    ("model_stock", {}, {1: {1}, 2: {2}}), ("model_stock_filter_wise", {}, {1: {1}, 2: {1}}),
    ("nearswap", {}, {1: {1}, 2: {1}}), ("ram", {}, {1: {1}, 2: {1}}), ("ramplus_tl", {}, {1: {2}, 2: {2}}),
    ("sce", {}, {1: {2}, 2: {2}}), ("sce_topk", {}, {1: {3}, 2: {3}}),
    ("sce_topk", {"dtype": "float32"}, {1: {5}, 2: {5}}), ("sce_topk", {"dtype": "float64"}, {1: {7}, 2: {7}}),
    ("arcee_fusion", {}, {1: {2}, 2: {2}})])
def test_plan_shape(method, extra, passes, mini_family, tmp_path, no_reads):
    """Reduce passes + map per tensor: the threshold passes of sce depend on the dtype's histogram levels."""
    from test_spherical import plan_passes

    base, experts = mini_family
    assert plan_passes(config_for(method, base, experts) | extra, tmp_path) == passes
