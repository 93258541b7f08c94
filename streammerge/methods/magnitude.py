"""Magnitude thresholds of task vectors δ = θ_k − θ_0, exact and without sorting, for TIES and breadcrumbs.

Per tensor: one histogram pass per level of the dtype's bit patterns (1 for bf16/fp16, 2 for fp32),
then a counting pass (elements equal to each threshold per row, so that the tie rule "first equal
ones in flat order" holds in any band or block; L1 sums for rescale). Without rescale the counting
may run in the map's read (`Reduce.so_far`). With `scope: model`, the same
over every tensor of the model (`model_pass`). The thresholds come from
`streammerge.kernels.threshold`; kernels are imported where they are called, so planning stays
torch-free.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from ._stats import HISTOGRAM_PASSES
from .registry import ModelPass, Reduce, TensorJob

if TYPE_CHECKING:
    import torch

    from ..kernels.threshold import KthMagnitude, Threshold


RESCALE_EPS = 1e-7


def deltas(job: TensorJob, chunks: list[torch.Tensor]) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Base band, input indices of the other models, and their δ stacked [K, ...] in the loaded dtype."""
    import torch
    assert job.base is not None
    base = chunks[job.base]
    others = [i for i in range(len(chunks)) if i != job.base]
    from ..kernels.scratch import scratch

    d = scratch("deltas", (len(others), *base.shape), base.dtype, base.device)
    for j, i in enumerate(others):
        torch.sub(chunks[i], base, out=d[j])
    return base, others, d


def model_param(job: TensorJob, i: int, key: str) -> Any:
    return job.model_params[i][key]


# -- magnitude thresholds -----------------------------------------------------------------------------

def _ranks(job: TensorJob, i: int, kind: str) -> tuple[int, ...]:
    """The k-th-largest ranks each model needs: top-k for ties; two for breadcrumbs' band."""
    gamma = float(model_param(job, i, "gamma")) if kind != "magnitude" else None
    return _ranks_for(job.numel, float(model_param(job, i, "density")), gamma, kind)


def needs_mask(job: TensorJob, i: int) -> bool:
    return float(model_param(job, i, "density")) < 1 and job.numel > 0


def magnitude_reduces(job: TensorJob, kind: str, rescale: bool) -> tuple[Reduce, ...]:
    """Histogram passes (one per level of the dtype's bit patterns), then the counting pass. The finders
    travel as the histogram passes' results: the first pass makes them, each later one reads them from
    `stats[-1]`; planning only counts the passes."""
    others = [i for i in range(len(job.model_params)) if i != job.base]
    masked = [needs_mask(job, i) for i in others]
    if not any(masked):
        return ()
    n_passes = HISTOGRAM_PASSES[job.compute_code]

    def hist_pass(p: int) -> Reduce:
        def init(job: TensorJob, stats: Sequence[Any]) -> tuple[list[KthMagnitude | None], list[KthMagnitude | None]]:
            if p == 0:
                from ..kernels.threshold import KthMagnitude

                shared = [KthMagnitude(job.compute_dtype, job.numel, _ranks(job, i, kind)) if m else None
                          for i, m in zip(others, masked)]
                assert all(f is None or f.passes == n_passes for f in shared), "HISTOGRAM_PASSES is out of date"
            else:
                shared = stats[-1]
            return shared, [f.spawn() if f is not None else None for f in shared]

        def update(state, job, chunks, row0) -> None:
            _, _, d = deltas(job, chunks)
            for j, f in enumerate(state[1]):
                if f is not None:
                    f.update(d[j], p)

        def merge(into, other) -> None:   # `into` keeps its finders; only the counts add up
            for a, b in zip(into[1], other[1]):
                if a is not None:
                    a.absorb(b)

        def finish(state, job, stats) -> list[KthMagnitude | None]:
            shared, parts = state
            for f, part in zip(shared, parts):
                if f is not None:
                    f.absorb(part)
                    f.finish_pass(p)
            return shared

        if p:   # a refine pass follows the coarse bins of the member's own ranks: not shared
            return Reduce(f"histogram_refine{p}", init, update, finish, merge)
        return Reduce("histogram", init, update, finish, merge, share=_histogram_key, adopt=_adopt_counts)

    def count_init(job: TensorJob, stats: Sequence[Any]) -> dict:
        return {"finders": stats[-1], "eq": [[] for _ in others], "l1": [[] for _ in others],
                "kept": [[] for _ in others]}

    def count_update(state: dict, job: TensorJob, chunks: list[torch.Tensor], row0: int) -> None:
        _, _, d = deltas(job, chunks)
        rows = d.shape[1] if d.dim() >= 3 else 1
        for j, f in enumerate(state["finders"]):
            if f is None:
                continue
            eq, l1, kept = _count_rows(d[j].reshape(rows, -1), _thresholds(f), rescale)
            state["eq"][j].append(eq)
            state["l1"][j].extend(l1)
            state["kept"][j].extend(kept)

    def count_merge(into: dict, other: dict) -> None:
        for key in ("eq", "l1", "kept"):
            for a, b in zip(into[key], other[key]):
                a.extend(b)

    def count_finish(state: dict, job: TensorJob, stats) -> dict:
        prefix, scale = [], []
        for j, f in enumerate(state["finders"]):
            entry, factor = (None, 1.0) if f is None else _prefix_and_scale(
                _thresholds(f), state["eq"][j], None, state["l1"][j], state["kept"][j], rescale)
            prefix.append(entry)
            scale.append(factor)
        return {"prefix": prefix, "scale": scale}

    passes = tuple(hist_pass(p) for p in range(n_passes))
    # Without rescale the map of a row needs only the equal elements of the rows before it: counted in
    # order, band by band, the map's own read can do the counting. The L1 factor needs every row first.
    so_far = None if rescale else count_finish
    return passes + (Reduce("tie_counts", count_init, count_update, count_finish, count_merge, so_far),)


