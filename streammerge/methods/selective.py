"""sce and arcee_fusion: methods that keep the elements a whole-tensor statistic selects.

sce (mergekit 0.1.5, loaded dtype throughout): with `select_topk` < 1, only the elements whose
variance across the task vectors is among the top `select_topk` fraction of the nonzero variances
take part. The k-th largest variance comes from the exact bit-pattern histogram of
`streammerge.kernels.threshold` (one pass for bf16/fp16; fp32 and fp64 first count the nonzero
variances, then narrow the histogram in refine passes). Exactly k elements are kept: every one above
the threshold and the first tied ones in flat order (mergekit's `torch.topk` picks tied elements in
an unspecified order). A last reduce pass then sums each model's kept squares (the weights) and counts,
per row, the tied elements kept before it, so that the map needs no state. The weights' mean square is
exactly rounded; mergekit's fp32 sum is up to 2 ulps from it (docs/compatibility.md, the sce rows). Passes: bf16/fp16 2 + map,
fp32 4 + map, fp64 6 + map; with `select_topk` 1 (the default) one reduce pass for the weights.

arcee_fusion: importance |f − b|·KL(softmax f ‖ softmax b) per row, threshold median + 1.5·IQR of
the importances, keep the model's change where importance ≥ threshold; fp32 result like mergekit's.
Quantiles are exact (all importances are kept and sorted: at most 10^6 values). Above 10^6 elements
mergekit samples 10^6 of them with replacement from the global torch RNG; we sample the same number
from the counter-based Philox stream of (seed, model, tensor), so the result is reproducible but
agrees with mergekit only statistically.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Sequence

from ._stats import HISTOGRAM_PASSES, ExactSum, as_rows, model_sum, nonbase, promote_fp32, rowwise, scalar, segment_sums
from .registry import FUSED_BLOCK_ELEMS, MethodSpec, Param, Reduce, TensorJob, in_range

if TYPE_CHECKING:
    import torch

    from ..kernels.threshold import KthMagnitude, Threshold


# -- sce --------------------------------------------------------------------------------------------

def _task_vectors(job: TensorJob, chunks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    import torch
    base = chunks[job.base]
    return base, torch.stack([x - base for x in nonbase(job, chunks)])


def _variance(tv: torch.Tensor) -> torch.Tensor:
    from ..kernels.variance import model_variance

    return model_variance(tv)


def _topk(job: TensorJob) -> float:
    return float(job.params["select_topk"])


def _selecting(job: TensorJob) -> bool:
    return 0 < _topk(job) < 1 and len(job.model_params) > 1


class _Select:
    """What the threshold passes hand on: the finder, and the count of nonzero variances."""

    def __init__(self, job: TensorJob) -> None:
        self.nonzero = 0
        self.finder: KthMagnitude | None = None
        self.dtype = job.compute_dtype
        self.n = job.numel

    def k(self, topk: float) -> int:
        # mergekit: int(count_nonzero(var) * density), the product taken in fp32
        import torch
        return int(torch.tensor(self.nonzero) * topk)


def _count_stage() -> Reduce:
    """fp32/fp64 refine passes follow the bin of a rank declared up front: count nonzero variances first."""
    def init(job: TensorJob, stats: Sequence[Any]) -> _Select:
        return _Select(job)

    def update(state: _Select, job: TensorJob, chunks: list[torch.Tensor], row0: int) -> None:
        import torch
        state.nonzero += int(torch.count_nonzero(_variance(_task_vectors(job, chunks)[1])))

    def merge(into: _Select, other: _Select) -> None:
        into.nonzero += other.nonzero

    return Reduce("nonzero_count", init, update, lambda state, job, stats: state, merge)


def _histogram_stage(p: int, one_pass: bool) -> Reduce:
    def init(job: TensorJob, stats: Sequence[Any]) -> _Select:
        from ..kernels.threshold import KthMagnitude

        sel = stats[-1] if stats else _Select(job)   # the count pass's (or the previous level's) selection
        if sel.finder is None and not one_pass:
            sel.finder = KthMagnitude(sel.dtype, sel.n, sel.k(_topk(job)))
        elif sel.finder is None:
            sel.finder = KthMagnitude(sel.dtype, sel.n, 0)   # one pass answers any k afterwards
        return sel

    def update(state: _Select, job: TensorJob, chunks: list[torch.Tensor], row0: int) -> None:
        import torch
        var = _variance(_task_vectors(job, chunks)[1])
        if one_pass:
            state.nonzero += int(torch.count_nonzero(var))
        state.finder.update(var, p)

    def finish(state: _Select, job: TensorJob, stats: Sequence[Any]) -> _Select:
        state.finder.finish_pass(p)
        return state

    return Reduce("variance_histogram" if p == 0 else f"variance_histogram_refine{p}", init, update, finish)


def _weights_stage() -> Reduce:
    """Kept squares per model, and per row the number of tied elements in earlier rows."""
    def init(job: TensorJob, stats: Sequence[Any]) -> dict[str, Any]:
        sel = stats[-1] if stats else None
        th = sel.finder.threshold_for(sel.k(_topk(job))) if sel is not None else None
        k = len(job.model_params) - 1
        return {"th": th, "sq": [ExactSum() for _ in range(k)], "equal": [0]}

    def update(state: dict[str, Any], job: TensorJob, chunks: list[torch.Tensor], row0: int) -> None:
        _, tv = _task_vectors(job, chunks)
        from ..kernels.threshold import topk_mask

        th: Threshold | None = state["th"]
        if th is not None:
            var = _variance(tv)
            rows = as_rows(var)
            mask, _ = topk_mask(var, th, state["equal"][-1])
            for n in _keys(rows).eq(th.bits).sum(dim=1).tolist():
                state["equal"].append(state["equal"][-1] + n)
            tv = tv * mask.to(tv.dtype)
        elif _topk(job) <= 0:
            tv = tv * 0
        for acc, t in zip(state["sq"], tv):
            acc.add(segment_sums(as_rows(t.square()).double()).tolist())

    def finish(state: dict[str, Any], job: TensorJob, stats: Sequence[Any]) -> dict[str, Any]:
        import torch
        dt = job.compute_dtype
        means = torch.stack([scalar(acc.value / job.numel, dt) for acc in state["sq"]])
        total = torch.sum(means).item()
        weights = torch.ones_like(means) / means.shape[0] if abs(total) < 1e-6 else means / total
        return {"th": state["th"], "equal": torch.tensor(state["equal"], dtype=torch.int64), "weights": weights}

    return Reduce("sce_weights", init, update, finish)


_KEYS = {"bfloat16": ("int16", 0x7FFF), "float16": ("int16", 0x7FFF), "float32": ("int32", 0x7FFFFFFF),
         "float64": ("int64", 0x7FFFFFFFFFFFFFFF)}   # torch dtype names: no torch at import


def _keys(x: torch.Tensor) -> torch.Tensor:
    """|x| as the threshold kernel's integer keys (the bit pattern without the sign bit)."""
    import torch
    int_dtype, mask = _KEYS[str(x.dtype).removeprefix("torch.")]
    return x.contiguous().view(getattr(torch, int_dtype)) & mask


