"""Parity with mergekit 0.1.5 for the task-vector family.

ties / breadcrumbs(_ties): equal to mergekit's output except where exactly equal magnitudes straddle a
threshold: mergekit picks among them with torch's unstable argsort, we keep the first ones in flat
order. Every differing element must be at such a position, and such positions must be rare.
dare_* / della*: random masks from different generators: compared statistically.
"""

import pytest
import torch

from conftest import load_dir, merge
from e2e.parity import mergekit_or_skip, run_mergekit
from methods.test_task_vectors import family_config

pytestmark = pytest.mark.parity


def _tie_positions(base, experts, name, density, gamma=None):
    """Elements where some model's |δ| equals one of its thresholds (the ambiguous ones)."""
    b = load_dir(base)[name]
    out = torch.zeros(b.shape, dtype=torch.bool)
    for e in experts:
        delta = (load_dir(e)[name] - b).float().abs().flatten()
        n = delta.numel()
        desc = delta.sort(descending=True).values
        if gamma is None:
            ks = [max(1, int(density * n))]
        else:
            target, top = int(density * n), int(gamma * n)
            bot = max(0, n - target - top)
            ks = [n - bot, n - bot - target]
        for k in ks:
            if 0 < k < n:
                out |= (delta == desc[k - 1]).reshape(b.shape)
    return out


@pytest.mark.parametrize("method, gamma", [("ties", None), ("breadcrumbs", 0.05), ("breadcrumbs_ties", 0.05)])
def test_magnitude_methods_differ_only_at_threshold_ties(method, gamma, tiny_family, tmp_path):
    mergekit_or_skip()
    base, experts = tiny_family
    extra = {"gamma": gamma} if gamma is not None else {}
    cfg = family_config(method, base, experts, density=0.5, **extra)
    ours, theirs = load_dir(merge(cfg, tmp_path)), load_dir(run_mergekit(cfg, tmp_path / "mk"))
    ambiguous = total = 0
    for name in theirs:
        diff = ours[name] != theirs[name]
        if not bool(diff.any()):
            continue
        ties = _tie_positions(base, experts, name, 0.5, gamma)
        assert not bool((diff & ~ties).any()), f"{name}: outputs differ where no magnitude ties the threshold"
        ambiguous += int(ties.sum())
        total += ties.numel()
    assert ambiguous <= 0.05 * max(total, 1)


def _agreement(x, y):
    both = (x != 0) & (y != 0)
    return float((x.sign() == y.sign())[both].float().mean())


@pytest.mark.parametrize("method, params", [("dare_linear", {}), ("dare_ties", {}),
                                            ("della_linear", {"epsilon": 0.1}), ("della", {"epsilon": 0.1})])
def test_random_methods_agree_statistically(method, params, tiny_family_fp32, tmp_path):
    """mergekit's draw must look like another draw of ours: same kept fraction, same L1 scale, and as
    much sign agreement with our seed-1 output as our own seed-2 output has."""
    mergekit_or_skip()
    base, experts = tiny_family_fp32
    cfg = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5, **params}} for e in experts]}
    ours = load_dir(merge(cfg, tmp_path, "s1", seed=1))
    ours2 = load_dir(merge(cfg, tmp_path, "s2", seed=2))
    theirs = load_dir(run_mergekit(cfg, tmp_path / "mk"))
    b = load_dir(base)
    for name in theirs:
        if theirs[name].numel() < 4096:
            continue
        d1, d2, dt = (x[name] - b[name] for x in (ours, ours2, theirs))
        kept_o, kept_t = float((d1 != 0).float().mean()), float((dt != 0).float().mean())
        assert abs(kept_o - kept_t) < 0.03, (name, kept_o, kept_t)
        assert abs(float(d1.abs().sum()) / float(dt.abs().sum()) - 1) < 0.05, name
        assert _agreement(d1, dt) >= _agreement(d1, d2) - 0.03, name
