"""nuslerp, multislerp, karcher: identities, band independence, Gram-matrix Karcher iteration, errors.

Also home of the small helpers the other method test files import (`run_method`, `mini_family`,
`no_reads`): a method driven directly, band by band, as the executor drives it; a family of tiny
checkpoints with few rows, so that merges in one-row bands stay fast.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import assert_band_invariant, load_dir, merge, shard_bytes
from streammerge.errors import ConfigError
from streammerge.io.header import CODE_OF
from streammerge.methods import TensorJob, get_method
from streammerge.methods.registry import REQUIRED


# -- helpers (imported by test_stock.py, test_widen.py, test_parity_more.py) ---------------------------

def make_mini_family(root: Path, n_experts: int = 3, dtype: str = "bfloat16", seed: int = 5) -> tuple[Path, list[Path]]:
    from streammerge import synth

    spec = synth.SynthSpec(hidden=16, intermediate=40, layers=2, vocab=48, heads=2, kv_heads=1, dtype=dtype)
    return synth.make_family(root, spec, n_experts, seed=seed)


@pytest.fixture(scope="module")
def mini_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    return make_mini_family(tmp_path_factory.mktemp("mini"))


def run_method(name: str, tensors: list[torch.Tensor], *, base: int | None = None, params: dict | None = None,
               model_params: list[dict] | None = None, kind: str = "layer", band: int | None = None,
               split: bool = False, seed: int = 0, tensor_name: str = "model.layers.0.mlp.up_proj.weight") -> torch.Tensor:
    """Drive a method as the executor does: every reduce over row bands in order (with `split`, each band
    is also cut into one-row states folded in with `merge`, as the worker pool does), then the map."""
    spec = get_method(name)
    shape = tuple(tensors[0].shape)
    rows = shape[0] if len(shape) >= 2 else 1
    numel = math.prod(shape)
    g = {p.name: p.default for p in spec.params if not p.per_model and p.default is not REQUIRED}
    g.update(params or {})
    mps = []
    for i, extra in enumerate(model_params or [{} for _ in tensors]):
        mp = {p.name: p.default for p in spec.params if p.per_model and p.default is not REQUIRED
              and (i != base or p.base_too)}
        mp.update(extra)
        mps.append(mp)
    job = TensorJob(name=tensor_name, shape=shape, rows=rows, compute_code=CODE_OF[tensors[0].dtype], base=base, params=g,
                    model_params=tuple(mps), model_ids=tuple(range(len(tensors))), seed=seed, kind=kind,
                    row_elems=numel // rows)
    band = band or rows

    def chunks(r0: int, r1: int) -> list[torch.Tensor]:
        return [t[r0:r1] if len(shape) >= 2 else t for t in tensors]

    stats: list = []
    for red in spec.reduces_for(job):
        state = red.init(job, stats)
        for r0 in range(0, rows, band):
            r1 = min(rows, r0 + band)
            if split and red.merge is not None and len(shape) >= 2:
                for r in range(r0, r1):
                    part = red.init(job, stats)
                    red.update(part, job, chunks(r, r + 1), r)
                    red.merge(state, part)
            else:
                red.update(state, job, chunks(r0, r1), r0)
        stats.append(red.finish(state, job, stats))
    outs = [spec.map(job, chunks(r0, min(rows, r0 + band)), stats, r0) for r0 in range(0, rows, band)]
    return torch.cat(outs) if len(shape) >= 2 else outs[0]


@pytest.fixture
def no_reads(monkeypatch):
    """Any attempt to read tensor data fails the test: config errors must come from the plan."""
    from streammerge.io import reader

    def boom(*a, **k):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(reader.RowReader, "read_rows", boom)
    monkeypatch.setattr(reader.RowReader, "pread_into", boom)


def weighted(models, weights) -> list[dict]:
    return [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)]


def config_for(method: str, base, experts) -> dict:
    b, e = str(base), [str(x) for x in experts]
    if method == "nuslerp":
        return {"merge_method": "nuslerp", "base_model": b, "models": weighted(e[:2], (0.3, 0.7))}
    if method == "nuslerp_nobase":
        return {"merge_method": "nuslerp", "models": weighted(e[:2], (0.6, 0.4))}
    if method == "nuslerp_rows":
        return {"merge_method": "nuslerp", "base_model": b, "parameters": {"nuslerp_flatten": False},
                "models": weighted(e[:2], (0.3, 0.7))}
    if method == "nuslerp_columns":
        return {"merge_method": "nuslerp", "base_model": b,
                "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}, "models": weighted(e[:2], (0.3, 0.7))}
    if method == "multislerp":
        return {"merge_method": "multislerp", "base_model": b, "models": weighted(e, (0.5, 0.3, 0.2))}
    if method == "multislerp_nobase":
        return {"merge_method": "multislerp", "models": weighted(e, (0.2, 0.3, 0.5))}
    if method == "karcher":
        return {"merge_method": "karcher", "models": [{"model": m} for m in [b] + e]}
    raise KeyError(method)


SPHERICAL = ["nuslerp", "nuslerp_rows", "nuslerp_columns", "multislerp", "karcher"]


# -- band independence ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", SPHERICAL)
def test_chunk_size_does_not_change_a_byte(method, mini_family, tmp_path):
    base, experts = mini_family
    cfg = config_for(method, base, experts)
    assert_band_invariant(cfg, tmp_path)


@pytest.mark.parametrize("name, params, base, dtype", [
    ("nuslerp", {}, 0, torch.bfloat16), ("nuslerp", {}, None, torch.float32),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, 0, torch.bfloat16),
    ("nuslerp", {"nuslerp_flatten": False}, None, torch.bfloat16), ("multislerp", {}, 0, torch.bfloat16),
    ("karcher", {}, None, torch.bfloat16), ("karcher", {}, None, torch.float32)])
def test_wide_rows_give_the_same_bits_in_any_bands(name, params, base, dtype):
    """Rows longer than a 4096-element segment and than torch's 32768-element grain, in bands of one
    row and of two, and with one-row states merged (the worker pool's path)."""
    g = torch.Generator().manual_seed(7)
    xs = [(torch.randn(3, 33000, generator=g) * s).to(dtype) for s in (1.0, 0.9, 1.1, 1.05)]
    n = 3 if base is not None else 2
    mps = None if name == "karcher" else [{"weight": w} for w in (0.0, 0.4, 0.7)][3 - n:]
    tensors = xs if name == "karcher" else xs[:n]
    whole = run_method(name, tensors, base=base, params=params, model_params=mps)
    for band, split in ((1, False), (2, True)):
        assert torch.equal(run_method(name, tensors, base=base, params=params, model_params=mps, band=band, split=split), whole)


# -- identities ---------------------------------------------------------------------------------------------

def test_nuslerp_of_a_model_with_itself_is_that_model_within_rounding():
    """The cosine of rounded unit vectors may fall just short of 1, and then the slerp branch (not the
    exact lerp) is taken, as in mergekit: the result is the model to within one ulp."""
    x = torch.randn(9, 33, dtype=torch.float64)
    same = [{"weight": 1.0}, {"weight": 1.0}]
    for params in ({}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}):
        for dtype, rtol in ((torch.float64, 1e-14), (torch.bfloat16, 2 ** -7)):
            xd = x.to(dtype)
            out = run_method("nuslerp", [xd, xd.clone()], params=params, model_params=same)
            torch.testing.assert_close(out.double(), xd.double(), rtol=rtol, atol=0)


