"""Progress on stderr: a rich bar on a terminal, plain occasional lines otherwise (logs, CI)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


class _Base:
    def __init__(self, console: Console, quiet: bool):
        self.console = console
        self.quiet = quiet
        self.tty = console.is_terminal
        self._progress: Progress | None = None
        self._last_line = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False

    def _plain(self, text: str, final: bool) -> None:
        now = time.monotonic()
        if final or now - self._last_line >= 5.0:
            self._last_line = now
            self.console.print(text, highlight=False)


class StageProgress(_Base):
    """Planner stages: (stage, done, total)."""

    def __init__(self, console: Console, quiet: bool):
        super().__init__(console, quiet)
        self._tasks: dict[str, int] = {}

    def update(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if not self.tty:
            self._plain(f"{stage}: {done}/{total}", done == total)
            return
        if self._progress is None:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False)
            self._progress.start()
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=total)
        self._progress.update(self._tasks[stage], completed=done, total=total)


class ApplyProgress(_Base):
    """Apply: tensors done, bytes read, ETA."""

    def __init__(self, console: Console, quiet: bool, total: int):
        super().__init__(console, quiet)
        self.total = total
        self._task = None
        self._t0 = time.monotonic()

    def update(self, done: int, total: int, nbytes: int) -> None:
        if self.quiet:
            return
        if not self.tty:
            el = time.monotonic() - self._t0
            eta = el / done * (total - done) if done else 0.0
            self._plain(f"apply: {done}/{total} tensors, {nbytes / 1e9:.2f} GB read, "
                        f"{el:.0f}s elapsed, ETA {eta:.0f}s", done == total)
            return
        if self._progress is None:
            self._progress = Progress(TextColumn("merging"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[gb]:.2f} GB read"), TimeElapsedColumn(),
                                      TimeRemainingColumn(), console=self.console)
            self._progress.start()
            self._task = self._progress.add_task("merge", total=total, gb=0.0)
        self._progress.update(self._task, completed=done, gb=nbytes / 1e9)
