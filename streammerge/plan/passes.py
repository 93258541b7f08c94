"""How many times each input is read: the planner's rules that trade memory for passes over the inputs.

A tensor with reduce passes is read once per pass unless one band holds it (`rules.read_once`). Two
rules cut that down, both decided here, once, and stored in the plan:

- **whole_band**: on the CPU a band's compute runs in blocks, so a band's cost is its buffers only; where
  the whole tensor fits the data budget, it is one band (read once for every pass) instead of bands of
  the 32 MiB target. A single-pass tensor keeps the target's bands: they pipeline reads with compute.
- **fold**: a last reduce that can give its statistic for the rows seen so far (`Reduce.so_far`: TIES's
  tie counts without rescale) runs in the map's read, band by band in row order: one read less.

Each multi-band tensor also records the budget from which whole_band would take it in one band
(`TensorPlan.one_read_budget`): `check` says "at 1 GiB, N reads of the inputs; at X, 1".

What the page cache does: a re-read of a band read a moment ago is served from RAM when the inputs fit
in free memory (warm: a re-read costs a memory copy, ~5-10 GB/s); on inputs larger than RAM (a 70B
merge) every pass is a disk read, so passes multiply the run's I/O time.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

from . import budget as budget_mod
from .ir import Plan, TensorPlan

if TYPE_CHECKING:
    from ..io.header import TensorInfo
    from ..methods import MethodSpec, TensorJob


def fold(spec: MethodSpec, job: TensorJob, t: TensorPlan) -> bool:
    """The fold rule: the last reduce runs in the map's read (only where the tensor is read band by band
    for each pass, and that reduce can give the rows-so-far statistic)."""
    reduces = spec.reduces_for(job)
    return bool(reduces) and not t.read_once and reduces[-1].so_far is not None


def reads(t: TensorPlan) -> int:
    """How many times the plan reads each input byte of `t` (model sweeps aside)."""
    if t.bytes_out == 0:
        return 0
    return 1 if t.read_once else t.passes - int(t.folded)


def settle(spec: MethodSpec, t: TensorPlan, job: TensorJob, infos: Sequence[TensorInfo], prefetch: int,
           data_left: int, fixed: int, block_work: int, in_flight: int, whole_ok: bool) -> tuple[TensorPlan, int]:
    """`t` with its reduce passes named and both rules applied; returns it and its bytes in flight.

    `data_left` is the data budget less the blocks' work space, `fixed` the baseline and allocator slack;
    `whole_ok` is False where bands are sized otherwise (a GPU run, or
    --chunk-rows given)."""
    names = tuple(r.name for r in spec.reduces_for(job))
    t = replace(t, passes=len(names) + 1, reduces=names)
    if not names or t.read_once:
        return t, in_flight
    cost = budget_mod.row_cost(list(infos), t.row_elems, t.compute_dtype, t.out_dtype, prefetch, blocked=True)
    need = fixed + block_work + t.rows * cost
    if whole_ok and t.rows * cost <= data_left:   # whole_band
        return replace(t, rows_per_chunk=t.rows, read_once=True), block_work + t.rows * cost
    t = replace(t, one_read_budget=math.ceil(need / 2**20) << 20 if whole_ok else 0)
    return replace(t, folded=fold(spec, job, t)), in_flight


def summary(plan: Plan) -> str:
    """Reads of the inputs per input byte at the plan's budget, and the budget that reads them once."""
    total = sum(t.bytes_in for t in plan.tensors)
    if not total:
        return "no input bytes to read"
    read = plan.bytes_in / total
    at = _size(plan.budget)
    once = max((t.one_read_budget for t in plan.tensors if reads(t) > 1), default=0)
    folded = sum(1 for t in plan.tensors if t.folded)
    text = f"at {at}, {read:.2f} reads of the inputs"
    if read > 1 and once and not plan.model_sweeps:
        text += f"; at {_size(once)}, 1"
    elif read > 1 and not plan.model_sweeps:
        text += " (bands sized by --chunk-rows or the GPU: every pass reads its tensor again)"
    if folded:
        text += f"; {folded} tensor(s) count ties in the map's read"
    return text


def _size(n: int) -> str:
    """As --max-memory takes it: whole GiB, else MiB (rounded up)."""
    return f"{n >> 30} GiB" if n % 2**30 == 0 else f"{-(-n >> 20)} MiB"
