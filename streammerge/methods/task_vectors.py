"""The task-vector family: task_arithmetic's relatives that sparsify each δ = θ_k − θ_0 and may vote on signs.

One configurable unit, as in mergekit: a sparsifier (magnitude top-k, Bernoulli, magnitude with
outliers dropped, DELLA's rank-based Bernoulli), an optional sign consensus, and mergekit 0.1.5's mixing
(`streammerge.kernels.vote.mix`). Everything runs in the loaded dtype, as mergekit does.

Passes per tensor:
- magnitude sparsifiers: one histogram pass per level of the dtype's bit patterns (1 for bf16/fp16,
  2 for fp32), then a counting pass (elements equal to each threshold per row, so that the tie rule
  "first equal ones in flat order" holds in any band or block; L1 sums for rescale), then the map;
- Bernoulli sparsifiers with L1 rescale: one pass for ‖δ‖₁ and ‖masked δ‖₁, then the map. Masks come
  from the counter-based Philox stream of (seed, model, tensor), so both passes draw the same mask.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Sequence

from .._lazy import lazy_module, lazy_names
from ._stats import HISTOGRAM_PASSES
from .registry import MethodSpec, ModelPass, Param, Reduce, TensorJob, in_range

if TYPE_CHECKING:
    from ..kernels.threshold import Threshold

torch = lazy_module("torch")
np = lazy_module("numpy")
KeepDraw, stream_id = lazy_names("streammerge.kernels.philox", "KeepDraw", "stream_id")
KthMagnitude, equal_per_row, magnitude_keys, topk_mask = lazy_names(
    "streammerge.kernels.threshold", "KthMagnitude", "equal_per_row", "magnitude_keys", "topk_mask")
(merge_deltas,) = lazy_names("streammerge.kernels.vote", "merge_deltas")
(della_keep,) = lazy_names("streammerge.kernels.della", "della_keep")
row_l1, dare_row_l1 = lazy_names("streammerge.kernels.norms", "row_l1", "dare_row_l1")
(scratch,) = lazy_names("streammerge.kernels.scratch", "scratch")

RESCALE_EPS = 1e-7


def _density_check(v: Any) -> str | None:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return f"must be a number, got {v!r}"
    if not 0 < v <= 1:
        return f"must be in (0, 1], got {v} (density is the fraction of each task vector kept)"
    return None


def _deltas(job: TensorJob, chunks: list[torch.Tensor]) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Base band, input indices of the other models, and their δ stacked [K, ...] in the loaded dtype."""
    assert job.base is not None
    base = chunks[job.base]
    others = [i for i in range(len(chunks)) if i != job.base]
    d = scratch("deltas", (len(others), *base.shape), base.dtype, base.device)
    for j, i in enumerate(others):
        torch.sub(chunks[i], base, out=d[j])
    return base, others, d


def _mp(job: TensorJob, i: int, key: str) -> Any:
    return job.model_params[i][key]


def _flat_start(job: TensorJob, row0: int) -> int:
    return row0 * job.row_elems if len(job.shape) >= 2 else 0


# -- magnitude thresholds -----------------------------------------------------------------------------

def _ranks(job: TensorJob, i: int, kind: str) -> tuple[int, ...]:
    """The k-th-largest ranks each model needs: top-k for ties; two for breadcrumbs' band."""
    gamma = float(_mp(job, i, "gamma")) if kind != "magnitude" else None
    return _ranks_for(job.numel, float(_mp(job, i, "density")), gamma, kind)


def _needs_mask(job: TensorJob, i: int) -> bool:
    return float(_mp(job, i, "density")) < 1 and job.numel > 0


