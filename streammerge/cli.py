"""Command line: parse, build RunOptions, call the library, print. No merge logic lives here.

`streammerge CONFIG OUT [mergekit-yaml flags]` works like `mergekit-yaml`, and so does
`streammerge run CONFIG OUT`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
COMMANDS = ("run", "check", "demo", "synth", "bench")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory", default=None, help="hard ceiling on resident memory, e.g. 1GiB (default: half the available RAM, 1-16 GiB)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="where to compute (default: cpu)")
    p.add_argument("--cuda", action="store_true", help="mergekit alias for --device cuda")
    p.add_argument("--out-shard-size", default="5B", help="maximum output shard size (default: 5B, mergekit's: 5e9 bytes)")
    p.add_argument("--random-seed", type=int, default=0, help="seed of the counter-based random masks (default: 0)")
    p.add_argument("--chunk-rows", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--prefetch", type=int, default=2, help="row bands read ahead of the compute (default: 2)")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="mergekit YAML config")
    p.add_argument("out", help="output folder")
    _common(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted merge into OUT")
    p.add_argument("--report", default=None, metavar="FILE.json", help="write the run report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--copy-tokenizer", dest="copy_tokenizer", action="store_true", default=True,
                   help="copy tokenizer files (default)")
    p.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false")
    p.add_argument("--write-model-card", dest="write_model_card", action="store_true", default=True)
    p.add_argument("--no-write-model-card", dest="write_model_card", action="store_false")
    p.add_argument("--allow-crimes", action="store_true", help="mergekit flag: accepted")
    for noop in ("--lazy-unpickle", "--low-cpu-memory", "--safe-serialization", "--trust-remote-code",
                 "--read-to-gpu", "--lazy-loader", "--verbose", "-v", "--quiet", "--multi-gpu"):
        p.add_argument(noop, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--transformers-cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--lora-merge-cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streammerge", description="Out-of-core merging of LLM checkpoints (mergekit YAML).")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command")
    _run_args(sub.add_parser("run", help="merge CONFIG into OUT"))
    pc = sub.add_parser("check", help="validate CONFIG and print the plan; reads headers only")
    pc.add_argument("config")
    _common(pc)
    pd = sub.add_parser("demo", help="make tiny checkpoints and merge them")
    pd.add_argument("--out", default=None, help="keep the demo folder here (default: a temporary folder)")
    pd.add_argument("--method", default="linear", help="method for the demo merge (default: linear)")
    pd.add_argument("--no-progress", action="store_true")
    ps = sub.add_parser("synth", help="write seeded synthetic Llama-shaped checkpoints")
    ps.add_argument("out")
    ps.add_argument("--preset", default="tiny", help="tiny, small or 1b (default: tiny)")
    ps.add_argument("--experts", type=int, default=2)
    ps.add_argument("--seed", type=int, default=0)
    ps.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: the preset's)")
    return parser


def _version() -> str:
    from . import __version__

    return f"streammerge {__version__}"


def _options(args: argparse.Namespace, **extra):
    from .options import RunOptions, parse_size

    device = "cuda" if getattr(args, "cuda", False) else args.device
    return RunOptions(
        max_memory=parse_size(args.max_memory, "--max-memory") if args.max_memory else 0,
        device=device, out_shard_size=parse_size(args.out_shard_size, "--out-shard-size"),
        seed=args.random_seed, chunk_rows=args.chunk_rows, prefetch=args.prefetch, **extra)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv = ["run", *argv]  # mergekit-yaml style: streammerge CONFIG OUT
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code not in (0, None) else EXIT_OK
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from rich.console import Console

    from .errors import StreammergeError

    console = Console(stderr=True)
    try:
        if args.command == "run":
            return _cmd_run(args, console)
        if args.command == "check":
            return _cmd_check(args, console)
        if args.command == "demo":
            return _cmd_demo(args, console)
        if args.command == "synth":
            return _cmd_synth(args, console)
    except StreammergeError as e:
        console.print(f"[red]error:[/red] {e}", markup=True, highlight=False)
        return EXIT_PROBLEMS
    except KeyboardInterrupt:
        console.print("[yellow]interrupted.[/yellow] Finished shards are kept; continue with "
                      "`streammerge run --resume CONFIG OUT`.")
        return 130
    return EXIT_USAGE


def _cmd_run(args: argparse.Namespace, console) -> int:
    from .progress import run_with_progress

    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    options = _options(args, overwrite=args.overwrite, resume=args.resume, copy_tokenizer=args.copy_tokenizer,
                       write_model_card=args.write_model_card, allow_crimes=args.allow_crimes,
                       progress=not args.no_progress)
    report = run_with_progress(args.config, args.out, options, console)
    report.print(console)
    if args.report:
        report.write_json(Path(args.report))
    return EXIT_OK


def _cmd_check(args: argparse.Namespace, console) -> int:
    from .merge import check
    from .plan.explain import print_plan

    plan = check(args.config, _options(args))
    print_plan(plan, console)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace, console) -> int:
    from .demo import demo

    return demo(console, out=Path(args.out) if args.out else None, method=args.method, progress=not args.no_progress)


def _cmd_synth(args: argparse.Namespace, console) -> int:
    import dataclasses

    from . import synth

    spec = synth.PRESETS.get(args.preset)
    if spec is None:
        console.print(f"[red]error:[/red] unknown preset {args.preset!r}; choose from {', '.join(synth.PRESETS)}")
        return EXIT_USAGE
    if args.dtype:
        spec = dataclasses.replace(spec, dtype=args.dtype)
    base, experts = synth.make_family(Path(args.out), spec, args.experts, seed=args.seed)
    console.print(f"base: {base}")
    for e in experts:
        console.print(f"expert: {e}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
