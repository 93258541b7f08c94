"""Command line: parse, build RunOptions, call the library, print. No merge logic lives here.

`streammerge CONFIG OUT [mergekit-yaml flags]` works like `mergekit-yaml`, and so does
`streammerge run CONFIG OUT`. The subcommands come from the command modules listed in MODULES (each
exports `COMMANDS`); their order is the order `--help` lists them in.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import signal
import sys

from .command import EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, Command
from .flags import options_from_args
from .signals import signals_as_interrupt

MODULES = ("commands", "moe", "batch")


def command_table() -> dict[str, Command]:
    found: dict[str, Command] = {}
    for module in MODULES:
        for c in importlib.import_module(f"{__name__}.{module}").COMMANDS:
            found[c.name] = c
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streammerge", description="Out-of-core merging of LLM checkpoints (mergekit YAML).")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command")
    for c in command_table().values():
        c.add_args(sub.add_parser(c.name, help=c.help))
    return parser


def _version() -> str:
    from .. import __version__

    return f"streammerge {__version__}"


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
    if argv and argv[0] not in command_table() and argv[0] not in ("-h", "--help", "--version"):
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

    from ..errors import StreammergeError

    console = Console(stderr=True)
    with signals_as_interrupt():  # outside the try: a second signal while we report ends the process
        try:
            return command_table()[args.command].handle(args, console)
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
            if command_table()[args.command].resumable:
                again = ["streammerge", *[a for a in argv if a != "--overwrite"]]
                if "--resume" not in again:
                    again.append("--resume")
                console.print(f"[yellow]interrupted.[/yellow] Finished shards are kept; continue with: "
                              f"{escape(shlex.join(again))}", highlight=False, soft_wrap=True)
            else:
                console.print("[yellow]interrupted.[/yellow]", soft_wrap=True)
            return code
    return EXIT_USAGE


__all__ = ["main", "build_parser", "options_from_args", "EXIT_OK", "EXIT_PROBLEMS", "EXIT_USAGE"]
