"""`batch --stream-intermediates`: a stage read by exactly one later stage is streamed straight into it,
never written, where the budget holds both at once.

The streamed stage (the producer) is planned in its wave as usual, then stands in for its output
with a folder under OUTDIR/.streammerge/streams/NAME: its config, tokenizer, index and shard headers,
the shards' data sparse (no blocks on disk) and never read. The reading stage (the consumer) is
planned against that folder in its own wave, so its checks, fingerprint and `--resume` work as for a
written input; the stand-in's mtime is taken from the producer's plan fingerprint, so an edited
producer changes the consumer's fingerprint as a rebuilt folder would. Then the two run at once: the
producer in a thread, its bands handed to the consumer in memory (`handoff.py`).

Where it does not fit (the producer's and consumer's peaks plus the tensors held between them over
--max-memory, even at an even share), or a side cannot stream (a whole-model sweep, a GPU or Ray run,
hub files not yet downloaded), the producer is written to OUTDIR/NAME as without the flag, and `check`
says why.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import MergeConfig
from ..errors import BudgetError
from ..io.outdir import MANIFEST_DIR
from ..io.reader import STREAM_STUBS
from ..options import RunOptions
from ..plan.ir import Plan
from .handoff import Handoff, HandoffSink, held_peak, readers, tensor_bytes
from .recipe import Stage


def single_consumers(stages: list[Stage]) -> dict[str, str]:
    """Each stage read by exactly one other stage, and that stage."""
    readers_of: dict[str, list[str]] = {}
    for s in stages:
        for n in s.needs:
            readers_of.setdefault(n, []).append(s.name)
    return {n: r[0] for n, r in readers_of.items() if len(r) == 1}


def stub_dir(outdir: Path, name: str) -> Path:
    return outdir / MANIFEST_DIR / STREAM_STUBS[0] / name


@dataclass(frozen=True)
class Deferred:
    """A producer planned, not run: its stand-in folder and what to run it from."""

    stage: Stage
    text: str
    config: MergeConfig
    plan: Plan
    stub: Path
    consumer: str

    def files(self) -> list[Path]:
        return [self.stub / sp.filename for sp in self.plan.shards]


def why_not(plan: Plan, options: RunOptions) -> str | None:
    """Why a stage with this plan cannot be either side of a stream, or None."""
    if options.device != "cpu":
        return f"runs on --device {options.device}"
    if options.backend != "local":
        return f"runs on --backend {options.backend}"
    if plan.model_sweeps:
        return "its method sweeps the whole model first (scope: model)"
    if plan.downloads:
        return "it reads hub files not downloaded yet"
    return None


def defer(recipe: Path, stage: Stage, text: str, plan: Plan, consumer: str, outdir: Path,
          options: RunOptions) -> Deferred | str:
    """The producer's stand-in folder, written now; or why the stage is written instead."""
    from .. import merge
    from ..config import load_config_text

    reason = why_not(plan, options)
    if reason is None and not all(sp.header for sp in plan.shards):
        reason = "its shard layout is not planned ahead"
    if reason is not None:
        return reason
    config = load_config_text(text, f"{recipe}: {stage.name}")
    stub = stub_dir(outdir, stage.name)
    write_stub(stub, plan, config, text, options, merge.plan_fingerprint(plan, config))
    return Deferred(stage, text, config, plan, stub, consumer)


def write_stub(stub: Path, plan: Plan, config: MergeConfig, text: str, options: RunOptions, fingerprint: str) -> None:
    """Every file of the producer's output folder but the shards' data: what its consumer plans from."""
    from .. import merge

    if stub.exists():
        shutil.rmtree(stub)
    stub.mkdir(parents=True)
    merge.finish_folder(stub, plan, config, text, dataclasses.replace(options, fsync=False, write_model_card=False))
    sizes = tensor_bytes(plan)
    stamp = int(fingerprint[:12], 16)            # deterministic: the consumer's fingerprint follows the producer's
    for sp in plan.shards:
        raw = sp.header.encode("utf-8")
        with open(stub / sp.filename, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + sum(sizes[n] for n in sp.tensors))
        os.utime(stub / sp.filename, ns=(stamp, stamp))


@dataclass(frozen=True)
class Streamed:
    """A producer and its consumer, planned to run at once."""

    deferred: Deferred
    producer_plan: Plan
    consumer_plan: Plan
    consumer_options: RunOptions
    room: int                # the most bytes of the producer's tensors held for the consumer at once
    need: int                # both runs' peak, with `room`

    def describe(self) -> str:
        return (f"stream into {self.deferred.consumer} (not written): holds up to {self.room / 2**20:.0f} MiB of "
                f"its tensors, both runs {self.need / 2**30:.2f} GiB of --max-memory")


def fit(recipe: Path, d: Deferred, consumer_text: str, consumer_plan: Plan, options: RunOptions) -> Streamed | str:
    """Both sides at once within the budget (each at its own plan, or each at an even share), or why not."""
    from .. import merge

    reason = why_not(consumer_plan, options)
    if reason is not None:
        return f"{d.consumer} {reason}"
    room = held_peak(d.plan, consumer_plan, d.files())
    budget = options.budget()

    def need(a: Plan, b: Plan) -> int:  # one process: its baseline counted once
        return a.peak_estimate - a.baseline_rss + b.peak_estimate + room

    if need(d.plan, consumer_plan) <= budget:
        return Streamed(d, d.plan, consumer_plan, options, room, need(d.plan, consumer_plan))
    base = max(d.plan.baseline_rss, consumer_plan.baseline_rss)
    share = base + (budget - base - room) // 2
    if share > base:
        narrow = dataclasses.replace(options, max_memory=share)
        try:
            a = merge.check(recipe, narrow, config_text=d.text)
            b = merge.check(recipe, narrow, config_text=consumer_text)
        except BudgetError:
            a = b = None
        if a is not None and b is not None and need(a, b) <= budget:
            return Streamed(d, a, b, narrow, room, need(a, b))
    return (f"streaming it into {d.consumer} needs {need(d.plan, consumer_plan) / 2**30:.2f} GiB (it holds up to "
            f"{room / 2**20:.0f} MiB of its tensors), over --max-memory {budget / 2**30:.2f} GiB; written instead")


