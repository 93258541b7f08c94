"""How many rows a band may hold so that every buffer in flight fits the memory budget.

In flight at once, per tensor: `prefetch` bands read ahead plus the band being computed (inputs in
their stored dtype, then converted), the method's fp32/fp64 work space (about K + 3 band-sized
arrays), and the output band waiting for the writer (`prefetch` of them plus the one being written).

A CUDA run also bounds its device buffers by `--max-gpu-memory` (`gpu_row_cost`); without it the
planner leaves the device unchecked (planning never imports torch) and `merge.run` plans with 80% of
the device's memory.
"""

from __future__ import annotations

import math
import sys

import psutil

from ..errors import BudgetError
from ..io.header import ITEMSIZE, TensorInfo

ALLOCATOR_SLACK = 64 << 20      # fragmentation and small allocations torch makes per call
TARGET_BAND_BYTES = 32 << 20    # per input: big enough to amortise calls, small enough to pipeline
GPU_ALLOCATOR_SLACK = 64 << 20  # the caching allocator's rounding, the kernels' small device buffers
TORCH_RSS = 200 << 20           # what `import torch` adds to the resident set (197 MiB: torch 2.13, CPU build)


def baseline_rss() -> int:
    """The process's resident memory before any band. `run` imports torch before it plans, so this is
    measured; `check` plans without torch, so it adds torch's share to plan what a run would."""
    return psutil.Process().memory_info().rss + (0 if "torch" in sys.modules else TORCH_RSS)


BLOCK_ELEMS = 1 << 19  # the largest CPU block (elements); each method names its own size up to this
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


def gpu_row_cost(inputs: list[TensorInfo], row_elems: int, compute_dtype: str, out_dtype: str) -> int:
    """Device bytes per band row of a CUDA run: the band's inputs as uploaded (stored dtype), the K inputs
    in the compute dtype, the method's float32 work space (about K + 3 band-sized arrays) and the output
    band; twice, since the next band is uploaded and the last result copied back while one is computed."""
    k = len(inputs)
    stored = sum(i.row_bytes for i in inputs)
    per_band = stored + (k * ITEMSIZE[compute_dtype] + (k + 3) * 4 + ITEMSIZE[out_dtype]) * row_elems
    return 2 * per_band


def rows_per_chunk(name: str, rows: int, inputs: list[TensorInfo], row_elems: int, compute_dtype: str,
                   out_dtype: str, prefetch: int, data_budget: int, budget: int, override: int | None,
                   blocked: bool = False, gpu_budget: int = 0) -> int:
    """Rows per band under the memory budget and, when `gpu_budget` is set (a CUDA run's
    --max-gpu-memory, bytes), under the device budget too. A tensor with no elements ([2^62, 0],
    [0, N], [0]) holds no bytes: it is one band of all its rows, whatever the budget or `override`
    say, so nothing ever loops over its rows."""
    if rows == 0 or row_elems == 0:
        return max(1, rows)
    cost = row_cost(inputs, row_elems, compute_dtype, out_dtype, prefetch, blocked)
    if cost > data_budget:
        need = budget - data_budget + cost
        raise BudgetError(f"tensor {name!r}: one row needs {cost / 2**20:.1f} MiB in flight but the budget leaves "
                          f"{max(data_budget, 0) / 2**20:.1f} MiB for data; raise --max-memory to at least "
                          f"{need / 2**30:.2f} GiB")
    by_gpu = rows
    if gpu_budget:
        gpu_cost = gpu_row_cost(inputs, row_elems, compute_dtype, out_dtype)
        gpu_data = gpu_budget - GPU_ALLOCATOR_SLACK
        if gpu_cost > gpu_data:
            need = math.ceil((GPU_ALLOCATOR_SLACK + gpu_cost) / 2**20)
            raise BudgetError(f"tensor {name!r}: one row needs {gpu_cost / 2**20:.1f} MiB of device memory in flight "
                              f"but --max-gpu-memory {gpu_budget / 2**20:.0f} MiB leaves {max(gpu_data, 0) / 2**20:.1f} "
                              f"MiB for data; raise --max-gpu-memory to at least {need} MiB")
        by_gpu = gpu_data // gpu_cost
    if override:
        return max(1, min(override, rows))
    widest = max((i.row_bytes for i in inputs), default=1) or 1
    by_budget = data_budget // max(cost, 1)
    by_target = max(1, TARGET_BAND_BYTES // widest)
    return max(1, min(rows, by_budget, by_target, by_gpu))


def in_flight(rows: int, inputs: list[TensorInfo], row_elems: int, compute_dtype: str, out_dtype: str, prefetch: int,
              blocked: bool = False) -> int:
    return rows * row_cost(inputs, row_elems, compute_dtype, out_dtype, prefetch, blocked)


def gpu_in_flight(rows: int, inputs: list[TensorInfo], row_elems: int, compute_dtype: str, out_dtype: str) -> int:
    return rows * gpu_row_cost(inputs, row_elems, compute_dtype, out_dtype)
