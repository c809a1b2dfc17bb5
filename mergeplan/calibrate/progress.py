"""Progress on stderr: one bar per model pass, advanced per batch; silent with quiet."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class CalibProgress:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=quiet,
        )

    def __enter__(self) -> "CalibProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        tid = self._progress.add_task(description, total=total)
        yield lambda: self._progress.advance(tid)

    def log(self, message: str) -> None:
        if not self.quiet:
            self._progress.console.print(message)
