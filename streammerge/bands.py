"""The reader side of a run: row bands read from the inputs into a fixed pool of host slots.

What is read, and how often, is the plan's: a tensor whose `read_once` is set is read once and all of
its passes run on that band; any other is read again, band by band, for every pass (a `folded` last
reduce shares the map's read). A tensor with no
elements ([0], [N, 0]) is never read: its header entry is all of it.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .io.reader import RowReader, TensorSource
from .pipeline import DONE, Halt, Pool
from .plan.ir import Plan, TensorPlan
from .report import ShardReport


@dataclass
class Band:
    tensor: int               # index into plan.tensors
    shard: int
    passes: tuple[int, ...]   # the tensor's passes this band runs (all of them when read once)
    r0: int
    r1: int
    chunks: list[torch.Tensor]
    slot: int                 # host slot (CPU: freed by the compute thread; CUDA: by the reader, once uploaded)
    nbytes: int
    dev_slot: int | None = None
    ready: object = None      # CUDA: the event that marks the upload into dev_slot done


def empty(t: TensorPlan) -> bool:
    """No elements: nothing to read, compute or write (however many rows a [2**62, 0] tensor claims)."""
    return t.bytes_out == 0


def band_bytes(t: TensorPlan, rows: int) -> int:
    return sum(rows * s.info.row_bytes for s in t.inputs)


def aligned(n: int) -> int:
    return (n + 63) // 64 * 64


def slot_bytes(t: TensorPlan) -> int:
    """A host slot holding one band of every input of `t`, each 64-byte aligned."""
    return sum(aligned(t.rows_per_chunk * s.info.row_bytes) for s in t.inputs)


def pass_groups(t: TensorPlan) -> list[tuple[int, ...]]:
    """The passes each reading of `t` runs: all at once when the plan reads it once, else one per read,
    the last reduce with the map when the plan folds it (`plan/passes.py`)."""
    if t.read_once:
        return [tuple(range(t.passes))]
    groups = [(p,) for p in range(t.passes)]
    return groups[:-2] + [(t.passes - 2, t.passes - 1)] if t.folded else groups


def read_band(reader: RowReader, t: TensorPlan, r0: int, r1: int, buf: torch.Tensor) -> list[torch.Tensor]:
    """Rows [r0, r1) of every input of `t`, laid out one after another (64-byte aligned) in `buf`."""
    chunks, off = [], 0
    for s in t.inputs:
        n = (r1 - r0) * s.info.row_bytes
        chunks.append(reader.read_rows(s.info, r0, r1, out=buf[off:off + n]))
        off += aligned(n)
    return chunks


def read_all(plan: Plan, skip: frozenset[int], pool: Pool, stage, halt: Halt, stats: list[ShardReport],
             bands: queue.Queue, sources: Mapping[Path, TensorSource] | None = None) -> None:
    """The reader thread: every band of every tensor to compute, in plan order, then `DONE`."""
    try:
        with RowReader(sources) as reader:
            for ti, t in enumerate(plan.tensors):
                if t.shard in skip or empty(t):
                    reader.done_with(s.info for s in t.inputs)
                    continue
                for passes in pass_groups(t):
                    for r0 in range(0, t.rows, t.rows_per_chunk):
                        r1 = min(t.rows, r0 + t.rows_per_chunk)
                        slot = stage.take_host_slot(halt)
                        t0 = time.perf_counter()
                        chunks = read_band(reader, t, r0, r1, pool.buffers[slot])
                        stats[t.shard].read_s += time.perf_counter() - t0
                        band = Band(ti, t.shard, passes, r0, r1, chunks, slot, band_bytes(t, r1 - r0))
                        stage.stage_in(band, halt)
                        halt.put(bands, band)
                reader.done_with(s.info for s in t.inputs)
        halt.put(bands, DONE)
    except BaseException as e:  # the first failure of any thread is the run's
        halt.fail(e)
