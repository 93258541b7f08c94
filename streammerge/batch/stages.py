"""Running a recipe's stages in order, each reused, resumed or built.

A stage's key is the plan fingerprint `run` already records in OUT/.streammerge/manifest.json: a hash
of the config as run, the output layout, the seed and every input file's size and mtime. So an edited
stage gets a new key and is rebuilt; a stage reading a rebuilt one sees new input files and is rebuilt
too; an unchanged stage over unchanged inputs is reused (mergekit-multi reuses any folder that has a
config.json, however stale). A stage interrupted mid-run is continued with `--resume`'s checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from ..config import load_config_text
from ..io.outdir import manifest_path
from ..options import RunOptions
from ..plan.ir import Plan
from .recipe import MODEL_KEYS, Stage
from .stream import Flow, stub_dir


@dataclass
class StageResult:
    name: str
    out: str
    status: str                     # built | reused | resumed | streamed | unneeded (its reader was reused)
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    peak_rss: int = 0
    needs: tuple[str, ...] = ()
    bytes_shared: int = 0                 # of bytes_read, read once for an earlier stage of its wave
    passes_adopted: int = 0               # tensor passes an earlier stage of its wave computed for it
    shared_with: tuple[str, ...] = ()     # the stages it was built with in one shared-read run
    wave_bytes_read: int = 0              # that run's input bytes read from the files ...
    wave_bytes_alone: int = 0             # ... and what its stages would read one after another
    shards: list[dict] = dataclasses.field(default_factory=list)   # its run report's, per shard
    streamed_into: str = ""               # streamed: the stage its tensors went to, in memory
    held_peak: int = 0                    # streamed: the most bytes of its tensors held at once

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["gb_per_s"] = self.bytes_read / self.seconds / 1e9 if self.seconds and self.bytes_read else 0.0
        return d


def stage_text(stage: Stage, outputs: dict[str, Path]) -> str:
    """The stage's config as run: earlier stages' names replaced by their output folders (its `name:`
    stays, so the output folder's mergekit_config.yml says which stage it is)."""

    def walk(node: Any, key: str | None) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, key) for v in node]
        if isinstance(node, str) and key in MODEL_KEYS:
            name = node.partition("@")[0]
            if name in stage.needs:
                return str(outputs[name].resolve())
        return node

    return yaml.safe_dump(walk(stage.doc, None), sort_keys=False)


