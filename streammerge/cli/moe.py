"""`streammerge moe CONFIG OUT`: a mergekit-moe config built out of core, with run's flags; and the MoE
part of `check` (a config with `experts:` is a MoE config)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .command import EXIT_OK, Command
from .flags import notes, options_from_args, run_args


def is_moe_config(path: str) -> bool:
    """Whether `path` is a mergekit-moe config (a mapping with `experts:`); False if it cannot be read."""
    from ..config import read_config_text
    from ..errors import StreammergeError
    from ..moe.config import is_moe_document
    from ..yaml_limits import load_yaml

    try:
        return is_moe_document(load_yaml(read_config_text(path), path))
    except (StreammergeError, OSError):
        return False  # the merge check reports the problem in its own words


def check_moe_cli(args: argparse.Namespace, console) -> int:
    """Validate a MoE config from headers and tokenizer files; print what would be built and why."""
    from rich.markup import escape

    from ..moe.run import check_moe
    from ..plan.explain import print_plan
    from .commands import results_console

    inp, plan = check_moe(args.config, options_from_args(args))
    out = results_console()
    cfg = inp.cfg
    out.print(f"[bold]moe[/bold] {inp.arch} ({escape(inp.why)}); {len(cfg.experts)} experts, "
              f"{len(cfg.shared_experts or [])} shared, {cfg.experts_per_token} per token; gate_mode {cfg.gate_mode}; "
              f"{inp.base_arch.num_layers} router(s) computed by the run", highlight=False)
    if inp.tokenizer_note:
        out.print(escape(inp.tokenizer_note), highlight=False, soft_wrap=True)
    print_plan(plan, out, console)
    return EXIT_OK


def _moe(args: argparse.Namespace, console) -> int:
    from ..moe.run import run_moe
    from ..progress import merge_progress
    from .commands import results_console

    if args.report and Path(args.report).absolute().parent != Path(args.out).absolute():
        from ..merge import check_report_path

        check_report_path(args.report)
    if args.verbose and not args.quiet:
        for note in notes(args):
            console.print(note, highlight=False, markup=False, soft_wrap=True)
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    as_run = argparse.Namespace(**{**vars(args), "command": "run"})  # run's flags, read as run reads them
    options = options_from_args(as_run, **({"progress": False} if args.quiet else {}))
    with merge_progress(console, options.progress, "moe") as (on_start, on_progress):
        report = run_moe(args.config, args.out, options, on_start, on_progress)
    if not args.quiet:
        report.print(results_console(), console)
    if args.report:
        report.write_json(Path(args.report))
    return EXIT_OK


COMMANDS = (
    Command("moe", "build a Mixture-of-Experts from dense experts (mergekit-moe's YAML) into OUT", run_args, _moe,
            resumable=True),
)
