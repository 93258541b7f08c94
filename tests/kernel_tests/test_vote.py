"""Sign consensus and masked mixing: hand-made cases, chunk invariance, mergekit parity."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from streammerge.kernels.vote import agree_mask, mix, sign_consensus, sum_models

INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (tells -0.0 from +0.0, unlike torch.equal)."""
    return a.dtype == b.dtype and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_sum_consensus_zero_sum_counts_positive():
    d = t([[1.0, -2.0, 0.0, 3.0, -1.0], [-1.0, 1.0, 0.0, -1.0, -1.0]])
    assert sign_consensus(d, "sum").tolist() == [1, -1, 1, 1, -1]
    assert sign_consensus(d, "sum").dtype == torch.int8


def test_count_consensus_counts_signs_not_sizes():
    d = t([[5.0, -5.0, 0.0, 1.0], [-1.0, 1.0, 0.0, 0.0], [-1.0, 1.0, 0.0, -1.0]])
    assert sign_consensus(d, "count").tolist() == [-1, 1, 1, 1]  # last column: 1 - 1 = 0 -> +1
    assert sign_consensus(d, "sum").tolist() == [1, -1, 1, 1]


def test_zero_delta_never_agrees():
    d = t([[0.0, -0.0, 2.0], [1.0, 1.0, -2.0]])
    majority = sign_consensus(d)  # [1, 1, 1]
    assert agree_mask(d, majority).tolist() == [[False, False, True], [True, True, False]]


def test_mix_hand_made_with_consensus():
    d = t([[1.0, -2.0, 0.0, 4.0], [-3.0, 1.0, 0.0, 2.0], [1.0, 1.0, 0.0, -0.5]])
    w = [1.0, 0.5, 2.0]
    # weighted: [1, -2, 0, 4], [-1.5, .5, 0, 1], [2, 2, 0, -1]; sums 1.5, 0.5, 0, 4 -> all +.
    # agree:    [T, F, F, T],  [F, T, F, T],    [T, T, F, F]
    mixed = mix(d, w, consensus="sum")
    assert mixed.tolist() == [3.0, 2.5, 0.0, 5.0]
    # divisor: [1+2, .5+2, 0 -> 1, 1+.5]
    assert torch.equal(mix(d, w, consensus="sum", normalize=True), t([1.0, 1.0, 0.0, 5.0 / 1.5]))
    scaled = mix(d, w, consensus="sum", normalize=True, lam=2.0)
    assert torch.equal(scaled, t([2.0, 2.0, 0.0, 10.0 / 1.5]))


def test_negative_weight_flips_the_vote():
    d = t([[1.0], [1.0]])
    # weighted [1, -3]: majority -1; only model 1 agrees; divisor = w1 = -3.
    assert mix(d, [1.0, -3.0], consensus="sum").tolist() == [-3.0]
    assert mix(d, [1.0, -3.0], consensus="sum", normalize=True).tolist() == [1.0]


def test_mix_without_consensus_divides_by_all_weights_not_the_mask():
    d = t([[2.0, 4.0], [6.0, 8.0]])
    mask = torch.tensor([[True, False], [True, True]])
    assert mix(d, [1.0, 3.0], mask).tolist() == [20.0, 24.0]
    assert mix(d, [1.0, 3.0], mask, normalize=True).tolist() == [5.0, 6.0]  # / (1 + 3)
    # With consensus the mask reaches the divisor through the zeroed delta.
    assert mix(d, [1.0, 3.0], mask, consensus="sum", normalize=True).tolist() == [5.0, 8.0]


def test_zero_weight_sums_are_guarded():
    d = t([[1.0, 2.0], [3.0, 4.0]])
    out = mix(d, [1.0, -1.0], normalize=True)  # sum of weights 0 -> divisor 1
    assert out.tolist() == [-2.0, -2.0]
    tiny = mix(d, [1e-9, 0.0], normalize=True)  # |sum| < 1e-8 -> divisor 1
    assert torch.allclose(tiny, t([1e-9, 2e-9]))
    zero_agree = mix(t([[0.0], [0.0]]), [1.0, 1.0], consensus="sum", normalize=True)
    assert zero_agree.tolist() == [0.0]


