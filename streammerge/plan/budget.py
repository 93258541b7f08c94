"""How many rows a band may hold so that every buffer in flight fits the memory budget.

In flight at once, per tensor: `prefetch` bands read ahead plus the band being computed (inputs in
their stored dtype, then converted), the method's fp32/fp64 work space (about K + 3 band-sized
arrays), and the output band waiting for the writer (`prefetch` of them plus the one being written).

A CUDA run also bounds its device buffers by `--max-gpu-memory` (`gpu_row_cost`); without it the
planner leaves the device unchecked (planning never imports torch) and `merge.run` plans with 80% of
the device's memory.

Before any band the process already holds Python, torch and, on a CPU run of a method with compiled
kernels, numba's code and JIT memory (`baseline_rss`). `Floor` gathers every tensor's one-row cost as
the planner sizes its bands and names the smallest budget the whole merge fits in.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from dataclasses import dataclass, field

import psutil

from ..errors import BudgetError
from ..io.header import ITEMSIZE, TensorInfo

ALLOCATOR_SLACK = 64 << 20      # fragmentation and small allocations torch makes per call
TARGET_BAND_BYTES = 32 << 20    # per input: big enough to amortise calls, small enough to pipeline
GPU_ALLOCATOR_SLACK = 64 << 20  # the caching allocator's rounding, the kernels' small device buffers
TORCH_RSS = 200 << 20           # what `import torch` adds to the resident set (197 MiB: torch 2.13, CPU build)


# numba's share of a CPU run's resident set, paid at the first kernel call, after planning: the import
# of numba and llvmlite (56 MiB) and the JIT's code and working memory for a method's kernels. Measured
# as peak RSS over a run without numba (STREAMMERGE_NO_NUMBA=1), numba 0.68 / llvmlite 0.50: 106-132 MiB
# with numba's on-disk cache, 140-165 MiB when the kernels compile for the first time (della the most).
NUMBA_IMPORT_RSS = 56 << 20
NUMBA_RSS = 176 << 20
# Methods whose CPU path calls no numba kernel (held by tests/e2e/test_budget_floor.py: a run of each
# reports no numba kernel); every other method is planned with NUMBA_RSS in its baseline.
NUMBA_FREE = frozenset({"linear", "passthrough"})


def _numba_enabled() -> bool:
    """As `kernels.dispatch` decides for a CPU chunk (that module imports torch; planning must not)."""
    off = os.environ.get("STREAMMERGE_NO_NUMBA", "").strip().lower() not in ("", "0", "false", "no")
    return not off and importlib.util.find_spec("numba") is not None


def numba_rss(method: str, device: str) -> int:
    """What numba will add to the resident set of a run of `method` on `device` ("auto" may be the CPU),
    beyond what this process holds now: 0 where no numba kernel runs."""
    if device not in ("cpu", "auto") or method in NUMBA_FREE or not _numba_enabled():
        return 0
    return NUMBA_RSS - (NUMBA_IMPORT_RSS if "numba" in sys.modules else 0)


def baseline_rss(method: str = "", device: str = "cpu") -> int:
    """The process's resident memory before any band. `run` imports torch before it plans, so this is
    measured; `check` plans without torch, so it adds torch's share to plan what a run would. Both add
    numba's share (`numba_rss`), which lands only at the first kernel call, after planning."""
    torch_rss = 0 if "torch" in sys.modules else TORCH_RSS
    return psutil.Process().memory_info().rss + torch_rss + (numba_rss(method, device) if method else 0)


BLOCK_ELEMS = 1 << 19  # the largest CPU block (elements); each method names its own size up to this
MIN_BLOCK_ELEMS = 1 << 12


def _per_elem(k: int, compute_dtype: str) -> int:
    """Work bytes per block element: K converted inputs and ~K+3 float64-sized temporaries (torch path)."""
    return k * ITEMSIZE[compute_dtype] + (k + 3) * 8


# A block's work space, over all threads, takes at most 1/BLOCK_SHARE of the data budget. A quarter,
# not an eighth: with numba's share in the baseline, an eighth halved the block at --max-memory 1GiB and
# ties on the 1.1B benchmark took ~30% longer (per-block overhead); the bands still fit what remains.
BLOCK_SHARE = 4


def block_elems(data_budget: int, k: int, compute_dtype: str, threads: int) -> int:
    """Largest power-of-two block whose work space, over all threads, takes at most 1/BLOCK_SHARE of
    the data budget: big blocks amortise per-call overhead, a tight budget still gets small ones."""
    e = BLOCK_ELEMS
    while e > MIN_BLOCK_ELEMS and threads * e * _per_elem(k, compute_dtype) > data_budget // BLOCK_SHARE:
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
                   blocked: bool = False, gpu_budget: int = 0, floor: Floor | None = None) -> int:
    """Rows per band under the memory budget and, when `gpu_budget` is set (a CUDA run's
    --max-gpu-memory, bytes), under the device budget too. A tensor with no elements ([2^62, 0],
    [0, N], [0]) holds no bytes: it is one band of all its rows, whatever the budget or `override`
    say, so nothing ever loops over its rows.

    With `floor`, a row that does not fit is recorded there (the planner reports the floor of the whole
    merge once, `Floor.error`) and 1 is returned; without it, this raises a BudgetError for the tensor."""
    if rows == 0 or row_elems == 0:
        return max(1, rows)
    cost = row_cost(inputs, row_elems, compute_dtype, out_dtype, prefetch, blocked)
    if floor is not None:
        floor.add(name, cost, blocked, len(inputs), compute_dtype)
    if cost > data_budget:
        if floor is not None:
            return 1
        need = budget - data_budget + cost
        raise BudgetError(f"tensor {name!r}: one row needs {cost / 2**20:.1f} MiB in flight but the budget leaves "
                          f"{max(data_budget, 0) / 2**20:.1f} MiB for data; raise --max-memory to at least "
                          f"{math.ceil(need / 2**20)}MiB")
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


