"""The core subcommands: run, check, demo, bench, synth. Each handler builds RunOptions from its flags,
calls the library and prints; no merge logic lives here."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..demo import TEMPLATES
from ..synth_spec import DTYPE_SIZES, PRESETS
from .command import EXIT_OK, EXIT_USAGE, Command
from .flags import add_options, alternatives, int_flag, notes, options_from_args, run_args


def _plot_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw per-shard read/compute/write GB/s and memory over time against the budget "
                        "(needs the plot extra: matplotlib)")


def _run_plot_args(p: argparse.ArgumentParser) -> None:
    run_args(p)
    _plot_arg(p)


def _plot_watch(args: argparse.Namespace, console):
    """A MemWatch when --plot is given (after checking matplotlib is there: not after an hour's run), or
    None; the `int` EXIT_USAGE when matplotlib is missing."""
    if not args.plot:
        return None
    from ..plot import PlotUnavailable, require_matplotlib

    try:
        require_matplotlib()
    except PlotUnavailable as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, markup=False)
        return EXIT_USAGE
    from ..memwatch import MemWatch

    return MemWatch()


def _draw(args: argparse.Namespace, report, watch, console) -> None:
    from ..plot import write_chart

    write_chart(args.plot, report, watch.samples)
    console.print(f"chart: {args.plot}", highlight=False, markup=False, soft_wrap=True)


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    add_options(p, "check")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="keep the demo folder here (default: a temporary folder)")
    p.add_argument("--method", default="linear", help="method for the demo merge (default: linear)")
    p.add_argument("--no-progress", action="store_true")


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", help=f"{alternatives(PRESETS)} (default: small)")
    p.add_argument("--method", default="linear", help=f"{alternatives(TEMPLATES)} (default: linear)")
    p.add_argument("--data", default=None, help="keep (and reuse) the synthetic inputs here (default: a temporary folder)")
    p.add_argument("--report", default=None, metavar="FILE.json", help="write the run report as JSON")
    add_options(p, "bench")
    _plot_arg(p)


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out")
    p.add_argument("--preset", default="tiny", help=f"{alternatives(PRESETS)} (default: tiny)")
    p.add_argument("--experts", type=int_flag("--experts", 1, 64), default=2, help="1 to 64 (default: 2)")
    p.add_argument("--seed", type=int_flag("--seed", 0, 2**63 - 1), default=0, help="0 to 2^63-1 (default: 0)")
    p.add_argument("--dtype", default=None, help=f"{alternatives(DTYPE_SIZES)} (default: the preset's)")


def _run(args: argparse.Namespace, console) -> int:
    from ..progress import run_with_progress

    if args.report and Path(args.report).absolute().parent != Path(args.out).absolute():
        from ..merge import check_report_path  # (a report in OUT is fine: the run creates OUT)

        check_report_path(args.report)  # before the merge: a bad path must not cost a whole run
    if args.verbose and not args.quiet:
        for note in notes(args):
            console.print(note, highlight=False, markup=False, soft_wrap=True)
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    if args.quiet:  # errors are printed by `_main` on its own console, still heard
        from rich.console import Console

        console = Console(stderr=True, quiet=True)
    extra = {"progress": False} if args.quiet else {}
    watch = _plot_watch(args, console)
    if isinstance(watch, int):
        return EXIT_USAGE
    import contextlib

    with watch if watch is not None else contextlib.nullcontext():
        report = run_with_progress(args.config, args.out, options_from_args(args, **extra), console)
    report.print(console if args.quiet else results_console(), console)
    if args.report:
        report.write_json(Path(args.report))
    if watch is not None:
        _draw(args, report, watch, console)
    return EXIT_OK


def _check(args: argparse.Namespace, console) -> int:
    from ..merge import check
    from ..plan.explain import print_plan
    from .moe import check_moe_cli, is_moe_config

    if is_moe_config(args.config):  # mergekit-moe's schema (has `experts:`)
        return check_moe_cli(args, console)
    plan = check(args.config, options_from_args(args))
    print_plan(plan, results_console(), console)
    return EXIT_OK


PIPE_WIDTH = 10_000  # piped results are not cut to rich's default of 80 columns: a table keeps its rows whole


def results_console():
    """Results (the plan, the run's table) go to stdout, at the terminal's width, or at full width when
    piped (`check c.yml > plan.txt`); errors, warnings and progress stay on the stderr console."""
    import sys

    from rich.console import Console

    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else PIPE_WIDTH)


def _demo(args: argparse.Namespace, console) -> int:
    from ..demo import demo

    return demo(console, out=Path(args.out) if args.out else None, method=args.method, progress=not args.no_progress)


def _bench(args: argparse.Namespace, console) -> int:
    from ..demo import bench
    from ..merge import check_report_path

    if args.report:
        check_report_path(args.report)
    watch = _plot_watch(args, console)
    if isinstance(watch, int):
        return EXIT_USAGE

    report = bench(console, options_from_args(args, overwrite=True, progress=True), args.preset, args.method,
                   Path(args.data) if args.data else None, watch)
    if report is None:
        return EXIT_USAGE
    if args.report:
        report.write_json(Path(args.report))
    if watch is not None:
        _draw(args, report, watch, console)
    return EXIT_OK


def _synth(args: argparse.Namespace, console) -> int:
    import dataclasses

    from .. import synth

    spec = synth.PRESETS.get(args.preset)
    if spec is None:
        console.print(f"[red]error:[/red] unknown preset {args.preset!r}; choose from {', '.join(synth.PRESETS)}")
        return EXIT_USAGE
    if args.dtype:
        spec = dataclasses.replace(spec, dtype=args.dtype)
    if args.preset in synth.FAST_PRESETS:
        from ..synth_fast import make_family_fast

        base, experts = make_family_fast(Path(args.out), spec, args.experts, seed=args.seed,
                                         shard_size=synth.PRESET_SHARD_SIZES[args.preset])
    else:
        base, experts = synth.make_family(Path(args.out), spec, args.experts, seed=args.seed)
    console.print(f"base: {base}")
    for e in experts:
        console.print(f"expert: {e}")
    return EXIT_OK


COMMANDS = (
    Command("run", "merge CONFIG into OUT", _run_plot_args, _run, resumable=True),
    Command("check", "validate CONFIG and print the plan; reads headers only", _check_args, _check),
    Command("demo", "make tiny checkpoints and merge them", _demo_args, _demo),
    Command("synth", "write seeded synthetic Llama-shaped checkpoints", _synth_args, _synth),
    Command("bench", "merge synthetic checkpoints and print the per-shard throughput", _bench_args, _bench),
)