def _magnitude_reduces(job: TensorJob, kind: str, rescale: bool) -> tuple[Reduce, ...]:
    """Histogram passes (one per level of the dtype's bit patterns), then the counting pass. The finders
    travel as the histogram passes' results: the first pass makes them, each later one reads them from
    `stats[-1]`; planning only counts the passes."""
    others = [i for i in range(len(job.model_params)) if i != job.base]
    masked = [_needs_mask(job, i) for i in others]
    if not any(masked):
        return ()
    n_passes = HISTOGRAM_PASSES[job.compute_code]

    def hist_pass(p: int) -> Reduce:
        def init(job: TensorJob, stats: Sequence[Any]) -> tuple[list[KthMagnitude | None], list[KthMagnitude | None]]:
            if p == 0:
                shared = [KthMagnitude(job.compute_dtype, job.numel, _ranks(job, i, kind)) if m else None
                          for i, m in zip(others, masked)]
                assert all(f is None or f.passes == n_passes for f in shared), "HISTOGRAM_PASSES is out of date"
            else:
                shared = stats[-1]
            return shared, [f.spawn() if f is not None else None for f in shared]

        def update(state, job, chunks, row0) -> None:
            _, _, d = _deltas(job, chunks)
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

        return Reduce("histogram" if p == 0 else f"histogram_refine{p}", init, update, finish, merge)

    def count_init(job: TensorJob, stats: Sequence[Any]) -> dict:
        return {"finders": stats[-1], "eq": [[] for _ in others], "l1": [[] for _ in others],
                "kept": [[] for _ in others]}

    def count_update(state: dict, job: TensorJob, chunks: list[torch.Tensor], row0: int) -> None:
        _, _, d = _deltas(job, chunks)
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
    return passes + (Reduce("tie_counts", count_init, count_update, count_finish, count_merge),)


def _thresholds(f: KthMagnitude) -> tuple[Threshold, ...]:
    return tuple(f.threshold_for(k) for k in f.ks)


def _count_rows(flat: torch.Tensor, ths: Sequence[Threshold], rescale: bool) -> tuple[torch.Tensor, list[float], list[float]]:
    """Per row of a [rows, n] band: elements equal to each threshold, and with rescale Σ|δ| and the Σ|δ|
    strictly above the first threshold (fp64 row sums, combined later with math.fsum)."""
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


def _magnitude_masks(job: TensorJob, d: torch.Tensor, stats: dict, row0: int, kind: str) -> torch.Tensor | None:
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


def _model_pass(kind: str) -> ModelPass:
    """Each expert keeps its top `density` fraction of |δ| over all of its tensors, as in the TIES paper:
    one histogram per expert across the model, then a counting sweep for the tie rule (first equal
    elements in flat order, tensors in plan order)."""

    def sweeps(jobs: Sequence[TensorJob]) -> int:
        if not _model_scope(jobs):
            return 0
        return KthMagnitude(jobs[0].compute_dtype, 1, 1).passes + 1

    def init(jobs: Sequence[TensorJob]) -> dict:
        dtypes = {j.compute_dtype for j in jobs}
        if len(dtypes) > 1:
            raise ValueError(f"scope: model needs one dtype for every tensor, got {sorted(map(str, dtypes))}; set 'dtype:'")
        sizes: dict[int, int] = {}
        density: dict[int, tuple[float, float | None]] = {}
        for job in jobs:
            for i, mid in enumerate(job.model_ids):
                if i == job.base:
                    continue
                sizes[mid] = sizes.get(mid, 0) + job.numel
                d = (float(_mp(job, i, "density")), float(_mp(job, i, "gamma")) if kind != "magnitude" else None)
                if density.setdefault(mid, d) != d:
                    raise ValueError(f"scope: model needs one density (and gamma) per model; model {mid} has "
                                     f"{density[mid]} and {d} (tensor {job.name!r})")
        finders = {}
        for mid, n in sizes.items():
            d, g = density[mid]
            if d < 1 and n:
                ks = _ranks_for(n, d, g, kind)
                finders[mid] = KthMagnitude(jobs[0].compute_dtype, n, ks)
        return {"finders": finders, "eq": {}, "l1": {}, "kept": {}, "offset": {}, "hist_sweeps": sweeps(jobs) - 1}

    def update(state: dict, sweep: int, index: int, job: TensorJob, chunks: list[torch.Tensor], row0: int) -> None:
        _, others, d = _deltas(job, chunks)
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

    return ModelPass(sweeps, init, update, end_sweep, result)


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


