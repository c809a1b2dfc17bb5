"""Rich table rows from plan text, taken literally: a tensor name, a model id or a value
like "[0.1, 0.2]" must never be read as Rich markup (which would drop "[math]")."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text


def literal(cell) -> Text:
    return Text(cell) if isinstance(cell, str) else cell


def add_row(table: Table, *cells) -> None:
    table.add_row(*(literal(c) for c in cells))


def section(title: str, body) -> Group:
    """A bold heading over a table; unlike Table(title=...), it never wraps to the table's width."""
    return Group(Text(title, style="bold"), body)
