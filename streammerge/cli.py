"""Command line: parse, build RunOptions, call the library, print. No merge logic lives here.

`streammerge CONFIG OUT [mergekit-yaml flags]` works like `mergekit-yaml`, and so does
`streammerge run CONFIG OUT`.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from .demo import TEMPLATES
from .errors import ConfigError
from .options import (
    MAX_THREADS,
    MERGEKIT_FLAGS,
    Alias,
    Flag,
    MergekitFlag,
    RunOptions,
    check_int,
    option_flags,
    parse_size,
)
from .synth_spec import DTYPE_SIZES, PRESETS

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
COMMANDS = ("run", "check", "demo", "synth", "bench")


def _argtype(flag: str, convert: Callable[[str], object], hint: str = ""):
    """An argparse type from a converter that raises ConfigError: the value is checked when the command
    line is read, not mid-run; the message drops the flag's name (argparse puts it first) and, for a value
    below the range, adds `hint` (what to write instead)."""
    def parse(text: str) -> object:
        try:
            return convert(text)
        except ConfigError as e:
            msg = str(e).removeprefix(f"{flag}: ")
            raise argparse.ArgumentTypeError(msg + (f"; {hint}" if hint and "less than" in msg else "")) from None
    return parse


def _size_flag(flag: str, hint: str):
    """A size of at least one byte; 0, '0.5' or '1e400' is a usage error that says what to write."""
    return _argtype(flag, lambda text: parse_size(text, flag, minimum=1), hint)


def _int_flag(flag: str, lo: int, hi: int | None = None):
    """An integer in [lo, hi]."""
    return _argtype(flag, lambda text: check_int(text, flag, lo, hi))


def _reader(flag: Flag, bounds: tuple[int, int | None] | None):
    """The argparse type of a flag that takes a value: how its text is read and range-checked."""
    if flag.kind == "size":
        return _size_flag(flag.name, flag.hint)
    if flag.kind == "int" and bounds is not None:
        return _int_flag(flag.name, *bounds)
    raise ValueError(f"RunOptions flag {flag.name}: kind {flag.kind!r} needs an integer range")


def _alias_dest(alias: Alias) -> str:
    return alias.flag.lstrip("-").replace("-", "_")


def _add_options(p: argparse.ArgumentParser, command: str, compat=None) -> None:
    """The RunOptions flags `command` takes, generated from the fields' metadata (options.Flag). Every
    flag defaults to None, which `options_from_args` reads as "the field's default". Mergekit aliases go
    to the `compat` group when given."""
    compat = compat or p
    for field, flag, bounds in option_flags():
        if command not in flag.commands:
            continue
        text = argparse.SUPPRESS if flag.hidden else flag.help and flag.help.replace("%", "%%")
        if flag.kind == "switch":
            p.add_argument(flag.name, dest=field, action="store_const", const=flag.sets, default=None, help=text)
            if flag.negation:
                p.add_argument(flag.negation, dest=field, action="store_const", const=not flag.sets)
        elif flag.kind == "choice":
            p.add_argument(flag.name, dest=field, default=None, choices=flag.choices, help=text,
                           **({"type": _argtype(flag.name, flag.convert)} if flag.convert else {}))
        else:
            p.add_argument(flag.name, dest=field, default=None, type=_reader(flag, bounds), help=text,
                           metavar=flag.name.lstrip("-").upper().replace("-", "_"))
        for alias in flag.aliases:
            text = alias.help + (f" (also {alias.negation})" if alias.negation else "")
            compat.add_argument(alias.flag, dest=_alias_dest(alias), action="store_true", help=text)
            if alias.negation:
                compat.add_argument(alias.negation, dest=_alias_dest(alias), action="store_false",
                                    help=argparse.SUPPRESS)


class _Refused(argparse.Action):
    """A mergekit flag streammerge does not implement: a usage error that says why, never accepted."""

    def __init__(self, option_strings, dest, why: str, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)
        self.why = why

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {self.why}")


def _add_mergekit_flags(g, flags: tuple[MergekitFlag, ...] = MERGEKIT_FLAGS) -> None:
    """options.MERGEKIT_FLAGS as argparse flags. An ignored flag given stores its own spelling, so that
    `_notes` can name it under -v."""
    for f in flags:
        names = (f.name, *f.extra)
        text = f.help + (f" (also {f.negation})" if f.negation and not f.refused else "")
        if f.kind == "count":
            g.add_argument(*names, dest=f.target, action="count", default=0, help=text)
        elif f.kind == "switch":
            g.add_argument(*names, dest=f.target, action="store_true", help=text)
            if f.negation:
                g.add_argument(f.negation, dest=f.target, action="store_false", help=argparse.SUPPRESS)
        elif f.value:
            g.add_argument(*names, dest=f.target, default=None, metavar=f.value, help=text,
                           type=_int_flag(f.name, 1, MAX_THREADS) if f.integer else str)
        else:
            g.add_argument(*names, dest=f.target, action="store_const", const=f.name, default=None, help=text)
        if f.negation and f.refused:
            g.add_argument(f.negation, action=_Refused, why=f.refused, help=argparse.SUPPRESS)
        elif f.negation and f.kind == "ignored":
            g.add_argument(f.negation, dest=f.target, action="store_const", const=f.negation, help=argparse.SUPPRESS)


def _notes(args: argparse.Namespace) -> list[str]:
    """One line for each ignored mergekit flag on the command line: what `run -v` prints."""
    notes = []
    for f in MERGEKIT_FLAGS:
        given = getattr(args, f.target, None)
        if f.kind == "ignored" and f.note and given is not None:
            notes.append(f"note: {given if not f.value else f.name}: {f.note}")
    for _, flag, _ in option_flags():
        notes += [f"note: {a.flag}: {a.note}" for a in flag.aliases if a.note and getattr(args, _alias_dest(a), False)]
    return notes


def _alternatives(names) -> str:
    """'a, b or c': the valid names, listed in help texts from the tables that define them."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="mergekit YAML config")
    p.add_argument("out", help="output folder")
    compat = p.add_argument_group("mergekit compatibility")
    _add_options(p, "run", compat)
    p.add_argument("--report", default=None, metavar="FILE.json", help="write the run report as JSON")
    _add_mergekit_flags(compat)
    threads = _int_flag("--num-threads", 1, MAX_THREADS)
    p.add_argument("--num-threads", type=threads, default=None,
                   help="torch intra-op threads, 1 to 1024 (default: torch's)")
    # a flag of its own, not a second spelling: --num-threads' messages name --num-threads alone
    compat.add_argument("-j", dest="num_threads", type=threads, metavar="N", help="mergekit alias for --num-threads")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streammerge", description="Out-of-core merging of LLM checkpoints (mergekit YAML).")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command")
    _run_args(sub.add_parser("run", help="merge CONFIG into OUT"))
    pc = sub.add_parser("check", help="validate CONFIG and print the plan; reads headers only")
    pc.add_argument("config")
    _add_options(pc, "check")
    pd = sub.add_parser("demo", help="make tiny checkpoints and merge them")
    pd.add_argument("--out", default=None, help="keep the demo folder here (default: a temporary folder)")
    pd.add_argument("--method", default="linear", help="method for the demo merge (default: linear)")
    pd.add_argument("--no-progress", action="store_true")
    pb = sub.add_parser("bench", help="merge synthetic checkpoints and print the per-shard throughput")
    pb.add_argument("--preset", default="small", help=f"{_alternatives(PRESETS)} (default: small)")
    pb.add_argument("--method", default="linear", help=f"{_alternatives(TEMPLATES)} (default: linear)")
    pb.add_argument("--data", default=None, help="keep (and reuse) the synthetic inputs here (default: a temporary folder)")
    pb.add_argument("--report", default=None, metavar="FILE.json", help="write the run report as JSON")
    _add_options(pb, "bench")
    ps = sub.add_parser("synth", help="write seeded synthetic Llama-shaped checkpoints")
    ps.add_argument("out")
    ps.add_argument("--preset", default="tiny", help=f"{_alternatives(PRESETS)} (default: tiny)")
    ps.add_argument("--experts", type=_int_flag("--experts", 1, 64), default=2, help="1 to 64 (default: 2)")
    ps.add_argument("--seed", type=_int_flag("--seed", 0, 2**63 - 1), default=0, help="0 to 2^63-1 (default: 0)")
    ps.add_argument("--dtype", default=None, help=f"{_alternatives(DTYPE_SIZES)} (default: the preset's)")
    return parser


