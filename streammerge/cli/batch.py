"""`streammerge batch RECIPE OUTDIR`: a multi-document recipe (mergekit-multi's format, with sweeps)
run as a DAG of merges into OUTDIR/NAME, unchanged stages reused."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .command import EXIT_OK, Command
from .commands import results_console
from .flags import add_mergekit_flags, add_options, options_from_args


def _batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="multi-document YAML: one merge config per document, each with a name:")
    p.add_argument("outdir", help="each stage is written to OUTDIR/NAME")
    p.add_argument("--check", action="store_true",
                   help="run nothing: list the stages in order, say which would be reused, resumed or built, "
                        "and check every stage whose inputs exist")
    p.add_argument("--report", default=None, metavar="FILE.json", help="write the per-stage report as JSON")
    compat = p.add_argument_group("mergekit compatibility")
    add_options(p, "run", compat)
    add_mergekit_flags(compat)


def _batch(args: argparse.Namespace, console) -> int:
    from rich.table import Table

    from ..batch.recipe import load_recipe
    from ..batch.stages import check_stages, run_stages
    from ..merge import check_report_path
    from ..progress import run_with_progress

    if args.report:
        check_report_path(args.report)
    recipe, outdir = Path(args.recipe), Path(args.outdir)
    stages = load_recipe(recipe)
    quiet = bool(getattr(args, "quiet", False))
    as_run = argparse.Namespace(**{**vars(args), "command": "run"})  # run's flags, read as run reads them
    options = options_from_args(as_run, **({"progress": False} if quiet else {}))
    out = results_console()
    if args.check:
        table = Table(title=f"{recipe}: {len(stages)} stage(s)")
        for col in ("stage", "reads stages", "would"):
            table.add_column(col)
        for stage, state in check_stages(recipe, stages, outdir, options):
            table.add_row(stage.name, ", ".join(stage.needs) or "-", state)
        out.print(table)
        return EXIT_OK
    outdir.mkdir(parents=True, exist_ok=True)

    def announce(stage, status: str) -> None:
        if not quiet:
            words = {"built": "building", "resumed": "resuming", "reused": "reused (unchanged config and inputs)"}
            console.print(f"[bold]{stage.name}[/bold]: {words[status]}", highlight=False)

    def run(config_path, stage_out, opts, config_text):
        return run_with_progress(config_path, stage_out, opts, console, config_text=config_text)

    results = run_stages(recipe, stages, outdir, options, announce, run)
    table = Table(title=f"batch {recipe}")
    for col in ("stage", "status", "seconds", "read MB", "read MB/s", "written MB", "peak RSS GiB"):
        table.add_column(col, justify="right" if col not in ("stage", "status") else "left")
    for r in results:
        j = r.to_json()
        table.add_row(r.name, r.status, f"{r.seconds:.1f}", f"{r.bytes_read / 1e6:.1f}", f"{j['gb_per_s'] * 1e3:.1f}",
                      f"{r.bytes_written / 1e6:.1f}", f"{r.peak_rss / 2**30:.2f}" if r.peak_rss else "-")
    if not quiet:
        out.print(table)
    if args.report:
        Path(args.report).write_text(json.dumps({"recipe": str(recipe), "stages": [r.to_json() for r in results]},
                                                indent=2) + "\n")
    return EXIT_OK


COMMANDS = (
    Command("batch", "run a multi-document recipe (mergekit-multi's, with sweeps) into OUTDIR/NAME",
            _batch_args, _batch, resumable=True),
)
