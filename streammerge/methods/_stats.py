"""Band-size-independent statistics for the reducing methods (spherical, stock, widen).

Every whole-tensor statistic here gives the same bits whatever the row bands were:

* `ExactSum` keeps an exact (unrounded) running sum of Python floats as a short list of non-overlapping
  doubles, so adding band partials in any grouping, or merging states built on several threads, ends
  in the same correctly rounded value.
* `segment_sums` cuts each row into fixed segments of at most 4096 elements (by position within the
  row, not within the band) and sums each segment with one torch call: a reduction of fewer elements
  than torch's grain size (32768) never splits across threads, so a segment's sum depends only on
  its elements. Products of bf16/fp16/fp32 values are exact in fp64, so only these segment sums and
  the final rounding round at all.
* `ColumnSums` adds rows into per-column fp64 accumulators strictly in row order (a cumsum over
  `[acc; rows]`), which is the same sequence of roundings for any banding.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from .registry import Reduce, TensorJob

if TYPE_CHECKING:
    import torch


# KthMagnitude(dtype).passes by dtype code: planning counts passes without importing torch.
HISTOGRAM_PASSES = {"BF16": 1, "F16": 1, "F32": 2, "F64": 4}

_SEG = 4096          # = kernels.dots.SEGMENT (not imported: planning must not load torch)
_COL_BLOCK = 256     # rows per cumsum step of a column accumulator (bounds the fp64 temporary)


class ExactSum:
    """An exact sum of floats: the value is rounded once, when read."""

    __slots__ = ("parts", "special")

    def __init__(self) -> None:
        self.parts: list[float] = []
        self.special: float | None = None   # inf or nan once a non-finite value was added

    def add(self, values: Iterable[float]) -> None:
        vals = self.parts + list(values)
        try:
            total = math.fsum(vals)
        except (OverflowError, ValueError):   # inf - inf, or an intermediate overflow
            total = math.nan
        if not math.isfinite(total):
            self.special = total if self.special is None or math.isnan(total) else self.special
            self.parts = []
            return
        # Peel off the correctly rounded sum until nothing is left: parts then add up exactly to vals.
        parts: list[float] = []
        while total != 0.0:
            parts.append(total)
            total = math.fsum(vals + [-p for p in parts])
        self.parts = parts

    def merge(self, other: "ExactSum") -> None:
        if other.special is not None:
            self.special = other.special if self.special is None or math.isnan(other.special) else self.special
        self.add(other.parts)

    @property
    def value(self) -> float:
        if self.special is not None:
            return self.special
        return math.fsum(self.parts)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """A band as `[rows, elements per row]`; a 1-D tensor is one row."""
    return x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)


def segment_sums(x: torch.Tensor) -> torch.Tensor:
    """Sums of fixed row segments of a `[rows, m]` tensor, flattened (see the module docstring)."""
    from ..kernels.dots import segment_sums as kernel_segment_sums

    return kernel_segment_sums(x)


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-row sums of a `[rows, m]` fp64 tensor that do not depend on which other rows share the call."""
    n, m = x.shape
    if m <= _SEG:
        return x.sum(dim=-1)
    return segment_sums(x).reshape(n, -1).sum(dim=-1)


class ColumnSums:
    """Per-column fp64 sums over rows, accumulated strictly in row order."""

    __slots__ = ("acc",)

    def __init__(self, cols: int, device: torch.device | str = "cpu") -> None:
        import torch
        self.acc = torch.zeros(cols, dtype=torch.float64, device=device)

    def add(self, rows: torch.Tensor) -> None:
        self.acc = _add_in_row_order(self.acc.to(rows.device), rows)


