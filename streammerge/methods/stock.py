"""model_stock, nearswap, ram and ramplus_tl, with mergekit 0.1.5's order of operations.

All four compute in the loaded dtype, as mergekit does (bf16 stays bf16), except where mergekit
itself promotes: ramplus_tl multiplies by fp32 factors and so returns fp32.

model_stock's per-tensor cosines come from one reduce pass of exact sums (norms from exact squares,
dot products from the products rounded to the loaded dtype, as mergekit forms them); only the order
in which mergekit's fp32 accumulator adds them can move a cosine's last bit. With `filter_wise`, and
for 1-D tensors, everything is per row and runs in the map, bit for bit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from ._stats import Gram, as_rows, gram_reduce, model_mean, model_sum, nonbase, promote_fp32, rowwise, scalar
from .registry import FUSED_BLOCK_ELEMS, REQUIRED, MethodSpec, Param, Reduce, TensorJob, in_range

if TYPE_CHECKING:
    import torch


# -- model_stock ------------------------------------------------------------------------------------

def _stock_t(cos: torch.Tensor, count: int) -> torch.Tensor:
    """t = N cos / (1 + (N - 1) cos), and 0 where the denominator vanishes (mergekit keeps the base)."""
    import torch
    den = 1 + (count - 1) * cos
    singular = den.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(den), den)
    return torch.where(singular, torch.zeros_like(cos), (count * cos) / safe)


def _pair_cos(dot: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor) -> torch.Tensor:
    return (dot / (norm_a * norm_b).clamp(min=1e-6)).clamp(-1, 1)


def _stock_rows_t(w0: torch.Tensor, ws: list[torch.Tensor], whole: bool) -> torch.Tensor:
    """Per-row t (shape [rows, 1]; [1] for a whole 1-D tensor), computed from the rows themselves."""
    import torch
    offsets = [w - w0 for w in ws]
    norms = [torch.norm(o, dim=-1) for o in offsets]
    cos = [_pair_cos((offsets[i] * offsets[j]).sum(dim=-1), norms[i], norms[j])
           for i in range(len(offsets)) for j in range(i + 1, len(offsets))]
    stacked = torch.stack(cos)
    # A whole tensor is exactly mergekit's call; a band of rows must not depend on the band's width.
    mean = stacked.mean(dim=0) if whole else model_mean(stacked)
    return _stock_t(mean.unsqueeze(-1), len(ws))


def _stock_mode(job: TensorJob) -> str:
    if job.params["filter_wise"]:
        return "rows"
    return "whole" if len(job.shape) < 2 else "flat"


def _stock_vectors(job: TensorJob, chunks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The task vectors, as (base, models): the Gram reduce forms the differences in cache."""
    return chunks[job.base], nonbase(job, chunks)


def _stock_finish(g: Gram, job: TensorJob, stats: Sequence[Any]) -> torch.Tensor:
    import torch
    dt = job.compute_dtype
    k = len(job.model_params) - 1
    norms = [scalar(math.sqrt(g[i, i]), dt) for i in range(k)]
    cos = [_pair_cos(scalar(g[i, j], dt), norms[i], norms[j]) for i in range(k) for j in range(i + 1, k)]
    return _stock_t(torch.stack(cos).mean(dim=0).unsqueeze(-1), k)


def _stock_reduces(job: TensorJob) -> tuple[Reduce, ...]:
    if _stock_mode(job) != "flat":
        return ()
    k = len(job.model_params) - 1
    squares = [(i, i) for i in range(k)]
    dots = [(i, j) for i in range(k) for j in range(i + 1, k)]
    return (gram_reduce("gram", _stock_vectors, lambda j: squares + dots, _stock_finish, rounded=lambda j: dots),)


def _stock_map(job: TensorJob, chunks: list[torch.Tensor], stats: Sequence[Any], row0: int) -> torch.Tensor:
    w0, ws = chunks[job.base], nonbase(job, chunks)
    shape = w0.shape
    mode = _stock_mode(job)
    if mode == "flat":
        t = stats[0].to(w0.device)
    elif mode == "whole":
        t = _stock_rows_t(w0, ws, whole=True)
    else:
        whole = w0.dim() < 2   # mergekit makes a 1-D tensor one row
        w0, ws = as_rows(w0), [as_rows(w) for w in ws]
        if whole:
            t = _stock_rows_t(w0, ws, whole=True)
        else:
            t = rowwise(lambda *xs: _stock_rows_t(xs[0], list(xs[1:]), whole=False), w0, *ws)
    from ..kernels.blend import stock_mix

    return stock_mix(w0, ws, t).reshape(shape)


MODEL_STOCK = MethodSpec(
    name="model_stock",
    map=_stock_map,
    reduce_plan=_stock_reduces,
    params=(Param("filter_wise", False, kind="bool", doc="one interpolation ratio per row instead of per tensor"),),
    base="required",
    min_models=2,
    block_elems=FUSED_BLOCK_ELEMS,
    description="moves the base toward the average of the models by a ratio set by the angle between their "
                "task vectors (Model Stock)",
    paper="https://arxiv.org/abs/2403.19522",
)


# -- nearswap ---------------------------------------------------------------------------------------

def _nearswap_map(job: TensorJob, chunks: list[torch.Tensor], stats: Sequence[Any], row0: int) -> torch.Tensor:
    from ..kernels.blend import nearswap_mix

    a = chunks[job.base]
    (b,) = nonbase(job, chunks)
    return nearswap_mix(a, b, float(job.params["t"]))


