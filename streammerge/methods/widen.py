"""WIDEN (arXiv 2408.03092): weigh each model per column by how much it changed, in magnitude and
in direction, relative to the base. Not in mergekit; the rules are docs/methods.md's.

For a 2-D weight `[out, in]`, column j of model k has magnitude m_kj = ‖W_k[:, j]‖ and direction
W_k[:, j] / m_kj. A reduce pass accumulates, per column, Σ W_k² for every model and the base and
Σ W_k·W_0 for every model, in fp64 and strictly in row order (band-independent); `finish` turns
these `[K, in]` sums into the weights, and the map writes W_0 + Σ_k δ_k · w_k row band by row band.
The input embedding `[vocab, hidden]` is treated transposed, so its "columns" are tokens: the same
sums per row, which a row band holds whole. `lm_head` is not transposed. 1-D tensors arrive whole
and are merged in the map from |δ_k| directly.

Arithmetic runs in fp32 for bf16/fp16 inputs and fp64 for fp32/fp64 ones (so that one model with
score_calibration_value 1 gives that model back exactly), and the result is cast to the loaded dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ._stats import ColumnProducts, as_rows, nonbase, row_sums, work_dtype
from .registry import MethodSpec, Param, Reduce, TensorJob, in_range

if TYPE_CHECKING:
    import torch


def _by_rows(job: TensorJob) -> bool:
    """The input embedding is transposed: its per-token statistics are per row here."""
    return job.kind == "embedding"


def _inputs(job: TensorJob, chunks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    wd = work_dtype(job.compute_dtype)
    return chunks[job.base].to(wd), [x.to(wd) for x in nonbase(job, chunks)]


def _sums(w0: torch.Tensor, ws: list[torch.Tensor]) -> list[torch.Tensor]:
    """Elementwise terms of the statistics, fp64: W_0², then W_k² and W_k·W_0 for each model."""
    a0 = as_rows(w0).double()
    terms = [a0 * a0]
    for w in ws:
        a = as_rows(w).double()
        terms += [a * a, a * a0]
    return terms


# -- reduce: per-column (or, for the embedding, per-row) sums -------------------------------------

def _columns_init(job: TensorJob, stats: Sequence[Any]) -> ColumnProducts:
    """The terms of `_sums` as products of [base, model 1, ...]: W_0², then W_k² and W_k·W_0 per model."""
    k = len(job.model_params) - 1
    pairs = [(0, 0)] + [p for i in range(1, k + 1) for p in ((i, i), (i, 0))]
    return ColumnProducts(job.row_elems, pairs)


def _columns_update(state: ColumnProducts, job: TensorJob, chunks: list[torch.Tensor], row0: int) -> None:
    state.add([chunks[job.base], *nonbase(job, chunks)])


def _columns_finish(state: ColumnProducts, job: TensorJob, stats: Sequence[Any]) -> torch.Tensor:
    return _weights(state.acc.cpu(), job)


def _rows_init(job: TensorJob, stats: Sequence[Any]) -> list[tuple[int, torch.Tensor]]:
    return []


def _rows_update(state: list, job: TensorJob, chunks: list[torch.Tensor], row0: int) -> None:
    import torch
    state.append((row0, torch.stack([row_sums(t) for t in _sums(*_inputs(job, chunks))]).cpu()))


def _rows_finish(state: list, job: TensorJob, stats: Sequence[Any]) -> torch.Tensor:
    import torch
    sums = torch.cat([s for _, s in sorted(state, key=lambda p: p[0])], dim=1)
    return _weights(sums, job)


def _widen_reduces(job: TensorJob) -> tuple[Reduce, ...]:
    if len(job.shape) < 2:
        return ()
    if _by_rows(job):
        return (Reduce("row_stats", _rows_init, _rows_update, _rows_finish, merge=lambda into, other: into.extend(other)),)
    return (Reduce("column_stats", _columns_init, _columns_update, _columns_finish),)


# -- from statistics to weights ---------------------------------------------------------------------

def _ranks(diff: torch.Tensor) -> torch.Tensor:
    """rank / n within each model (row of `diff`): the smallest difference 0, ties in index order."""
    import torch
    n = diff.shape[1]
    order = torch.argsort(diff, dim=1, stable=True)
    ranks = torch.empty_like(diff)
    ranks.scatter_(1, order, (torch.arange(n, dtype=diff.dtype) / n).expand_as(diff).contiguous())
    return ranks


def _scores(significance: torch.Tensor, job: TensorJob) -> torch.Tensor:
    """Softmax across models, then s wherever a model's value exceeds t × its mean over the tensor."""
    import torch
    t = float(job.params["above_average_value_ratio"])
    s = float(job.params["score_calibration_value"])
    scores = torch.softmax(significance, dim=0)
    above = significance > significance.mean(dim=1, keepdim=True) * t
    return torch.where(above, torch.full_like(scores, s), scores)


def _weights(sums: torch.Tensor, job: TensorJob) -> torch.Tensor:
    """Per-model, per-column weights `[K, columns]` from the fp64 sums of `_sums`."""
    import torch
    m0 = sums[0].clamp(min=0).sqrt()
    mk = sums[1::2].clamp(min=0).sqrt()
    dot = sums[2::2]
    denom = mk * m0
    cos = torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0), 0.0).clamp(-1, 1)
    # A zero column has no direction: unchanged if both are zero, fully turned if one is.
    cos = torch.where((mk == 0) & (m0 == 0), 1.0, cos)
    magnitude = _scores(_ranks((mk - m0).abs()), job)
    direction = _scores(_ranks(1 - cos), job)
    return (0.5 * (magnitude + direction)).to(work_dtype(job.compute_dtype))


# -- map ----------------------------------------------------------------------------------------------

def _widen_map(job: TensorJob, chunks: list[torch.Tensor], stats: Sequence[Any], row0: int) -> torch.Tensor:
    import torch
    w0, ws = _inputs(job, chunks)
    base = as_rows(w0)
    deltas = [as_rows(w) - base for w in ws]
    if len(job.shape) < 2:
        weights = _scores(torch.cat([d.abs() for d in deltas]).double(), job).to(base.dtype)   # [K, m]
        weights = weights.unsqueeze(1)
    elif _by_rows(job):
        weights = stats[0][:, row0:row0 + base.shape[0]].to(base.device).unsqueeze(-1)   # [K, n, 1]
    else:
        weights = stats[0].to(base.device).unsqueeze(1)                                   # [K, 1, in]
    acc = torch.zeros_like(base)
    for d, w in zip(deltas, weights):
        acc += d * w
    return (base + acc).reshape(w0.shape).to(job.compute_dtype)


WIDEN = MethodSpec(
    name="widen",
    map=_widen_map,
    reduce_plan=_widen_reduces,
    params=(
        Param("above_average_value_ratio", 1.0, check=in_range(0, None),
              doc="t: a model's score is calibrated where its rank exceeds t × its mean rank"),
        Param("score_calibration_value", 1.0, check=in_range(None, None),
              doc="s: the calibrated score"),
    ),
    base="required",
    min_models=1,
    description="WIDEN: weighs each model per column by how much it changed in magnitude and direction from the "
                "base; merges fine-tuned and continued-pre-trained models",
    paper="https://arxiv.org/abs/2408.03092",
)
