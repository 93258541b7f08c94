"""What a subcommand is to the CLI: a name, its flags and its handler. Each command module lists its own
`COMMANDS`; `cli.main` builds the parser from them, so a new command is a new module, not an edit here."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    handle: Callable[[argparse.Namespace, object], int]  # (args, rich console on stderr) -> exit code
    # Ctrl-C prints "continue with: ... --resume" (the command writes an output folder that resumes)
    resumable: bool = False
