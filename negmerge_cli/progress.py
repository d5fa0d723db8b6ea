"""A progress bar on stderr for long merges (rich comes with typer)."""

from __future__ import annotations

import sys


class StderrProgress:
    """Byte-based progress bar, drawn only when stderr is a terminal (a log file gets the
    summary line, not a bar's control codes)."""

    def __init__(self) -> None:
        self._bar = None
        self._task = None

    def start(self, total: int, label: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.stop()
        if not sys.stderr.isatty():
            return
        self._bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(label, total=total)

    def advance(self, amount: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, amount)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