def _add_in_row_order(acc: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``acc + rows[0] + rows[1] + ...`` column by column, one row at a time (a cumulative sum)."""
    import torch
    for lo in range(0, rows.shape[0], _COL_BLOCK):
        acc = torch.cumsum(torch.cat([acc.unsqueeze(0), rows[lo:lo + _COL_BLOCK]]), dim=0)[-1].clone()
    return acc


class ColumnProducts:
    """Per-column fp64 sums Σ_rows x_i·x_j for `pairs` of input positions, the products exact, accumulated
    strictly in row order: one compiled pass over the inputs where there is one (no fp64 temporaries),
    else `ColumnSums`' cumulative sums of the fp64 products, which round the same way."""

    __slots__ = ("pairs", "acc")

    def __init__(self, cols: int, pairs: Iterable[tuple[int, int]]) -> None:
        import torch
        self.pairs = list(pairs)
        self.acc = torch.zeros(len(self.pairs), cols, dtype=torch.float64)

    def add(self, xs: Sequence[torch.Tensor]) -> None:
        rows = [as_rows(x) for x in xs]
        if self.acc.device != rows[0].device:
            self.acc = self.acc.to(rows[0].device)
        from ..kernels.dots import column_products

        if column_products(rows, self.pairs, self.acc):
            return
        wide = [r.double() for r in rows]
        for p, (i, j) in enumerate(self.pairs):
            self.acc[p] = _add_in_row_order(self.acc[p], wide[i] * wide[j])


class Gram:
    """Exact sums of pairwise products Σ x_i·x_j over a tensor, for `pairs` of input positions.

    `rounded` pairs multiply in the inputs' dtype first (mergekit's `(a * b).sum()` rounds each
    product); the others multiply in fp64, which is exact for bf16, fp16 and fp32 inputs.
    """

    __slots__ = ("sums", "rounded")

    def __init__(self, pairs: Iterable[tuple[int, int]], rounded: Iterable[tuple[int, int]] = ()) -> None:
        self.sums = {p: ExactSum() for p in pairs}
        self.rounded = frozenset(rounded)

    def update(self, base: torch.Tensor | None, xs: Sequence[torch.Tensor]) -> None:
        """Add the products of the vectors ``xs[k] - base`` (``xs[k]`` without a base)."""
        from ..kernels.dots import gram_segments

        pairs = list(self.sums)
        sums = gram_segments([as_rows(x) for x in xs], None if base is None else as_rows(base), pairs,
                              self.rounded)
        for p, row in zip(pairs, sums.tolist()):
            self.sums[p].add(row)

    def merge(self, other: "Gram") -> None:
        for p, acc in self.sums.items():
            acc.merge(other.sums[p])

    def __getitem__(self, pair: tuple[int, int]) -> float:
        i, j = pair
        return self.sums[(i, j) if (i, j) in self.sums else (j, i)].value


def all_pairs(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i, k)]


def gram_reduce(name: str, vectors: Callable[[TensorJob, list[torch.Tensor]], tuple[torch.Tensor | None, Sequence[torch.Tensor]]],
                pairs: Callable[[TensorJob], Iterable[tuple[int, int]]],
                finish: Callable[[Gram, TensorJob, Sequence[Any]], Any],
                rounded: Callable[[TensorJob], Iterable[tuple[int, int]]] = lambda job: ()) -> Reduce:
    """A one-pass reduce of exact pairwise sums of the vectors ``x - base`` for ``(base, xs) =
    vectors(job, chunks)`` (``base`` None: the ``xs`` themselves); parallel-safe (exact merge)."""

    def init(job: TensorJob, stats: Sequence[Any]) -> Gram:
        return Gram(pairs(job), rounded(job))

    def update(state: Gram, job: TensorJob, chunks: list[torch.Tensor], row0: int) -> None:
        state.update(*vectors(job, chunks))

    return Reduce(name, init, update, finish, merge=lambda into, other: into.merge(other))


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exactly computed statistics (fp64) rounded the way torch rounds a reduction's result: half types
    accumulate in fp32 and round that, so go through fp32; wider types round once."""
    import torch
    if dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.to(dtype)


def scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    """`rounded` for one Python float: a 0-dim tensor."""
    import torch
    return rounded(torch.tensor(value, dtype=torch.float64), dtype)


def rowwise(fn: Callable[..., torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
    """`fn` applied to row bands, made independent of the band's row count.

    torch splits a reduction with a single output of at least 32768 elements across threads, which
    a multi-row call never does; a one-row band is doubled so its reductions run like the whole
    tensor's (one row per output).
    """
    import torch
    if xs[0].dim() >= 2 and xs[0].shape[0] == 1:
        return fn(*(torch.cat([x, x]) for x in xs))[:1]
    return fn(*xs)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, fp64 for wider ones: enough to make identities exact."""
    import torch
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else torch.float64


def model_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over dim 0 in model order from zero, as torch sums a large tensor over a short leading dim:
    half types accumulate in fp32 and round once, wider ones accumulate in their own dtype."""
    import torch
    acc_dtype = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    acc = torch.zeros(x.shape[1:], dtype=acc_dtype, device=x.device)
    for k in range(x.shape[0]):
        acc += x[k]
    return acc.to(x.dtype)


def model_mean(x: torch.Tensor) -> torch.Tensor:
    """mean over dim 0 as torch computes it for a large tensor: half types divide the fp32 sum before
    rounding; fp32 divides its (rounded) sum; fp64 sums in fp64."""
    import torch
    n = x.shape[0]
    if x.dtype in (torch.bfloat16, torch.float16):
        acc = torch.zeros(x.shape[1:], dtype=torch.float32, device=x.device)
        for k in range(n):
            acc += x[k]
        return (acc / n).to(x.dtype)
    return model_sum(x) / n


def nonbase(job: TensorJob, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [c for i, c in enumerate(chunks) if i != job.base]


def nonbase_params(job: TensorJob, name: str) -> list[Any]:
    return [p[name] for i, p in enumerate(job.model_params) if i != job.base]


def promote_fp32(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a loaded-dtype tensor times an fp32 tensor (fp32 masks or factors)."""
    import torch
    return torch.promote_types(dtype, torch.float32)
