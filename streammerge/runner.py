"""The band runner: what the compute thread does with a band, as the plan says.

Per band: each reduce pass it runs (by name in the plan, resolved against the method's spec), then the
map; on the CPU in the plan's row blocks (`TensorPlan.block_rows`) on worker threads; the map's output
checked for NaN and Inf and handed to the writer. Before any band, the model-wide sweeps
(`Plan.model_sweeps`, TIES with scope: model). Device work goes through the stage (`stage.py`).
"""

from __future__ import annotations

import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping, Protocol

import torch

from .bands import Band, band_bytes, empty, read_band
from .errors import StreammergeError
from .io.header import DTYPES
from .io.reader import RowReader
from .methods import MethodSpec, Reduce, TensorJob
from .pipeline import Halt, Pool
from .plan.ir import Plan, TensorPlan
from .sink import WriteItem


class PassShare(Protocol):
    """One reduce pass of one tensor computed once for several outputs of a shared run."""

    follows: bool                        # this output adopts the pass's state instead of computing it

    def publish(self, state: Any) -> None: ...

    def wait(self, halt: Halt) -> Any: ...


def resolve_reduces(spec: MethodSpec, job: TensorJob, t: TensorPlan) -> tuple[Reduce, ...]:
    """The method's reduce callables for the passes the plan names; a plan from another version of the
    method (other passes, or in another order) is refused rather than run."""
    reduces = spec.reduces_for(job)
    names = tuple(r.name for r in reduces)
    if names != t.reduces:
        raise StreammergeError(f"plan: tensor {t.name!r} lists the reduce passes {list(t.reduces)}, but method "
                               f"{spec.name!r} here runs {list(names)}; the plan was made by another version of "
                               "streammerge: plan it again with this one")
    if t.folded and not t.read_once and (not reduces or reduces[-1].so_far is None):
        raise StreammergeError(f"plan: tensor {t.name!r} counts its last reduce pass in the map's read, but method "
                               f"{spec.name!r} here cannot; the plan was made by another version: plan it again")
    return reduces


