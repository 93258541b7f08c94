"""Where a band is computed: `HostStage` (the CPU) beside `transfer.CudaStage` (a CUDA run's copies).

Both have one interface, so the reader and the band runner have no device branches:
- reader thread: `take_host_slot(halt)` (a free host slot), `stage_in(band, halt)` (on CUDA, the upload);
- compute thread: `with computing(band, shard, stats, write_wait)` around a band's work, and
  `deliver(result, out, shard, check_finite) -> (finite, fence)` for each block of a map's output;
- after the run: `finish(stats)`.
`blocks` says whether a band may be split into the plan's row blocks on worker threads (the CPU: on a GPU
one band is one launch).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from .pipeline import Halt, Pool

if TYPE_CHECKING:
    from .report import ShardReport


def make_stage(device: torch.device, pool: Pool, slot_bytes: int):
    """The stage for `device`: chosen once, here."""
    if device.type == "cuda":
        from .transfer import CudaStage

        return CudaStage(device, slot_bytes, pool)
    return HostStage(device, pool)


def all_finite(x: torch.Tensor) -> bool:
    """A sum is finite when every element is (one fast pass); only an overflowing sum needs the exact check."""
    if not x.is_floating_point() or x.numel() == 0:
        return True
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


class HostStage:
    """A CPU run: bands are computed where the reader put them, in row blocks on worker threads."""

    blocks = True

    def __init__(self, device: torch.device, pool: Pool):
        self.device = device
        self.pool = pool

    def take_host_slot(self, halt: Halt) -> int:
        return halt.get(self.pool.free)

    def stage_in(self, band, halt: Halt) -> None:
        """Nothing to copy: the band's chunks are computed in its host slot."""

    @contextmanager
    def computing(self, band, shard: int, stats: list[ShardReport], write_wait: Callable[[], float]) -> Iterator[None]:
        """Time the band's compute (less the waits for room in the writer queue); its host slot is free after."""
        t0, waited = time.perf_counter(), write_wait()
        try:
            yield
        finally:
            self.pool.free.put(band.slot)
        stats[shard].compute_s += time.perf_counter() - t0 - (write_wait() - waited)

    def deliver(self, res: torch.Tensor, out: torch.Tensor, shard: int, check_finite: bool) -> tuple[bool, None]:
        """Copy a block's result into its output slot; whether it is all finite (checked here, on the
        worker: on the main thread it held up the next band)."""
        out.copy_(res)
        return not check_finite or all_finite(out), None

    def finish(self, stats: list[ShardReport]) -> None:
        pass