def _version() -> str:
    from . import __version__

    return f"streammerge {__version__}"


def options_from_args(args: argparse.Namespace, **extra) -> RunOptions:
    """RunOptions from the flags `args.command` takes. A flag left out (None) gives the field's default
    (sizes were parsed and range-checked by argparse, so None is the only way to a default); a mergekit
    alias given wins over its flag (`--cuda --device cpu` computes on cuda)."""
    values: dict[str, object] = {}
    for field, flag, _ in option_flags():
        if args.command not in flag.commands:
            continue
        value = getattr(args, field)
        for alias in flag.aliases:
            if getattr(args, _alias_dest(alias)):
                value = alias.value
        if value is not None:
            values[field] = value
    return RunOptions(**{**values, **extra})


def main(argv: list[str] | None = None) -> int:
    """The console entry point. Ctrl-C before `_main` installs its handlers (during the start-up
    imports, say) is one line and exit 130, never a traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt as e:
        sys.stderr.write("interrupted.\n")
        return 128 + int(getattr(e, "signum", signal.SIGINT))


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv = ["run", *argv]  # mergekit-yaml style: streammerge [FLAGS] CONFIG OUT [FLAGS]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code not in (0, None) else EXIT_OK
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from rich.console import Console
    from rich.markup import escape

    from .errors import StreammergeError

    console = Console(stderr=True)
    with _signals_as_interrupt():  # outside the try: a second signal while we report ends the process
        try:
            if args.command == "run":
                return _cmd_run(args, console)
            if args.command == "check":
                return _cmd_check(args, console)
            if args.command == "demo":
                return _cmd_demo(args, console)
            if args.command == "synth":
                return _cmd_synth(args, console)
            if args.command == "bench":
                return _cmd_bench(args, console)
        except StreammergeError as e:
            # soft_wrap: a path in the message stays on one line, whatever the terminal width
            console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            return EXIT_PROBLEMS
        except OSError as e:  # disk full, permission denied on the output folder, ...
            where = f": {e.filename}" if e.filename else ""
            console.print(f"[red]error:[/red] {escape((e.strerror or str(e)) + where)}", highlight=False, soft_wrap=True)
            return EXIT_PROBLEMS
        except KeyboardInterrupt as e:
            code = 128 + int(getattr(e, "signum", signal.SIGINT))
            if args.command == "run":
                again = ["streammerge", *[a for a in argv if a != "--overwrite"]]
                if "--resume" not in again:
                    again.append("--resume")
                console.print(f"[yellow]interrupted.[/yellow] Finished shards are kept; continue with: "
                              f"{escape(shlex.join(again))}", highlight=False, soft_wrap=True)
            else:
                console.print("[yellow]interrupted.[/yellow]", soft_wrap=True)
            return code
    return EXIT_USAGE


class _Stopped(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised in the main thread so that every one stops a run the way Ctrl-C
    does: the writer finishes the bands in flight, unfinished shards stay `.partial`, `--resume` continues."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once (still resumable)
    raise _Stopped(signum)


@contextlib.contextmanager
def _signals_as_interrupt():
    """Handlers only from the main thread (signal.signal refuses others), and only over Python's own
    defaults (a SIGHUP ignored under nohup stays ignored); restored on the way out, so `main()` called
    from a library or a test leaves the process as it found it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL, signal.SIGHUP: signal.SIG_DFL}
    previous = {sig: signal.signal(sig, _raise_stopped) for sig, default in defaults.items()
                if signal.getsignal(sig) is default}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _cmd_run(args: argparse.Namespace, console) -> int:
    from .progress import run_with_progress

    if args.report and Path(args.report).absolute().parent != Path(args.out).absolute():
        from .merge import check_report_path  # (a report in OUT is fine: the run creates OUT)

        check_report_path(args.report)  # before the merge: a bad path must not cost a whole run
    if args.verbose and not args.quiet:
        for note in _notes(args):
            console.print(note, highlight=False, markup=False, soft_wrap=True)
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    if args.quiet:  # errors are printed by `_main` on its own console, still heard
        from rich.console import Console

        console = Console(stderr=True, quiet=True)
    extra = {"progress": False} if args.quiet else {}
    report = run_with_progress(args.config, args.out, options_from_args(args, **extra), console)
    report.print(console)
    if args.report:
        report.write_json(Path(args.report))
    return EXIT_OK


def _cmd_check(args: argparse.Namespace, console) -> int:
    from .merge import check
    from .plan.explain import print_plan

    plan = check(args.config, options_from_args(args))
    print_plan(plan, console)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace, console) -> int:
    from .demo import demo

    return demo(console, out=Path(args.out) if args.out else None, method=args.method, progress=not args.no_progress)


def _cmd_bench(args: argparse.Namespace, console) -> int:
    from .demo import bench
    from .merge import check_report_path

    if args.report:
        check_report_path(args.report)

    report = bench(console, options_from_args(args, overwrite=True, progress=True), args.preset, args.method,
                   Path(args.data) if args.data else None)
    if report is None:
        return EXIT_USAGE
    if args.report:
        report.write_json(Path(args.report))
    return EXIT_OK


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
