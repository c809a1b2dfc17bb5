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
_deferred: list[bool] = []


def requested() -> bool:
    return bool(_requested)


def defer() -> None:
    """From now on a signal is only recorded: called when the result is about to land whole
    (after a last `requested()` check), so a late Ctrl-C cannot turn a complete, renamed
    output into a failed run."""
    _deferred.append(True)


def reset() -> None:
    _requested.clear()
    _deferred.clear()


def _handler(signum, frame) -> None:
    _requested.append(signum)
    if len(_requested) == 1 and not _deferred:
        raise KeyboardInterrupt


def install():
    """Route SIGINT, SIGTERM and SIGHUP to one handler (main thread only, and only where
    the default is in place: an ignored SIGHUP under nohup stays ignored). Returns a
    function that puts the previous handlers back."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        reset()
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler, _handler):
                previous[sig] = signal.signal(sig, _handler)

    def restore() -> None:
        # After a result landed the process is about to exit 0, and a signal during the
        # interpreter's teardown would still kill it with the default disposition (Python
        # puts SIG_DFL back for handlers it ran, but leaves SIG_IGN alone): ignore them.
        for sig, h in previous.items():
            signal.signal(sig, signal.SIG_IGN if _deferred else h)

    return restore