NEARSWAP = MethodSpec(
    name="nearswap",
    block_elems=FUSED_BLOCK_ELEMS,
    map=_nearswap_map,
    params=(Param("t", REQUIRED, check=in_range(None, None),
                  doc="similarity threshold: where |base - model| <= t the model's value is taken, farther "
                      "away it is blended in by t / |base - model|"),),
    base="required",
    min_models=1,
    max_models=1,
    description="takes the other model's parameters where they are close to the base's, and interpolates "
                "toward the base where they differ",
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
)


# -- ram / ramplus_tl -------------------------------------------------------------------------------
# Per element, the models whose |task vector| exceeds epsilon contribute: alone, their value is kept;
# together, their values are averaged. ramplus_tl scales each model's unique contributions by
# 1 + r·clamp(ρ, 0, α), with ρ the model's ratio of overlapping to unique contributions in the tensor.

def _ram_parts(job: TensorJob, chunks: Sequence[torch.Tensor]):
    import torch
    base = chunks[job.base]
    tv = torch.stack([x - base for x in nonbase(job, chunks)])
    nonzero = tv.abs() > float(job.params["epsilon"])
    counts = nonzero.sum(dim=0)
    return base, tv, nonzero, counts


def _ram_map(job: TensorJob, chunks: list[torch.Tensor], stats: Sequence[Any], row0: int) -> torch.Tensor:
    from ..kernels.blend import ram_fused

    if len(chunks) == 1:
        return chunks[0]
    fused = ram_fused(chunks[job.base], nonbase(job, chunks), float(job.params["epsilon"]))
    if fused is not None:
        return fused
    base, tv, nonzero, counts = _ram_parts(job, chunks)
    tz = tv * nonzero
    merged = model_sum(tz * (counts == 1) + tz * (counts > 1) / counts.clamp(min=1))
    return base + merged


def _ramplus_init(job: TensorJob, stats: Sequence[Any]) -> list[list[int]]:
    k = len(job.model_params) - 1
    return [[0] * k, [0] * k]     # per model: overlapping, unique contributions


def _ramplus_update(state: list[list[int]], job: TensorJob, chunks: list[torch.Tensor], row0: int) -> None:
    from ..kernels.blend import ram_counts_fused

    fused = ram_counts_fused(chunks[job.base], nonbase(job, chunks), float(job.params["epsilon"]))
    if fused is not None:
        shared, unique = fused
    else:
        _, _, nonzero, counts = _ram_parts(job, chunks)
        k = nonzero.shape[0]
        shared = (nonzero & (counts > 1)).reshape(k, -1).sum(dim=1).tolist()
        unique = (nonzero & (counts == 1)).reshape(k, -1).sum(dim=1).tolist()
    for i in range(len(shared)):
        state[0][i] += shared[i]
        state[1][i] += unique[i]


def _ramplus_merge(into: list[list[int]], other: list[list[int]]) -> None:
    for a, b in zip(into, other):
        for i, v in enumerate(b):
            a[i] += v


def _ramplus_finish(state: list[list[int]], job: TensorJob, stats: Sequence[Any]) -> torch.Tensor:
    """λ_k in fp32, as mergekit's integer counts and their clamp with a float produce it."""
    import torch
    shared, unique = torch.tensor(state[0], dtype=torch.int64), torch.tensor(state[1], dtype=torch.int64)
    rho = shared / unique.clamp(min=float(job.params["epsilon"]))
    return 1 + float(job.params["r"]) * rho.clamp(min=0, max=float(job.params["alpha"]))


def _ramplus_reduces(job: TensorJob) -> tuple[Reduce, ...]:
    if len(job.model_params) == 1:
        return ()
    return (Reduce("overlap_counts", _ramplus_init, _ramplus_update, _ramplus_finish, merge=_ramplus_merge),)


def _ramplus_map(job: TensorJob, chunks: list[torch.Tensor], stats: Sequence[Any], row0: int) -> torch.Tensor:
    from ..kernels.blend import ram_fused

    if len(chunks) == 1:
        return chunks[0]
    fused = ram_fused(chunks[job.base], nonbase(job, chunks), float(job.params["epsilon"]), stats[0])
    if fused is not None:
        return fused
    base, tv, nonzero, counts = _ram_parts(job, chunks)
    lam = stats[0].to(base.device).view(-1, *([1] * base.dim()))
    tz = tv * nonzero
    merged = model_sum(tz * (counts == 1) * lam + tz * (counts > 1) / counts.clamp(min=1))
    return base + merged


_EPSILON = Param("epsilon", 1e-5, check=in_range(0, None),
                 doc="a task-vector entry counts as a contribution when its magnitude exceeds this")

RAM = MethodSpec(
    name="ram",
    map=_ram_map,
    params=(_EPSILON,),
    base="required",
    min_models=0,
    description="Reinforced Agent Merging: keeps each model's unique task-vector entries and averages the "
                "entries several models change",
    paper="https://arxiv.org/abs/2601.13572",
)

RAMPLUS_TL = MethodSpec(
    name="ramplus_tl",
    map=_ramplus_map,
    reduce_plan=_ramplus_reduces,
    params=(
        Param("r", 0.1, check=in_range(0, None), doc="strength of the boost of unique contributions"),
        Param("alpha", 0.2, check=in_range(0, None), doc="cap on each model's overlap ratio"),
        Param("epsilon", 1e-5, check=in_range(0, None, lo_open=True),
              doc="a task-vector entry counts when its magnitude exceeds this; also guards the ratio's division"),
    ),
    base="required",
    min_models=0,
    result_dtype=promote_fp32,
    description="RAM+ (tensor-local): RAM with each model's unique entries boosted by how much it overlaps "
                "the others in that tensor; returns fp32, as mergekit does",
    paper="https://arxiv.org/abs/2601.13572",
)
