"""Reduce passes computed once for several outputs of a shared run.

Outputs of a sweep often run the same reduce pass over the same inputs: TIES at densities 0.3 and 0.7
count the same |δ| histogram and differ only in the thresholds they read from it. A pass whose method
gives it a share key (`Reduce.share`) is computed by the first member of its group (batch order) with
that key, over the same inputs in the same order and in the same read of them; every later member
adopts its state (`Reduce.adopt`) and runs its own `finish`. A member waits only on an earlier one, so
the waits cannot form a cycle, and the computing member never waits for its followers.
"""

from __future__ import annotations

import threading
from typing import Any

from ..bands import pass_groups
from ..methods import MethodSpec, TensorJob
from ..pipeline import Halt
from ..runner import resolve_reduces
from .groups import Group


class SharedPass:
    """The computed state of one pass, handed from the member that computes it to those that adopt it."""

    def __init__(self, follows: bool, slot: "_Slot"):
        self.follows = follows
        self._slot = slot

    def publish(self, state: Any) -> None:
        self._slot.state = state
        self._slot.ready.set()

    def wait(self, halt: Halt) -> Any:
        while not self._slot.ready.wait(0.05):
            halt.check()   # the computing output failed: stop rather than wait forever
        return self._slot.state


class _Slot:
    def __init__(self) -> None:
        self.ready = threading.Event()
        self.state: Any = None


def plan_shares(group: Group, specs: list[MethodSpec], seed_of: list[int]) -> list[dict[int, SharedPass]]:
    """Per member of `group`: the passes it computes for later members or adopts from an earlier one,
    by pass index (empty where it shares none)."""
    found: dict[tuple, _Slot] = {}
    out: list[dict[int, SharedPass]] = []
    for m in group.members:
        t = m.plan
        spec = specs[m.output]
        job = TensorJob.from_plan(t, seed_of[m.output])
        reduces = resolve_reduces(spec, job, t)
        rounds = pass_groups(t)
        folded_last = len(reduces) - 1 if t.folded and not t.read_once else None
        mine: dict[int, SharedPass] = {}
        for p, red in enumerate(reduces):
            if red.share is None or red.adopt is None or p == folded_last:
                continue
            key = red.share(job)
            if key is None:
                continue
            rnd = next(r for r, grp in enumerate(rounds) if p in grp)
            full = (red.name, p, rnd, m.picks, key)
            if full in found:
                mine[p] = SharedPass(True, found[full])
            else:
                found[full] = _Slot()
                mine[p] = SharedPass(False, found[full])
        out.append(mine)
    leaders = {id(s._slot) for mine in out for s in mine.values() if s.follows}
    return [{p: s for p, s in mine.items() if s.follows or id(s._slot) in leaders} for mine in out]


def adopted(shares: list[dict[int, SharedPass]]) -> int:
    """How many member passes adopt a computed state instead of computing their own."""
    return sum(s.follows for mine in shares for s in mine.values())
