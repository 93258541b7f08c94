"""A wave of a batch: the stages ready to build at once (their inputs all exist) that read the same
input files, merged in one shared-read run (`shared.py`), each into its own folder with its own
manifest, commit order and report, exactly as `merge.run` would write it alone.

The budget covers the whole wave: each output is planned at the full budget first; if the shared run
(one pool of input bands, every output's own output bands and work space) would not fit, each is
planned again at an even share of what is above the process's baseline; if even that does not fit,
the wave must be split, and the error says how.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import MergeConfig, load_config_text
from ..errors import BudgetError
from ..options import RunOptions
from ..plan.ir import Plan
from ..report import RunReport, peak_rss_bytes
from .groups import alone_bytes, group_tensors, shared_peak


@dataclass
class WaveItem:
    """One stage of a wave: its name, config text as run, output folder and run options."""

    name: str
    text: str
    out: Path
    options: RunOptions


@dataclass
class WavePlan:
    items: list[WaveItem]
    configs: list[MergeConfig]
    plans: list[Plan]
    peak: int              # resident bytes the shared run may reach
    split: bool            # planned at a share of the budget, not the whole of it

    def bytes_in(self) -> int:
        """Input bytes the shared run reads (each shared band once)."""
        return sum(g.bytes_read() for g in group_tensors(self.plans, [frozenset()] * len(self.plans)))

    def bytes_alone(self) -> int:
        """Input bytes the stages would read run one after another."""
        return alone_bytes(self.plans, [frozenset()] * len(self.plans))


@dataclass(frozen=True)
class WaveStart:
    """What a progress bar needs at the start of a wave (duck-typed as a plan by `merge_progress`)."""

    method: str
    bytes_in: int
    warnings: tuple[str, ...]


def shareable(plan: Plan, options: RunOptions) -> bool:
    """Whether a stage may join a shared-read run: a local CPU run of a plan whose inputs are files here
    and whose passes are per tensor (a whole-model sweep, e.g. model-wide TIES, runs alone)."""
    return (options.backend == "local" and options.device == "cpu" and not plan.downloads
            and not plan.model_sweeps)


def input_files(plan: Plan) -> set[str]:
    return {str(s.info.file.resolve()) for t in plan.tensors for s in t.inputs}


def plan_wave(recipe: Path, items: list[WaveItem], budget: int, prefetch: int) -> WavePlan:
    """Plan every item for one shared run under `budget`, narrowing bands as the wave needs; a
    BudgetError says to raise --max-memory or split the batch when even an even share does not fit."""
    from ..plan.build import build_plan, compute_threads

    configs = [load_config_text(i.text, f"{recipe}: {i.name}") for i in items]

    def at(share: int | None) -> list[Plan]:
        return [build_plan(c, recipe, i.options if share is None else dataclasses.replace(i.options, max_memory=share))
                for c, i in zip(configs, items)]

    def peak(plans: list[Plan]) -> int:
        return shared_peak(plans, group_tensors(plans, [frozenset()] * len(plans)), prefetch, compute_threads())

    plans = at(None)
    need = peak(plans)
    if need <= budget:
        return WavePlan(items, configs, plans, need, False)
    baseline = max(p.baseline_rss for p in plans)
    share = baseline + (budget - baseline) // len(items)
    try:
        narrow = at(share)
    except BudgetError:
        narrow = None
    if narrow is not None and (need := peak(narrow)) <= budget:
        return WavePlan(items, configs, narrow, need, True)
    raise BudgetError(f"batch: stages {', '.join(i.name for i in items)} share their input reads, but "
                      f"--max-memory {budget / 2**30:.2f} GiB cannot hold all of them at once (needs "
                      f"{need / 2**30:.2f} GiB); raise --max-memory, split the recipe into smaller batches, or run "
                      "with --no-shared-reads (each stage reads its inputs itself)")


def run_wave(recipe: Path, wave: WavePlan, on_start: Callable[[WaveStart], None] | None = None,
             on_progress: Callable[[int], None] | None = None) -> tuple[list[RunReport], int]:
    """Merge a planned wave; returns each item's report and the input bytes read from the files."""
    from .. import merge
    from ..kernels import dispatch
    from ..pipeline import bound_malloc
    from .shared import Output, SharedExecutor

    t0 = time.perf_counter()
    locks, outputs, plans = [], [], []
    try:
        for item, config, plan in zip(wave.items, wave.configs, wave.plans):
            fingerprint = merge.plan_fingerprint(plan, config)
            locks.append(merge.prepare_out_dir(item.out, plan, item.options, fingerprint, recipe))
            plan, skip, shard_done = merge.start_manifest(item.out, plan, fingerprint, item.options)
            plans.append(plan)
            outputs.append(Output(plan, item.out, skip, shard_done))
        dispatch.reset()
        bound_malloc()  # before the run's threads start
        first = wave.items[0].options
        executor = SharedExecutor(outputs, prefetch=first.prefetch, check_nonfinite=first.check_nonfinite,
                                  durable=first.fsync, on_progress=on_progress)
        if on_start:
            on_start(WaveStart(f"{len(outputs)} outputs, shared reads", executor.total_bytes(),
                               tuple(f"{i.name}: {w}" for i, p in zip(wave.items, plans) for w in p.warnings)))
        result = executor.run()
        used = dispatch.used()
        reports = []
        for item, config, plan, shards, nonfinite in zip(wave.items, wave.configs, plans, result.shards,
                                                         result.nonfinite):
            merge.finish_folder(item.out, plan, config, item.text, item.options)
            reports.append(RunReport(method=plan.method, out_dir=str(item.out), seconds=time.perf_counter() - t0,
                                     peak_rss=peak_rss_bytes(), budget=plan.budget, device="cpu", shards=shards,
                                     nonfinite_tensors=nonfinite, warnings=list(plan.warnings), kernels=used))
        return reports, result.bytes_read
    finally:
        for lock in locks:
            lock.release()
