"""Parity with mergekit 0.1.5: bitwise for linear, task_arithmetic and passthrough; slerp within 1 bf16 ulp."""

import pytest
import torch

from conftest import load_dir, merge
from e2e.parity import mergekit_or_skip, run_mergekit
from e2e.test_methods_basic import config_for

pytestmark = pytest.mark.parity


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "passthrough"])
def test_bitwise_parity(method, tiny_family, tmp_path):
    mergekit_or_skip()
    base, experts = tiny_family
    cfg = config_for(method, base, experts)
    ours = load_dir(merge(cfg, tmp_path, chunk_rows=7))
    theirs = load_dir(run_mergekit(cfg, tmp_path / "mk"))
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, k
        assert torch.equal(ours[k], theirs[k]), k


def test_linear_parity_with_fp32_inputs_and_bf16_output(tiny_family_fp32, tmp_path):
    mergekit_or_skip()
    base, experts = tiny_family_fp32
    cfg = {"merge_method": "linear", "out_dtype": "bfloat16", "parameters": {"normalize": False},
           "models": [{"model": str(base), "parameters": {"weight": 0.4}}, {"model": str(experts[0]), "parameters": {"weight": 0.9}}]}
    ours, theirs = load_dir(merge(cfg, tmp_path)), load_dir(run_mergekit(cfg, tmp_path / "mk"))
    assert all(ours[k].dtype == torch.bfloat16 and torch.equal(ours[k], theirs[k]) for k in theirs)


def test_slerp_parity_within_one_ulp(tiny_family, tmp_path):
    """Our norms and dot product are exactly-rounded fp64 sums over rows; mergekit sums fp32 chunks.
    The coefficients then differ in the last fp32 bits, which can flip a bf16 rounding: at most one
    bf16 ulp, in a small fraction of elements."""
    mergekit_or_skip()
    base, experts = tiny_family
    cfg = config_for("slerp", base, experts)
    ours, theirs = load_dir(merge(cfg, tmp_path)), load_dir(run_mergekit(cfg, tmp_path / "mk"))
    differing = total = 0
    for k in theirs:
        a, b = ours[k].float(), theirs[k].float()
        ulp = torch.finfo(torch.bfloat16).eps * b.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
        assert bool(((a - b).abs() <= ulp).all()), k
        differing += int((a != b).sum())
        total += b.numel()
    assert differing <= total * 1e-3
