"""linear, passthrough and slerp, with mergekit 0.1.5's order of operations.

linear and slerp compute in fp32 (fp64 inputs stay fp64) and cast back to the first input's dtype;
passthrough scales in the loaded dtype. task_arithmetic lives with its family in task_vectors.py.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from ._stats import Gram, all_pairs, gram_reduce
from .registry import FUSED_BLOCK_ELEMS, MethodSpec, Param, TensorJob, in_range

if TYPE_CHECKING:
    import torch


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    import torch
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# -- linear -----------------------------------------------------------------------------------------

def _linear_map(job: TensorJob, chunks: list[torch.Tensor], stats: Sequence[Any], row0: int) -> torch.Tensor:
    from ..kernels.mix import weighted_sum

    weights = [float(p["weight"]) for p in job.model_params]
    return weighted_sum(chunks, weights, bool(job.params["normalize"]), _acc_dtype(chunks[0]))


LINEAR = MethodSpec(
    name="linear",
    map=_linear_map,
    params=(
        Param("weight", per_model=True, doc="mixing weight of each model"),
        Param("normalize", True, kind="bool", doc="divide by the sum of weights"),
    ),
    base="ignored",
    min_models=1,
    description="weighted average of the models",
    paper="https://arxiv.org/abs/2203.05482",
)


# -- passthrough ------------------------------------------------------------------------------------

def _passthrough_map(job: TensorJob, chunks: list[torch.Tensor], stats: Sequence[Any], row0: int) -> torch.Tensor:
    out = chunks[0]
    noise = job.model_params[0].get("noise")
    if noise:
        out = out + (gaussian_noise(job, row0, out) * noise).to(out.dtype)
    scale = job.model_params[0].get("scale")
    return out if scale is None else out * scale


def gaussian_noise(job: TensorJob, row0: int, like: torch.Tensor) -> torch.Tensor:
    """N(0, 1) values for the elements of `like` (the band at row `row0`), a pure function of the seed, the
    model, the tensor name and the element (Box-Muller on two Philox streams): the same at any chunking."""
    import torch

    from ..kernels.philox import philox_uniform, stream_id

    start, count = row0 * job.row_elems, like.numel()
    seed = job.seed % (1 << 64)
    u1 = philox_uniform(seed, stream_id(job.model_ids[0], "noise-r:" + job.name), start, count, like.device)
    u2 = philox_uniform(seed, stream_id(job.model_ids[0], "noise-a:" + job.name), start, count, like.device)
    z = torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(u2 * (2 * math.pi))
    return z.view(like.shape)


PASSTHROUGH = MethodSpec(
    name="passthrough",
    map=_passthrough_map,
    params=(Param("scale", None, per_model=True, doc="optional factor applied to the tensor"),
            Param("noise", None, per_model=True,
                  doc="standard deviation of Gaussian noise added before the scale (streammerge moe's noise_scale); "
                      "reproducible: keyed by --random-seed, the tensor and the element"),),
    base="ignored",
    min_models=1,
    max_models=1,
    description="copies one model's tensors; with slices, stacks layers (frankenmerge)",
)


# -- slerp ------------------------------------------------------------------------------------------
# Reduce: exact sums of a², b², ab over the tensor (`_stats.Gram`: segment sums, exactly added), so the
# result does not depend on how rows were grouped into bands.

def _slerp_pair(job: TensorJob, chunks: Sequence[torch.Tensor]) -> tuple[None, list[torch.Tensor]]:
    assert job.base is not None
    return None, [chunks[job.base], chunks[1 - job.base]]


def _slerp_finish(g: Gram, job: TensorJob, stats: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two interpolation coefficients, computed in fp32 as mergekit does from the statistics."""
    import torch
    dt = torch.float64 if job.compute_dtype == torch.float64 else torch.float32
    eps, threshold = 1e-8, 0.9995
    t = torch.tensor(float(job.params["t"]), dtype=dt)
    na = torch.tensor(math.sqrt(g[0, 0]), dtype=dt)
    nb = torch.tensor(math.sqrt(g[1, 1]), dtype=dt)
    na = torch.where(na > eps, na, 1)
    nb = torch.where(nb > eps, nb, 1)
    dot = torch.tensor(g[0, 1] / (float(na) * float(nb)), dtype=dt).clamp(-1, 1)
    linear = dot.abs() > threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    ca = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    cb = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return ca, cb


def _slerp_map(job: TensorJob, chunks: list[torch.Tensor], stats: Sequence[Any], row0: int) -> torch.Tensor:
    from ..kernels.blend import pair_mix

    _, (a, b) = _slerp_pair(job, chunks)
    ca, cb = stats[0]
    return pair_mix(a, b, ca, cb)


SLERP = MethodSpec(
    name="slerp",
    block_elems=FUSED_BLOCK_ELEMS,
    map=_slerp_map,
    reduces=(gram_reduce("gram", _slerp_pair, lambda job: all_pairs(2), _slerp_finish),),
    params=(Param("t", check=in_range(None, None), doc="interpolation position: 0 = base, 1 = the other model"),),
    base="required",
    min_models=1,
    max_models=1,
    description="spherical interpolation between the base and one other model",
    paper="https://en.wikipedia.org/wiki/Slerp",
)
