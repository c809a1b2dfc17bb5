"""Plan text for Rich and Textual, taken literally.

A plan is shared like a lock file, so its strings (model ids, tensor names, notes, stats
keys, edit-log entries), the paths of the models it names and the error messages that
quote them are someone else's text. Passed as a plain str, Textual and Rich read it as
markup: a "[/bold]" raises MarkupError and kills the review, a "[math]" silently drops,
and a "[@click=app.quit]" turns the text into a button that runs an app action. So every
such string reaches a widget through one of these, never as a markup str:

- `text(s)` / `literal(cell)`: a rich Text (tables, the detail and overview bodies);
- `content(s)`: a Textual Content (Static, Label, toasts: never parsed);
- `markup(template, **values)`: our own markup with the values inserted literally;
- `fit(s, width)`: a cleaned string cut to a number of terminal cells (grid header).

All of them clean first (mergeplan.safetext.clean, plus bidi controls, below), so no
control character from a plan reaches the terminal.
"""

from __future__ import annotations

from typing import Any

from rich.cells import cell_len, set_cell_size
from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.content import Content

from mergeplan import safetext

def clean(s: Any, keep_newlines: bool = False) -> str:
    """safetext.clean: control, bidi and separator characters as visible escapes."""
    return safetext.clean(s, keep_newlines=keep_newlines)


def text(s: Any, style: str = "", keep_newlines: bool = False) -> Text:
    """clean(s) as a rich Text, which Rich never parses for markup."""
    return Text(clean(s, keep_newlines=keep_newlines), style=style)


def content(s: Any, style: str = "", keep_newlines: bool = False) -> Content:
    """clean(s) as a Textual Content: a Static or Label shows it as is (Content(...) is
    literal; only Content.from_markup parses)."""
    c = Content(clean(s, keep_newlines=keep_newlines))
    return c.stylize(style) if style else c


def markup(template: str, **values: Any) -> Content:
    """Textual markup written here (`template`, e.g. "[b]$count[/b] $label") with each
    $value cleaned and inserted as literal text: Textual's markup parser inserts a
    variable as plain text, so a "[/b]" or "$x" in a value is never read."""
    return Content.from_markup(template, **{k: clean(v) for k, v in values.items()})


def fit(s: Any, width: int) -> str:
    """clean(s) cut to at most `width` terminal cells (a CJK character takes two; cutting
    by characters would let a wide name push a fixed-width grid column out of line)."""
    s = clean(s)
    return s if cell_len(s) <= width else set_cell_size(s, width)


def tell(node, message: Any, **kwargs) -> None:
    """node.notify() with the message as literal text (it may quote paths, model ids and
    tensor names, which notify's default markup would parse)."""
    node.notify(clean(message, keep_newlines=True), markup=False, **kwargs)


def literal(cell) -> Text:
    return text(cell) if isinstance(cell, str) else cell


def add_row(table: Table, *cells) -> None:
    table.add_row(*(literal(c) for c in cells))


def section(title: str, body) -> Group:
    """A bold heading over a table; unlike Table(title=...), it never wraps to the table's width."""
    return Group(text(title, style="bold"), body)