class BandRunner:
    """Runs the bands of one plan; used by the compute thread only (its blocks by the workers)."""

    def __init__(self, plan: Plan, spec: MethodSpec, stage, halt: Halt, out_pool: Pool, writes: queue.Queue,
                 check_nonfinite: bool, nonfinite: list[str]):
        self.plan = plan
        self.spec = spec
        self.stage = stage
        self.halt = halt
        self.out_pool = out_pool
        self.writes = writes
        self.check_nonfinite = check_nonfinite
        self.nonfinite = nonfinite
        self.workers: ThreadPoolExecutor | None = None
        self.write_wait = 0.0  # seconds the compute thread waited for room in the writer queue

    def blocks(self, t: TensorPlan, band: Band) -> list[tuple[int, int]]:
        """Row-aligned sub-bands of the plan's block size, relative to the band (one on a GPU)."""
        n = band.r1 - band.r0
        step = t.block_rows if self.stage.blocks and t.block_rows else n
        return [(a, min(n, a + step)) for a in range(0, n, max(step, 1))]

    def parallel(self, fn: Callable, parts: list) -> list:
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

    def run_band(self, t: TensorPlan, job: TensorJob, reduces: tuple[Reduce, ...], band: Band, states: dict,
                 stats: list, shares: Mapping[int, PassShare] | None = None) -> None:
        """`shares`: the reduce passes another output of a shared run computes for this one (`follows`),
        or this one for others, by pass index (`batch/reuse.py`)."""
        blocked = self.stage.blocks and t.block_rows > 0
        blocks = self.blocks(t, band)
        # on CUDA the chunks are on the device already (uploaded by the reader): this converts the dtype only
        whole = [c.to(self.stage.device, job.compute_dtype) for c in band.chunks] if not blocked else None

        def chunks_of(a: int, b: int) -> list[torch.Tensor]:
            if whole is not None:
                return [c[a:b] if c.dim() >= 2 and len(t.shape) >= 2 else c for c in whole]
            return [(c[a:b] if len(t.shape) >= 2 else c).to(job.compute_dtype) for c in band.chunks]

        folded = t.folded and not t.read_once and len(band.passes) == 2  # the last reduce and the map share this read
        for p in band.passes:
            if p < len(reduces):
                red = reduces[p]
                share = shares.get(p) if shares else None
                if band.r0 == 0:
                    states[band.tensor] = red.init(job, stats)
                state = states[band.tensor]
                if share is not None and share.follows:
                    if band.r1 == t.rows:
                        computed = share.wait(self.halt)
                        stats.append(red.finish(red.adopt(states.pop(band.tensor), computed), job, stats))
                    continue
                if red.merge is not None and len(blocks) > 1:
                    def part(a: int, b: int):
                        st = red.init(job, stats)
                        red.update(st, job, chunks_of(a, b), band.r0 + a)
                        return st
                    for st in self.parallel(part, blocks):
                        red.merge(state, st)
                else:
                    for a, b in blocks:
                        red.update(state, job, chunks_of(a, b), band.r0 + a)
                if folded:   # the rows so far are all the map of this band needs
                    so_far = red.so_far(state, job, stats)
                    if band.r1 == t.rows:
                        states.pop(band.tensor)
                    self.map(t, job, band, blocks, chunks_of, [*stats, so_far])
                    return
                if band.r1 == t.rows:
                    state = states.pop(band.tensor)
                    if share is not None:
                        share.publish(state)
                    stats.append(red.finish(state, job, stats))
                continue
            self.map(t, job, band, blocks, chunks_of, stats)

    def map(self, t: TensorPlan, job: TensorJob, band: Band, blocks, chunks_of, stats: list) -> None:
        rows = band.r1 - band.r0
        shape = (rows, *t.shape[1:]) if len(t.shape) >= 2 else t.shape
        out_slot = self.halt.get(self.out_pool.free)
        dtype, itemsize = DTYPES[t.out_dtype][0], DTYPES[t.out_dtype][1]
        n = rows * t.row_elems if len(t.shape) >= 2 else t.row_elems
        out = self.out_pool.buffers[out_slot][: n * itemsize].view(dtype).reshape(shape)

        def result(a: int, b: int) -> torch.Tensor:
            res = self.spec.map(job, chunks_of(a, b), stats, band.r0 + a)
            expect = (b - a, *t.shape[1:]) if len(t.shape) >= 2 else t.shape
            if tuple(res.shape) != tuple(expect):
                raise StreammergeError(f"internal: method {self.spec.name!r} produced shape {tuple(res.shape)} for "
                                       f"rows {band.r0 + a}:{band.r0 + b} of {t.name!r}, expected {expect}")
            return res

        def work(a: int, b: int):
            return self.stage.deliver(result(a, b), out[a:b] if len(t.shape) >= 2 else out, t.shard,
                                      self.check_nonfinite)

        try:
            delivered = self.parallel(work, blocks)
        except BaseException:
            self.out_pool.free.put(out_slot)
            raise
        if not all(finite for finite, _ in delivered) and t.name not in self.nonfinite:
            self.nonfinite.append(t.name)
        fence = delivered[0][1] if len(delivered) == 1 else None   # CUDA: the band's one download
        t0 = time.perf_counter()
        self.halt.put(self.writes, WriteItem(t.shard, t.name, band.r0 * t.row_elems * itemsize, out, out_slot, fence))
        self.write_wait += time.perf_counter() - t0

    def model_sweeps(self, buf: torch.Tensor, on_progress: Callable[[int], None]) -> dict[int, object]:
        """The plan's sweeps over the whole model before any tensor's own passes (TIES with scope: model):
        each tensor's statistic, handed to its passes as `stats[0]`. Bands are read synchronously into
        `buf`; no other thread runs yet."""
        sweeps, mp = self.plan.model_sweeps, self.spec.model_pass
        if not sweeps:
            return {}
        if mp is None:
            raise StreammergeError(f"plan: {sweeps} whole-model sweep(s) planned, but method {self.spec.name!r} "
                                   "here has none; the plan was made by another version: plan it again")
        jobs = [TensorJob.from_plan(t, self.plan.seed) for t in self.plan.tensors]
        try:
            state = mp.init(jobs)
        except ValueError as e:
            raise StreammergeError(f"method {self.spec.name!r}: {e}") from None
        with RowReader() as reader:
            for sweep in range(sweeps):
                for ti, (t, job) in enumerate(zip(self.plan.tensors, jobs)):
                    for r0 in range(0, 0 if empty(t) else t.rows, t.rows_per_chunk):
                        r1 = min(t.rows, r0 + t.rows_per_chunk)
                        chunks = [c.to(job.compute_dtype) for c in read_band(reader, t, r0, r1, buf)]
                        mp.update(state, sweep, ti, job, chunks, r0)
                        on_progress(band_bytes(t, r1 - r0))
                mp.end_sweep(state, sweep)
        return {ti: mp.result(state, ti, job) for ti, (t, job) in enumerate(zip(self.plan.tensors, jobs))
                if not empty(t)}
