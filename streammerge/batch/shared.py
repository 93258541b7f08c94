"""Run several plans over one read of their shared inputs (`groups.py` says what is shared).

One reader thread reads each group's band of all its inputs into a pool slot; each output's lane
thread runs that band, in its member's own sub-bands, through the output's `BandRunner` (sharing the
block workers); each output has its own output slots, writer thread and shard sink, so its folder is committed exactly as a run of its
plan alone would commit it, and its bytes are the same (every method's result is independent of where
bands begin and end). A reduce pass that several outputs would compute alike over the same inputs (TIES's
|δ| histogram at several densities) is computed by the first of them and adopted by the others
(`reuse.py`). The threads share one stop flag: a failure anywhere stops the whole batch.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..bands import Band, aligned, band_bytes, pass_groups
from ..io.header import DTYPES
from ..io.reader import RowReader
from ..methods import MethodSpec, TensorJob, get_method
from ..pipeline import DONE, Halt, Pool, trim_heap
from ..plan.ir import Plan
from ..report import ShardReport
from ..runner import BandRunner, resolve_reduces
from ..sink import ShardSink, write_all
from ..stage import HostStage
from .groups import Group, group_tensors
from .reuse import SharedPass, adopted, plan_shares


@dataclass
class Output:
    """One output of a shared run: its plan, folder, the shards a resume keeps, and its callback."""

    plan: Plan
    out_dir: Path
    skip: frozenset[int] = frozenset()
    on_shard_done: Callable[[int, ShardReport], None] = lambda i, s: None


@dataclass
class SharedResult:
    shards: list[list[ShardReport]]          # per output
    nonfinite: list[list[str]]
    bytes_read: int = 0                      # from the input files, each shared band counted once
    rounds: dict[str, int] = field(default_factory=dict)
    passes_adopted: int = 0                  # tensor passes computed once for several outputs (reuse.py)


@dataclass
class _GroupBand:
    group: int
    round: int
    r0: int
    r1: int
    chunks: list[torch.Tensor]
    slot: int
    nbytes: int


class _Lane:
    """One output's side of the run: its runner, writer and per-tensor state."""

    def __init__(self, out: Output, stage: HostStage, halt: Halt, prefetch: int, check_nonfinite: bool,
                 durable: bool):
        self.out = out
        self.spec: MethodSpec = get_method(out.plan.method)
        plan = out.plan
        self.stats = [ShardReport(s.filename, skipped=i in out.skip) for i, s in enumerate(plan.shards)]
        self.sink = ShardSink(plan, out.out_dir, self.stats, durable, out.skip, out.on_shard_done)
        size = max((t.rows_per_chunk * t.row_elems * DTYPES[t.out_dtype][1] for t in plan.tensors), default=1)
        self.out_pool = Pool(prefetch + 2, size)
        self.writes: queue.Queue = queue.Queue(maxsize=prefetch + 1)
        self.nonfinite: list[str] = []
        self.runner = BandRunner(plan, self.spec, stage, halt, self.out_pool, self.writes, check_nonfinite,
                                 self.nonfinite)
        self.jobs: dict[int, tuple] = {}
        self.states: dict[int, object] = {}
        self.tensor_stats: dict[int, list] = {}

    def job(self, ti: int):
        if ti not in self.jobs:
            t = self.out.plan.tensors[ti]
            job = TensorJob.from_plan(t, self.out.plan.seed)
            self.jobs[ti] = (job, resolve_reduces(self.spec, job, t))
            self.tensor_stats[ti] = []
            if not self.stats[t.shard].started:
                self.stats[t.shard].started = time.perf_counter()
        return self.jobs[ti]


