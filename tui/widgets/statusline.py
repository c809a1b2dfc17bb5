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
    # Literal text, never markup: it names model ids and components from the plan. The
    # caller cleans it (mergeplan_tui.richtext.clean).
    text: reactive[str] = reactive("", layout=False)

    def render(self) -> Text:
        text = Text(self.text, overflow="ellipsis")
        text.no_wrap = True
        return text
