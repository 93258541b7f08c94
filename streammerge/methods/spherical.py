"""nuslerp and multislerp: interpolation on the sphere, as mergekit 0.1.5 computes them.

mergekit runs nuslerp and multislerp entirely in the loaded dtype (bf16 stays bf16). We do the same
for every elementwise step, in mergekit's order, so a map pass gives mergekit's bits whenever the
few whole-tensor scalars agree. Those scalars (norms, cosines) come from one reduce pass of exact
pairwise sums (see `_stats`), rounded to the loaded dtype where mergekit's are in it. mergekit takes
its cosines from unit vectors already rounded to bf16; ours come from the exact sums, so a cosine
can differ in its last bit, which moves the output by about one ulp. Per-column cosines
(nuslerp_row_wise) are short sums where that rounding matters often, so they take a second pass over
the rounded units. 1-D tensors (norms, biases) arrive whole, so for them we run mergekit's
computation itself and match it bit for bit.
(karcher, the third method on the sphere, is in karcher.py.)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import StreammergeError
from ._stats import (
    ColumnSums, Gram, all_pairs, as_rows, gram_reduce, model_sum, nonbase, nonbase_params, rounded, rowwise,
    scalar,
)
from .registry import FUSED_BLOCK_ELEMS, REQUIRED, MethodSpec, Param, Reduce, TensorJob, in_range

if TYPE_CHECKING:
    import torch


_COLINEAR_EPS = 1e-8   # nuslerp: colinear when 1 - cos² <= eps²
_UNIT_EPS = 1e-7       # nuslerp: norms are clamped to at least this


def _inputs(job: TensorJob, chunks: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(base or None, the non-base inputs): what a Gram reduce of the task vectors takes."""
    return (chunks[job.base] if job.base is not None else None), nonbase(job, chunks)


