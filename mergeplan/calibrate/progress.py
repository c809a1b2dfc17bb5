"""Calibration progress on stderr: one bar per model pass, advanced per batch.

On a terminal, rich bars; otherwise (logs, CI, nohup) one plain line per finished pass, like
the rest of mergeplan's progress output. Nothing at all with quiet.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class CalibProgress:
    def __init__(self, quiet: bool = False, console: Console | None = None, prefix: str = "calibrate"):
        self.quiet = quiet
        self.prefix = prefix  # the plain lines' first word: which command is working
        self.console = console or Console(stderr=True)
        self.tty = self.console.is_terminal
        self._progress: Progress | None = None
        if not quiet and self.tty:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
            )

    def __enter__(self) -> "CalibProgress":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        if self.quiet:
            yield lambda: None
            return
        if self._progress is not None:
            tid = self._progress.add_task(description, total=total)
            yield lambda: self._progress.advance(tid)
            return
        done = [0]
        t0 = time.perf_counter()

        def advance() -> None:
            done[0] += 1

        yield advance
        self.console.print(
            f"{self.prefix}: {description}: {done[0]}/{total} in {time.perf_counter() - t0:.1f}s", highlight=False
        )