class SharedExecutor:
    """Runs the plans of `outputs` (CPU) reading every shared input band once."""

    def __init__(self, outputs: list[Output], *, prefetch: int = 2, check_nonfinite: bool = True,
                 durable: bool = True, on_progress: Callable[[int], None] | None = None):
        for o in outputs:
            if o.plan.model_sweeps:
                raise ValueError(f"{o.out_dir}: a plan with whole-model sweeps runs alone, not in a shared run")
        self.outputs = outputs
        self.prefetch = max(1, prefetch)
        self.groups: list[Group] = group_tensors([o.plan for o in outputs], [o.skip for o in outputs])
        self.on_progress = on_progress or (lambda n: None)
        self.halt = Halt()
        slot = max((g.slot_bytes() for g in self.groups), default=1)
        self.pool = Pool(self.prefetch + 1, slot)
        self.stage = HostStage(torch.device("cpu"), self.pool)
        self.bands: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self.lanes = [_Lane(o, self.stage, self.halt, self.prefetch, check_nonfinite, durable) for o in outputs]
        self.bytes_read = 0
        self.lane_threads: list[ThreadPoolExecutor] = []
        self.pending: list[Future] = []
        self._progress_lock = threading.Lock()
        self.shares: dict[tuple[int, int], dict[int, SharedPass]] = {}
        self.passes_adopted = 0

    def total_bytes(self) -> int:
        """What the run reads from the input files: the progress bar's total."""
        return sum(g.bytes_read() for g in self.groups)

    def run(self) -> SharedResult:
        for lane in self.lanes:
            lane.sink.commit_empty()
        threads = torch.get_num_threads()
        workers = None
        if threads > 1:
            workers = ThreadPoolExecutor(threads, thread_name_prefix="streammerge-compute")
            torch.set_num_threads(1)
            for lane in self.lanes:
                lane.runner.workers = workers
        self.lane_threads = [ThreadPoolExecutor(1, thread_name_prefix=f"streammerge-lane-{i}")
                             for i in range(len(self.lanes))]
        reader = threading.Thread(target=self._read_all, name="streammerge-reader", daemon=True)
        writers = [threading.Thread(target=write_all, name=f"streammerge-writer-{i}", daemon=True,
                                    args=(self.halt, lane.writes, lane.sink, lane.out_pool, lane.nonfinite))
                   for i, lane in enumerate(self.lanes)]
        reader.start()
        for w in writers:
            w.start()
        try:
            self._compute_loop()
            for lane in self.lanes:
                self.halt.put(lane.writes, DONE)
        except BaseException as e:
            self.halt.fail(e)
        finally:
            try:
                for w in writers:
                    w.join()
            finally:
                self.halt.stop.set()
                reader.join()
                for ex in self.lane_threads:
                    ex.shutdown(cancel_futures=True)
                if workers is not None:
                    workers.shutdown(cancel_futures=True)
                    torch.set_num_threads(threads)
        self.halt.raise_first()
        return SharedResult([lane.stats for lane in self.lanes], [lane.nonfinite for lane in self.lanes],
                            self.bytes_read, {g.name: g.rounds for g in self.groups if g.rounds > 1},
                            self.passes_adopted)

    def _read_all(self) -> None:
        try:
            with RowReader() as reader:
                for gi, g in enumerate(self.groups):
                    for rnd in range(g.rounds):
                        wanted = set(g.round_inputs(rnd))
                        for r0 in range(0, g.rows, g.rows_per_chunk):
                            r1 = min(g.rows, r0 + g.rows_per_chunk)
                            slot = self.stage.take_host_slot(self.halt)
                            t0 = time.perf_counter()
                            chunks, off, buf, nbytes = [], 0, self.pool.buffers[slot], 0
                            for j, s in enumerate(g.inputs):
                                n = (r1 - r0) * s.info.row_bytes
                                if j in wanted:
                                    chunks.append(reader.read_rows(s.info, r0, r1, out=buf[off:off + n]))
                                    nbytes += n
                                else:
                                    chunks.append(None)
                                off += aligned(n)
                            self._charge_read(g, time.perf_counter() - t0)
                            self.bytes_read += nbytes
                            self.halt.put(self.bands, _GroupBand(gi, rnd, r0, r1, chunks, slot, nbytes))
            self.halt.put(self.bands, DONE)
        except BaseException as e:
            self.halt.fail(e)

    def _charge_read(self, g: Group, seconds: float) -> None:
        """Read time goes to the first member's shard: the one the read is counted for."""
        m = g.members[0]
        self.lanes[m.output].stats[m.plan.shard].read_s += seconds

    def _compute_loop(self) -> None:
        """Hands each band to the lanes of its members and returns once every lane has run all of its
        bands. A band's slot goes back to the reader when its last member is done with it."""
        while True:
            band = self.halt.get(self.bands)
            if band is DONE:
                break
            self._dispatch(band)
        for f in self.pending:
            f.result()
        self.halt.raise_first()

    def _dispatch(self, band: _GroupBand) -> None:
        """Every member's passes of this round on the band, each in its output's lane thread. Each
        input's read is counted for the first member (in batch order) that uses it this round; for the
        others it is `bytes_shared`.

        One thread per output, not a barrier per band: an output waiting for its writer (its share of
        the disk) or on a serial step (a reduce's merge, a threshold search) leaves the block workers to
        the others, and a cheap output runs up to the reader's prefetch ahead of a costly one. Each lane
        runs its bands in order and owns its runner, states, output slots and writer."""
        g = self.groups[band.group]
        if band.round == 0 and band.r0 == 0:
            shares = plan_shares(g, [lane.spec for lane in self.lanes], [lane.out.plan.seed for lane in self.lanes])
            self.passes_adopted += adopted(shares)
            for m, mine in zip(g.members, shares):
                if mine:
                    self.shares[(m.output, m.tensor)] = mine
        owned: set[int] = set()
        work: list[tuple] = []
        for m in g.members:
            groups = pass_groups(m.plan)
            if band.round >= len(groups):
                continue
            shared_row = sum(g.inputs[j].info.row_bytes for j in m.picks if j in owned)
            owned.update(m.picks)
            work.append((m, groups, shared_row))
        left = [len(work)]
        lock = threading.Lock()

        def release() -> None:
            with lock:
                left[0] -= 1
                last = left[0] <= 0
            if last:
                trim_heap()   # as the single-output compute loop does after each band
                self.pool.free.put(band.slot)
                with self._progress_lock:
                    self.on_progress(band.nbytes)

        def run(*w) -> None:
            try:
                try:
                    self.halt.check()
                    self._member(band, *w)
                finally:
                    release()
            except BaseException as e:   # the progress callback's too (an interrupt)
                self.halt.fail(e)
                raise

        if not work:
            left[0] = 1
            release()
        done = [f for f in self.pending if f.done()]
        for f in done:
            f.result()
        self.pending = [f for f in self.pending if f not in done]
        self.pending += [self.lane_threads[w[0].output].submit(run, *w) for w in work]

    def _member(self, band: _GroupBand, m, groups: list[tuple[int, ...]], shared_row: int) -> None:
        lane, t = self.lanes[m.output], m.plan
        job, reduces = lane.job(m.tensor)
        stats = lane.stats[t.shard]
        two_d = len(t.shape) >= 2
        for a in range(band.r0, band.r1, t.rows_per_chunk):
            b = min(band.r1, a + t.rows_per_chunk)
            chunks = [band.chunks[j][a - band.r0:b - band.r0] if two_d else band.chunks[j] for j in m.picks]
            sub = Band(m.tensor, t.shard, groups[band.round], a, b, chunks, band.slot, band_bytes(t, b - a))
            stats.bytes_read += sub.nbytes
            stats.bytes_shared += (b - a) * shared_row
            t0, waited = time.perf_counter(), lane.runner.write_wait
            lane.runner.run_band(t, job, reduces, sub, lane.states, lane.tensor_stats[m.tensor],
                                 self.shares.get((m.output, m.tensor)))
            stats.compute_s += time.perf_counter() - t0 - (lane.runner.write_wait - waited)
        if band.r1 == t.rows and band.round == len(groups) - 1:
            lane.jobs.pop(m.tensor, None)
            lane.tensor_stats.pop(m.tensor, None)
            mine = self.shares.pop((m.output, m.tensor), None)
            stats.passes_adopted += sum(s.follows for s in mine.values()) if mine else 0
