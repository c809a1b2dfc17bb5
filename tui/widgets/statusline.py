"""A one-line status text that repaints without a layout pass (it updates on every cursor move)."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget


class StatusLine(Widget):
    DEFAULT_CSS = """
    StatusLine { height: 1; width: 1fr; }
    """

    # layout=False: a fixed one-line box, so a new text needs a repaint, not a reflow.
    text: reactive[str] = reactive("", layout=False)

    def render(self) -> Text:
        text = Text.from_markup(self.text, overflow="ellipsis")
        text.no_wrap = True
        return text
