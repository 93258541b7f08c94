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
    p.add_argument("--no-shared-reads", dest="shared_reads", action="store_false",
                   help="each stage reads its inputs itself (default: stages built together that read the same "
                        "files read each input band once for all of them)")
    p.add_argument("--stream-intermediates", action="store_true",
                   help="a stage that only one later stage reads streams into it in memory, never written, where "
                        "--max-memory holds both runs at once (--check says which); the others are written")
    p.add_argument("--report", default=None, metavar="FILE.json", help="write the per-stage report as JSON")
    compat = p.add_argument_group("mergekit compatibility")
    add_options(p, "run", compat)
    add_mergekit_flags(compat)


def _batch(args: argparse.Namespace, console) -> int:
    from rich.table import Table

    from ..batch.recipe import load_recipe
    from ..batch.stages import check_stages, run_stages
    from ..merge import check_report_path
    from ..batch.wave import run_wave
    from ..progress import merge_progress, run_with_progress

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
        for stage, state in check_stages(recipe, stages, outdir, options, args.shared_reads,
                                                 args.stream_intermediates):
            table.add_row(stage.name, ", ".join(stage.needs) or "-", state)
        out.print(table)
        return EXIT_OK
    outdir.mkdir(parents=True, exist_ok=True)

    def announce(stage, status: str) -> None:
        if not quiet:
            words = {"built": "building", "resumed": "resuming", "reused": "reused (unchanged config and inputs)",
                     "streamed": "streaming into its reader (not written)",
                     "unneeded": "not needed (its one reader is reused)"}
            base, _, shared = status.partition("+")
            extra = " (shared reads)" if shared else ""
            console.print(f"[bold]{stage.name}[/bold]: {words[base]}{extra}", highlight=False)

    def run(config_path, stage_out, opts, config_text, **kw):
        return run_with_progress(config_path, stage_out, opts, console, config_text=config_text, **kw)

    def run_shared(recipe_path, wave):
        with merge_progress(console, options.progress) as (on_start, on_progress):
            return run_wave(recipe_path, wave, on_start, on_progress)

    results = run_stages(recipe, stages, outdir, options, announce, run, shared=args.shared_reads,
                         run_shared=run_shared, stream=args.stream_intermediates)
    table = Table(title=f"batch {recipe}")
    for col in ("stage", "status", "seconds", "read MB", "of it shared MB", "read MB/s", "written MB", "peak RSS GiB"):
        table.add_column(col, justify="right" if col not in ("stage", "status") else "left")
    for r in results:
        j = r.to_json()
        status = f"streamed into {r.streamed_into}" if r.streamed_into else r.status
        table.add_row(r.name, status, f"{r.seconds:.1f}", f"{r.bytes_read / 1e6:.1f}", f"{r.bytes_shared / 1e6:.1f}",
                      f"{j['gb_per_s'] * 1e3:.1f}", f"{r.bytes_written / 1e6:.1f}",
                      f"{r.peak_rss / 2**30:.2f}" if r.peak_rss else "-")
    summary = _summary(results)
    if not quiet:
        out.print(table)
        if summary["bytes_alone"] > summary["bytes_from_files"]:
            out.print(f"read {summary['bytes_from_files'] / 1e9:.2f} GB from the input files; one stage at a time "
                      f"would read {summary['bytes_alone'] / 1e9:.2f} GB", highlight=False)
        if summary["passes_adopted"]:
            out.print(f"{summary['passes_adopted']} tensor passes computed once for several stages (the same "
                      "reduce over the same inputs, e.g. TIES's |δ| histogram at several densities)", highlight=False)
    if args.report:
        Path(args.report).write_text(json.dumps({"recipe": str(recipe), **summary,
                                                 "stages": [r.to_json() for r in results]}, indent=2) + "\n")
    return EXIT_OK


def _summary(results) -> dict:
    """Input bytes the batch read from the files, against what its built stages would read one at a time."""
    waves, alone_read, alone = {}, 0, 0
    for r in results:
        if r.shared_with:
            waves[tuple(sorted((r.name, *r.shared_with)))] = (r.wave_bytes_read, r.wave_bytes_alone)
        else:
            alone_read += r.bytes_read
    disk = alone_read + sum(d for d, _ in waves.values())
    alone = alone_read + sum(a for _, a in waves.values())
    return {"bytes_from_files": disk, "bytes_alone": alone, "passes_adopted": sum(r.passes_adopted for r in results)}


COMMANDS = (
    Command("batch", "run a multi-document recipe (mergekit-multi's, with sweeps) into OUTDIR/NAME",
            _batch_args, _batch, resumable=True),
)