@pytest.mark.parametrize("weights, which", [((1.0, 0.0), 0), ((0.0, 1.0), 1)])
def test_nuslerp_weight_one_zero_gives_that_model_within_rounding(weights, which):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(12, 20, generator=g) for _ in range(3)]
    out = run_method("nuslerp", xs, base=0, model_params=[{}, {"weight": weights[0]}, {"weight": weights[1]}])
    torch.testing.assert_close(out, xs[1 + which], rtol=1e-6, atol=1e-6)


def test_nuslerp_endpoints_through_a_merge(mini_family, tmp_path):
    base, experts = mini_family
    cfg = {"merge_method": "nuslerp", "models": weighted(experts[:2], (0.0, 1.0))}
    out, ref = load_dir(merge(cfg, tmp_path)), load_dir(experts[1])
    for k in ref:
        torch.testing.assert_close(out[k].float(), ref[k].float(), rtol=2 ** -7, atol=1e-6)


def test_multislerp_of_one_model_is_that_model_even_with_a_base(mini_family, tmp_path):
    base, experts = mini_family
    cfg = {"merge_method": "multislerp", "base_model": str(base), "models": weighted(experts[:1], (0.3,))}
    out, ref = load_dir(merge(cfg, tmp_path)), load_dir(experts[0])
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_multislerp_keeps_the_weighted_mean_norm_and_direction():
    """From a base: the result's task vector has the weighted mean norm and the direction of Σ w_i u_i."""
    g = torch.Generator().manual_seed(3)
    b = torch.randn(6, 50, generator=g, dtype=torch.float64)
    ds = [torch.randn(6, 50, generator=g, dtype=torch.float64) * s for s in (1.0, 2.0, 0.5)]
    w = [0.2, 0.5, 0.3]
    out = run_method("multislerp", [b] + [b + d for d in ds], base=0, params={"eps": 0.0},
                     model_params=[{}] + [{"weight": x} for x in w])
    tv = out - b
    assert math.isclose(float(tv.norm()), sum(wi * float(d.norm()) for wi, d in zip(w, ds)), rel_tol=1e-12)
    mean = sum(wi * d / d.norm() for wi, d in zip(w, ds))
    torch.testing.assert_close(tv / tv.norm(), mean / mean.norm(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_karcher_of_identical_inputs_is_the_input(dtype):
    """Exact: the coefficients (1/K each, to ~1e-16) are applied in a wider dtype than the inputs'."""
    x = (torch.randn(7, 30) * 0.1).to(dtype)
    for k in (2, 3, 5):
        assert torch.equal(run_method("karcher", [x.clone() for _ in range(k)]), x)


def test_karcher_of_one_model_is_that_model(mini_family, tmp_path):
    base, experts = mini_family
    out, ref = load_dir(merge({"merge_method": "karcher", "models": [{"model": str(experts[2])}]}, tmp_path)), load_dir(experts[2])
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def dense_karcher(xs: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The Karcher-mean iteration written on the vectors themselves, in fp64 (the rule mergekit follows)."""
    flat = [x.reshape(-1).double() for x in xs]
    norms = [float(v.norm()) for v in flat]
    units = [v / n for v, n in zip(flat, norms)]
    alphas = [1 / len(xs)] * len(xs)
    mean = sum(a * u for a, u in zip(alphas, units))
    mean = mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(alphas, units):
            d = float(torch.dot(mean, u).clamp(-1, 1))
            theta = math.acos(d)
            if theta < tol:
                continue
            tangent += a * (theta / math.sin(theta)) * (u - d * mean)
        tn = float(tangent.norm())
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * tangent / tn
        mean = mean / mean.norm()
    return (sum(a * n for a, n in zip(alphas, norms)) * mean).reshape(xs[0].shape)


@pytest.mark.parametrize("max_iter", [0, 1, 3, 10, 50])
def test_karcher_on_the_gram_matrix_matches_the_dense_iteration(max_iter):
    """Every iterate is Σ c_i u_i, so iterating on the K×K Gram matrix is the dense iteration, exactly
    in real arithmetic: fp64 agrees to ~1e-13 even for inputs far apart (large angles, many steps)."""
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(8, 40, generator=g, dtype=torch.float64) + 0.3 for _ in range(4)]
    ours = run_method("karcher", xs, params={"max_iter": max_iter, "tol": 1e-12})
    torch.testing.assert_close(ours, dense_karcher(xs, max_iter, 1e-12), rtol=1e-12, atol=1e-13)


def test_karcher_ignores_zero_inputs_in_the_direction_but_not_in_the_scale():
    x = torch.randn(4, 10, dtype=torch.float64)
    out = run_method("karcher", [x, torch.zeros_like(x)])
    torch.testing.assert_close(out, x / 2, rtol=1e-15, atol=0)
    assert torch.equal(run_method("karcher", [torch.zeros_like(x)] * 2), torch.zeros_like(x))


# -- errors before any tensor is read ---------------------------------------------------------------------

@pytest.mark.parametrize("cfg, message", [
    (lambda b, e: {"merge_method": "nuslerp", "models": weighted(e, (1, 1, 1))}, "'nuslerp' takes exactly 2 model(s)"),
    (lambda b, e: {"merge_method": "nuslerp", "base_model": str(b), "models": weighted(e[:1], (1,))},
     "'nuslerp' takes exactly 2 model(s) besides the base, got 1"),
    (lambda b, e: {"merge_method": "nuslerp", "models": [{"model": str(m)} for m in e[:2]]}, "needs parameter 'weight'"),
    (lambda b, e: {"merge_method": "multislerp", "models": weighted(e[:2], (0.5, -0.5))},
     "multislerp: the weights [0.5, -0.5] sum to zero"),
    (lambda b, e: {"merge_method": "multislerp", "parameters": {"eps": -1e-3}, "models": weighted(e[:2], (1, 1))},
     "parameter 'eps' must be in [0, inf], got -0.001"),
    (lambda b, e: {"merge_method": "karcher", "parameters": {"max_iter": -1}, "models": [{"model": str(m)} for m in e]},
     "parameter 'max_iter' must be in [0, inf], got -1"),
    (lambda b, e: {"merge_method": "karcher", "parameters": {"tol": -1}, "models": [{"model": str(m)} for m in e]},
     "parameter 'tol' must be in [0, inf], got -1"),
])
def test_config_errors_come_before_any_data(cfg, message, mini_family, tmp_path, no_reads):
    base, experts = mini_family
    with pytest.raises(ConfigError) as e:
        merge(cfg(base, experts), tmp_path)
    assert message in str(e.value)


# -- plan shape ---------------------------------------------------------------------------------------------

def plan_passes(cfg: dict, tmp_path: Path) -> dict[int, set[int]]:
    """Passes (reduces + map) of the planned tensors, by tensor rank; reads headers only."""
    from conftest import write_yaml
    from streammerge import RunOptions
    from streammerge.merge import check

    plan = check(write_yaml(tmp_path / "plan.yml", cfg), RunOptions(max_memory=2 << 30))
    out: dict[int, set[int]] = {}
    for t in plan.tensors:
        out.setdefault(min(len(t.shape), 2), set()).add(t.passes)
    return out


@pytest.mark.parametrize("method, passes", [
    ("nuslerp", {1: {1}, 2: {2}}), ("nuslerp_rows", {1: {1}, 2: {1}}), ("nuslerp_columns", {1: {1}, 2: {3}}),
    ("multislerp", {1: {1}, 2: {2}}), ("karcher", {1: {2}, 2: {2}})])
def test_plan_shape(method, passes, mini_family, tmp_path, no_reads):
    base, experts = mini_family
    assert plan_passes(config_for(method, base, experts), tmp_path) == passes
