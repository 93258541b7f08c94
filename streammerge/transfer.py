"""Host <-> device copies of a CUDA run, overlapped with the compute: the CUDA stage (`stage.py` has the
interface it shares with the host stage).

Three streams: the copy stream uploads a band from its pinned host slot into one of two device slots
while the compute stream (torch's current stream) works on the band in the other slot, and the
download stream copies results into pinned host buffers. Events order them; no thread waits for the
GPU except the writer (for a band's results, before it writes them) and the reader (for an upload,
before it reuses the host slot it came from).

Who calls what: the reader thread `take_slot` and `upload` and `reclaim`; the compute thread `begin`,
`download` and `end`; the writer thread `Fence.wait`. Every stage is timed with CUDA events on its
own stream; `collect` adds the seconds to the per-shard statistics once the events have completed.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from .errors import BudgetError
from .pipeline import Halt, Pool, Stopped

if TYPE_CHECKING:
    from .report import ShardReport

SLOTS = 2  # device input slots: the band being computed and the next one being uploaded


def _aligned(n: int) -> int:
    return (n + 63) // 64 * 64


class Fence:
    """A band's results on their way into pinned host memory."""

    def __init__(self, done: torch.cuda.Event, finite: torch.Tensor | None):
        self.done = done
        self.finite = finite

    def wait(self) -> bool:
        """Block until the results are in host memory; False when they hold a NaN or an Inf."""
        self.done.synchronize()
        return self.finite is None or bool(self.finite)


