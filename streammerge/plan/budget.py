"""How many rows a band may hold so that every buffer in flight fits the memory budget.

In flight at once, per tensor: `prefetch` bands read ahead plus the band being computed (inputs in
their stored dtype, then converted), the method's fp32/fp64 work space (about K + 3 band-sized
arrays), and the output band waiting for the writer (`prefetch` of them plus the one being written).
"""

from __future__ import annotations

from ..errors import BudgetError
from ..io.header import DTYPES, TensorInfo

ALLOCATOR_SLACK = 64 << 20      # fragmentation and small allocations torch makes per call
TARGET_BAND_BYTES = 32 << 20    # per input: big enough to amortise calls, small enough to pipeline


def row_cost(inputs: list[TensorInfo], row_elems: int, compute_dtype: str, out_dtype: str, prefetch: int) -> int:
    k = len(inputs)
    stored = sum(i.row_bytes for i in inputs)
    loaded = k * row_elems * DTYPES[compute_dtype][1]
    work = (k + 3) * row_elems * 8
    out = row_elems * DTYPES[out_dtype][1]
    return (prefetch + 1) * stored + loaded + work + (prefetch + 1) * out


def rows_per_chunk(name: str, rows: int, inputs: list[TensorInfo], row_elems: int, compute_dtype: str,
                   out_dtype: str, prefetch: int, data_budget: int, budget: int, override: int | None) -> int:
    cost = row_cost(inputs, row_elems, compute_dtype, out_dtype, prefetch)
    if cost > data_budget:
        need = budget - data_budget + cost
        raise BudgetError(f"tensor {name!r}: one row needs {cost / 2**20:.1f} MiB in flight but the budget leaves "
                          f"{max(data_budget, 0) / 2**20:.1f} MiB for data; raise --max-memory to at least "
                          f"{need / 2**30:.2f} GiB")
    if override:
        return max(1, min(override, rows))
    widest = max((i.row_bytes for i in inputs), default=1) or 1
    by_budget = data_budget // max(cost, 1)
    by_target = max(1, TARGET_BAND_BYTES // widest)
    return max(1, min(rows, by_budget, by_target))


def in_flight(rows: int, inputs: list[TensorInfo], row_elems: int, compute_dtype: str, out_dtype: str, prefetch: int) -> int:
    return rows * row_cost(inputs, row_elems, compute_dtype, out_dtype, prefetch)