def _sce_reduces(job: TensorJob) -> tuple[Reduce, ...]:
    if len(job.model_params) == 1 or job.numel == 0:   # no elements: no statistics (a mean of none divides by 0)
        return ()
    if not _selecting(job):
        return (_weights_stage(),)
    passes = HISTOGRAM_PASSES[job.compute_code]
    stages = [] if passes == 1 else [_count_stage()]
    stages += [_histogram_stage(p, passes == 1) for p in range(passes)]
    return (*stages, _weights_stage())


def _sce_map(job: TensorJob, chunks: list[torch.Tensor], stats: Sequence[Any], row0: int) -> torch.Tensor:
    import torch
    if len(chunks) == 1:
        return chunks[0]
    if job.numel == 0:
        return chunks[job.base]
    from ..kernels.threshold import topk_mask

    st = stats[-1]
    base, tv = _task_vectors(job, chunks)
    mask_dtype = torch.int8 if job.params["int8_mask"] else base.dtype
    if st["th"] is not None:
        keep, _ = topk_mask(_variance(tv), st["th"], int(st["equal"][row0]) if base.dim() >= 2 else 0)
        tv = tv * keep.to(mask_dtype).unsqueeze(0)
    elif _topk(job) <= 0:
        tv = tv * torch.zeros((), dtype=mask_dtype, device=tv.device)
    sign = tv.sign().to(mask_dtype)
    majority = (model_sum(tv) >= 0).to(mask_dtype) * 2 - 1
    erase = sign == majority
    weights = st["weights"].to(tv.device).view(-1, *([1] * base.dim()))
    erased = weights * erase
    merged = model_sum(tv * erased)
    return base + merged / model_sum(erased).clamp(min=1e-6)


SCE = MethodSpec(
    name="sce",
    map=_sce_map,
    reduce_plan=_sce_reduces,
    params=(
        Param("select_topk", 1.0, check=in_range(0, 1),
              doc="fraction of the elements, by variance across the task vectors, that take part"),
        Param("int8_mask", False, kind="bool", doc="int8 masks (memory only; the result is the same)"),
    ),
    base="required",
    min_models=0,
    description="Select, Calculate, Erase: keeps high-variance elements, weights each task vector by its mean "
                "square, and erases minority signs",
    paper="https://arxiv.org/abs/2408.07990",
)


# -- arcee_fusion -----------------------------------------------------------------------------------

_SAMPLE = 1_000_000
_QUANTILES = (0.25, 0.5, 0.75)


