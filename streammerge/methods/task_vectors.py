"""The task-vector family: task_arithmetic's relatives that sparsify each δ = θ_k − θ_0 and may vote on signs.

One configurable unit, as in mergekit: a sparsifier (magnitude top-k, Bernoulli, magnitude with
outliers dropped, DELLA's rank-based Bernoulli), an optional sign consensus, and mergekit 0.1.5's mixing
(`streammerge.kernels.vote.mix`). Everything runs in the loaded dtype, as mergekit does.

Passes per tensor:
- magnitude sparsifiers (magnitude.py): one histogram pass per level of the dtype's bit patterns (1 for
  bf16/fp16, 2 for fp32), then a counting pass for the tie rule and L1 sums, then the map;
- Bernoulli sparsifiers with L1 rescale: one pass for ‖δ‖₁ and ‖masked δ‖₁, then the map. Masks come
  from the counter-based Philox stream of (seed, model, tensor), so both passes draw the same mask.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Sequence

from .magnitude import RESCALE_EPS, deltas, magnitude_masks, magnitude_reduces, model_param, model_pass, needs_mask
from .registry import FUSED_BLOCK_ELEMS, MethodSpec, Param, Reduce, TensorJob, in_range

if TYPE_CHECKING:
    import torch

    from ..kernels.philox import KeepDraw


def _density_check(v: Any) -> str | None:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return f"must be a number, got {v!r}"
    if not 0 < v <= 1:
        return f"must be in (0, 1], got {v} (density is the fraction of each task vector kept)"
    return None


def _flat_start(job: TensorJob, row0: int) -> int:
    return row0 * job.row_elems if len(job.shape) >= 2 else 0


# -- Bernoulli masks (DARE, DELLA) --------------------------------------------------------------------

def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """mergekit draws and rescales in bf16 for bf16 inputs, in fp32 for fp16/fp32 on CPU."""
    import torch
    return dtype if dtype in (torch.bfloat16, torch.float64) else torch.float32


def _dare_p(job: TensorJob, i: int) -> float:
    """DARE's keep probability: the density rounded to the work dtype, as mergekit draws against it."""
    return _rounded(float(model_param(job, i, "density")), _work_dtype(job.compute_dtype))


@functools.lru_cache(maxsize=64)
def _rounded(value: float, dtype: torch.dtype) -> float:
    import torch
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
    if not any(needs_mask(job, i) for i in others):
        return None
    from ..kernels.philox import KeepDraw, stream_id

    return KeepDraw(job.seed, tuple(stream_id(job.model_ids[i], job.name) for i in others),
                    tuple(_dare_p(job, i) if needs_mask(job, i) else None for i in others), _flat_start(job, row0),
                    packed)


def _della_masks(job: TensorJob, d: torch.Tensor, row0: int) -> torch.Tensor | None:
    import torch
    others = [i for i in range(len(job.model_params)) if i != job.base]
    if not any(needs_mask(job, i) for i in others):
        return None
    from ..kernels.della import della_keep
    from ..kernels.philox import stream_id
    from ..kernels.scratch import scratch

    mask = scratch("masks", tuple(d.shape), torch.bool, d.device)
    start = _flat_start(job, row0)
    for j, i in enumerate(others):
        if needs_mask(job, i):
            della_keep(_rows(job, d[j]), float(model_param(job, i, "density")), float(model_param(job, i, "epsilon")),
                       job.seed, stream_id(job.model_ids[i], job.name), start, out=mask[j])
        else:
            mask[j].fill_(True)
    return mask


