"""sce against mergekit 0.1.5 on a three-model config (base + two experts, the tiny preset): where the
outputs differ and exactly why (docs/compatibility.md, the sce rows).

* bf16, `select_topk` 1 (the default): bit for bit.
* `select_topk` < 1: the only difference is the tie rule of the top-k variance selection. In bf16 the
  variances take few distinct values, so hundreds of elements often tie with the k-th; mergekit's
  `torch.topk` keeps some of them (in the order its selection algorithm leaves them), we keep the first in
  flat order. A different kept set also changes each model's weight (the mean square of its *kept* task
  vector), so elements elsewhere in the tensor move too. With mergekit's selection made stable, every
  tensor is bit for bit.
* fp32: the only difference is the rounding of the weights' mean square: ours is exactly rounded, mergekit's
  is torch's fp32 sum (within 2 ulps of it). With mergekit's mean exactly rounded, every tensor is bit
  for bit.
The sign election, the erase step, the normalisation and the dtype of every intermediate agree: each
patched comparison below is bitwise on all 39 tensors.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import load_dir, merge
from e2e.parity import mergekit_or_skip, run_mergekit

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def family_fp32(tmp_path_factory):
    from streammerge import synth

    spec = dataclasses.replace(synth.PRESETS["tiny"], dtype="float32")
    return synth.make_family(tmp_path_factory.mktemp("sce32"), spec, 2, seed=2)


def _config(base, experts, **params) -> dict:
    cfg = {"merge_method": "sce", "base_model": str(base), "models": [{"model": str(e)} for e in experts[:2]]}
    return cfg | ({"parameters": params} if params else {})


def _bitwise(ours: dict, theirs: dict) -> list[str]:
    assert ours.keys() == theirs.keys() and len(theirs) == 39
    return [k for k in theirs if ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k])]


def _stable_mask(tvs, density, mask_dtype=None):
    """mergekit's sce_mask with its torch.topk replaced by a stable descending order: ties in flat order."""
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var, dtype=mask_dtype)
    mask.view(-1)[torch.argsort(var.abs().reshape(-1), descending=True, stable=True)[:k]] = 1
    return mask


def _exact_weight(tvs):
    """mergekit's sce_weight with the mean square exactly rounded (as ours) instead of torch's fp32 sum."""
    weights = (tvs.square().reshape(tvs.shape[0], -1).double().sum(dim=1) / tvs[0].numel()).to(tvs.dtype)
    total = torch.sum(weights).item()
    return torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total


def test_bf16_without_selection_is_bit_for_bit(tiny_family, tmp_path):
    mergekit_or_skip()
    cfg = _config(*tiny_family)
    ours, theirs = load_dir(merge(cfg, tmp_path, "ours")), load_dir(run_mergekit(cfg, tmp_path / "mk"))
    assert len(_bitwise(ours, theirs)) == 39


@pytest.mark.parametrize("topk", [0.5])
def test_bf16_selection_differs_only_by_the_tie_rule(tiny_family, tmp_path, monkeypatch, topk):
    mergekit_or_skip()
    from mergekit.merge_methods import sce as mk_sce

    cfg = _config(*tiny_family, select_topk=topk)
    ours = load_dir(merge(cfg, tmp_path, "ours", chunk_rows=7))   # ties split across bands
    theirs = load_dir(run_mergekit(cfg, tmp_path / "mk"))
    # every tensor that differs has variances tied with the k-th largest, some of them left out
    base, experts = tiny_family
    b, e = load_dir(base), [load_dir(x) for x in experts[:2]]
    for name in set(theirs) - set(_bitwise(ours, theirs)):
        tvs = torch.stack([m[name] - b[name] for m in e])
        var = torch.var(tvs, dim=0, unbiased=False).reshape(-1)
        k = int(torch.count_nonzero(var) * topk)
        kth = var.topk(k).values[-1]
        assert int((var >= kth).sum()) > k, name
        # mergekit's own selection keeps exactly k too, and differs from the stable one only among the tied
        theirs_mask = mk_sce.sce_mask(tvs, topk, torch.int64).reshape(-1)
        stable = _stable_mask(tvs, topk, torch.int64).reshape(-1)
        assert int(theirs_mask.sum()) == int(stable.sum()) == k
        assert torch.all((theirs_mask != stable) <= (var == kth)), name
    # mergekit with the stable tie rule: every tensor bit for bit
    monkeypatch.setattr(mk_sce, "sce_mask", _stable_mask)
    stable_theirs = load_dir(run_mergekit(cfg, tmp_path / "mk_stable"))
    assert len(_bitwise(ours, stable_theirs)) == 39


@pytest.mark.parametrize("topk", [0.3])
def test_fp32_differs_only_by_the_rounding_of_the_weights(family_fp32, tmp_path, monkeypatch, topk):
    mergekit_or_skip()
    from mergekit.merge_methods import sce as mk_sce

    base, experts = family_fp32
    cfg = _config(base, experts, **({"select_topk": topk} if topk < 1 else {}))
    ours = load_dir(merge(cfg, tmp_path, "ours"))
    theirs = load_dir(run_mergekit(cfg, tmp_path / "mk"))
    for k, ref in theirs.items():   # a weight an ulp or two off moves the output by about an ulp of its largest value
        err = float((ours[k].double() - ref.double()).abs().max())
        assert err <= torch.finfo(torch.float32).eps * float(ref.double().abs().max()) * 1.5, k
    b, e = load_dir(base), [load_dir(x) for x in experts[:2]]
    for name in theirs:   # mergekit's fp32 mean square against the exactly rounded one: 2 ulps at most
        tvs = torch.stack([m[name] - b[name] for m in e])
        if topk < 1:
            tvs = tvs * _stable_mask(tvs, topk, tvs.dtype).unsqueeze(0)
        mk_mean = tvs.square().reshape(2, -1).mean(dim=1)
        exact = (tvs.square().reshape(2, -1).double().sum(dim=1) / tvs[0].numel()).float()
        assert torch.all((mk_mean.view(torch.int32) - exact.view(torch.int32)).abs() <= 2), name
    monkeypatch.setattr(mk_sce, "sce_mask", _stable_mask)
    monkeypatch.setattr(mk_sce, "sce_weight", _exact_weight)
    exact_theirs = load_dir(run_mergekit(cfg, tmp_path / "mk_exact"))
    assert len(_bitwise(ours, exact_theirs)) == 39
