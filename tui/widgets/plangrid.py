"""The layer grid: a DataTable of layers x (component, model), coloured as a heatmap."""

from __future__ import annotations

from dataclasses import dataclass

from rich.style import Style
from rich.text import Text
from textual.message import Message
from textual.widgets import DataTable

from mergeplan.plan.edit import PlanEditor

from ..gridmodel import GridModel, Quantity, RowKey, fmt_cell, heat, short_component, value_range

CELL_WIDTH = 5  # 4 characters of value, then the edited marker (or a space, which separates cells)

ColumnKey = tuple[str, "str | None"]  # (component, model or None)


def _col_key(comp: str, model: str | None) -> str:
    return f"{comp}|{model or ''}"


class PlanGrid(DataTable):
    """Shows one quantity of every tensor; Enter (or a click on the cursor cell) opens the
    tensor. Cells that differ from the plan as loaded carry a '*'; cells in the marked
    selection are underlined."""

    @dataclass
    class TensorChosen(Message):
        tensor: str
        model: str | None

    def __init__(self, model: GridModel, editor: PlanEditor, **kwargs):
        super().__init__(cursor_type="cell", header_height=2, zebra_stripes=False, cell_padding=0, **kwargs)
        self.gm = model
        self.editor = editor
        self.quantity: Quantity | None = None
        self.col_keys: list[ColumnKey] = []
        self._selected: set[tuple[int, int]] = set()
        self._range: tuple[float, float] = (0.0, 1.0)

    # -- content --------------------------------------------------------------------------
    def show(self, q: Quantity, models: list[str] | None) -> None:
        """Rebuild for a quantity and model filter, keeping the cursor where it was."""
        keep = self.cursor_coordinate
        old_cols = self.col_keys
        self.quantity = q
        self.col_keys = self.gm.columns(q, models)
        self.clear(columns=True)
        prev_model = object()
        for comp, m in self.col_keys:
            top = (m or "")[:CELL_WIDTH] if m != prev_model else ""
            prev_model = m
            self.add_column(Text(f"{top}\n{short_component(comp)}"), width=CELL_WIDTH, key=_col_key(comp, m))
        values = self.gm.values(q, models)
        self._range = value_range(values.values())
        for r, row in enumerate(self.gm.rows):
            cells = [self._cell(row, comp, m, values[(row, comp, m)], (r, c) in self._selected)
                     for c, (comp, m) in enumerate(self.col_keys)]
            self.add_row(*cells, key=str(row), label=Text(self.gm.row_label(row).ljust(5), style="bold"))
        # Keep the same (row, component, model) under the cursor across a quantity switch.
        col = keep.column
        if keep.column < len(old_cols) and old_cols[keep.column] in self.col_keys:
            col = self.col_keys.index(old_cols[keep.column])
        elif keep.column < len(old_cols):
            comp = old_cols[keep.column][0]
            col = next((i for i, (c, _) in enumerate(self.col_keys) if c == comp), 0)
        self.move_cursor(row=min(keep.row, len(self.gm.rows) - 1), column=min(col, len(self.col_keys) - 1),
                         animate=False)

    def refresh_values(self) -> None:
        """Values changed (edit, undo): rebuild in place with the same columns."""
        if self.quantity is not None:
            models = sorted({m for _, m in self.col_keys if m}, key=self.gm.models.index) or None
            self.show(self.quantity, models if self.quantity.per_model else None)

    def _cell(self, row: RowKey, comp: str, model: str | None, v: float | None, selected: bool) -> Text:
        q = self.quantity
        edited = False
        name = self.gm.tensor_at(row, comp)
        field = q.field or ("omega" if q.key == "aim" else None)
        if name is not None and field is not None and v is not None:
            m = model if q.per_model else None
            edited = self.editor.get(name, m, field) != self.editor.planned(name, m, field)
        text = fmt_cell(v) + ("*" if edited else " ")
        colours = heat(v, *self._range)
        style = Style(bgcolor=colours[0], color=colours[1]) if colours else Style(dim=True)
        if selected:
            style += Style(underline=True, bold=True)
        return Text(text, style=style)

    # -- cursor and selection -----------------------------------------------------------
    def at(self, row_index: int, col_index: int) -> tuple[RowKey, str, str | None]:
        comp, model = self.col_keys[col_index]
        return self.gm.rows[row_index], comp, model

    def cursor_cell(self) -> tuple[RowKey, str, str | None] | None:
        if not self.col_keys or not self.gm.rows:
            return None
        c = self.cursor_coordinate
        return self.at(c.row, c.column)

    def set_selected(self, cells: set[tuple[int, int]]) -> None:
        """Underline exactly these (row, column) cells, redrawing only the ones that change."""
        changed = cells ^ self._selected
        self._selected = set(cells)
        q = self.quantity
        if q is None:
            return
        for r, c in changed:
            if r >= len(self.gm.rows) or c >= len(self.col_keys):
                continue
            row, comp, m = self.at(r, c)
            name = self.gm.tensor_at(row, comp)
            v = None if name is None else self.gm.value(name, q, m)
            self.update_cell(str(row), _col_key(comp, m), self._cell(row, comp, m, v, (r, c) in cells))

    def on_data_table_cell_selected(self, event: DataTable.CellSelected) -> None:
        event.stop()
        row, comp, model = self.at(event.coordinate.row, event.coordinate.column)
        name = self.gm.tensor_at(row, comp)
        if name is not None:
            self.post_message(self.TensorChosen(name, model))