def _histogram_key(job: TensorJob) -> tuple:
    """The first histogram pass counts |δ| of every masked model, whatever its density or kind."""
    others = [i for i in range(len(job.model_params)) if i != job.base]
    return ("magnitude_histogram", job.compute_code, job.base, job.numel, tuple(needs_mask(job, i) for i in others))


def _adopt_counts(mine: tuple, computed: tuple) -> tuple:
    """Own finders (own ranks), the computed pass's counts (finish only reads them)."""
    return mine[0], computed[1]


def _thresholds(f: KthMagnitude) -> tuple[Threshold, ...]:
    return tuple(f.threshold_for(k) for k in f.ks)


def _count_rows(flat: torch.Tensor, ths: Sequence[Threshold], rescale: bool) -> tuple[torch.Tensor, list[float], list[float]]:
    """Per row of a [rows, n] band: elements equal to each threshold, and with rescale Σ|δ| and the Σ|δ|
    strictly above the first threshold (fp64 row sums, combined later with math.fsum)."""
    import torch
    from ..kernels.threshold import equal_per_row, magnitude_keys

    eq = equal_per_row(flat, [th.bits for th in ths])
    if not rescale:
        return eq, [], []
    key = magnitude_keys(flat)
    mag = flat.abs()
    kept = torch.where(key > ths[0].bits, mag, 0).sum(dim=1, dtype=torch.float64)
    return eq, mag.sum(dim=1, dtype=torch.float64).tolist(), kept.tolist()


def _prefix_and_scale(ths: tuple[Threshold, ...], eq: list[torch.Tensor], offset: torch.Tensor | None,
                      l1: list[float], kept: list[float], rescale: bool) -> tuple[tuple, float]:
    """The map's tie bookkeeping (equal elements before each row, from `offset` on) and the L1 rescale
    factor of one tensor and model; the kept L1 adds the equal elements that fall within the quota."""
    import torch
    per_row = torch.cat(eq, dim=1) if eq else torch.zeros(len(ths), 0, dtype=torch.int64)
    before = torch.zeros(len(ths), per_row.shape[1] + 1, dtype=torch.int64)
    torch.cumsum(per_row, dim=1, out=before[:, 1:])
    if offset is not None:
        before += offset.unsqueeze(1)
    factor = 1.0
    if rescale:
        total = math.fsum(l1)
        part = math.fsum(kept) + _equal_kept(ths[0], before[0]) * abs(ths[0].value)
        factor = total / part if total >= RESCALE_EPS and part >= RESCALE_EPS else 1.0
    return (ths, before), factor


def magnitude_masks(job: TensorJob, d: torch.Tensor, stats: dict, row0: int, kind: str) -> torch.Tensor | None:
    import torch
    from ..kernels.scratch import scratch
    from ..kernels.threshold import topk_mask

    mask = scratch("masks", tuple(d.shape), torch.bool, d.device).fill_(True)
    any_mask = False
    for j, entry in enumerate(stats["prefix"]):
        if entry is None:
            continue
        any_mask = True
        ths, before = entry
        row = row0 if len(job.shape) >= 2 else 0
        m, _ = topk_mask(d[j], ths[0], int(before[0, row]))
        if kind == "magnitude_outliers":
            if ths[1].k > 0:
                drop, _ = topk_mask(d[j], ths[1], int(before[1, row]))
                m &= ~drop
        mask[j] = m
    return mask if any_mask else None


# -- TIES over the whole model (scope: model) ---------------------------------------------------------

def _model_scope(jobs: Sequence[TensorJob]) -> bool:
    return bool(jobs) and jobs[0].params.get("scope") == "model"