def test_scale_applies_after_mask_before_weight():
    d = t([[1.0, 3.0], [2.0, 4.0]])
    mask = torch.tensor([[True, False], [False, True]])
    out = mix(d, [2.0, 1.0], mask, scale=[1.5, 0.5])
    assert out.tolist() == [1.0 * 1.5 * 2.0, 4.0 * 0.5]


def test_per_element_weights_broadcast_like_mergekit():
    d = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) - 10
    w = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]])  # [K, rows] -> [K, rows, 1]
    want = (d * w[:, :, None]).sum(0)
    assert torch.equal(mix(d, w), want)
    with pytest.raises(ValueError, match=r"one per model"):
        mix(d, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="does not broadcast"):
        mix(d, torch.ones(2, 5))
    with pytest.raises(ValueError, match="consensus must be"):
        mix(d, [1.0, 1.0], consensus="majority")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'sum' or 'count'"):
        sign_consensus(d, "mean")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("k", [1, 3, 8, 16])
def test_sum_models_matches_torch_sum_over_models(dtype, k):
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(k, 4096, generator=g) * torch.logspace(-3, 3, k)[:, None]).to(dtype)
    assert same_bits(sum_models(x), x.sum(dim=0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("consensus", [None, "sum", "count"])
def test_mix_is_chunk_invariant(dtype, consensus, monkeypatch):
    import streammerge.kernels.vote as vote

    g = torch.Generator().manual_seed(1)
    d = (torch.randn(6, 40, 9, generator=g) * (torch.rand(6, 40, 9, generator=g) < 0.6)).to(dtype)
    mask = torch.rand(6, 40, 9, generator=g) < 0.7
    w = [0.3, -0.2, 1.1, 0.0, 0.7, 0.25]
    kw = dict(consensus=consensus, normalize=True, lam=0.9)
    whole = mix(d, w, mask, **kw)
    for rows in (1, 7):
        bands = [mix(d[:, r : r + rows], w, mask[:, r : r + rows], **kw) for r in range(0, 40, rows)]
        assert same_bits(torch.cat(bands), whole)
    single = [mix(d[:, 5:6, c : c + 1], w, mask[:, 5:6, c : c + 1], **kw) for c in range(9)]
    assert same_bits(torch.cat(single, dim=1)[0], whole[5])
    monkeypatch.setattr(vote, "_BAND", 9 * 3)  # internal bands of 3 rows
    assert same_bits(mix(d, w, mask, **kw), whole)


def mergekit_group(base, models):
    entries = [SimpleNamespace(tensor=m, id=i) for i, m in enumerate(models)]
    return SimpleNamespace(base=SimpleNamespace(tensor=base), non_base=entries)


@pytest.mark.parity
@pytest.mark.parametrize("method,consensus", [("task_arithmetic", None), ("ties", "sum")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_bitwise_parity_with_mergekit_at_density_one(method, consensus, dtype):
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    merge = registry.get(method)
    g = torch.Generator().manual_seed(7)
    base = torch.randn(48, 17, generator=g).to(dtype)
    models = []
    for _ in range(3):
        noise = torch.randn(48, 17, generator=g) * 0.1 * (torch.rand(48, 17, generator=g) < 0.7)
        models.append((base.float() + noise).to(dtype))
    models[0][:3] = base[:3]  # rows of zero deltas
    weights = [0.3, -0.7, 1.1]
    deltas = torch.stack([m - base for m in models])
    for normalize in (False, True):
        for lam in (1.0, 0.8):
            params = {
                "density": {i: 1.0 for i in range(3)},
                "rescale": False,
                "int8_mask": False,
                "weight": dict(enumerate(weights)),
                "normalize": normalize,
                "lambda": lam,
            }
            want = merge.merge_group(mergekit_group(base, models), **params)
            got = (base + mix(deltas, weights, consensus=consensus, normalize=normalize, lam=lam)).to(dtype)
            assert same_bits(got, want), (normalize, lam)
