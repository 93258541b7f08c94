"""Shared reads: the output tensors of several plans that read the same input bytes, grouped so that
each band of those inputs is read once and computed into every output that needs it.

A group is one output tensor name (and row count) across the batch's plans, with the union of its
members' inputs (an input is the same when it is the same bytes of the same file). The group's band
is its widest member's (`rows_per_chunk`); a member planned for narrower bands runs each group band
in sub-bands of its own size, so every member computes exactly the bands its own budget allows, and
one planned to read its tensor once (a band of all its rows) still does. A member whose passes need
several reads of its inputs (a reduce, then the map) runs one of them per *round*: the group reads
its inputs `rounds` times, the most any member needs, not the sum.

The memory of the whole: one pool of host slots for the widest group band of all inputs, plus each
output's own output slots and compute work space (`shared_peak`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..bands import aligned, empty, pass_groups
from ..plan import budget as budget_mod
from ..plan.ir import Plan, Source, TensorPlan


@dataclass(frozen=True)
class Member:
    """One output's tensor in a group: `picks[j]` is the group input that is the member's input j."""

    output: int
    tensor: int
    plan: TensorPlan
    picks: tuple[int, ...]

    def rounds(self) -> int:
        return len(pass_groups(self.plan))


@dataclass(frozen=True)
class Group:
    name: str
    rows: int
    rows_per_chunk: int
    inputs: tuple[Source, ...]
    members: tuple[Member, ...]

    @property
    def rounds(self) -> int:
        return max(m.rounds() for m in self.members)

    @property
    def row_bytes(self) -> int:
        return sum(s.info.row_bytes for s in self.inputs)

    def slot_bytes(self) -> int:
        return sum(aligned(self.rows_per_chunk * s.info.row_bytes) for s in self.inputs)

    def round_inputs(self, rnd: int) -> tuple[int, ...]:
        """The inputs some member uses in round `rnd`: the only ones read for it."""
        return tuple(sorted({j for m in self.members if m.rounds() > rnd for j in m.picks}))

    def bytes_read(self) -> int:
        """Input bytes this group reads from the files: each round, the inputs its members use."""
        return sum(self.rows * self.inputs[j].info.row_bytes for r in range(self.rounds) for j in self.round_inputs(r))


def _key(s: Source) -> tuple:
    return (str(Path(s.info.file).resolve()), s.info.begin, s.info.dtype, s.info.shape)


def group_tensors(plans: list[Plan], skips: list[frozenset[int]]) -> list[Group]:
    """The batch's tensors as groups, in the order the plans list them (first plan first), leaving out
    tensors of shards a resume keeps and tensors with no elements."""
    found: dict[tuple[str, int], list[Member]] = {}
    inputs: dict[tuple[str, int], list[Source]] = {}
    keys: dict[tuple[str, int], dict[tuple, int]] = {}
    for o, plan in enumerate(plans):
        for ti, t in enumerate(plan.tensors):
            if t.shard in skips[o] or empty(t):
                continue
            g = (t.name, t.rows)
            srcs, index = inputs.setdefault(g, []), keys.setdefault(g, {})
            picks = []
            for s in t.inputs:
                k = _key(s)
                if k not in index:
                    index[k] = len(srcs)
                    srcs.append(s)
                picks.append(index[k])
            found.setdefault(g, []).append(Member(o, ti, t, tuple(picks)))
    return [Group(name, rows, max(m.plan.rows_per_chunk for m in members), tuple(inputs[(name, rows)]),
                  tuple(members)) for (name, rows), members in found.items()]


def _own_input_cost(t: TensorPlan, prefetch: int) -> int:
    """The part of a tensor's planned bytes in flight that is its input bands (shared in a batch)."""
    return (prefetch + 1) * t.rows_per_chunk * sum(s.info.row_bytes for s in t.inputs)


def _non_input_cost(plan: Plan, prefetch: int, threads: int) -> int:
    """An output's own bytes in flight beyond its input bands: output slots and compute work space."""
    worst = 0
    for t in plan.tensors:
        if empty(t):
            continue
        infos = [s.info for s in t.inputs]
        blocked = plan.device == "cpu"
        flight = budget_mod.in_flight(t.rows_per_chunk, infos, t.row_elems, t.compute_dtype, t.out_dtype, prefetch,
                                      blocked)
        work = budget_mod.block_work(len(infos), t.compute_dtype, threads, plan.block_elems) if blocked else 0
        worst = max(worst, flight - _own_input_cost(t, prefetch) + work)
    return worst


def shared_peak(plans: list[Plan], groups: list[Group], prefetch: int, threads: int) -> int:
    """Resident bytes a shared run of `plans` may reach: the process (the largest baseline), the
    allocator's slack, the widest group band of every input (prefetch + 1 of them), and each output's
    own output bands and work space."""
    baseline = max(p.baseline_rss for p in plans)
    bands = max(((prefetch + 1) * g.slot_bytes() for g in groups), default=0)
    return baseline + budget_mod.ALLOCATOR_SLACK + bands + sum(_non_input_cost(p, prefetch, threads) for p in plans)


def alone_bytes(plans: list[Plan], skips: list[frozenset[int]]) -> int:
    """What the outputs would read run one after another: the sum of their plans' reads."""
    from ..plan.passes import reads

    return sum(reads(t) * t.bytes_in for o, p in enumerate(plans) for t in p.tensors if t.shard not in skips[o])