class CudaStage:
    """The streams, events and device input slots of a CUDA run."""

    blocks = False

    def __init__(self, device: torch.device, slot_bytes: int, pool: Pool):
        self.device = device
        self.pool = pool
        self.compute = torch.cuda.current_stream(device)
        self.h2d = torch.cuda.Stream(device)
        self.d2h = torch.cuda.Stream(device)
        try:
            self.slots = [torch.empty(max(slot_bytes, 1), dtype=torch.uint8, device=device) for _ in range(SLOTS)]
        except torch.cuda.OutOfMemoryError:
            free, total = torch.cuda.mem_get_info(device)
            raise BudgetError(f"{device}: {SLOTS} device input slots of {slot_bytes / 2**20:.1f} MiB do not fit "
                              f"({free / 2**20:.0f} MiB free of {total / 2**20:.0f} MiB); lower --max-gpu-memory "
                              "or free the GPU") from None
        self.slot_free: list[torch.cuda.Event | None] = [None] * SLOTS  # recorded when a slot's band is done
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(SLOTS):
            self.free.put(i)
        self.uploading: deque[tuple[torch.cuda.Event, int]] = deque()  # reader only: (upload done, host slot)
        self._timed: list[tuple[int, str, torch.cuda.Event, torch.cuda.Event]] = []
        self._lock = threading.Lock()

    # -- reader thread --------------------------------------------------------------------------------
    def take_host_slot(self, halt: Halt) -> int:
        """A free host slot; host slots come back once their uploads are done."""
        while True:
            halt.check()
            self.reclaim(self.pool.free, block=self.pool.free.empty())
            try:
                return self.pool.free.get(timeout=0.1)
            except queue.Empty:
                continue

    def stage_in(self, band, halt: Halt) -> None:
        """Upload the band into a device slot; its chunks become the device copies."""
        band.dev_slot = self.take_slot(halt.stop)
        if band.dev_slot is None:
            raise Stopped
        band.chunks, band.ready = self.upload(band.chunks, band.dev_slot, band.slot, band.shard)

    def take_slot(self, stop: threading.Event) -> int | None:
        """A free device slot; None when the run stops first."""
        while not stop.is_set():
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def upload(self, chunks: list[torch.Tensor], slot: int, host_slot: int | None, shard: int
               ) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        """Copy a band's chunks into device slot `slot` on the copy stream, laid out as in the host slot;
        returns the device chunks and the event that marks them uploaded. The host slot is handed back by
        `reclaim` once that event has completed."""
        buf = self.slots[slot]
        start, ready = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        out, off = [], 0
        with torch.cuda.stream(self.h2d):
            if self.slot_free[slot] is not None:
                self.h2d.wait_event(self.slot_free[slot])  # the band that used this slot before is done
            start.record(self.h2d)
            for c in chunks:
                n = c.numel() * c.element_size()
                dst = buf[off:off + n].view(c.dtype).reshape(c.shape)
                dst.copy_(c, non_blocking=True)
                out.append(dst)
                off += _aligned(n)
            ready.record(self.h2d)
        if host_slot is not None:
            self.uploading.append((ready, host_slot))
        self._time(shard, "h2d_s", start, ready)
        return out, ready

    def reclaim(self, free: queue.Queue, block: bool) -> None:
        """Hand back to `free` the host slots whose uploads have completed; with `block`, wait for the
        oldest one when none has."""
        while self.uploading:
            ready, host_slot = self.uploading[0]
            if not ready.query():
                if not block:
                    return
                ready.synchronize()
            self.uploading.popleft()
            free.put(host_slot)
            block = False

    # -- compute thread -------------------------------------------------------------------------------
    @contextmanager
    def computing(self, band, shard: int, stats: list[ShardReport], write_wait: Callable[[], float]) -> Iterator[None]:
        """The compute stream waits for the band's upload; its device slot is free once its work is done."""
        start = self.begin(band.ready)
        try:
            yield
        finally:
            self.end(band.dev_slot, shard, start)
        self.collect(stats)

    def deliver(self, res: torch.Tensor, out: torch.Tensor, shard: int, check_finite: bool) -> tuple[bool, Fence]:
        """The band's result, copied back into pinned `out` on the download stream; the writer's fence
        says whether it is finite."""
        return True, self.download(res.to(out.dtype), out, shard, check_finite)

    def begin(self, ready: torch.cuda.Event) -> torch.cuda.Event:
        """The compute stream waits for a band's upload; returns the event that starts its timing."""
        self.compute.wait_event(ready)
        start = torch.cuda.Event(enable_timing=True)
        start.record(self.compute)
        return start

    def end(self, slot: int, shard: int, start: torch.cuda.Event) -> None:
        """All of a band's work is queued: time it, and free its device slot once the compute and the
        downloads queued so far are done (a result may be a view of the slot)."""
        end = torch.cuda.Event(enable_timing=True)
        end.record(self.compute)
        self._time(shard, "compute_s", start, end)
        self.d2h.wait_stream(self.compute)
        done = torch.cuda.Event()
        done.record(self.d2h)
        self.slot_free[slot] = done
        self.free.put(slot)

    def download(self, res: torch.Tensor, host_out: torch.Tensor, shard: int, check_finite: bool) -> Fence:
        """Copy a result into pinned `host_out` on the download stream, after the compute queued so far."""
        finite = torch.isfinite(res).all() if check_finite and res.is_floating_point() else None
        self.d2h.wait_stream(self.compute)
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flag = None
        with torch.cuda.stream(self.d2h):
            start.record(self.d2h)
            host_out.copy_(res, non_blocking=True)
            if finite is not None:
                flag = torch.empty((), dtype=torch.bool, pin_memory=True)
                flag.copy_(finite, non_blocking=True)
            done.record(self.d2h)
        res.record_stream(self.d2h)  # allocated on the compute stream: not reused before the copy is done
        if finite is not None:
            finite.record_stream(self.d2h)
        self._time(shard, "d2h_s", start, done)
        return Fence(done, flag)

    def finish(self, stats: list[ShardReport]) -> None:
        self.collect(stats, wait=True)

    # -- timings --------------------------------------------------------------------------------------
    def _time(self, shard: int, stage: str, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        with self._lock:
            self._timed.append((shard, stage, start, end))

    def collect(self, stats: list, wait: bool = False) -> None:
        """Add the seconds of every completed stage to `stats[shard].<stage>` (all of them with `wait`)."""
        with self._lock:
            timed, self._timed = self._timed, []
        pending = []
        for shard, stage, start, end in timed:
            if wait:
                end.synchronize()
            elif not end.query():
                pending.append((shard, stage, start, end))
                continue
            setattr(stats[shard], stage, getattr(stats[shard], stage) + start.elapsed_time(end) / 1000)
        if pending:
            with self._lock:
                self._timed[:0] = pending
