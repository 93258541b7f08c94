"""Flags shared by the subcommands, generated from the RunOptions metadata (options.Flag) and the
mergekit-yaml flag table (options.MERGEKIT_FLAGS): how each is parsed, range-checked and turned back into
RunOptions. Values are checked when the command line is read, never mid-run."""

from __future__ import annotations

import argparse
from typing import Callable

from ..errors import ConfigError
from ..options import (
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


def argtype(flag: str, convert: Callable[[str], object], hint: str = ""):
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


def size_flag(flag: str, hint: str):
    """A size of at least one byte; 0, '0.5' or '1e400' is a usage error that says what to write."""
    return argtype(flag, lambda text: parse_size(text, flag, minimum=1), hint)


def int_flag(flag: str, lo: int, hi: int | None = None):
    """An integer in [lo, hi]."""
    return argtype(flag, lambda text: check_int(text, flag, lo, hi))


def _reader(flag: Flag, bounds: tuple[int, int | None] | None):
    """The argparse type of a flag that takes a value: how its text is read and range-checked."""
    if flag.kind == "size":
        return size_flag(flag.name, flag.hint)
    if flag.kind == "int" and bounds is not None:
        return int_flag(flag.name, *bounds)
    if flag.kind == "text":
        return str
    raise ValueError(f"RunOptions flag {flag.name}: kind {flag.kind!r} needs an integer range")


def _alias_dest(alias: Alias) -> str:
    return alias.flag.lstrip("-").replace("-", "_")


def add_options(p: argparse.ArgumentParser, command: str, compat=None) -> None:
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
                           **({"type": argtype(flag.name, flag.convert)} if flag.convert else {}))
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


def add_mergekit_flags(g, flags: tuple[MergekitFlag, ...] = MERGEKIT_FLAGS) -> None:
    """options.MERGEKIT_FLAGS as argparse flags. An ignored flag given stores its own spelling, so that
    `notes` can name it under -v."""
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
                           type=int_flag(f.name, 1, MAX_THREADS) if f.integer else str)
        else:
            g.add_argument(*names, dest=f.target, action="store_const", const=f.name, default=None, help=text)
        if f.negation and f.refused:
            g.add_argument(f.negation, action=_Refused, why=f.refused, help=argparse.SUPPRESS)
        elif f.negation and f.kind == "ignored":
            g.add_argument(f.negation, dest=f.target, action="store_const", const=f.negation, help=argparse.SUPPRESS)


def notes(args: argparse.Namespace) -> list[str]:
    """One line for each ignored mergekit flag on the command line: what `run -v` prints."""
    notes = []
    for f in MERGEKIT_FLAGS:
        given = getattr(args, f.target, None)
        if f.kind == "ignored" and f.note and given is not None:
            notes.append(f"note: {given if not f.value else f.name}: {f.note}")
    for _, flag, _ in option_flags():
        notes += [f"note: {a.flag}: {a.note}" for a in flag.aliases if a.note and getattr(args, _alias_dest(a), False)]
    return notes


def alternatives(names) -> str:
    """'a, b or c': the valid names, listed in help texts from the tables that define them."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


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


def run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="mergekit YAML config")
    p.add_argument("out", help="output folder")
    compat = p.add_argument_group("mergekit compatibility")
    add_options(p, "run", compat)
    p.add_argument("--report", default=None, metavar="FILE.json", help="write the run report as JSON")
    add_mergekit_flags(compat)
    threads = int_flag("--num-threads", 1, MAX_THREADS)
    p.add_argument("--num-threads", type=threads, default=None,
                   help="torch intra-op threads, 1 to 1024 (default: torch's)")
    # a flag of its own, not a second spelling: --num-threads' messages name --num-threads alone
    compat.add_argument("-j", dest="num_threads", type=threads, metavar="N", help="mergekit alias for --num-threads")
