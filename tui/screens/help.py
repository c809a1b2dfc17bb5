"""Help: every key binding, read from the screens' BINDINGS so it cannot drift from them."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Label, Static

from ..richtext import add_row, section

# Keys handled by Textual widgets themselves, which the screens' BINDINGS do not list.
_NAVIGATION = [
    ("arrows, PgUp/PgDn", "move in tables and scroll views"),
    ("click", "move the grid cursor; a second click (or double click) opens the tensor"),
    ("Tab / Shift+Tab", "next / previous field (edit and dialogs)"),
    ("mouse wheel", "scroll"),
]


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("question_mark", "close", "Close", show=False),
        Binding("q", "close", "Close", show=False),
        Binding("f1", "close", "Close", show=False),
    ]

    def __init__(self, sections: list[tuple[str, list[Binding]]]):
        super().__init__(classes="dialog-screen")
        self.sections = sections

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="help-dialog"):
            yield Label("Keys  (Esc closes)", classes="dialog-title")
            with VerticalScroll(id="help-scroll"):
                yield Static(self._render_keys())
        yield Footer(compact=True)  # this dialog's keys, not those of the screen beneath

    def on_mount(self) -> None:
        self.query_one("#help-scroll").focus()

    def _render_keys(self) -> Group:
        parts = []
        for title, bindings in self.sections:
            tab = Table(show_header=False, box=None,
                        padding=(0, 1))
            tab.add_column(style="cyan", no_wrap=True, min_width=14)
            tab.add_column()
            singles = list(Binding.make_bindings(bindings))  # "u,ctrl+z" -> one binding per key
            seen = set()
            for b in singles:
                if b.action in seen:
                    continue
                seen.add(b.action)
                keys = " ".join(dict.fromkeys(self.app.get_key_display(x) for x in singles if x.action == b.action))
                add_row(tab, keys, b.tooltip or b.description or b.action)
            parts.append(section(title, tab))
        nav = Table(show_header=False, box=None,
                    padding=(0, 1))
        nav.add_column(style="cyan", no_wrap=True, min_width=14)
        nav.add_column()
        for k, d in _NAVIGATION:
            add_row(nav, k, d)
        parts.append(section("Navigation", nav))
        parts.append(Text("Cell marks: * an edit not saved yet; + a value set by hand in a saved review (the "
                          "plan's edit log); ? a statistic an edit made stale, known at apply. Underlined cells "
                          "are marked for editing.", style="dim"))
        return Group(*parts)

    def action_close(self) -> None:
        self.dismiss(None)
