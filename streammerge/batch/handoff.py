"""A stage's output tensors handed to the one stage that reads it, in memory, never written.

The producing stage runs its plan as usual but its finished bands go to a `HandoffSink` instead of
shard files; each tensor is assembled in one buffer and published whole when its last band arrives.
The consuming stage's reader (`io.reader.RowReader` with `sources`) reads its rows from the published
buffer, waiting for it if need be, and lets go of it after the last of its tensors that reads it
(`done_with`), so what is held is bounded by how the two plans' tensor orders interleave
(`held_peak`), not by the model's size. The producer waits before starting a tensor that would take
the held bytes over `room`, unless the consumer is waiting for a tensor not yet published, so the two
can never wait for each other.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import StreammergeError
from ..io.header import ITEMSIZE
from ..plan.ir import Plan
from ..report import ShardReport

_POLL_S = 0.1


def tensor_bytes(plan: Plan) -> dict[str, int]:
    """Each output tensor of `plan` and its size as written."""
    out = {}
    for t in plan.tensors:
        n = ITEMSIZE[t.out_dtype]
        for d in t.shape:
            n *= d
        out[t.name] = n
    return out


def readers(consumer: Plan, files: Iterable[Path]) -> dict[str, int]:
    """For each tensor of `files`, how many of `consumer`'s tensors read it. `bands.read_all` reports each
    of its tensors done (`done_with`) in plan order, one it skips (a shard kept by --resume, no elements)
    too, so a tensor only a skipped one reads is let go of unread."""
    files = set(files)
    count: dict[str, int] = {}
    for t in consumer.tensors:
        for name in {s.info.name for s in t.inputs if s.info.file in files}:
            count[name] = count.get(name, 0) + 1
    return count


def held_peak(producer: Plan, consumer: Plan, files: Iterable[Path]) -> int:
    """The most bytes held at once when the producer makes its tensors in plan order only as fast as the
    consumer, reading in its plan order, needs them: the hand-off's `room`."""
    files, sizes = set(files), tensor_bytes(producer)
    left = readers(consumer, files)
    order = iter(t.name for t in producer.tensors)
    made: set[str] = set()
    held = peak = 0
    for t in consumer.tensors:
        names = {s.info.name for s in t.inputs if s.info.file in files}
        for name in names:
            while name not in made:
                made_name = next(order, None)
                if made_name is None:
                    raise StreammergeError(f"internal: the consumer reads {name!r}, which the producer never makes")
                made.add(made_name)
                held += sizes[made_name] if left.get(made_name) else 0
        peak = max(peak, held)
        for name in names:
            left[name] -= 1
            if not left[name]:
                held -= sizes[name]
    return peak


class Handoff:
    """The producer's finished tensors, held for the consumer's reads (`io.reader.TensorSource`)."""

    def __init__(self, stage: str, sizes: dict[str, int], readers: dict[str, int], room: int):
        self.stage = stage
        self.sizes = sizes
        self.left = {n: k for n, k in readers.items() if sizes.get(n)}   # a tensor of no bytes is never sent
        self.room = room
        self.cond = threading.Condition()
        self.partial: dict[str, list] = {}     # name -> [buffer, bytes filled]
        self.ready: dict[str, torch.Tensor] = {}
        self.held = 0
        self.peak = 0
        self.waiting = False                   # the consumer waits for a tensor not yet published
        self.error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        """Either side failed: the other's next wait raises."""
        with self.cond:
            if self.error is None:
                self.error = error
            self.cond.notify_all()

    def _raise(self) -> None:
        if self.error is not None:
            raise StreammergeError(f"stage {self.stage!r}, streamed into this one, stopped: {self.error}")

    def put(self, name: str, offset: int, data: torch.Tensor) -> None:
        """A band of the producer's tensor `name`, `offset` bytes into its data (the producer's writer thread)."""
        if not self.left.get(name):
            return                             # nothing of the consumer reads it
        with self.cond:
            if name not in self.partial:
                need = self.sizes[name]
                while self.held and self.held + need > self.room and not self.waiting:
                    self._raise()
                    self.cond.wait(_POLL_S)
                self._raise()
                self.partial[name] = [torch.empty(need, dtype=torch.uint8), 0]
                self.held += need
                self.peak = max(self.peak, self.held)
            entry = self.partial[name]
        raw = data.contiguous().view(torch.uint8).reshape(-1)
        entry[0][offset:offset + raw.numel()].copy_(raw)
        with self.cond:
            entry[1] += raw.numel()
            if entry[1] == self.sizes[name]:
                buf = self.partial.pop(name)[0]
                if self.left[name]:
                    self.ready[name] = buf
                else:                          # only skipped tensors read it, and they have passed
                    self.held -= self.sizes[name]
                self.cond.notify_all()

    def finish(self) -> None:
        """The producer's last band is in: every tensor the consumer reads must have been published."""
        with self.cond:
            missing = [n for n, k in self.left.items() if k and n not in self.ready]
            if missing:
                self.fail(StreammergeError(f"internal: the run ended without {len(missing)} tensor(s) the next "
                                           f"stage reads ({', '.join(missing[:3])})"))
                self._raise()

    def read(self, name: str, start: int, out: torch.Tensor) -> None:
        """Bytes [start, start + len(out)) of the producer's tensor `name` (the consumer's reader thread)."""
        with self.cond:
            while name not in self.ready:
                self._raise()
                self.waiting = True
                self.cond.notify_all()
                self.cond.wait(_POLL_S)
            self.waiting = False
            buf = self.ready[name]
        out.view(torch.uint8).reshape(-1).copy_(buf[start:start + out.numel() * out.element_size()])

    def done_with(self, name: str) -> None:
        """One more of the consumer's tensors has read all it reads of `name`."""
        with self.cond:
            if name not in self.left:
                return
            self.left[name] -= 1
            if not self.left[name] and self.ready.pop(name, None) is not None:
                self.held -= self.sizes[name]
                self.cond.notify_all()


class HandoffSink:
    """The producer's writer-thread side (in place of `sink.ShardSink`): bands into the hand-off."""

    def __init__(self, handoff: Handoff, stats: list[ShardReport]):
        self.handoff = handoff
        self.stats = stats

    def commit_empty(self) -> None:
        pass

    def write(self, shard: int, name: str, offset: int, data: torch.Tensor) -> int:
        self.handoff.put(name, offset, data)
        return data.numel() * data.element_size()

    def finish(self) -> None:
        self.handoff.finish()

    def abort(self) -> None:
        pass