@dataclass
class StreamStats:
    seconds: float
    bytes_read: int
    held_peak: int


def run_streamed(s: Streamed, run_consumer: Callable[[RunOptions, Mapping[Path, Any]], Any],
                 options: RunOptions) -> tuple[Any, StreamStats]:
    """The producer in a thread, its tensors handed to `run_consumer(options, sources)` in memory; returns
    the consumer's report and the producer's figures. A failure on either side stops both."""
    import torch

    from ..execute import Executor
    from ..pipeline import bound_malloc

    d = s.deferred
    files = d.files()
    handoff = Handoff(d.stage.name, tensor_bytes(s.producer_plan), readers(s.consumer_plan, files), s.room)
    bound_malloc()
    executor = Executor(s.producer_plan, out_dir=d.stub, device=torch.device("cpu"), prefetch=options.prefetch,
                        check_nonfinite=options.check_nonfinite, sink=lambda stats: HandoffSink(handoff, stats))
    box: dict[str, Any] = {}

    def produce() -> None:
        t0 = time.perf_counter()
        try:
            box["result"] = executor.run()
        except BaseException as e:  # noqa: BLE001  the consumer's next read raises it
            box["error"] = e
            handoff.fail(e)
        box["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=produce, name=f"streammerge-stream-{d.stage.name}", daemon=True)
    thread.start()
    try:
        report = run_consumer(s.consumer_options, {f: handoff for f in files})
    except BaseException as e:
        handoff.fail(e)
        executor.halt.fail(e)
        raise
    finally:
        thread.join()
    if "error" in box:
        raise box["error"]
    shards = box["result"].shards
    return report, StreamStats(box["seconds"], sum(x.bytes_read for x in shards), handoff.peak)


class Flow:
    """Which stages of a recipe stream into which (with `stream`), and the folder each later stage reads
    an earlier one from: OUTDIR/NAME, or a deferred producer's stand-in."""

    def __init__(self, recipe: Path, stages: list[Stage], outdir: Path, options: RunOptions, stream: bool):
        self.recipe, self.outdir, self.options = recipe, outdir, options
        self.paths = {s.name: outdir / s.name for s in stages}
        self.candidates = single_consumers(stages) if stream else {}
        self.deferred: dict[str, Deferred] = {}
        self.notes: dict[str, str] = {}         # producer name -> why it is written, or how it streams

    def defer(self, stage: Stage, text: str, plan: Plan) -> bool:
        """Plan `stage` to stream into its one reader instead of running now (True), where it can."""
        consumer = self.candidates.get(stage.name)
        if consumer is None:
            return False
        out = self.outdir / stage.name
        if any(n in self.deferred for n in stage.needs):
            self.notes[stage.name] = "written: it reads a streamed stage"
            return False
        if out.is_dir() and any(out.iterdir()):
            self.notes[stage.name] = f"written: {out} holds an earlier output, rebuilt in place"
            return False
        d = defer(self.recipe, stage, text, plan, consumer, self.outdir, self.options)
        if isinstance(d, str):
            self.notes[stage.name] = f"written: {d}"
            return False
        self.deferred[stage.name] = d
        self.paths[stage.name] = d.stub
        return True

    def producers_of(self, stage: Stage) -> list[Deferred]:
        return [self.deferred[n] for n in stage.needs if n in self.deferred]

    def undefer(self, d: Deferred, why: str, write: Callable[[Deferred], None]) -> None:
        """`d` written after all (by `write`), to OUTDIR/NAME, which its reader then reads."""
        self.notes[d.stage.name] = f"written: {why}"
        write(d)
        self.paths[d.stage.name] = self.outdir / d.stage.name
        del self.deferred[d.stage.name]

    def stream_into(self, stage: Stage, replan: Callable[[], tuple[str, Plan | None]],
                    write: Callable[[Deferred], None]) -> tuple[Streamed | None, str, Plan | None]:
        """The one producer that streams into `stage` (or None) and `stage`'s config text and plan as it
        will run. A stage reading several deferred producers streams the first; the others are written
        first (by `write`), then the stage is planned against what it will read."""
        producers = self.producers_of(stage)
        for d in producers[1:]:
            self.undefer(d, f"{stage.name} streams {producers[0].stage.name} in", write)
        text, plan = replan()
        if not producers:
            return None, text, plan
        if plan is None:                       # `check`: the stages written first are not there to plan from
            self.notes[producers[0].stage.name] = (f"stream into {stage.name} where it fits (checked once "
                                                   f"{', '.join(d.stage.name for d in producers[1:])} are written)")
            return None, text, plan
        got = fit(self.recipe, producers[0], text, plan, self.options)
        if isinstance(got, Streamed):
            self.notes[producers[0].stage.name] = got.describe()
            return got, text, plan
        self.undefer(producers[0], got, write)
        text, plan = replan()
        return None, text, plan
