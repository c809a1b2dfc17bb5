"""Ctrl-C, SIGTERM and SIGHUP (an SSH session that drops) end a run the same way.

The handler records the signal before raising KeyboardInterrupt in the main thread.
Python drops an exception raised while a finaliser (__del__, a weakref callback) runs
("Exception ignored in ..."), so a raise alone can be lost; code that is about to make
its result visible (apply's final rename) checks `requested()` as well, and worker
threads stop taking work when it is set.
"""

from __future__ import annotations

import signal
import threading

_requested: list[int] = []


def requested() -> bool:
    return bool(_requested)


def reset() -> None:
    _requested.clear()


def _handler(signum, frame) -> None:
    _requested.append(signum)
    if len(_requested) == 1:
        raise KeyboardInterrupt


def install() -> None:
    """Route SIGINT, SIGTERM and SIGHUP to one handler (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler, _handler):
            signal.signal(sig, _handler)
