"""Running a recipe's stages in order, each reused, resumed or built.

A stage's key is the plan fingerprint `run` already records in OUT/.streammerge/manifest.json: a hash
of the config as run, the output layout, the seed and every input file's size and mtime. So an edited
stage gets a new key and is rebuilt; a stage reading a rebuilt one sees new input files and is rebuilt
too; an unchanged stage over unchanged inputs is reused (mergekit-multi reuses any folder that has a
config.json, however stale). A stage interrupted mid-run is continued with `--resume`'s checks.
"""

from __future__ import annotations

import dataclasses
import json
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


@dataclass
class StageResult:
    name: str
    out: str
    status: str                     # built | reused | resumed
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    peak_rss: int = 0
    needs: tuple[str, ...] = ()

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


def _planned(recipe: Path, stage: Stage, outputs: dict[str, Path], options: RunOptions) -> tuple[str, bool | None]:
    """The stage's config text as run, and `finished` of its folder for the plan that text makes now."""
    from .. import merge

    text = stage_text(stage, outputs)
    plan = merge.check(recipe, options, config_text=text)
    fingerprint = merge.plan_fingerprint(plan, load_config_text(text, f"{recipe}: {stage.name}"))
    return text, finished(outputs[stage.name], plan, fingerprint)


def run_stages(recipe: Path, stages: list[Stage], outdir: Path, options: RunOptions,
               on_stage: Callable[[Stage, str], None] = lambda s, status: None,
               run: Callable[..., Any] | None = None) -> list[StageResult]:
    """Every stage in order into OUTDIR/NAME; returns what happened to each. `run(recipe, out, options,
    config_text=...)` merges one stage (default: `merge.run`; the CLI passes one with a progress bar).
    With `options.overwrite` every stage is rebuilt."""
    from .. import merge

    run = run or merge.run

    outputs = {s.name: outdir / s.name for s in stages}
    results = []
    for stage in stages:
        out = outputs[stage.name]
        text, state = _planned(recipe, stage, outputs, options)
        state = None if options.overwrite else state
        if state is True:
            on_stage(stage, "reused")
            results.append(StageResult(stage.name, str(out), "reused", needs=stage.needs))
            continue
        status = "resumed" if state is False else "built"
        on_stage(stage, status)
        run_opts = dataclasses.replace(options, resume=state is False,
                                       overwrite=state is None and out.is_dir() and any(out.iterdir()))
        t0 = time.perf_counter()
        report = run(recipe, out, run_opts, config_text=text)
        j = report.to_json()
        results.append(StageResult(stage.name, str(out), status, time.perf_counter() - t0, j["bytes_read"],
                                   j["bytes_written"], report.peak_rss, stage.needs))
    return results


def check_stages(recipe: Path, stages: list[Stage], outdir: Path, options: RunOptions) -> list[tuple[Stage, str]]:
    """Each stage's state without running anything: reuse / resume / build, or why it cannot be checked
    yet (it reads a stage not built). A stage whose inputs exist is planned, so its mistakes show now."""
    outputs = {s.name: outdir / s.name for s in stages}
    rows = []
    for stage in stages:
        pending = [n for n in stage.needs if not (outputs[n] / "config.json").is_file()]
        if pending:
            rows.append((stage, f"build (after {', '.join(pending)}; checked then)"))
            continue
        _, state = _planned(recipe, stage, outputs, options)
        rows.append((stage, {True: "reuse (unchanged)", False: "resume"}.get(state, "build")))
    return rows