# -- Bernoulli masks (DARE, DELLA) --------------------------------------------------------------------

def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """mergekit draws and rescales in bf16 for bf16 inputs, in fp32 for fp16/fp32 on CPU."""
    return dtype if dtype in (torch.bfloat16, torch.float64) else torch.float32


def _dare_p(job: TensorJob, i: int) -> float:
    """DARE's keep probability: the density rounded to the work dtype, as mergekit draws against it."""
    return _rounded(float(_mp(job, i, "density")), _work_dtype(job.compute_dtype))


@functools.lru_cache(maxsize=64)
def _rounded(value: float, dtype: torch.dtype) -> float:
    return float(torch.tensor(value, dtype=dtype))


def _rows(job: TensorJob, band: torch.Tensor) -> torch.Tensor:
    """DELLA ranks within rows: a matrix band as [rows, n]; a 1-D tensor is one row."""
    if band.dim() >= 2 and len(job.shape) >= 2:
        return band.reshape(band.shape[0], -1)
    return band.reshape(1, -1)


def _keep_draw(job: TensorJob, row0: int, packed: tuple | None = None) -> KeepDraw | None:
    """DARE's masks for the chunk at ``row0``, drawn by whoever uses them (the fused mix, tile by tile),
    or read from ``packed``, the bits the rescale pass drew for the same chunk."""
    others = [i for i in range(len(job.model_params)) if i != job.base]
    if not any(_needs_mask(job, i) for i in others):
        return None
    return KeepDraw(job.seed, tuple(stream_id(job.model_ids[i], job.name) for i in others),
                    tuple(_dare_p(job, i) if _needs_mask(job, i) else None for i in others), _flat_start(job, row0),
                    packed)


def _della_masks(job: TensorJob, d: torch.Tensor, row0: int) -> torch.Tensor | None:
    others = [i for i in range(len(job.model_params)) if i != job.base]
    if not any(_needs_mask(job, i) for i in others):
        return None
    mask = scratch("masks", tuple(d.shape), torch.bool, d.device).fill_(True)
    start = _flat_start(job, row0)
    for j, i in enumerate(others):
        if _needs_mask(job, i):
            keep = della_keep(_rows(job, d[j]), float(_mp(job, i, "density")), float(_mp(job, i, "epsilon")),
                              job.seed, stream_id(job.model_ids[i], job.name), start)
            mask[j] = keep.reshape(d[j].shape)
    return mask