def _dare_update(state: dict, job: TensorJob, chunks: list[torch.Tensor], row0: int) -> None:
    """The DARE rescale sums straight from the inputs, expert by expert (same sums as the δ/mask path).
    For a tensor of one band, whose map runs next on the same in-memory band, it keeps the keep bits it
    drew (packed, by the chunk's first row: K bits an element, a sixteenth of the band's bf16 inputs)
    for the map to read instead of drawing again; a tensor of several bands draws again rather than
    hold a whole tensor's bits between its passes."""
    import torch
    import numpy as np

    from ..kernels.norms import dare_row_l1
    from ..kernels.philox import stream_id

    base = chunks[job.base]
    rows = base.shape[0] if base.dim() >= 2 and len(job.shape) >= 2 else 1
    base = base.reshape(rows, -1)
    start = _flat_start(job, row0)
    others = [i for i in range(len(chunks)) if i != job.base]
    keep = job.read_once  # the map pass runs on this band in memory: its keep bits are reused there
    bits = [np.empty(-(-base.numel() // 8), np.uint8) if keep and needs_mask(job, i) else None for i in others]
    parts = [dare_row_l1(chunks[i].reshape(rows, -1), base, job.seed, stream_id(job.model_ids[i], job.name), start,
                         _dare_p(job, i) if needs_mask(job, i) else None, packed)
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
        from ..kernels.norms import row_l1

        _, _, d = deltas(job, chunks)
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
        import torch
        l1 = torch.cat(state["l1"], dim=1) if state["l1"] else torch.zeros(0, 0, dtype=torch.float64)
        kept = torch.cat(state["kept"], dim=1) if state["kept"] else l1
        scale = []
        for j in range(l1.shape[0]):
            total, part = math.fsum(l1[j].tolist()), math.fsum(kept[j].tolist())
            scale.append(total / part if total >= RESCALE_EPS and part >= RESCALE_EPS else 1.0)
        return {"scale": scale, "keep": state["keep"]}

    return (Reduce("rescale_sums", init, update, finish, merge),)


# -- the family -----------------------------------------------------------------------------------------

def _make(name: str, *, sparsify: str | None, consensus: bool, normalize: bool, rescale: bool,
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
            return magnitude_reduces(job, sparsify, bool(job.params["rescale"]))
        if sparsify in ("random", "della") and job.params["rescale"] and job.params["rescale_mode"] == "l1":
            return _bernoulli_reduces(job, sparsify)
        return ()

    def map_fn(job: TensorJob, chunks: list[torch.Tensor], stats: Sequence[Any], row0: int) -> torch.Tensor:
        import torch
        base, others = chunks[job.base], [i for i in range(len(chunks)) if i != job.base]
        if not others:
            return base
        d, mask, scale = None, None, None   # without a magnitude or DELLA mask, δ is formed where it is used
        if magnitude and stats:
            _, _, d = deltas(job, chunks)
            mask = magnitude_masks(job, d, stats[-1], row0, sparsify)
            scale = stats[-1]["scale"] if job.params["rescale"] else None
        elif sparsify in ("random", "della"):
            if sparsify == "random":
                # pop: the bits of each chunk are freed as soon as its map has them
                mask = _keep_draw(job, row0, stats[-1]["keep"].pop(row0, None) if stats else None)
            else:
                _, _, d = deltas(job, chunks)
                mask = _della_masks(job, d, row0)
            if job.params["rescale"]:
                if job.params["rescale_mode"] == "l1":
                    scale = stats[-1]["scale"]
                else:
                    scale = [1.0 / float(model_param(job, i, "density")) for i in others]
        if scale is not None:
            scale = torch.tensor(scale, dtype=torch.float64).to(_work_dtype(base.dtype)).to(base.dtype)
        from ..kernels.vote import merge_deltas

        weights = [float(model_param(job, i, "weight")) for i in others]
        method = job.params.get("consensus", "sum") if consensus else None
        return merge_deltas(base, d, weights, mask, scale=scale, consensus=method,
                            normalize=bool(job.params["normalize"]), lam=float(job.params["lambda"]),
                            experts=[chunks[i] for i in others])

    def validate(job: TensorJob) -> str | None:
        if sparsify == "della":
            for i in range(len(job.model_params)):
                if i == job.base:
                    continue
                dd, eps = float(model_param(job, i, "density")), float(model_param(job, i, "epsilon"))
                if dd < 1 and not (0 < dd - eps and dd + eps < 1):
                    return (f"della needs 0 < density - epsilon and density + epsilon < 1; got density {dd}, "
                            f"epsilon {eps} for input {i}: lower epsilon below {min(dd, 1 - dd):g}")
        return None

    return MethodSpec(name=name, map=map_fn, params=tuple(params), base="required", min_models=1, block_elems=FUSED_BLOCK_ELEMS,
                      reduce_plan=reduce_plan, description=description, paper=paper, validate=validate,
                      model_pass=model_pass(sparsify) if magnitude else None)


def _one_of(*allowed: str):
    def check(v: Any) -> str | None:
        return None if v in allowed else f"must be one of {', '.join(allowed)}, got {v!r}"
    return check


TASK_ARITHMETIC = _make("task_arithmetic", sparsify=None, consensus=False, normalize=False, rescale=False,
                        description="base plus the weighted sum of task vectors (model - base)",
                        paper="https://arxiv.org/abs/2212.04089")
TIES = _make("ties", sparsify="magnitude", consensus=True, normalize=True, rescale=False,
             description="keep each task vector's top-density |δ|, elect signs, average the agreeing entries",
             paper="https://arxiv.org/abs/2306.01708")
DARE_TIES = _make("dare_ties", sparsify="random", consensus=True, normalize=False, rescale=True,
                  description="drop δ at random (keep p = density), rescale, elect signs",
                  paper="https://arxiv.org/abs/2311.03099")
DARE_LINEAR = _make("dare_linear", sparsify="random", consensus=False, normalize=False, rescale=True,
                    description="drop δ at random, rescale, add", paper="https://arxiv.org/abs/2311.03099")
BREADCRUMBS = _make("breadcrumbs", sparsify="magnitude_outliers", consensus=False, normalize=False, rescale=False,
                    description="drop the largest gamma and the smallest |δ|, keep density",
                    paper="https://arxiv.org/abs/2312.06795")
BREADCRUMBS_TIES = _make("breadcrumbs_ties", sparsify="magnitude_outliers", consensus=True, normalize=False,
                         rescale=False, description="breadcrumbs with sign election",
                         paper="https://arxiv.org/abs/2312.06795")
DELLA = _make("della", sparsify="della", consensus=True, normalize=True, rescale=True,
              description="keep δ with probability rising with its rank in the row (density ± epsilon), rescale, "
                          "elect signs", paper="https://arxiv.org/abs/2406.11617")
DELLA_LINEAR = _make("della_linear", sparsify="della", consensus=False, normalize=False, rescale=True,
                     description="della without sign election", paper="https://arxiv.org/abs/2406.11617")