def finished(out: Path, plan: Plan, fingerprint: str) -> bool | None:
    """True: a complete output of this very plan; False: a partial one of it (resumable); None: anything
    else (no folder, another plan's, or not ours)."""
    try:
        doc = json.loads(manifest_path(out).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("fingerprint") != fingerprint or not isinstance(doc.get("shards"), dict):
        return None
    for s in plan.shards:
        rec, f = doc["shards"].get(s.filename), out / s.filename
        if not isinstance(rec, dict) or not f.is_file() or f.stat().st_size != rec.get("size"):
            return False
    if len(plan.shards) > 1 and not (out / "model.safetensors.index.json").is_file():
        return False
    return not (plan.out_config is not None and not (out / "config.json").is_file())


def _planned(recipe: Path, stage: Stage, outputs: dict[str, Path], options: RunOptions
             ) -> tuple[str, Plan, bool | None]:
    """The stage's config text as run, its plan now, and `finished` of its folder for that plan."""
    from .. import merge

    text = stage_text(stage, outputs)
    plan = merge.check(recipe, options, config_text=text)
    fingerprint = merge.plan_fingerprint(plan, load_config_text(text, f"{recipe}: {stage.name}"))
    return text, plan, finished(outputs[stage.name], plan, fingerprint)


def clusters(plans: list[Plan], can_share: list[bool]) -> list[list[int]]:
    """Indices of `plans` in groups that read at least one input file in common (transitively): each
    group of two or more (of those `can_share`) runs with shared reads, the rest alone."""
    from .wave import input_files

    parent = list(range(len(plans)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, plan in enumerate(plans):
        if not can_share[i]:
            continue
        for f in input_files(plan):
            if f in owner:
                parent[root(i)] = root(owner[f])
            else:
                owner[f] = i
    found: dict[int, list[int]] = {}
    for i in range(len(plans)):
        found.setdefault(root(i), []).append(i)
    return list(found.values())


def _waves(stages: list[Stage]) -> list[list[Stage]]:
    """The stages in waves: each wave's stages read only stages of earlier waves."""
    done: set[str] = set()
    waves, left = [], list(stages)
    while left:
        ready = [s for s in left if all(n in done for n in s.needs)]
        waves.append(ready)
        done.update(s.name for s in ready)
        left = [s for s in left if s.name not in done]
    return waves


def run_stages(recipe: Path, stages: list[Stage], outdir: Path, options: RunOptions,
               on_stage: Callable[[Stage, str], None] = lambda s, status: None,
               run: Callable[..., Any] | None = None, *, shared: bool = True,
               run_shared: Callable[..., Any] | None = None, stream: bool = False) -> list[StageResult]:
    """Every stage into OUTDIR/NAME, wave by wave; returns what happened to each, in recipe order.
    Stages of a wave that read the same input files are built in one shared-read run (`wave.py`)
    unless `shared` is False; with `stream`, a stage read by one later stage only is streamed into it
    where the budget allows (`stream.py`). `run(recipe, out, options, config_text=..., sources=...)`
    merges one stage alone (default: `merge.run`) and `run_shared(recipe, wave_plan)` a shared wave
    (default: `wave.run_wave`); the CLI passes both with a progress bar. With `options.overwrite`
    every stage is rebuilt."""
    from .. import merge
    from .wave import WaveItem, plan_wave, run_wave, shareable

    run = run or merge.run
    run_shared = run_shared or run_wave
    outputs = {s.name: outdir / s.name for s in stages}
    flow = Flow(recipe, stages, outdir, options, stream)
    results: dict[str, StageResult] = {}

    def build_alone(stage: Stage, text: str, run_opts: RunOptions, status: str) -> None:
        on_stage(stage, status)
        t0 = time.perf_counter()
        report = run(recipe, outputs[stage.name], run_opts, config_text=text)
        results[stage.name] = _result(stage, status, time.perf_counter() - t0, report)

    for wave in _waves(stages):
        todo = []
        for stage in wave:
            out = outputs[stage.name]
            text, plan, state = _planned(recipe, stage, flow.paths, options)
            state = None if options.overwrite else state
            if state is True:
                on_stage(stage, "reused")
                results[stage.name] = StageResult(stage.name, str(out), "reused", needs=stage.needs)
                for d in flow.producers_of(stage):
                    on_stage(d.stage, "unneeded")
                    results[d.stage.name] = StageResult(d.stage.name, "", "unneeded", needs=d.stage.needs)
                continue
            run_opts = dataclasses.replace(options, resume=state is False,
                                           overwrite=state is None and out.is_dir() and any(out.iterdir()))
            status = "resumed" if state is False else "built"
            if state is None and flow.defer(stage, text, plan):
                continue
            if flow.producers_of(stage):
                streamed, text, plan = flow.stream_into(
                    stage, lambda st=stage: _planned(recipe, st, flow.paths, options)[:2],
                    lambda d: build_alone(d.stage, d.text, options, "built"))
            else:
                streamed = None
            todo.append((stage, text, plan, run_opts, status, streamed))
        can = [shared and t[5] is None and shareable(t[2], t[3]) for t in todo]
        for group in clusters([t[2] for t in todo], can):
            if len(group) == 1 and todo[group[0]][5] is not None:
                stage, text, _, run_opts, status, streamed = todo[group[0]]
                _run_streamed(recipe, stage, text, run_opts, status, streamed, run, outputs, on_stage, results)
                continue
            if len(group) == 1:
                build_alone(*(todo[group[0]][i] for i in (0, 1, 3, 4)))
                continue
            items = [WaveItem(todo[i][0].name, todo[i][1], outputs[todo[i][0].name], todo[i][3]) for i in group]
            planned = plan_wave(recipe, items, options.budget(), options.prefetch)
            names = tuple(it.name for it in items)
            for i in group:
                on_stage(todo[i][0], f"{todo[i][4]}+shared")
            t0 = time.perf_counter()
            reports, disk = run_shared(recipe, planned)
            seconds = time.perf_counter() - t0
            alone = planned.bytes_alone()
            for i, report in zip(group, reports):
                stage, status = todo[i][0], todo[i][4]
                res = _result(stage, status, seconds, report)
                res.shared_with = tuple(n for n in names if n != stage.name)
                res.wave_bytes_read, res.wave_bytes_alone = disk, alone
                results[stage.name] = res
    return [results[s.name] for s in stages]


def _run_streamed(recipe: Path, stage: Stage, text: str, run_opts: RunOptions, status: str, streamed,
                  run: Callable[..., Any], outputs: dict[str, Path], on_stage, results: dict) -> None:
    """A consumer and the producer streamed into it, at once."""
    from .stream import run_streamed

    producer = streamed.deferred.stage
    on_stage(producer, "streamed")
    on_stage(stage, status)
    t0 = time.perf_counter()
    opts = dataclasses.replace(run_opts, max_memory=streamed.consumer_options.max_memory)
    report, stats = run_streamed(streamed, lambda o, sources: run(recipe, outputs[stage.name], opts,
                                                                  config_text=text, sources=sources), run_opts)
    results[stage.name] = _result(stage, status, time.perf_counter() - t0, report)
    results[producer.name] = StageResult(producer.name, "", "streamed", stats.seconds, stats.bytes_read,
                                         needs=producer.needs, streamed_into=stage.name, held_peak=stats.held_peak)


def _result(stage: Stage, status: str, seconds: float, report) -> StageResult:
    j = report.to_json()
    shared = sum(s.bytes_shared for s in report.shards)
    return StageResult(stage.name, str(Path(report.out_dir)), status, seconds, j["bytes_read"], j["bytes_written"],
                       report.peak_rss, stage.needs, bytes_shared=shared,
                       passes_adopted=sum(s.passes_adopted for s in report.shards), shards=j["shards"])


def check_stages(recipe: Path, stages: list[Stage], outdir: Path, options: RunOptions,
                 shared: bool = True, stream: bool = False) -> list[tuple[Stage, str]]:
    """Each stage's state without running anything: reuse / resume / build, or why it cannot be checked
    yet (it reads a stage not built), which stages it would share its reads with, and (with `stream`)
    which stages would stream into their reader and why the others would be written. A stage whose
    inputs exist is planned, so its mistakes show now. The stand-in folders planned against are removed
    after unless a run left them."""
    from .wave import shareable

    flow = Flow(recipe, stages, outdir, options, stream)
    kept = {d for d in (stub_dir(outdir, s.name) for s in stages) if d.exists()}
    rows: dict[str, str] = {}

    def pending(stage: Stage) -> list[str]:
        return [n for n in stage.needs if n not in flow.deferred and not (flow.paths[n] / "config.json").is_file()]

    def replan(stage: Stage) -> tuple[str, Plan | None]:
        return ("", None) if pending(stage) else _planned(recipe, stage, flow.paths, options)[:2]

    try:
        for wave in _waves(stages):
            ready = []
            for stage in wave:
                if pending(stage):
                    rows[stage.name] = f"build (after {', '.join(pending(stage))}; checked then)"
                    continue
                text, plan, state = _planned(recipe, stage, flow.paths, options)
                state = None if options.overwrite else state
                rows[stage.name] = {True: "reuse (unchanged)", False: "resume"}.get(state, "build")
                if state is True:
                    for d in flow.producers_of(stage):
                        flow.notes[d.stage.name] = f"not needed: {stage.name} is reused"
                    continue
                if state is None and flow.defer(stage, text, plan):
                    continue
                streamed = None
                if flow.producers_of(stage):
                    streamed, text, plan = flow.stream_into(stage, lambda st=stage: replan(st), lambda d: None)
                if plan is None:
                    rows[stage.name] = f"build (after {', '.join(pending(stage))}; checked then)"
                elif streamed is not None:
                    rows[stage.name] += f", streams {streamed.deferred.stage.name} in"
                else:
                    ready.append((stage, plan))
            can = [shared and shareable(plan, options) for _, plan in ready]
            for group in clusters([p for _, p in ready], can):
                for i in group if len(group) > 1 else ():
                    others = [ready[j][0].name for j in group if j != i]
                    rows[ready[i][0].name] += f", shared reads with {', '.join(others)}"
    finally:
        for s in stages:
            d = stub_dir(outdir, s.name)
            if d.exists() and d not in kept:
                shutil.rmtree(d, ignore_errors=True)
        for d in (stub_dir(outdir, "x").parent, stub_dir(outdir, "x").parent.parent, outdir):
            with contextlib.suppress(OSError):
                d.rmdir()                      # only where empty: check leaves no folder it made
    for name, note in flow.notes.items():
        rows[name] += f"; {note}"
    return [(s, rows[s.name]) for s in stages]
