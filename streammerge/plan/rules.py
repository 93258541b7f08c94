"""The planner's named rules: each decision the executor acts on is made here, once, and stored in the plan.

The executor never re-derives these; it reads `TensorPlan.reduces`, `read_once` and `block_rows`.
Torch-free: planning imports none of the kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..methods import MethodSpec, TensorJob


def read_once(rows: int, rows_per_chunk: int) -> bool:
    """The engine's one fusion rule: a tensor that fits in one band is read once for all its passes
    (they run on the band in memory); a larger one is read again, band by band, for every pass."""
    return rows_per_chunk >= rows


def block_rows(shape: tuple[int, ...], rows: int, row_elems: int, block_elems: int) -> int:
    """Rows per CPU compute block: about `block_elems` elements, whole rows, so that the blocks of one band
    run on a thread each and stay in cache (every method's output rows depend only on the same input rows
    and its statistics). A 1-D or 0-d tensor is one row, so one block."""
    if len(shape) < 2:
        return max(rows, 1)
    return max(1, block_elems // max(row_elems, 1))


def reduce_names(spec: MethodSpec, job: TensorJob) -> tuple[str, ...]:
    """The tensor's reduce passes by name, in the order they run (the map pass follows them)."""
    return tuple(r.name for r in spec.reduces_for(job))
