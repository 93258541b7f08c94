"""karcher: the Riemannian (Karcher) mean of all models on the hypersphere, as mergekit 0.1.5 iterates it.

mergekit's Karcher-mean iteration runs here on the K×K Gram matrix of the inputs: every iterate is a
combination Σ c_i u_i of the unit inputs, so all iterations run on the Gram matrix after one reduce
pass, in fp64, and the map applies the final coefficients. mergekit iterates on bf16 tensors; the
difference is bf16 rounding noise (see docs/methods.md for the tolerance).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from ._stats import Gram, all_pairs, gram_reduce, work_dtype
from .registry import MethodSpec, Param, Reduce, TensorJob, in_range

if TYPE_CHECKING:
    import torch


def karcher_coefficients(g: Gram, k: int, max_iter: int, tol: float) -> list[float]:
    """Coefficients a_i with Karcher mean = Σ a_i x_i, from the Gram matrix of the inputs (fp64).

    mergekit's iteration with equal weights, on coefficients: the mean is m = Σ c_i u_i with
    u_i = x_i / ‖x_i‖, so m·u_j = (Ĝc)_j and ‖v‖² = vᵀĜv for Ĝ the Gram matrix of the units.
    """
    G = [[g[i, j] for j in range(k)] for i in range(k)]
    norms = [math.sqrt(max(G[i][i], 0.0)) for i in range(k)]
    alphas = [1.0 / k] * k
    valid = [i for i in range(k) if norms[i] > tol]
    if not valid:
        return [0.0] * k
    a_sum = sum(alphas[i] for i in valid)
    a = {i: alphas[i] / a_sum for i in valid}
    gu = {(i, j): G[i][j] / (norms[i] * norms[j]) for i in valid for j in valid}

    def quad(c: dict[int, float]) -> float:
        return max(math.fsum(c[i] * c[j] * gu[i, j] for i in valid for j in valid), 0.0)

    c = dict(a)
    mean_norm = math.sqrt(quad(c))
    if mean_norm < tol:   # mergekit starts from the first unit then
        c = {i: (1.0 if i == valid[0] else 0.0) for i in valid}
    else:
        c = {i: v / mean_norm for i, v in c.items()}
    for _ in range(max_iter):
        tangent = {i: 0.0 for i in valid}
        for i in valid:
            d = min(1.0, max(-1.0, math.fsum(c[j] * gu[i, j] for j in valid)))
            theta = math.acos(d)
            if theta < tol:
                continue
            f = a[i] * theta / math.sin(theta)
            tangent[i] += f
            for j in valid:
                tangent[j] -= f * d * c[j]
        tn = math.sqrt(quad(tangent))
        if tn < tol:
            break
        c = {i: math.cos(tn) * c[i] + math.sin(tn) * tangent[i] / tn for i in valid}
        un = math.sqrt(quad(c))
        if un > tol:
            c = {i: v / un for i, v in c.items()}
    scale = math.fsum(alphas[i] * norms[i] for i in range(k))
    return [scale * c[i] / norms[i] if i in c else 0.0 for i in range(k)]


def _karcher_finish(g: Gram, job: TensorJob, stats: Sequence[Any]) -> list[float]:
    k = len(job.model_params)
    return karcher_coefficients(g, k, int(job.params["max_iter"]), float(job.params["tol"]))


def _karcher_reduces(job: TensorJob) -> tuple[Reduce, ...]:
    k = len(job.model_params)
    return () if k == 1 else (gram_reduce("gram", lambda j, c: (None, c), lambda j: all_pairs(k), _karcher_finish),)


def _karcher_map(job: TensorJob, chunks: list[torch.Tensor], stats: Sequence[Any], row0: int) -> torch.Tensor:
    if len(chunks) == 1:
        return chunks[0]
    import torch

    coefs = stats[0]
    acc = torch.zeros(chunks[0].shape, dtype=work_dtype(chunks[0].dtype), device=chunks[0].device)
    for x, c in zip(chunks, coefs):
        if c != 0.0:
            acc.add_(x.to(acc.dtype), alpha=c)
    return acc.to(chunks[0].dtype)


KARCHER = MethodSpec(
    name="karcher",
    map=_karcher_map,
    reduce_plan=_karcher_reduces,
    params=(
        Param("max_iter", 10, kind="int", check=in_range(0, None), doc="iterations of the Karcher-mean solver"),
        Param("tol", 1e-5, check=in_range(0, None), doc="convergence tolerance (and the smallest norm that counts)"),
    ),
    base="ignored",
    min_models=1,
    description="Riemannian (Karcher) mean of all models on the hypersphere, rescaled to their mean norm",
    paper="https://arxiv.org/abs/2603.04972",
)