FLOOR_MARGIN = 2 << 20  # the baseline is measured: a later process may start a MiB or so higher


@dataclass
class Floor:
    """The smallest --max-memory a merge can run in, gathered tensor by tensor as the planner sizes
    bands. The planner needs, for every tensor, data budget D (budget - baseline - ALLOCATOR_SLACK) >=
    its one-row cost plus, for a blocked tensor, the blocks' work space, whose size itself grows with D
    (`block_elems`); `data_floor` solves that for the smallest D."""

    budget: int
    baseline: int
    block_cap: int            # the method's own block size (MethodSpec.block_elems)
    widest_k: int             # the most inputs of any tensor: sizes the blocks, as the planner does
    threads: int
    loose: int = 0            # the largest one-row cost of a tensor without blocks
    blocked: dict[tuple[int, str], int] = field(default_factory=dict)  # (K, compute dtype) -> largest row cost
    widest: tuple[int, str] = (0, "")  # (cost, tensor) of the largest row, for the message

    def block_elems(self, data_budget: int) -> int:
        """The block size the planner uses under `data_budget` (one definition for the plan and the floor)."""
        return min(self.block_cap, block_elems(data_budget, self.widest_k, "F32", self.threads))

    def add(self, name: str, cost: int, blocked: bool, k: int, compute_dtype: str) -> None:
        if blocked:
            key = (k, compute_dtype)
            self.blocked[key] = max(self.blocked.get(key, 0), cost)
        else:
            self.loose = max(self.loose, cost)
        if cost > self.widest[0]:
            self.widest = (cost, name)

    def _need(self, elems: int) -> int:
        """The data budget every tensor needs when blocks hold `elems` elements."""
        need = self.loose
        for (k, compute), cost in self.blocked.items():
            need = max(need, cost + block_work(k, compute, self.threads, elems))
        return need

    def fits(self, data_budget: int) -> bool:
        """Whether every tensor fits `data_budget`, exactly as the planner decides it."""
        return data_budget >= max(1, self._need(self.block_elems(data_budget)))

    def data_floor(self) -> int:
        """The smallest data budget from which every larger one fits too. The block size steps up at
        D = BLOCK_SHARE * threads * e * per_elem (see `block_elems`), so what the tensors need is constant on each
        step's range; walking the ranges down from the open-ended last one, the floor is where a range
        stops fitting whole."""
        starts, e = [1], MIN_BLOCK_ELEMS * 2
        while e <= BLOCK_ELEMS:
            starts.append(BLOCK_SHARE * self.threads * e * _per_elem(self.widest_k, "F32"))
            e *= 2
        floor = starts[-1]
        for i in range(len(starts) - 1, -1, -1):
            lo, hi = starts[i], (starts[i + 1] if i + 1 < len(starts) else None)
            need = max(1, self._need(self.block_elems(lo)))
            if hi is not None and need >= hi:
                break  # nothing in this range fits: the floor is where the next one starts fitting
            floor = max(lo, need)
            if need > lo:
                break  # the range fits only from `need` on
        return floor

    def minimum(self) -> int:
        """The floor as a budget in whole MiB, rounded up with a margin: a later run given it passes."""
        exact = self.baseline + ALLOCATOR_SLACK + self.data_floor()
        return math.ceil((exact + FLOOR_MARGIN) / 2**20) << 20

    def error(self) -> BudgetError | None:
        """The BudgetError for a budget the merge does not fit in, None when it fits."""
        if self.fits(self.budget - self.baseline - ALLOCATOR_SLACK):
            return None
        need = self.minimum()
        cost, name = self.widest
        row = f"; its largest row in flight, of {name!r}, takes {cost / 2**20:.2f} MiB" if name else ""
        return BudgetError(f"--max-memory {_mib(self.budget)} is below the smallest budget this merge can run in, "
                           f"{need >> 20} MiB (the process holds {_mib(self.baseline)} before any band: Python, torch "
                           f"and, for compiled kernels, numba{row}); raise --max-memory to at least {need >> 20}MiB")


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


def in_flight(rows: int, inputs: list[TensorInfo], row_elems: int, compute_dtype: str, out_dtype: str, prefetch: int,
              blocked: bool = False) -> int:
    return rows * row_cost(inputs, row_elems, compute_dtype, out_dtype, prefetch, blocked)


def gpu_in_flight(rows: int, inputs: list[TensorInfo], row_elems: int, compute_dtype: str, out_dtype: str) -> int:
    return rows * gpu_row_cost(inputs, row_elems, compute_dtype, out_dtype)
