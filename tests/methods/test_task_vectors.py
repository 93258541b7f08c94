"""ties, dare_*, breadcrumbs*, della*: exactness, chunk invariance, parity with mergekit 0.1.5."""

import dataclasses
import math

import pytest
import torch

from conftest import assert_band_invariant, load_dir, merge, shard_bytes, write_yaml
from streammerge import RunOptions
from streammerge.merge import check
from streammerge.errors import ConfigError

FAMILY = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]


def family_config(method, base, experts, density=0.5, **extra):
    per = {"density": density, **extra} if method != "task_arithmetic" else {}
    return {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": w, **per}} for e, w in zip(experts, (0.5, 0.3, 0.4))]}


@pytest.mark.parametrize("method", FAMILY)
def test_chunk_size_does_not_change_a_byte(method, tiny_family, tmp_path):
    base, experts = tiny_family
    extra = {"epsilon": 0.1} if method.startswith("della") else {}
    cfg = family_config(method, base, experts, **extra)
    assert_band_invariant(cfg, tmp_path)


def test_masks_do_not_depend_on_tensor_order(tiny_family, tmp_path, monkeypatch):
    """A DARE mask is a function of (seed, model, tensor, element): reversing the order tensors are
    processed in gives the same bytes."""
    from streammerge import merge as merge_mod
    from streammerge.plan import build

    base, experts = tiny_family
    cfg = family_config("dare_ties", base, experts)
    forward = shard_bytes(merge(cfg, tmp_path, "fwd"))
    real = build.build_plan

    def reversed_plan(*a, **k):
        plan = real(*a, **k)
        return dataclasses.replace(plan, tensors=tuple(reversed(plan.tensors)))

    monkeypatch.setattr(merge_mod, "build_plan", reversed_plan)
    assert shard_bytes(merge(cfg, tmp_path, "rev")) == forward


def test_seed_changes_dare_masks_and_is_reproducible(tiny_family, tmp_path):
    base, experts = tiny_family
    cfg = family_config("dare_linear", base, experts)
    a = shard_bytes(merge(cfg, tmp_path, "s1", seed=1))
    b = shard_bytes(merge(cfg, tmp_path, "s1b", seed=1))
    c = shard_bytes(merge(cfg, tmp_path, "s2", seed=2))
    assert a == b and a != c


def test_density_one_is_task_arithmetic(tiny_family, tmp_path):
    base, experts = tiny_family
    ta = load_dir(merge(family_config("task_arithmetic", base, experts), tmp_path, "ta"))
    for method in ("dare_linear", "breadcrumbs"):
        cfg = family_config(method, base, experts, density=1.0)
        if method == "breadcrumbs":
            for m in cfg["models"]:
                m["parameters"]["gamma"] = 0.0
        out = load_dir(merge(cfg, tmp_path, method))
        assert all(torch.equal(out[k], ta[k]) for k in ta), method


def _single_expert_deltas(family, method, tmp_path, global_params=None, **params):
    """Merge one fp32 expert (weight 1) so the output minus base is exactly the sparsified δ."""
    base, experts = family
    cfg = {"merge_method": method, "base_model": str(base), "dtype": "float32", "parameters": global_params or {},
           "models": [{"model": str(experts[0]), "parameters": {"weight": 1.0, **params}}]}
    out = load_dir(merge(cfg, tmp_path, method))
    b, e = load_dir(base), load_dir(experts[0])
    return {k: (out[k] - b[k], e[k] - b[k]) for k in out if out[k].dim() == 2}


def test_ties_keeps_exactly_k_per_tensor(tiny_family_fp32, tmp_path):
    for kept, delta in _single_expert_deltas(tiny_family_fp32, "ties", tmp_path, density=0.3).values():
        k = max(1, int(0.3 * delta.numel()))
        assert int((kept != 0).sum()) == k
        thr = delta.abs().flatten().sort(descending=True).values[k - 1]
        assert bool((kept.abs() >= thr)[kept != 0].all())


def test_dare_keeps_density_within_four_sigma_and_matches_l1(tiny_family_fp32, tmp_path):
    pairs = _single_expert_deltas(tiny_family_fp32, "dare_linear", tmp_path, density=0.4)
    n = sum(d.numel() for _, d in pairs.values())
    kept = sum(int((o != 0).sum()) for o, _ in pairs.values())
    assert abs(kept / n - 0.4) <= 4 * math.sqrt(0.4 * 0.6 / n)
    for out, delta in pairs.values():
        torch.testing.assert_close(out.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)  # L1 matching


def test_inverse_density_rescale_is_unbiased(tiny_family_fp32, tmp_path):
    pairs = _single_expert_deltas(tiny_family_fp32, "dare_linear", tmp_path, {"rescale_mode": "inverse_density"},
                                  density=0.5)
    out = torch.cat([o.flatten() for o, _ in pairs.values()])
    delta = torch.cat([d.flatten() for _, d in pairs.values()])
    kept = out != 0
    torch.testing.assert_close(out[kept], delta[kept] * 2)
    # Monte Carlo: E[mask * δ / p] = δ, so the mean over many elements matches
    assert abs(float(out.sum() - delta.sum())) <= 4 * float(delta.abs().pow(2).sum().sqrt())


def test_della_keeps_larger_magnitudes_more_often(tiny_family_fp32, tmp_path):
    pairs = _single_expert_deltas(tiny_family_fp32, "della_linear", tmp_path, density=0.5, epsilon=0.3)
    hi = lo = hi_n = lo_n = 0
    for out, delta in pairs.values():
        med = delta.abs().median(dim=1, keepdim=True).values
        big = delta.abs() > med
        hi += int((out != 0)[big].sum()); hi_n += int(big.sum())
        lo += int((out != 0)[~big].sum()); lo_n += int((~big).sum())
    assert hi / hi_n > 0.6 and lo / lo_n < 0.4  # ranks map to keep probabilities 0.2 .. 0.8
    assert abs((hi + lo) / (hi_n + lo_n) - 0.5) < 0.02


@pytest.mark.parametrize("params, needle", [
    ({"density": 0.0}, "density' must be in (0, 1]"),
    ({"density": 1.5}, "density' must be in (0, 1]"),
])
def test_bad_density_is_rejected_before_reading(params, needle, tiny_family, tmp_path):
    base, experts = tiny_family
    cfg = family_config("ties", base, experts)
    cfg["models"][1]["parameters"].update(params)
    with pytest.raises(ConfigError) as e:
        check(write_yaml(tmp_path / "c.yml", cfg), RunOptions(max_memory=2 << 30))
    assert needle in str(e.value)


def test_della_epsilon_out_of_range_is_rejected(tiny_family, tmp_path):
    base, experts = tiny_family
    cfg = family_config("della", base, experts, density=0.5, epsilon=0.6)
    with pytest.raises(ConfigError, match="density - epsilon"):
        check(write_yaml(tmp_path / "c.yml", cfg), RunOptions(max_memory=2 << 30))


def test_missing_base_is_rejected(tiny_family, tmp_path):
    base, experts = tiny_family
    cfg = family_config("ties", base, experts)
    del cfg["base_model"]
    with pytest.raises(ConfigError, match="needs a base model"):
        check(write_yaml(tmp_path / "c.yml", cfg), RunOptions(max_memory=2 << 30))


def _two_tensor_model(path, seed, base=None):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    path.mkdir()
    if base is None:
        t = {"a.weight": torch.randn(6, 5, generator=g), "b.weight": torch.randn(4, 3, generator=g)}
    else:
        t = {k: v + torch.randn(v.shape, generator=g) * (3.0 if k == "a.weight" else 0.5) for k, v in base.items()}
    save_file(t, path / "model.safetensors")
    return t


def test_ties_model_scope_matches_a_dense_reference(tmp_path):
    """scope: model keeps each expert's top density of |δ| over all of its tensors, so the tensor whose
    deltas are larger (a.weight) keeps more than density of its own entries."""
    base = _two_tensor_model(tmp_path / "base", 0)
    experts = [_two_tensor_model(tmp_path / f"e{i}", 10 + i, base) for i in range(2)]
    density = 0.4
    cfg = {"merge_method": "ties", "base_model": str(tmp_path / "base"), "parameters": {"scope": "model"},
           "models": [{"model": str(tmp_path / f"e{i}"), "parameters": {"weight": w, "density": density}}
                      for i, w in enumerate((0.6, 0.8))]}
    out = load_dir(merge(cfg, tmp_path, "model", chunk_rows=1))
    names = ["a.weight", "b.weight"]
    # dense reference, written from the definition
    deltas, masks = [], []
    for e in experts:
        flat = torch.cat([(e[n] - base[n]).flatten() for n in names])
        k = max(1, int(density * flat.numel()))
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[flat.abs().argsort(descending=True, stable=True)[:k]] = True
        deltas.append(flat)
        masks.append(keep)
    d = torch.stack(deltas) * torch.stack(masks)
    w = torch.tensor([0.6, 0.8]).unsqueeze(1)
    d = d * w
    majority = torch.where(d.sum(0) >= 0, 1.0, -1.0)
    agree = d.sign() == majority
    mixed = (d * agree).sum(0) / torch.where((w * agree).sum(0) == 0, 1.0, (w * agree).sum(0))
    start = 0
    for n in names:
        size = base[n].numel()
        expect = base[n] + mixed[start:start + size].reshape(base[n].shape)
        torch.testing.assert_close(out[n], expect, rtol=1e-6, atol=1e-6)
        start += size
    kept_a = int(masks[0][: base["a.weight"].numel()].sum())
    assert kept_a > density * base["a.weight"].numel()  # the big-delta tensor keeps more than its share
    per_tensor = load_dir(merge(cfg | {"parameters": {"scope": "tensor"}}, tmp_path, "tensor"))
    assert not torch.equal(per_tensor["b.weight"], out["b.weight"])


def test_model_scope_needs_one_density_per_model(tiny_family, tmp_path):
    base, experts = tiny_family
    cfg = family_config("ties", base, experts) | {"parameters": {"scope": "model"}}
    cfg["models"][0]["parameters"]["density"] = [0.2, 0.8]
    with pytest.raises(ConfigError, match="one density"):
        check(write_yaml(tmp_path / "c.yml", cfg), RunOptions(max_memory=2 << 30))
