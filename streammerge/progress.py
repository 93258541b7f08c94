"""A rich progress bar in bytes with an ETA around a merge."""

from __future__ import annotations

import os

from .options import RunOptions
from .report import RunReport


def run_with_progress(config_path: str | os.PathLike, out: str | os.PathLike, options: RunOptions, console, *,
                      config_text: str | None = None) -> RunReport:
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    from .merge import run

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=console, disable=not options.progress, transient=False)
    state: dict = {}

    def on_start(plan) -> None:
        total = plan.bytes_in
        state["task"] = progress.add_task(f"{plan.method}", total=total)
        for w in plan.warnings:
            console.print(f"[yellow]warning:[/yellow] {w}")

    def on_progress(n: int) -> None:
        if "task" in state:
            progress.advance(state["task"], n)

    with progress:
        return run(config_path, out, options, on_start=on_start, on_progress=on_progress, config_text=config_text)
