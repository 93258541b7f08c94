"""Run a plan: a reader thread fills row bands from a fixed buffer pool, the compute thread runs each
band (`runner.BandRunner`), a writer thread pwrites finished bands into their planned shards.

The executor receives the plan and the method spec it names, and decides when, never what: passes,
single reads, blocks and model sweeps are the plan's fields. Its parts:
- `pipeline.py`: the stop flag and first failure (`Halt`), buffer pools;
- `bands.py`: the reader thread; `sink.py`: the writer thread and the shards' lifecycle;
- `stage.py` / `transfer.py`: where a band is computed (host, or CUDA with overlapped copies);
- `runner.py`: reduces, maps, blocks, sweeps and finiteness checks of one band.

Memory is bounded by construction: the reader can only fill a band when a pool slot is free (the
pool has `prefetch + 1` slots, each sized for the largest band of the plan), and the writer queue
holds at most `prefetch + 1` output bands. After each band where resident memory is more than halfway
from the planned peak to the budget, the compute loop hands the heap's free pages back
(`pipeline.trim_heap`), so allocator fragmentation cannot accumulate across bands.

A failure in any thread stops the others (pipeline.Halt): every wait on a queue or a pool polls the
stop flag, and the run raises the first failure. The only waits that do not poll are CUDA event
synchronizations, which wait for device work already queued, never for another thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .bands import read_all, slot_bytes
from .errors import StreammergeError
from .io.header import DTYPES
from .io.reader import TensorSource
from .methods import MethodSpec, TensorJob, get_method
from .pipeline import DONE, Halt, Pool, trim_heap
from .plan.ir import Plan
from .report import ShardReport
from .runner import BandRunner, resolve_reduces
from .sink import ShardSink, write_all
from .stage import make_stage

__all__ = ["Executor", "ExecResult"]


@dataclass
class ExecResult:
    shards: list[ShardReport]
    nonfinite: list[str] = field(default_factory=list)
    device: str = "cpu"


class Executor:
    """Runs one plan (or the shards of it not in `skip_shards`) into `out_dir`."""

    def __init__(self, plan: Plan, *, out_dir: Path, device: torch.device, spec: MethodSpec | None = None,
                 prefetch: int = 2, skip_shards: frozenset[int] = frozenset(),
                 on_progress: Callable[[int], None] | None = None,
                 on_shard_done: Callable[[int, ShardReport], None] | None = None, check_nonfinite: bool = True,
                 durable: bool = True, sources: Mapping[Path, TensorSource] | None = None,
                 sink: Callable[[list[ShardReport]], ShardSink] | None = None):
        """`sources`: input files served from memory (a stage streamed into this one); `sink(stats)`: where
        the finished bands go instead of the shards in `out_dir` (a stage streamed into another)."""
        self.plan = plan
        self.spec = spec if spec is not None else get_method(plan.method)
        if self.spec.name != plan.method:
            raise StreammergeError(f"the plan is for method {plan.method!r}, not {self.spec.name!r}")
        self.out_dir = out_dir
        self.device = device
        self.prefetch = max(1, prefetch)
        self.skip = skip_shards
        self.on_progress = on_progress or (lambda n: None)
        self.stats = [ShardReport(s.filename, skipped=i in skip_shards) for i, s in enumerate(plan.shards)]
        self.halt = Halt()
        self.sources = sources
        self.sink = sink(self.stats) if sink is not None else ShardSink(
            plan, out_dir, self.stats, durable, skip_shards, on_shard_done or (lambda i, s: None))
        slot = max((slot_bytes(t) for t in plan.tensors), default=1)
        pin = device.type == "cuda"
        self.pool = Pool(self.prefetch + 1, slot, pin=pin)
        out_slot = max((t.rows_per_chunk * t.row_elems * DTYPES[t.out_dtype][1] for t in plan.tensors), default=1)
        self.out_pool = Pool(self.prefetch + 2, out_slot, pin=pin)
        self.stage = make_stage(device, self.pool, slot)
        self.bands: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self.writes: queue.Queue = queue.Queue(maxsize=self.prefetch + 1)
        self.nonfinite: list[str] = []
        # free heap pages stay resident up to halfway from the planned peak to the budget
        self.trim_above = (plan.peak_estimate + plan.budget) // 2 if plan.peak_estimate < plan.budget else 0
        self.runner = BandRunner(plan, self.spec, self.stage, self.halt, self.out_pool, self.writes, check_nonfinite,
                                 self.nonfinite)

    def run(self) -> ExecResult:
        """Run the plan; raises the first failure of any thread (after every thread has stopped)."""
        self.sink.commit_empty()
        threads = torch.get_num_threads()
        if self.stage.blocks and threads > 1 and any(t.block_rows for t in self.plan.tensors):
            self.runner.workers = ThreadPoolExecutor(threads, thread_name_prefix="streammerge-compute")
            torch.set_num_threads(1)
        try:
            model_stats = self.runner.model_sweeps(self.pool.buffers[0], self.on_progress)
        except BaseException:
            self._stop_workers(threads)
            raise
        reader = threading.Thread(target=read_all, name="streammerge-reader", daemon=True,
                                  args=(self.plan, self.skip, self.pool, self.stage, self.halt, self.stats, self.bands,
                                        self.sources))
        writer = threading.Thread(target=write_all, name="streammerge-writer", daemon=True,
                                  args=(self.halt, self.writes, self.sink, self.out_pool, self.nonfinite))
        reader.start()
        writer.start()
        try:
            self._compute_loop(model_stats)
            self.halt.put(self.writes, DONE)
        except BaseException as e:
            self.halt.fail(e)
        finally:
            try:
                writer.join()
            finally:  # an interrupt in the join still stops the other threads
                self.halt.stop.set()  # the reader has finished unless the run failed
                reader.join()
            self._stop_workers(threads)
        self.halt.raise_first()
        self.stage.finish(self.stats)
        return ExecResult(self.stats, self.nonfinite, str(self.device))

    def _stop_workers(self, threads: int) -> None:
        if self.runner.workers is not None:
            self.runner.workers.shutdown(cancel_futures=True)
            self.runner.workers = None
            torch.set_num_threads(threads)

    def _compute_loop(self, model_stats: dict[int, object]) -> None:
        jobs: dict[int, tuple[TensorJob, tuple]] = {}
        states: dict[int, object] = {}
        stats: dict[int, list] = {}
        write_wait = lambda: self.runner.write_wait  # noqa: E731
        while True:
            band = self.halt.get(self.bands)
            if band is DONE:
                break
            t = self.plan.tensors[band.tensor]
            if band.tensor not in jobs:
                job = TensorJob.from_plan(t, self.plan.seed)
                jobs[band.tensor] = (job, resolve_reduces(self.spec, job, t))
                stats[band.tensor] = [model_stats[band.tensor]] if band.tensor in model_stats else []
                if not self.stats[t.shard].started:
                    self.stats[t.shard].started = time.perf_counter()
            job, reduces = jobs[band.tensor]
            self.stats[t.shard].bytes_read += band.nbytes
            with self.stage.computing(band, t.shard, self.stats, write_wait):
                self.runner.run_band(t, job, reduces, band, states, stats[band.tensor])
            trim_heap(self.trim_above)
            self.on_progress(band.nbytes)
            if band.r1 == t.rows and band.passes[-1] == t.passes - 1:
                jobs.pop(band.tensor, None)
                stats.pop(band.tensor, None)
