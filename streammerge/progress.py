"""A rich progress bar in bytes with an ETA around a merge."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .options import RunOptions
from .report import RunReport


@contextmanager
def merge_progress(console, show: bool, label: str | None = None
                   ) -> Iterator[tuple[Callable[[object], None], Callable[[int], None]]]:
    """The `on_start(plan)` and `on_progress(nbytes)` callbacks of a merge, driving one byte bar named
    `label` (default: the plan's method) on `console`; `on_start` also prints the plan's warnings."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=console, disable=not show, transient=False)
    state: dict = {}

    def on_start(plan) -> None:
        state["task"] = progress.add_task(label or plan.method, total=plan.bytes_in)
        for w in plan.warnings:
            console.print(f"[yellow]warning:[/yellow] {w}")

    def on_progress(n: int) -> None:
        if "task" in state:
            progress.advance(state["task"], n)

    with progress:
        yield on_start, on_progress


def run_with_progress(config_path: str | os.PathLike, out: str | os.PathLike, options: RunOptions, console, *,
                      config_text: str | None = None, **run_kw) -> RunReport:
    from .merge import run

    with merge_progress(console, options.progress) as (on_start, on_progress):
        return run(config_path, out, options, on_start=on_start, on_progress=on_progress, config_text=config_text,
                   **run_kw)