def _dare_update(state: dict, job: TensorJob, chunks: list[torch.Tensor], row0: int) -> None:
    """The DARE rescale sums straight from the inputs, expert by expert (same sums as the δ/mask path).
    For a tensor of one band, whose map runs next on the same in-memory band, it keeps the keep bits it
    drew (packed, by the chunk's first row: K bits an element, a sixteenth of the band's bf16 inputs)
    for the map to read instead of drawing again; a tensor of several bands draws again rather than
    hold a whole tensor's bits between its passes."""
    base = chunks[job.base]
    rows = base.shape[0] if base.dim() >= 2 and len(job.shape) >= 2 else 1
    base = base.reshape(rows, -1)
    start = _flat_start(job, row0)
    others = [i for i in range(len(chunks)) if i != job.base]
    keep = job.rows_per_chunk >= job.rows
    bits = [np.empty(-(-base.numel() // 8), np.uint8) if keep and _needs_mask(job, i) else None for i in others]
    parts = [dare_row_l1(chunks[i].reshape(rows, -1), base, job.seed, stream_id(job.model_ids[i], job.name), start,
                         _dare_p(job, i) if _needs_mask(job, i) else None, packed)
             for i, packed in zip(others, bits)]
    state["l1"].append(torch.stack([p[0] for p in parts]))
    state["kept"].append(torch.stack([p[1] for p in parts]))
    if keep:
        state["keep"][row0] = tuple(bits)


def _bernoulli_reduces(job: TensorJob, kind: str) -> tuple[Reduce, ...]:
    """‖δ‖₁ and ‖masked δ‖₁ per row. DARE's pass also keeps its mask bits, packed, for the map (DELLA's
    map draws again: its masks depend on ranks, which the map recomputes anyway)."""
    def init(job, stats):
        return {"l1": [], "kept": [], "keep": {}}

    def update(state, job, chunks, row0):
        if kind == "random":
            return _dare_update(state, job, chunks, row0)
        _, _, d = _deltas(job, chunks)
        mask = _della_masks(job, d, row0)
        k = d.shape[0]
        shape = (k, d.shape[1] if d.dim() >= 3 else 1, -1)
        l1, kept = row_l1(d.reshape(shape), None if mask is None else mask.reshape(shape))
        state["l1"].append(l1)
        state["kept"].append(kept)

    def merge(into, other):
        into["l1"].extend(other["l1"])
        into["kept"].extend(other["kept"])
        into["keep"].update(other["keep"])

    def finish(state, job, stats):
        l1 = torch.cat(state["l1"], dim=1) if state["l1"] else torch.zeros(0, 0, dtype=torch.float64)
        kept = torch.cat(state["kept"], dim=1) if state["kept"] else l1
        scale = []
        for j in range(l1.shape[0]):
            total, part = math.fsum(l1[j].tolist()), math.fsum(kept[j].tolist())
            scale.append(total / part if total >= RESCALE_EPS and part >= RESCALE_EPS else 1.0)
        return {"scale": scale, "keep": state["keep"]}

    return (Reduce("rescale_sums", init, update, finish, merge),)


# -- the family -----------------------------------------------------------------------------------------

def _make(name: str, sparsify: str | None, consensus: bool, normalize: bool, rescale: bool,
          description: str, paper: str) -> MethodSpec:
    params = [
        Param("weight", per_model=True, base_too=False, doc="scale of each model's task vector"),
        Param("density", 1.0, per_model=True, base_too=False, check=_density_check, doc="fraction of δ kept"),
        Param("normalize", normalize, kind="bool", doc="divide by the sum of the weights that take part"),
        Param("rescale", rescale, kind="bool", doc="rescale kept δ to the L1 norm of the whole δ"),
        Param("lambda", 1.0, doc="scale of the merged task vector"),
        Param("int8_mask", False, kind="bool", doc="accepted for mergekit compatibility (no numerical effect)"),
    ]
    if sparsify == "magnitude_outliers":
        params.append(Param("gamma", 0.01, per_model=True, base_too=False, check=in_range(0, 1),
                            doc="fraction of the largest |δ| dropped"))
    if sparsify == "della":
        params.append(Param("epsilon", 0.15, per_model=True, base_too=False, check=in_range(0, 1, lo_open=True),
                            doc="keep probabilities span density ± epsilon by rank within each row"))
    if sparsify in ("random", "della"):
        params.append(Param("rescale_mode", "l1", kind="str", check=_one_of("l1", "inverse_density"),
                            doc="l1: mergekit's L1-norm matching; inverse_density: the DARE paper's 1/p"))
    if sparsify in ("magnitude", "magnitude_outliers"):
        params.append(Param("scope", "tensor", kind="str", check=_one_of("tensor", "model"),
                            doc="tensor: top-k per tensor (mergekit); model: per expert over the whole model (TIES paper)"))
    if consensus:
        params.append(Param("consensus", "sum", kind="str", check=_one_of("sum", "count"),
                            doc="sign election: sign of Σ w·δ (sum) or of Σ sign(δ) (count)"))

    magnitude = sparsify in ("magnitude", "magnitude_outliers")

    def reduce_plan(job: TensorJob) -> tuple[Reduce, ...]:
        if magnitude and job.params.get("scope") == "model":
            return ()
        if magnitude:
            return _magnitude_reduces(job, sparsify, bool(job.params["rescale"]))
        if sparsify in ("random", "della") and job.params["rescale"] and job.params["rescale_mode"] == "l1":
            return _bernoulli_reduces(job, sparsify)
        return ()

    def map_fn(job: TensorJob, chunks: list[torch.Tensor], stats: Sequence[Any], row0: int) -> torch.Tensor:
        base, others = chunks[job.base], [i for i in range(len(chunks)) if i != job.base]
        if not others:
            return base
        d, mask, scale = None, None, None   # without a magnitude or DELLA mask, δ is formed where it is used
        if magnitude and stats:
            _, _, d = _deltas(job, chunks)
            mask = _magnitude_masks(job, d, stats[-1], row0, sparsify)
            scale = stats[-1]["scale"] if job.params["rescale"] else None
        elif sparsify in ("random", "della"):
            if sparsify == "random":
                # pop: the bits of each chunk are freed as soon as its map has them
                mask = _keep_draw(job, row0, stats[-1]["keep"].pop(row0, None) if stats else None)
            else:
                _, _, d = _deltas(job, chunks)
                mask = _della_masks(job, d, row0)
            if job.params["rescale"]:
                if job.params["rescale_mode"] == "l1":
                    scale = stats[-1]["scale"]
                else:
                    scale = [1.0 / float(_mp(job, i, "density")) for i in others]
        if scale is not None:
            scale = torch.tensor(scale, dtype=torch.float64).to(_work_dtype(base.dtype)).to(base.dtype)
        weights = [float(_mp(job, i, "weight")) for i in others]
        method = job.params.get("consensus", "sum") if consensus else None
        return merge_deltas(base, d, weights, mask, scale=scale, consensus=method,
                            normalize=bool(job.params["normalize"]), lam=float(job.params["lambda"]),
                            experts=[chunks[i] for i in others])

    def validate(job: TensorJob) -> str | None:
        if sparsify == "della":
            for i in range(len(job.model_params)):
                if i == job.base:
                    continue
                dd, eps = float(_mp(job, i, "density")), float(_mp(job, i, "epsilon"))
                if dd < 1 and not (0 < dd - eps and dd + eps < 1):
                    return (f"della needs 0 < density - epsilon and density + epsilon < 1; got density {dd}, "
                            f"epsilon {eps} for input {i}: lower epsilon below {min(dd, 1 - dd):g}")
        return None

    return MethodSpec(name=name, map=map_fn, params=tuple(params), base="required", min_models=1, block_elems=1 << 19,
                      reduce_plan=reduce_plan, description=description, paper=paper, validate=validate,
                      model_pass=_model_pass(sparsify) if magnitude else None)


def _one_of(*allowed: str):
    def check(v: Any) -> str | None:
        return None if v in allowed else f"must be one of {', '.join(allowed)}, got {v!r}"
    return check


TASK_ARITHMETIC = _make("task_arithmetic", None, False, False, False, "base plus the weighted sum of task vectors "
                        "(model - base)", "https://arxiv.org/abs/2212.04089")
TIES = _make("ties", "magnitude", True, True, False, "keep each task vector's top-density |δ|, elect signs, "
             "average the agreeing entries", "https://arxiv.org/abs/2306.01708")
DARE_TIES = _make("dare_ties", "random", True, False, True, "drop δ at random (keep p = density), rescale, "
                  "elect signs", "https://arxiv.org/abs/2311.03099")
DARE_LINEAR = _make("dare_linear", "random", False, False, True, "drop δ at random, rescale, add",
                    "https://arxiv.org/abs/2311.03099")
BREADCRUMBS = _make("breadcrumbs", "magnitude_outliers", False, False, False,
                    "drop the largest gamma and the smallest |δ|, keep density", "https://arxiv.org/abs/2312.06795")
BREADCRUMBS_TIES = _make("breadcrumbs_ties", "magnitude_outliers", True, False, False,
                         "breadcrumbs with sign election", "https://arxiv.org/abs/2312.06795")
DELLA = _make("della", "della", True, True, True, "keep δ with probability rising with its rank in the row "
              "(density ± epsilon), rescale, elect signs", "https://arxiv.org/abs/2406.11617")
DELLA_LINEAR = _make("della_linear", "della", False, False, True, "della without sign election",
                     "https://arxiv.org/abs/2406.11617")

SPECS = (TASK_ARITHMETIC, TIES, DARE_TIES, DARE_LINEAR, BREADCRUMBS, BREADCRUMBS_TIES, DELLA, DELLA_LINEAR)

