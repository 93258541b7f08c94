"""Run a plan: a reader thread fills row bands from a fixed buffer pool, the main thread computes, a
writer thread pwrites finished bands into their planned shards.

Memory is bounded by construction: the reader can only fill a band when a pool slot is free (the
pool has `prefetch + 1` slots, each sized for the largest band of the plan), and the writer queue
holds at most `prefetch + 1` output bands.

On CUDA the pools are pinned and the copies are pipelined (`transfer.CudaStage`): the reader uploads
each band on a copy stream as soon as it is read, the compute stream waits only for that band's
upload, and results go back into pinned output slots on a download stream that the writer waits for.

A failure in any thread stops the others (pipeline.Halt): every wait on a queue or a pool polls the
stop flag, and the run raises the first failure. The only waits that do not poll are CUDA event
synchronizations, which wait for device work already queued, never for another thread.

A tensor with no elements ([0], [N, 0]) is never read, computed or written: its header entry is all
of it (sink.ShardSink commits a shard of only such tensors up front).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .errors import StreammergeError
from .io.header import DTYPES
from .io.reader import RowReader
from .methods import TensorJob, get_method
from .pipeline import Halt, Pool, Stopped, bound_malloc
from .plan.ir import Plan, TensorPlan
from .sink import ShardSink, ShardStats
from .transfer import CudaStage

__all__ = ["Executor", "ExecResult", "ShardStats"]

_DONE = object()


@dataclass
class Band:
    tensor: int
    passes: tuple[int, ...]
    r0: int
    r1: int
    chunks: list[torch.Tensor]
    slot: int                 # host slot (CPU: freed by the compute thread; CUDA: by the reader, once uploaded)
    nbytes: int
    dev_slot: int | None = None
    ready: object = None      # CUDA: the event that marks the upload into dev_slot done


@dataclass
class ExecResult:
    shards: list[ShardStats]
    nonfinite: list[str] = field(default_factory=list)
    device: str = "cpu"


def _all_finite(x: torch.Tensor) -> bool:
    """A sum is finite when every element is (one fast pass); only an overflowing sum needs the exact check."""
    if not x.is_floating_point() or x.numel() == 0:
        return True
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def _empty(t: TensorPlan) -> bool:
    """No elements: nothing to read, compute or write (however many rows a [2**62, 0] tensor claims)."""
    return t.bytes_out == 0


def _band_bytes(t: TensorPlan, rows: int) -> int:
    return sum(rows * s.info.row_bytes for s in t.inputs)


def _aligned(n: int) -> int:
    return (n + 63) // 64 * 64


def _read_band(reader: RowReader, t: TensorPlan, r0: int, r1: int, buf: torch.Tensor) -> list[torch.Tensor]:
    """Rows [r0, r1) of every input of `t`, laid out one after another (64-byte aligned) in `buf`."""
    chunks, off = [], 0
    for s in t.inputs:
        n = (r1 - r0) * s.info.row_bytes
        chunks.append(reader.read_rows(s.info, r0, r1, out=buf[off:off + n]))
        off += _aligned(n)
    return chunks


class Executor:
    def __init__(self, plan: Plan, out_dir: Path, device: torch.device, prefetch: int = 2,
                 skip_shards: frozenset[int] = frozenset(), on_progress: Callable[[int], None] | None = None,
                 on_shard_done: Callable[[int, ShardStats], None] | None = None, check_nonfinite: bool = True,
                 durable: bool = True):
        self.plan = plan
        self.out_dir = out_dir
        self.device = device
        self.prefetch = max(1, prefetch)
        self.skip = skip_shards
        self.on_progress = on_progress or (lambda n: None)
        self.on_shard_done = on_shard_done or (lambda i, s: None)
        self.check_nonfinite = check_nonfinite
        self.durable = durable
        self.spec = get_method(plan.method)
        self.stats = [ShardStats(s.filename) for s in plan.shards]
        self.halt = Halt()
        self.stop = self.halt.stop
        self.sink = ShardSink(plan, out_dir, self.stats, durable, skip_shards, self.on_shard_done)
        slot = max((sum(_aligned(t.rows_per_chunk * s.info.row_bytes) for s in t.inputs) for t in plan.tensors), default=1)
        cuda = device.type == "cuda"
        self.pool = Pool(self.prefetch + 1, slot, pin=cuda)
        out_slot = max((t.rows_per_chunk * t.row_elems * DTYPES[t.out_dtype][1] for t in plan.tensors), default=1)
        self.out_pool = Pool(self.prefetch + 2, out_slot, pin=cuda)
        self.stage = CudaStage(device, slot) if cuda else None
        self._write_wait = 0.0  # seconds the compute thread waited for room in the writer queue
        self.bands: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self.writes: queue.Queue = queue.Queue(maxsize=self.prefetch + 1)
        self.nonfinite: list[str] = []
        self.workers = None
        self.model_stats: dict[int, object] = {}

    # -- reader ---------------------------------------------------------------------------------------
    def _read_all(self) -> None:
        try:
            with RowReader() as reader:
                for ti, t in enumerate(self.plan.tensors):
                    if t.shard in self.skip or _empty(t):
                        continue
                    whole = t.rows_per_chunk >= t.rows
                    pass_groups = [tuple(range(t.passes))] if whole else [(p,) for p in range(t.passes)]
                    for passes in pass_groups:
                        for r0 in range(0, t.rows, t.rows_per_chunk):
                            r1 = min(t.rows, r0 + t.rows_per_chunk)
                            slot = self._take_slot()
                            buf = self.pool.buffers[slot]
                            t0 = time.perf_counter()
                            chunks = _read_band(reader, t, r0, r1, buf)
                            self.stats[t.shard].read_s += time.perf_counter() - t0
                            band = Band(ti, passes, r0, r1, chunks, slot, _band_bytes(t, r1 - r0))
                            if self.stage is not None:
                                band.dev_slot = self.stage.take_slot(self.stop)
                                if band.dev_slot is None:
                                    raise Stopped
                                band.chunks, band.ready = self.stage.upload(chunks, band.dev_slot, slot, t.shard)
                            self.halt.put(self.bands, band)
            self.halt.put(self.bands, _DONE)
        except BaseException as e:  # the first failure of any thread is the run's
            self.halt.fail(e)

    def _take_slot(self) -> int:
        while True:
            self.halt.check()
            if self.stage is not None:  # host slots come back once their uploads are done
                self.stage.reclaim(self.pool.free, block=self.pool.free.empty())
            try:
                return self.pool.free.get(timeout=0.1)
            except queue.Empty:
                continue

    # -- writer ---------------------------------------------------------------------------------------
    def _write_all(self) -> None:
        try:
            while True:
                item = self.halt.get(self.writes)
                if item is _DONE:
                    break
                shard, name, offset, data, out_slot, fence = item
                if fence is not None and not fence.wait() and name not in self.nonfinite:
                    self.nonfinite.append(name)
                self.sink.write(shard, name, offset, data)
                if out_slot is not None:
                    self.out_pool.free.put(out_slot)
            self.sink.finish()
        except BaseException as e:  # a full disk among them: the compute and the reader stop too
            self.halt.fail(e)
        finally:
            self.sink.abort()

    # -- compute --------------------------------------------------------------------------------------
    def run(self) -> ExecResult:
        """Run the plan; raises the first failure of any thread (after every thread has stopped)."""
        self.sink.commit_empty()
        bound_malloc()
        threads = torch.get_num_threads()
        if self.spec.row_local and self.device.type == "cpu" and threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.workers = ThreadPoolExecutor(threads, thread_name_prefix="streammerge-compute")
            torch.set_num_threads(1)
        try:
            self.model_stats = self._model_pass()
        except BaseException:
            if self.workers is not None:
                self.workers.shutdown()
                torch.set_num_threads(threads)
            raise
        reader = threading.Thread(target=self._read_all, name="streammerge-reader", daemon=True)
        writer = threading.Thread(target=self._write_all, name="streammerge-writer", daemon=True)
        reader.start()
        writer.start()
        try:
            self._compute_loop()
            self.halt.put(self.writes, _DONE)
        except BaseException as e:
            self.halt.fail(e)
        finally:
            try:
                writer.join()
            finally:  # an interrupt in the join still stops the other threads
                self.stop.set()  # the reader has finished unless the run failed
                reader.join()
            if self.workers is not None:
                self.workers.shutdown(cancel_futures=True)
                torch.set_num_threads(threads)
        self.halt.raise_first()
        if self.stage is not None:
            self.stage.collect(self.stats, wait=True)
        return ExecResult(self.stats, self.nonfinite, str(self.device))

    def _compute_loop(self) -> None:
        jobs: dict[int, tuple[TensorJob, tuple]] = {}
        states: dict[int, object] = {}
        stats: dict[int, list] = {}
        while True:
            band = self.halt.get(self.bands)
            if band is _DONE:
                break
            t = self.plan.tensors[band.tensor]
            if band.tensor not in jobs:
                job = TensorJob.from_plan(t, self.plan.seed)
                jobs[band.tensor] = (job, self.spec.reduces_for(job))
                stats[band.tensor] = [self.model_stats[band.tensor]] if band.tensor in self.model_stats else []
                if not self.stats[t.shard].started:
                    self.stats[t.shard].started = time.perf_counter()
            job, reduces = jobs[band.tensor]
            self.stats[t.shard].bytes_read += band.nbytes
            if self.stage is None:
                t0, waited = time.perf_counter(), self._write_wait
                try:
                    self._run_band(t, job, reduces, band, states, stats[band.tensor])
                finally:
                    self.pool.free.put(band.slot)
                self.stats[t.shard].compute_s += time.perf_counter() - t0 - (self._write_wait - waited)
            else:
                start = self.stage.begin(band.ready)
                try:
                    self._run_band(t, job, reduces, band, states, stats[band.tensor])
                finally:
                    self.stage.end(band.dev_slot, t.shard, start)
                self.stage.collect(self.stats)
            self.on_progress(band.nbytes)
            if band.r1 == t.rows and band.passes[-1] == t.passes - 1:
                jobs.pop(band.tensor, None)
                stats.pop(band.tensor, None)

    def _model_pass(self) -> dict[int, object]:
        """Sweeps over the whole model before any tensor's own passes (e.g. TIES with scope: model).
        Bands are read synchronously into the first pool slot; no other thread runs yet."""
        mp = self.spec.model_pass
        if mp is None:
            return {}
        jobs = [TensorJob.from_plan(t, self.plan.seed) for t in self.plan.tensors]
        sweeps = mp.sweeps(jobs)
        if not sweeps:
            return {}
        try:
            state = mp.init(jobs)
        except ValueError as e:
            raise StreammergeError(f"method {self.spec.name!r}: {e}") from None
        buf = self.pool.buffers[0]
        with RowReader() as reader:
            for sweep in range(sweeps):
                for ti, (t, job) in enumerate(zip(self.plan.tensors, jobs)):
                    for r0 in range(0, 0 if _empty(t) else t.rows, t.rows_per_chunk):
                        r1 = min(t.rows, r0 + t.rows_per_chunk)
                        chunks = [c.to(job.compute_dtype) for c in _read_band(reader, t, r0, r1, buf)]
                        mp.update(state, sweep, ti, job, chunks, r0)
                        self.on_progress(_band_bytes(t, r1 - r0))
                mp.end_sweep(state, sweep)
        return {ti: mp.result(state, ti, job) for ti, (t, job) in enumerate(zip(self.plan.tensors, jobs))
                if not _empty(t)}

    def _blocks(self, t: TensorPlan, band: Band) -> list[tuple[int, int]]:
        """Row-aligned sub-bands of about the plan's block size, relative to the band."""
        step = max(1, self.plan.block_elems // max(t.row_elems, 1)) if len(t.shape) >= 2 else band.r1 - band.r0
        return [(a, min(band.r1 - band.r0, a + step)) for a in range(0, band.r1 - band.r0, step)]

    def _parallel(self, fn, parts: list) -> list:
        """``fn(*part)`` for every part, in order. One task per block, so a worker that the reader or the
        writer slowed down takes fewer blocks (a fixed split left the other worker idle at every band's end)."""
        def task(*p):
            self.halt.check()  # another thread failed: the rest of this band is not worth computing
            return fn(*p)

        if self.workers is None or len(parts) < 2:
            return [task(*p) for p in parts]
        futures: list[Future] = [self.workers.submit(task, *p) for p in parts]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def _run_band(self, t: TensorPlan, job: TensorJob, reduces: tuple, band: Band, states: dict, stats: list) -> None:
        cpu = self.device.type == "cpu"
        blocked = cpu and self.spec.row_local
        blocks = self._blocks(t, band) if blocked else [(0, band.r1 - band.r0)]
        # on CUDA the chunks are on the device already (uploaded by the reader): this converts the dtype only
        whole = [c.to(self.device, job.compute_dtype) for c in band.chunks] if not blocked else None

        def chunks_of(a: int, b: int) -> list[torch.Tensor]:
            if whole is not None:
                return [c[a:b] if c.dim() >= 2 and len(t.shape) >= 2 else c for c in whole]
            return [(c[a:b] if len(t.shape) >= 2 else c).to(job.compute_dtype) for c in band.chunks]

        for p in band.passes:
            if p < len(reduces):
                red = reduces[p]
                if band.r0 == 0:
                    states[band.tensor] = red.init(job, stats)
                state = states[band.tensor]
                if red.merge is not None and len(blocks) > 1:
                    def part(a: int, b: int):
                        st = red.init(job, stats)
                        red.update(st, job, chunks_of(a, b), band.r0 + a)
                        return st
                    for st in self._parallel(part, blocks):
                        red.merge(state, st)
                else:
                    for a, b in blocks:
                        red.update(state, job, chunks_of(a, b), band.r0 + a)
                if band.r1 == t.rows:
                    stats.append(red.finish(states.pop(band.tensor), job, stats))
                continue
            self._map(t, job, band, blocks, chunks_of, stats)

    def _map(self, t: TensorPlan, job: TensorJob, band: Band, blocks, chunks_of, stats: list) -> None:
        rows = band.r1 - band.r0
        shape = (rows, *t.shape[1:]) if len(t.shape) >= 2 else t.shape
        out_slot = self.halt.get(self.out_pool.free)
        dtype = DTYPES[t.out_dtype][0]
        n = rows * t.row_elems if len(t.shape) >= 2 else t.row_elems
        out = self.out_pool.buffers[out_slot][: n * DTYPES[t.out_dtype][1]].view(dtype).reshape(shape)

        def result(a: int, b: int) -> torch.Tensor:
            res = self.spec.map(job, chunks_of(a, b), stats, band.r0 + a)
            expect = (b - a, *t.shape[1:]) if len(t.shape) >= 2 else t.shape
            if tuple(res.shape) != tuple(expect):
                raise StreammergeError(f"internal: method {self.spec.name!r} produced shape {tuple(res.shape)} for "
                                       f"rows {band.r0 + a}:{band.r0 + b} of {t.name!r}, expected {expect}")
            return res

        def work(a: int, b: int) -> bool:
            """Write the block into the output slot; whether it is all finite, checked here on the worker
            (on the main thread it held up the next band)."""
            block = out[a:b] if len(t.shape) >= 2 else out
            block.copy_(result(a, b))
            return not self.check_nonfinite or _all_finite(block)

        try:
            if self.stage is not None:  # one block: the whole band, copied back on the download stream
                fence = self.stage.download(result(0, rows).to(dtype), out, t.shard, self.check_nonfinite)
                offset = band.r0 * t.row_elems * DTYPES[t.out_dtype][1]
                self.halt.put(self.writes, (t.shard, t.name, offset, out, out_slot, fence))
                return
            finite = all(self._parallel(work, blocks))
        except BaseException:
            self.out_pool.free.put(out_slot)
            raise
        self._emit(t, band, out, out_slot, finite)

    def _emit(self, t: TensorPlan, band: Band, out: torch.Tensor, out_slot: int | None, finite: bool) -> None:
        """Queue a finished band for the writer; ``finite``: the workers' verdict on its values."""
        dtype = DTYPES[t.out_dtype][0]
        out = out.to(dtype)
        if not finite and t.name not in self.nonfinite:
            self.nonfinite.append(t.name)
        if out.device.type != "cpu":
            out = out.cpu()
        offset = band.r0 * t.row_elems * DTYPES[t.out_dtype][1]
        t0 = time.perf_counter()
        self.halt.put(self.writes, (t.shard, t.name, offset, out.contiguous(), out_slot, None))
        self._write_wait += time.perf_counter() - t0