def model_pass(kind: str) -> ModelPass:
    """Each expert keeps its top `density` fraction of |δ| over all of its tensors, as in the TIES paper:
    one histogram per expert across the model, then a counting sweep for the tie rule (first equal
    elements in flat order, tensors in plan order)."""

    def sweeps(jobs: Sequence[TensorJob]) -> int:
        if not _model_scope(jobs):
            return 0
        return HISTOGRAM_PASSES[jobs[0].compute_code] + 1

    def densities(jobs: Sequence[TensorJob]) -> tuple[dict[int, int], dict[int, tuple[float, float | None]]]:
        """Each expert's element count over the model and its one (density, gamma); ValueError if two."""
        sizes: dict[int, int] = {}
        density: dict[int, tuple[float, float | None]] = {}
        for job in jobs:
            for i, mid in enumerate(job.model_ids):
                if i == job.base:
                    continue
                sizes[mid] = sizes.get(mid, 0) + job.numel
                d = (float(model_param(job, i, "density")), float(model_param(job, i, "gamma")) if kind != "magnitude" else None)
                if density.setdefault(mid, d) != d:
                    raise ValueError(f"scope: model needs one density (and gamma) per model; model {mid} has "
                                     f"{density[mid]} and {d} (tensor {job.name!r})")
        return sizes, density

    def check(jobs: Sequence[TensorJob]) -> str | None:
        """The planner's test of the parameters (torch-free): `init` then builds the state once, in the run."""
        codes = {j.compute_code for j in jobs}
        if len(codes) > 1:
            return f"scope: model needs one dtype for every tensor, got {sorted(codes)}; set 'dtype:'"
        try:
            densities(jobs)
        except ValueError as e:
            return str(e)
        return None

    def init(jobs: Sequence[TensorJob]) -> dict:
        from ..kernels.threshold import KthMagnitude

        sizes, density = densities(jobs)
        finders = {}
        for mid, n in sizes.items():
            d, g = density[mid]
            if d < 1 and n:
                ks = _ranks_for(n, d, g, kind)
                finders[mid] = KthMagnitude(jobs[0].compute_dtype, n, ks)
                assert finders[mid].passes == HISTOGRAM_PASSES[jobs[0].compute_code], "HISTOGRAM_PASSES is out of date"
        return {"finders": finders, "eq": {}, "l1": {}, "kept": {}, "offset": {}, "hist_sweeps": sweeps(jobs) - 1}

    def update(state: dict, sweep: int, index: int, job: TensorJob, chunks: list[torch.Tensor], row0: int) -> None:
        _, others, d = deltas(job, chunks)
        for j, i in enumerate(others):
            f = state["finders"].get(job.model_ids[i])
            if f is None:
                continue
            if sweep < state["hist_sweeps"]:
                f.update(d[j], sweep)
                continue
            rows = d.shape[1] if d.dim() >= 3 else 1
            eq, l1, kept = _count_rows(d[j].reshape(rows, -1), _thresholds(f), bool(job.params["rescale"]))
            state["eq"].setdefault((index, j), []).append(eq)
            state["l1"].setdefault((index, j), []).extend(l1)
            state["kept"].setdefault((index, j), []).extend(kept)

    def end_sweep(state: dict, sweep: int) -> None:
        import torch
        if sweep < state["hist_sweeps"]:
            for f in state["finders"].values():
                f.finish_pass(sweep)
            return
        running: dict[int, torch.Tensor] = {}
        for (index, j) in sorted(state["eq"]):
            per_row = torch.cat(state["eq"][(index, j)], dim=1)
            state["offset"][(index, j)] = running.get(j, torch.zeros(per_row.shape[0], dtype=torch.int64)).clone()
            running[j] = state["offset"][(index, j)] + per_row.sum(dim=1)

    def result(state: dict, index: int, job: TensorJob) -> dict:
        prefix, scale = [], []
        others = [i for i in range(len(job.model_ids)) if i != job.base]
        for j, i in enumerate(others):
            f = state["finders"].get(job.model_ids[i])
            if f is None or (index, j) not in state["eq"]:
                prefix.append(None)
                scale.append(1.0)
                continue
            key = (index, j)
            entry, factor = _prefix_and_scale(_thresholds(f), state["eq"][key], state["offset"][key],
                                              state["l1"].get(key, []), state["kept"].get(key, []),
                                              bool(job.params["rescale"]))
            prefix.append(entry)
            scale.append(factor)
        return {"prefix": prefix, "scale": scale}

    return ModelPass(sweeps, init, update, end_sweep, result, check)


def _equal_kept(th: Threshold, before: torch.Tensor) -> int:
    """How many of this tensor's elements equal to the threshold fall within the model's quota."""
    start, end = int(before[0]), int(before[-1])
    return max(0, min(end, th.n_equal_keep) - start)


def _ranks_for(n: int, density: float, gamma: float | None, kind: str) -> tuple[int, ...]:
    if kind == "magnitude":
        return (max(1, int(density * n)),)
    target, top = int(density * n), int(gamma * n)
    bot = max(0, n - target - top)
    return (n - bot, n - bot - target)
