"""A Linux terminal driver whose input thread stops at once when the app exits.

Textual's LinuxDriver polls the terminal with select(0.1) and, on exit, joins that thread
and then sleeps one more select(0.1) with no file registered: 0.1-0.2 s between `q` and
the shell prompt, most of the 0.3 s a quit may take over SSH. This driver adds a wake-up
pipe to the same loop: disable_input() writes to it, the select returns at once, and the
thread drains what the terminal already sent without waiting. Everything else (parser,
ticks for a lone Escape, messages) is Textual's own.
"""

from __future__ import annotations

import os
import selectors
from codecs import getincrementaldecoder

from textual._xterm_parser import XTermParser
from textual.drivers.linux_driver import LinuxDriver


class FastExitDriver(LinuxDriver):
    _wake: tuple[int, int] | None = None

    def start_application_mode(self) -> None:
        self._wake = os.pipe()
        super().start_application_mode()

    def disable_input(self) -> None:
        wake = self._wake
        if wake is not None:
            try:
                os.write(wake[1], b"x")  # the input thread leaves its loop now, not at the next poll
            except OSError:
                pass
        super().disable_input()  # mouse off, joins the input thread, flushes pending input
        if wake is not None:
            self._wake = None
            for fd in wake:
                os.close(fd)

    def run_input_thread(self) -> None:
        if self._wake is None:
            return super().run_input_thread()
        wake = self._wake[0]
        selector = selectors.SelectSelector()
        selector.register(self.fileno, selectors.EVENT_READ)
        selector.register(wake, selectors.EVENT_READ)
        parser = XTermParser(self._debug)
        decode = getincrementaldecoder("utf-8")().decode

        def process(events, final: bool = False) -> None:
            for key, mask in events:
                if key.fd == self.fileno and mask & selectors.EVENT_READ:
                    data = decode(os.read(self.fileno, 4096), final=final)
                    if not data:
                        break
                    for event in parser.feed(data):
                        self.process_message(event)
            for event in parser.tick():
                self.process_message(event)

        try:
            while not self.exit_event.is_set():
                events = selector.select(0.1)
                process(events)
                if any(key.fd == wake for key, _ in events):
                    break
            selector.unregister(wake)
            process(selector.select(0), final=True)  # what already arrived, without waiting
        finally:
            selector.close()
            try:
                for _ in parser.feed(""):
                    pass
            except Exception:
                pass