def _kl(f: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL divergence of the softmax of each last-dim vector of ``f`` from that of ``b`` (keepdim)."""
    import torch
    import torch.nn.functional as F

    p = F.softmax(f, dim=-1).add_(1e-8)   # in place: the same elementwise bits, 3 temporaries not 7
    q = F.softmax(b, dim=-1).add_(1e-8)
    return torch.sum(torch.div(p, q, out=q).log_().mul_(p), dim=-1, keepdim=True)


def _pair(job: TensorJob, chunks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    (f,) = nonbase(job, chunks)
    return chunks[job.base], f


def order_statistics(values: torch.Tensor, quantiles: Sequence[float]) -> torch.Tensor:
    """``sorted(values)[floor(q * (n - 1))]`` for each q, as a tensor of `values`' dtype: the quantiles
    mergekit reads off ``torch.sort``, by selection (numpy's introselect, O(n)): a full sort of 10^6
    importances was 43 % of arcee_fusion's compute (scripts/profile_passes.py). NaN sorts last in both."""
    import numpy as np
    import torch
    idx = (torch.tensor(quantiles) * (values.numel() - 1)).long().tolist()   # float32, as before
    wide = values.float().numpy()       # exact for bf16/fp16; fp32 as is
    if values.dtype == torch.float64:
        wide = values.numpy()
    picked = np.partition(wide, idx)[idx]
    return torch.from_numpy(picked).to(values.dtype)


def _fusion_reduces(job: TensorJob) -> tuple[Reduce, ...]:
    if job.numel == 0:   # no elements: no quantiles to take
        return ()
    sampled = job.numel > _SAMPLE
    cache: dict[str, torch.Tensor] = {}
    lock = threading.Lock()

    def positions() -> torch.Tensor:
        with lock:
            if "pos" not in cache:
                model = job.model_ids[next(i for i in range(len(job.model_ids)) if i != job.base)]
                from ..kernels.philox import stream_id
                from ..kernels.sample import sample_positions

                cache["pos"] = sample_positions(job.seed % (1 << 64), stream_id(model, job.name), job.numel, _SAMPLE)
            return cache["pos"]

    def init(job: TensorJob, stats: Sequence[Any]) -> dict[str, list]:
        return {"kl": [], "imp": []}

    def update(state: dict[str, list], job: TensorJob, chunks: list[torch.Tensor], row0: int) -> None:
        import torch
        b, f = _pair(job, chunks)
        kl = rowwise(_kl, f, b)
        if sampled:   # |f - b| only where the sample looks: elementwise, so the same bits
            start = row0 * job.row_elems
            pos = positions()
            lo, hi = torch.searchsorted(pos, torch.tensor([start, start + f.numel()])).tolist()
            at = pos[lo:hi].to(f.device) - start
            imp = (f.reshape(-1)[at] - b.reshape(-1)[at]).abs() * kl.reshape(-1)[at // f.shape[-1]]
        else:
            imp = ((f - b).abs() * kl).reshape(-1)
        state["kl"].append((row0, kl.reshape(-1).cpu()))
        state["imp"].append(imp.cpu())

    def merge(into: dict[str, list], other: dict[str, list]) -> None:
        into["kl"].extend(other["kl"])
        into["imp"].extend(other["imp"])

    def finish(state: dict[str, list], job: TensorJob, stats: Sequence[Any]) -> dict[str, torch.Tensor]:
        import torch
        q1, median, q3 = order_statistics(torch.cat(state["imp"]), _QUANTILES)
        kl = torch.cat([v for _, v in sorted(state["kl"], key=lambda item: item[0])])
        return {"threshold": median + 1.5 * (q3 - q1), "kl": kl}

    return (Reduce("importance", init, update, finish, merge=merge),)


def _fusion_map(job: TensorJob, chunks: list[torch.Tensor], stats: Sequence[Any], row0: int) -> torch.Tensor:
    """The importance |f - b| · KL(row) from the KL values the reduce pass kept: no second softmax."""
    from ..kernels.blend import fusion_mix

    b, f = _pair(job, chunks)
    if job.numel == 0:
        return b.to(promote_fp32(b.dtype))
    per_row = f.numel() // f.shape[-1] if f.dim() else 1
    first = row0 * job.row_elems // f.shape[-1] if f.dim() >= 2 else 0
    kl = stats[0]["kl"][first:first + per_row].to(f.device).reshape(*f.shape[:-1], 1) if f.dim() else stats[0]["kl"][0]
    return fusion_mix(b, f, kl, stats[0]["threshold"].to(f.device))   # one f - b: mergekit's two, same bits


ARCEE_FUSION = MethodSpec(
    name="arcee_fusion",
    block_elems=FUSED_BLOCK_ELEMS,
    map=_fusion_map,
    reduce_plan=_fusion_reduces,
    base="required",
    min_models=1,
    max_models=1,
    result_dtype=promote_fp32,
    description="takes the other model's changes only where their importance (|change| × KL divergence of the "
                "rows' softmax) is an outlier above median + 1.5·IQR; returns fp32, as mergekit does",
    paper="https://arcee.ai",
)
