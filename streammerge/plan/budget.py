"""How many rows a band may hold so that every buffer in flight fits the memory budget.

In flight at once, per tensor: `prefetch` bands read ahead plus the band being computed (inputs in
their stored dtype, then converted), the method's fp32/fp64 work space (about K + 3 band-sized
arrays), and the output band waiting for the writer (`prefetch` of them plus the one being written).
"""

from __future__ import annotations

import sys

import psutil

from ..errors import BudgetError
from ..io.header import ITEMSIZE, TensorInfo

ALLOCATOR_SLACK = 64 << 20      # fragmentation and small allocations torch makes per call
TARGET_BAND_BYTES = 32 << 20    # per input: big enough to amortise calls, small enough to pipeline
TORCH_RSS = 200 << 20           # what `import torch` adds to the resident set (197 MiB: torch 2.13, CPU build)


def baseline_rss() -> int:
    """The process's resident memory before any band. `run` imports torch before it plans, so this is
    measured; `check` plans without torch, so it adds torch's share to plan what a run would."""
    return psutil.Process().memory_info().rss + (0 if "torch" in sys.modules else TORCH_RSS)


BLOCK_ELEMS = 1 << 19  # CPU maps and reduces of row-local methods run on row-aligned blocks of at most this size
MIN_BLOCK_ELEMS = 1 << 12


def _per_elem(k: int, compute_dtype: str) -> int:
    """Work bytes per block element: K converted inputs and ~K+3 float64-sized temporaries (torch path)."""
    return k * ITEMSIZE[compute_dtype] + (k + 3) * 8


def block_elems(data_budget: int, k: int, compute_dtype: str, threads: int) -> int:
    """Largest power-of-two block whose work space, over all threads, takes at most an eighth of the
    data budget: big blocks amortise per-call overhead, a tight budget still gets small ones."""
    e = BLOCK_ELEMS
    while e > MIN_BLOCK_ELEMS and threads * e * _per_elem(k, compute_dtype) > data_budget // 8:
        e //= 2
    return e


def block_work(k: int, compute_dtype: str, threads: int, elems: int) -> int:
    """Work space of blocked CPU compute: per worker thread, one block's worth; it does not grow with
    the band."""
    return threads * elems * _per_elem(k, compute_dtype)


def row_cost(inputs: list[TensorInfo], row_elems: int, compute_dtype: str, out_dtype: str, prefetch: int,
             blocked: bool = False) -> int:
    """Bytes in flight per band row; `blocked` (row-local method on CPU) moves the work space to
    `block_work`, so a band can hold a whole tensor and later passes need no re-read."""
    k = len(inputs)
    stored = sum(i.row_bytes for i in inputs)
    loaded = 0 if blocked else k * row_elems * ITEMSIZE[compute_dtype]
    work = 0 if blocked else (k + 3) * row_elems * 8
    out = row_elems * ITEMSIZE[out_dtype]
    return (prefetch + 1) * stored + loaded + work + (prefetch + 1) * out


def rows_per_chunk(name: str, rows: int, inputs: list[TensorInfo], row_elems: int, compute_dtype: str,
                   out_dtype: str, prefetch: int, data_budget: int, budget: int, override: int | None,
                   blocked: bool = False) -> int:
    cost = row_cost(inputs, row_elems, compute_dtype, out_dtype, prefetch, blocked)
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


def in_flight(rows: int, inputs: list[TensorInfo], row_elems: int, compute_dtype: str, out_dtype: str, prefetch: int,
              blocked: bool = False) -> int:
    return rows * row_cost(inputs, row_elems, compute_dtype, out_dtype, prefetch, blocked)