def _vectors(job: TensorJob, chunks: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(base or None, the non-base inputs minus the base), in the loaded dtype as mergekit forms them."""
    base, xs = _inputs(job, chunks)
    return base, xs if base is None else [x - base for x in xs]


# -- nuslerp ----------------------------------------------------------------------------------------

def _nuslerp_t(job: TensorJob) -> float:
    w0, w1 = (float(w) for w in nonbase_params(job, "weight"))
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def _nuslerp_mode(job: TensorJob) -> str:
    """"whole": 1-D, computed in the map; "flat": one cosine per tensor; "row": per vector along the
    last dim, in the map; "column": per vector along dim 0 (mergekit's nuslerp_row_wise)."""
    if len(job.shape) < 2:
        return "whole"
    if job.params["nuslerp_flatten"]:
        return "flat"
    return "column" if job.params["nuslerp_row_wise"] else "row"


def _colinear(cos: torch.Tensor) -> torch.Tensor:
    return (1 - cos.square()) <= _COLINEAR_EPS ** 2


def _slerp_mix(t: float, v0: torch.Tensor, v1: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """mergekit's nuslerp from the cosine on, elementwise in the vectors' dtype.

    With one cosine for the whole tensor only the branch it selects is computed: the same bits as
    mergekit's `where` over both, at half the passes over the tensor.
    """
    import torch
    colinear = _colinear(cos)
    if cos.numel() == 1:
        if bool(colinear):
            return (1 - t) * v0 + t * v1
        theta = torch.acos(cos)
        return (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    return torch.where(colinear, (1 - t) * v0 + t * v1, out)


def _unit(v: torch.Tensor) -> torch.Tensor:
    import torch
    return v / torch.norm(v, dim=-1, keepdim=True).clamp(min=_UNIT_EPS)


def _cos_along_last(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    import torch
    return torch.sum(_unit(v0) * _unit(v1), dim=-1, keepdim=True).clamp(-1, 1)


def _nuslerp_finish(g: Gram, job: TensorJob, stats: Sequence[Any]) -> torch.Tensor:
    dt = job.compute_dtype
    n0 = scalar(math.sqrt(g[0, 0]), dt).clamp(min=_UNIT_EPS)
    n1 = scalar(math.sqrt(g[1, 1]), dt).clamp(min=_UNIT_EPS)
    return scalar(g[0, 1] / (float(n0) * float(n1)), dt).reshape(1).clamp(-1, 1)


# Per-column cosines (nuslerp_row_wise) are sums over only `rows` elements, so the unit rounding
# mergekit applies before its dot product often decides the cosine's last bit: two passes, norms
# first, then the dot product of the rounded units exactly as mergekit forms them.

def _column_norms_init(job: TensorJob, stats: Sequence[Any]) -> dict[str, ColumnSums]:
    return {k: ColumnSums(job.row_elems) for k in ("aa", "bb")}


def _column_norms_update(state: dict[str, ColumnSums], job: TensorJob, chunks: list[torch.Tensor], row0: int) -> None:
    _, (v0, v1) = _vectors(job, chunks)
    a, b = as_rows(v0).double(), as_rows(v1).double()
    state["aa"].add(a * a)
    state["bb"].add(b * b)


def _column_norms_finish(state: dict[str, ColumnSums], job: TensorJob,
                         stats: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    dt = job.compute_dtype
    return tuple(rounded(state[k].acc.sqrt(), dt).clamp(min=_UNIT_EPS).reshape(1, -1) for k in ("aa", "bb"))


def _column_dots_init(job: TensorJob, stats: Sequence[Any]) -> tuple[ColumnSums, tuple[torch.Tensor, torch.Tensor]]:
    return ColumnSums(job.row_elems), stats[0]


def _column_dots_update(state: tuple, job: TensorJob, chunks: list[torch.Tensor], row0: int) -> None:
    acc, (n0, n1) = state
    _, (v0, v1) = _vectors(job, chunks)
    a, b = as_rows(v0), as_rows(v1)
    acc.add(((a / n0.to(a.device)) * (b / n1.to(b.device))).double())


def _column_dots_finish(state: tuple, job: TensorJob, stats: Sequence[Any]) -> torch.Tensor:
    return rounded(state[0].acc, job.compute_dtype).clamp(-1, 1).reshape(1, -1).cpu()


def _nuslerp_reduces(job: TensorJob) -> tuple[Reduce, ...]:
    mode = _nuslerp_mode(job)
    if mode == "flat":
        return (gram_reduce("gram", _inputs, lambda j: all_pairs(2), _nuslerp_finish),)
    if mode == "column":
        return (Reduce("column_norms", _column_norms_init, _column_norms_update, _column_norms_finish),
                Reduce("column_dots", _column_dots_init, _column_dots_update, _column_dots_finish))
    return ()


def _nuslerp_map(job: TensorJob, chunks: list[torch.Tensor], stats: Sequence[Any], row0: int) -> torch.Tensor:
    import torch
    t = _nuslerp_t(job)
    mode = _nuslerp_mode(job)
    if mode == "flat" and not bool(_colinear(stats[-1])):
        theta = torch.acos(stats[-1])
        from ..kernels.blend import slerp_fused

        base = chunks[job.base] if job.base is not None else None
        fused = slerp_fused(*nonbase(job, chunks), base, torch.sin((1 - t) * theta), torch.sin(t * theta),
                             torch.sin(theta))
        if fused is not None:
            return fused
    base, (v0, v1) = _vectors(job, chunks)
    if mode in ("whole", "row"):
        out = rowwise(lambda a, b: _slerp_mix(t, a, b, _cos_along_last(a, b)), v0, v1)
    else:
        cos = stats[-1].to(v0.device)
        shape = v0.shape
        out = _slerp_mix(t, as_rows(v0), as_rows(v1), cos).reshape(shape)
    return out if base is None else base + out


NUSLERP = MethodSpec(
    name="nuslerp",
    block_elems=FUSED_BLOCK_ELEMS,
    map=_nuslerp_map,
    reduce_plan=_nuslerp_reduces,
    params=(
        Param("weight", REQUIRED, per_model=True, base_too=False, check=in_range(None, None),
              doc="relative weight of each of the two models; t = w1 / (w0 + w1)"),
        Param("nuslerp_flatten", True, kind="bool", doc="one angle for the whole tensor"),
        Param("nuslerp_row_wise", False, kind="bool",
              doc="without flatten: one angle per vector along dim 0 (else along the last dim)"),
    ),
    base="optional",
    min_models=2,
    max_models=2,
    description="spherical interpolation of two models (or of their task vectors from a base), weights as "
                "relative factors; per tensor, row or column",
    paper="https://en.wikipedia.org/wiki/Slerp",
)


# -- multislerp -------------------------------------------------------------------------------------

_ZERO_MEAN = ("{name}: multislerp: the weighted sum of the unit vectors is zero (antipodal inputs whose weights "
              "balance out); change the weights")


def _multislerp_weights(job: TensorJob) -> torch.Tensor:
    import torch
    w = torch.tensor([float(x) for x in nonbase_params(job, "weight")], dtype=job.compute_dtype)
    return w / w.sum() if job.params["normalize_weights"] else w


def _multislerp_scalars(norms: torch.Tensor, mean_norm: torch.Tensor, dots: torch.Tensor, w: torch.Tensor,
                        eps: float) -> dict[str, torch.Tensor]:
    """The per-tensor scalars of mergekit's multislerp, all in the loaded dtype.

    The tangent vector Σ w_i (u_i - (u_i·m) m) is zero in exact arithmetic (m is the normalized
    Σ w_i u_i); mergekit's is rounding noise whose norm (~1e-3 in bf16) gives cos = sin(s)/s = 1 in
    the loaded dtype, exactly what a zero norm gives. So the norm is taken as 0 (+ eps); the noise
    itself is still formed elementwise in the map, as mergekit adds it.
    """
    import torch
    s = torch.zeros((), dtype=w.dtype) + eps
    sinc = torch.sin(s) / s if s > 0 else torch.ones((), dtype=w.dtype)   # eps = 0: the limit, not 0/0
    return {"denom": norms + eps, "w": w, "mean_norm": mean_norm, "dots": dots,
            "cos_s": torch.cos(s), "sinc_s": sinc, "avg_norm": (norms.squeeze(-1) * w).sum()}


def _multislerp_from_data(xs: list[torch.Tensor], w: torch.Tensor, eps: float) -> dict[str, torch.Tensor] | None:
    """mergekit's own computation of the scalars, on a whole tensor (used for 1-D tensors)."""
    import torch
    flat = torch.stack(xs).reshape(len(xs), -1)
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = model_sum(units * w.view(-1, 1))
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        return None
    dots = (units * (mean / mean_norm)).sum(-1, keepdim=True)
    tangent = model_sum((units - dots * (mean / mean_norm)) * w.view(-1, 1))
    tn = torch.norm(tangent) + eps
    sc = _multislerp_scalars(norms, mean_norm, dots, w, eps)
    sc.update(cos_s=torch.cos(tn), sinc_s=torch.sin(tn) / tn)
    return sc


def _multislerp_finish(g: Gram, job: TensorJob, stats: Sequence[Any]) -> dict[str, torch.Tensor] | None:
    """The scalars from the Gram matrix G of the task vectors: with c_i = w_i / (‖x_i‖ + eps), the mean
    is Σ c_i x_i, its squared norm cᵀGc, and its dot product with unit i (Gc)_i / (‖x_i‖ + eps)."""
    import torch
    dt, eps = job.compute_dtype, float(job.params["eps"])
    w = _multislerp_weights(job)
    k = len(w)
    norms = torch.stack([scalar(math.sqrt(g[i, i]), dt) for i in range(k)]).reshape(k, 1)
    d = [float(x) for x in (norms + eps).reshape(-1)]
    c = [float(w[i]) / d[i] for i in range(k)]
    mean_sq = math.fsum(c[i] * c[j] * g[i, j] for i in range(k) for j in range(k))
    mean_norm = scalar(math.sqrt(max(mean_sq, 0.0)), dt)
    if mean_norm < eps:
        if k == 2:
            return None   # the map falls back to the weighted sum, as mergekit does
        raise StreammergeError(_ZERO_MEAN.format(name=job.name))
    mn = float(mean_norm)
    dots = torch.stack([scalar(math.fsum(c[j] * g[i, j] for j in range(k)) / d[i] / mn, dt) for i in range(k)])
    return _multislerp_scalars(norms, mean_norm, dots.reshape(k, 1), w, eps)


def _units(xs: list[torch.Tensor], denom: torch.Tensor) -> torch.Tensor:
    import torch
    return torch.stack([x / denom[i].to(x.device) for i, x in enumerate(xs)])


def _multislerp_reduces(job: TensorJob) -> tuple[Reduce, ...]:
    k = len(job.model_params) - (job.base is not None)
    if k == 1 or len(job.shape) < 2:
        return ()
    return (gram_reduce("gram", _inputs, lambda j: all_pairs(k), _multislerp_finish),)


def _multislerp_map(job: TensorJob, chunks: list[torch.Tensor], stats: Sequence[Any], row0: int) -> torch.Tensor:
    xs = nonbase(job, chunks)
    if len(xs) == 1:
        return xs[0]
    if len(job.shape) >= 2 and stats[-1] is not None:
        from ..kernels.blend import multislerp_fused

        fused = multislerp_fused(xs, chunks[job.base] if job.base is not None else None, stats[-1])
        if fused is not None:
            return fused
    base, xs = _vectors(job, chunks)
    w = _multislerp_weights(job).to(xs[0].device)
    eps = float(job.params["eps"])
    sc = _multislerp_from_data(xs, w, eps) if len(job.shape) < 2 else stats[-1]
    if sc is None:
        if len(xs) != 2:
            raise StreammergeError(_ZERO_MEAN.format(name=job.name))
        out = xs[0] * w[0] + xs[1] * w[1]
    else:
        sc = {k: v.to(xs[0].device) for k, v in sc.items()}
        units = _units(xs, sc["denom"])
        wv = sc["w"].view(-1, *([1] * xs[0].dim()))
        m = model_sum(units * wv) / sc["mean_norm"]
        tangent = model_sum((units - sc["dots"].view(-1, *([1] * xs[0].dim())) * m) * wv)
        out = (m * sc["cos_s"] + tangent * sc["sinc_s"]) * sc["avg_norm"]
    return out if base is None else out + base


MULTISLERP = MethodSpec(
    name="multislerp",
    block_elems=FUSED_BLOCK_ELEMS,
    map=_multislerp_map,
    reduce_plan=_multislerp_reduces,
    params=(
        Param("weight", REQUIRED, per_model=True, base_too=False, check=in_range(None, None),
              doc="barycentric weight of each model"),
        Param("normalize_weights", True, kind="bool", doc="divide the weights by their sum"),
        Param("eps", 1e-8, check=in_range(0, None), doc="guard added to norms"),
    ),
    base="optional",
    min_models=1,
    description="barycentric interpolation of any number of models on the hypersphere (optionally of task "
                "vectors from a base), rescaled to the weighted mean norm",
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    validate=lambda job: _multislerp_validate(job),
)


def _multislerp_validate(job: TensorJob) -> str | None:
    ws = [float(x) for x in nonbase_params(job, "weight")]
    if len(ws) > 1 and job.params["normalize_weights"] and sum(ws) == 0:
        return (f"multislerp: the weights {ws} sum to zero, so they cannot be normalized; change them or set "
                "normalize_weights: false")
    return None
