"""Tensors handed to worker threads within a memory budget (apply and the planner).

Both run a few tensors at a time; a handful of huge ones (embeddings, heads) must not be
expanded side by side, yet no worker should idle while one of them runs.
"""

from __future__ import annotations

import threading

from . import interrupt


class MemoryScheduler:
    """Hands tensors to workers in the given order, skipping any whose estimated working
    set does not fit in `limit` beside those in flight (it waits for a later turn, while
    the worker takes a smaller one); a tensor larger than the whole budget runs alone.
    Keeps the few huge tensors (embeddings, head) from being expanded at the same time
    without leaving a worker idle. After a failure, workers stop taking tensors."""

    def __init__(self, jobs: list[tuple[int, object]], limit: int):
        self._todo = list(jobs)
        self.limit = max(0, int(limit))
        self.used = 0
        self._failed = False
        self._cond = threading.Condition()

    def stop(self) -> None:
        with self._cond:
            self._failed = True
            self._cond.notify_all()

    def take(self) -> tuple[int, object] | None:
        with self._cond:
            while True:
                if interrupt.requested():
                    self._failed = True
                    raise KeyboardInterrupt
                if self._failed or not self._todo:
                    return None
                for i, (cost, job) in enumerate(self._todo):
                    if self.used == 0 or self.used + cost <= self.limit:
                        del self._todo[i]
                        self.used += cost
                        return cost, job
                self._cond.wait()

    def finish(self, cost: int, ok: bool = True) -> None:
        with self._cond:
            self.used -= cost
            self._failed |= not ok
            self._cond.notify_all()

    def work(self, run) -> None:
        """Run jobs until none is left (or one failed, here or in another worker)."""
        while (got := self.take()) is not None:
            cost, job = got
            ok = False
            try:
                run(job)
                ok = True
            finally:
                self.finish(cost, ok)
