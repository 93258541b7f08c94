"""The writer thread's side of a run: every planned shard opened on its first bytes, committed exactly
once when its last byte is written, never looked up again.

A zero-byte band (a tensor of shape [0] or [N, 0]) writes nothing, so it touches no shard: a shard of
only such tensors is committed before the run starts, from its planned header. (The empty band of a
tensor that sorted last in its shard used to reopen the finished shard's `.partial` and commit it
again: every real tensor of that shard came out zero.)
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import StreammergeError
from .io.writer import OutTensor, ShardWriter
from .pipeline import DONE, Halt, Pool
from .report import ShardReport

if TYPE_CHECKING:
    import torch

    from .plan.ir import Plan
    from .transfer import Fence


@dataclass(frozen=True)
class WriteItem:
    """A finished band on its way to the writer thread: `data` is written at `offset` bytes into tensor
    `name`'s data in shard `shard`; `out_slot` goes back to the output pool after; `fence` (CUDA) is
    waited for first and says whether the values are all finite."""

    shard: int
    name: str
    offset: int
    data: torch.Tensor
    out_slot: int | None = None
    fence: Fence | None = None


class ShardSink:
    """Routes finished bands into their shards; used by the writer thread only."""

    def __init__(self, plan: Plan, out_dir: Path, stats: list[ShardReport], durable: bool, skip: frozenset[int],
                 on_shard_done: Callable[[int, ShardReport], None]):
        self.plan = plan
        self.out_dir = out_dir
        self.stats = stats
        self.durable = durable
        self.skip = skip
        self.on_shard_done = on_shard_done
        self.writers: dict[int, ShardWriter] = {}
        self.remaining = {i: s.nbytes for i, s in enumerate(plan.shards)}
        self.committed: set[int] = set()
        self._tensors = {t.name: t for t in plan.tensors}

    def _open(self, shard: int) -> ShardWriter:
        sp = self.plan.shards[shard]
        outs = [OutTensor(n, self._tensors[n].out_dtype, self._tensors[n].shape) for n in sp.tensors]
        layout = (sp.header, sp.offsets) if sp.header else None  # the plan's layout, as the planner fixed it
        w = self.writers[shard] = ShardWriter(self.out_dir / sp.filename, outs, {"format": "pt"}, self.durable,
                                              layout=layout)
        return w

    def commit_empty(self) -> None:
        """Commit the shards that hold no data bytes (no tensors, or zero-size ones only): no band will."""
        for i, sp in enumerate(self.plan.shards):
            if sp.nbytes == 0 and i not in self.skip:
                self.stats[i].started = time.perf_counter()
                self._open(i)
                self._commit(i)
                self.on_shard_done(i, self.stats[i])

    def write(self, shard: int, name: str, offset: int, data: torch.Tensor) -> int:
        """Write a band of tensor `name` at `offset` bytes into its data; commits the shard with its last byte."""
        nbytes = data.numel() * data.element_size()
        if nbytes == 0:
            return 0
        filename = self.plan.shards[shard].filename
        if shard in self.committed or shard in self.skip:
            raise StreammergeError(f"internal: {nbytes} bytes of {name!r} arrived for {filename}, which is "
                                   "already committed; nothing was written over it")
        if nbytes > self.remaining[shard]:
            raise StreammergeError(f"internal: {nbytes} bytes of {name!r} arrived for {filename}, which has "
                                   f"{self.remaining[shard]} bytes left to write")
        t0 = time.perf_counter()
        w = self.writers.get(shard) or self._open(shard)
        n = w.write(name, offset, data)
        st = self.stats[shard]
        st.bytes_written += n
        self.remaining[shard] -= n
        if self.remaining[shard] == 0:
            self._commit(shard)
        st.write_s += time.perf_counter() - t0
        if self.remaining[shard] == 0:
            self.on_shard_done(shard, st)
        return n

    def _commit(self, shard: int) -> None:
        """Commit once; the checksum is set before `on_shard_done` sees the stats."""
        w = self.writers.pop(shard)
        w.commit()
        self.committed.add(shard)
        st = self.stats[shard]
        st.checksum = w.digest.hexdigest() if w.digest is not None else ""
        st.finished = time.perf_counter()

    def finish(self) -> None:
        """After the last band: every shard of the run must be committed (a missing one is a bug, never a
        silently short output)."""
        missing = [sp.filename for i, sp in enumerate(self.plan.shards) if i not in self.committed and i not in self.skip]
        if missing:
            raise StreammergeError(f"internal: the run ended with {len(missing)} shard(s) not fully written "
                                   f"({', '.join(missing[:3])}); their .partial files were removed")

    def abort(self) -> None:
        """Close and remove every shard still being written (their bytes are incomplete)."""
        for w in self.writers.values():
            w.abort()
        self.writers.clear()


def write_all(halt: Halt, items: queue.Queue, sink: ShardSink, out_pool: Pool, nonfinite: list[str]) -> None:
    """The writer thread: `WriteItem`s until `DONE`, then every shard must be committed. Its failure (a
    full disk among them) stops the reader and the compute too."""
    try:
        while True:
            item = halt.get(items)
            if item is DONE:
                break
            if item.fence is not None and not item.fence.wait() and item.name not in nonfinite:
                nonfinite.append(item.name)
            sink.write(item.shard, item.name, item.offset, item.data)
            if item.out_slot is not None:
                out_pool.free.put(item.out_slot)
        sink.finish()
    except BaseException as e:
        halt.fail(e)
    finally:
        sink.abort()
