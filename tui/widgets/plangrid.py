"""The layer grid: layers x (component, model) cells coloured as a heatmap.

A Line-API ScrollView rather than a DataTable: a DataTable re-renders every column of
every visible row on each cursor move, which costs tens of milliseconds per key on a
70B plan (80 rows x 36 columns); this widget renders only the visible cells and repaints
only the rows a cursor move touches. The header (model, component) and the row labels
stay fixed while the body scrolls.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.cells import set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView

from mergeplan.plan.edit import differs
from textual.strip import Strip

from mergeplan.plan.edit import PlanEditor

from ..gridmodel import GridModel, Quantity, RowKey, fmt_cell, heat, short_component, value_range
from ..richtext import clean, fit

CELL_WIDTH = 5  # 4 characters of value, then the edited marker (or a space, which separates cells)
LABEL_WIDTH = 5  # "L79 " / "head "
HEADER_HEIGHT = 2  # model names, then component names

ColumnKey = tuple[str, "str | None"]  # (component, model or None)


class PlanGrid(ScrollView, can_focus=True):
    """Shows one quantity of every tensor. Arrows move, Enter (or a click on the cursor
    cell) opens the tensor. Cells that differ from the plan as loaded carry a '*', values a
    saved edit session set (the edit log) a '+'; cells in the marked selection are underlined."""

    BINDINGS = [
        Binding("up,k", "move(-1, 0)", "Up", show=False, tooltip="previous layer"),
        Binding("down,j", "move(1, 0)", "Down", show=False, tooltip="next layer"),
        Binding("left,h", "move(0, -1)", "Left", show=False, tooltip="previous column"),
        Binding("right,l", "move(0, 1)", "Right", show=False, tooltip="next column"),
        Binding("pageup", "page(-1)", "Page up", show=False, tooltip="a screenful of layers up"),
        Binding("pagedown", "page(1)", "Page down", show=False, tooltip="a screenful of layers down"),
        Binding("home", "jump('top')", "First row", show=False, tooltip="first row"),
        Binding("end", "jump('bottom')", "Last row", show=False, tooltip="last row"),
        Binding("ctrl+left,shift+home", "jump('left')", "First column", show=False, tooltip="first column"),
        Binding("ctrl+right,shift+end", "jump('right')", "Last column", show=False, tooltip="last column"),
        Binding("enter", "choose", "Detail", show=False, tooltip="open the tensor under the cursor"),
    ]

    COMPONENT_CLASSES = {"plangrid--header", "plangrid--label", "plangrid--cursor", "plangrid--empty"}

    DEFAULT_CSS = """
    PlanGrid { background: $surface; }
    PlanGrid > .plangrid--header { color: $text; text-style: bold; background: $panel; }
    PlanGrid > .plangrid--label { color: $text; text-style: bold; background: $panel; }
    PlanGrid > .plangrid--cursor { color: $block-cursor-foreground; background: $block-cursor-background;
                                   text-style: bold; }
    PlanGrid > .plangrid--empty { color: $text-muted; }
    """

    @dataclass
    class TensorChosen(Message):
        tensor: str
        model: str | None

    @dataclass
    class CursorMoved(Message):
        row: int
        column: int

    def __init__(self, model: GridModel, editor: PlanEditor, **kwargs):
        super().__init__(**kwargs)
        self.gm = model
        self.editor = editor
        self.quantity: Quantity | None = None
        self.col_keys: list[ColumnKey] = []
        self.value_range: tuple[float, float] = (0.0, 1.0)
        self.values: dict = {}  # (row, component, model) -> the value shown
        self.cursor: tuple[int, int] = (0, 0)
        self._selected: set[tuple[int, int]] = set()
        # Per row, per column: (text, style without cursor/selection decoration).
        self._cells: list[list[tuple[str, Style]]] = []
        self._off_scale: set[tuple[RowKey, str, str | None]] = set()  # shown, but not coloured
        self._header: tuple[list[str], list[str]] = ([], [])

    # -- content --------------------------------------------------------------------------
    def show(self, q: Quantity, models: list[str] | None) -> None:
        """Fill for a quantity and model filter, keeping the cursor on the same cell."""
        old_cols, (row, col) = self.col_keys, self.cursor
        self.quantity = q
        self.col_keys = self.gm.columns(q, models)
        self.values = values = self.gm.values(q, models)
        self._off_scale = {key for key, v in values.items() if v is not None and
                           not self.gm.on_scale(self.gm.tensor_at(key[0], key[1]), q, key[2])}
        self.value_range = value_range(v for key, v in values.items() if key not in self._off_scale)
        empty = self.get_component_rich_style("plangrid--empty", partial=True)
        self._cells = [
            [self._cell(r, comp, m, values[(r, comp, m)], empty) for comp, m in self.col_keys] for r in self.gm.rows
        ]
        # Segments go to the terminal as they are: model ids and raw module names are
        # cleaned of control characters and cut by cells, not characters.
        top = [clean(m or "") for _, m in self.col_keys]
        names = [fit(short_component(comp), CELL_WIDTH) for comp, _ in self.col_keys]
        self._header = (top, names)
        self.virtual_size = Size(LABEL_WIDTH + CELL_WIDTH * len(self.col_keys), HEADER_HEIGHT + len(self.gm.rows))
        if 0 <= col < len(old_cols) and old_cols[col] in self.col_keys:
            col = self.col_keys.index(old_cols[col])
        elif 0 <= col < len(old_cols):  # same component, another model or none
            col = next((i for i, (c, _) in enumerate(self.col_keys) if c == old_cols[col][0]), 0)
        self.cursor = (-1, -1)
        self.move_cursor(row, col)
        self.refresh()

    def refresh_values(self) -> None:
        """Values changed (edit, undo): refill with the same columns."""
        if self.quantity is not None:
            models = [m for m in self.gm.models if any(m == cm for _, cm in self.col_keys)]
            self.show(self.quantity, models if self.quantity.per_model else None)

    def _cell(self, row: RowKey, comp: str, model: str | None, v: float | None, empty: Style) -> tuple[str, Style]:
        q = self.quantity
        name = self.gm.tensor_at(row, comp)
        field = q.field or ("omega" if q.key == "aim" else None)
        edited = False
        mark = " "
        m = model if q.per_model else None
        # Nothing differs from the plan as loaded until the editor copied it (first edit).
        if name is not None and field is not None and v is not None and self.editor.loaded is not self.editor.plan:
            edited = differs(self.editor.get(name, m, field), self.editor.planned(name, m, field))
        if edited:
            mark = "*"
        elif (self.gm.has_hand_edits and name is not None and field is not None
              and self.gm.set_by_hand(name, m, field, self.editor.get(name, m, field))):
            mark = "+"  # set in an earlier, saved review session (the plan's edit log)
        colours = None if (row, comp, model) in self._off_scale else heat(v, *self.value_range)
        style = Style(bgcolor=colours[0], color=colours[1]) if colours else empty
        if v is None and name is not None and self.gm.pending(name, q, model):
            return "?".rjust(CELL_WIDTH - 1) + " ", empty  # a statistic an edit made stale: known at apply
        return fmt_cell(v) + mark, style

    # -- cursor ---------------------------------------------------------------------------
    def at(self, row_index: int, col_index: int) -> tuple[RowKey, str, str | None]:
        comp, model = self.col_keys[col_index]
        return self.gm.rows[row_index], comp, model

    def cursor_cell(self) -> tuple[RowKey, str, str | None] | None:
        if not self.col_keys or not self.gm.rows:
            return None
        return self.at(*self.cursor)

    def move_cursor(self, row: int, col: int) -> None:
        nrows, ncols = len(self.gm.rows), len(self.col_keys)
        if not nrows or not ncols:
            return
        row = max(0, min(row, nrows - 1))
        col = max(0, min(col, ncols - 1))
        old = self.cursor
        if (row, col) == old:
            return
        self.cursor = (row, col)
        if not self._scroll_to_cursor():
            # Only the two touched rows and the header (column highlight) change.
            for r in {old[0], row}:
                self._refresh_row(r)
            self.refresh(Region(0, 0, self.size.width, HEADER_HEIGHT))
        self.post_message(self.CursorMoved(row, col))

    def _refresh_row(self, row: int) -> None:
        y = HEADER_HEIGHT + row - self.scroll_offset.y
        if HEADER_HEIGHT <= y < self.size.height:
            self.refresh(Region(0, y, self.size.width, 1))

    def _scroll_to_cursor(self) -> bool:
        """Scroll so the cursor cell is visible; True if the view moved."""
        view = self.scrollable_content_region
        if view.height <= HEADER_HEIGHT or self.cursor[0] < 0:
            return False  # not laid out yet; on_resize scrolls once it is
        row, col = self.cursor
        sx, sy = self.scroll_offset
        body_h = view.height - HEADER_HEIGHT
        body_w = max(CELL_WIDTH, view.width - LABEL_WIDTH)
        if row < sy:
            sy = row
        elif row >= sy + body_h:
            sy = row - body_h + 1
        x0 = col * CELL_WIDTH
        if x0 < sx:
            sx = x0
        elif x0 + CELL_WIDTH > sx + body_w:
            sx = x0 + CELL_WIDTH - body_w
        if (sx, sy) == tuple(self.scroll_offset):
            return False
        self.scroll_to(sx, sy, animate=False, immediate=True)
        self.refresh()
        return True

    def on_resize(self) -> None:
        self._scroll_to_cursor()

    def action_move(self, drow: int, dcol: int) -> None:
        self.move_cursor(self.cursor[0] + drow, self.cursor[1] + dcol)

    def action_page(self, direction: int) -> None:
        step = max(1, self.scrollable_content_region.height - HEADER_HEIGHT - 1)
        self.move_cursor(self.cursor[0] + direction * step, self.cursor[1])

    def action_jump(self, where: str) -> None:
        row, col = self.cursor
        row = {"top": 0, "bottom": len(self.gm.rows) - 1}.get(where, row)
        col = {"left": 0, "right": len(self.col_keys) - 1}.get(where, col)
        self.move_cursor(row, col)

    def action_choose(self) -> None:
        cell = self.cursor_cell()
        if cell is not None:
            name = self.gm.tensor_at(cell[0], cell[1])
            if name is not None:
                self.post_message(self.TensorChosen(name, cell[2]))

    def _cell_at(self, x: int, y: int) -> tuple[int, int] | None:
        if y < HEADER_HEIGHT or x < LABEL_WIDTH:
            return None
        row = y - HEADER_HEIGHT + self.scroll_offset.y
        col = (x - LABEL_WIDTH + self.scroll_offset.x) // CELL_WIDTH
        if row < len(self.gm.rows) and col < len(self.col_keys):
            return row, col
        return None

    def on_click(self, event: events.Click) -> None:
        cell = self._cell_at(event.x, event.y)
        if cell is None:
            return
        event.stop()
        if cell == self.cursor or event.chain >= 2:
            self.move_cursor(*cell)
            self.action_choose()
        else:
            self.move_cursor(*cell)

    # -- selection ------------------------------------------------------------------------
    def set_selected(self, cells: set[tuple[int, int]]) -> None:
        """Underline exactly these (row, column) cells; repaint only rows that change."""
        changed = cells ^ self._selected
        self._selected = set(cells)
        for r in {r for r, _ in changed}:
            self._refresh_row(r)

    # -- rendering ------------------------------------------------------------------------
    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base = self.rich_style
        sx, sy = self.scroll_offset
        if y < HEADER_HEIGHT:
            return self._header_line(y, sx, width, base)
        row = sy + y - HEADER_HEIGHT
        if row >= len(self._cells):
            return Strip.blank(width, base)
        crow, ccol = self.cursor
        label_style = self.get_component_rich_style("plangrid--cursor" if row == crow else "plangrid--label")
        label = Segment(self.gm.row_label(self.gm.rows[row]).ljust(LABEL_WIDTH)[:LABEL_WIDTH], label_style)
        c0, off = divmod(sx, CELL_WIDTH)
        body_w = max(0, width - LABEL_WIDTH)
        c1 = min(len(self.col_keys), c0 + (body_w + off) // CELL_WIDTH + 1)
        cursor_style = self.get_component_rich_style("plangrid--cursor")
        underline = Style(underline=True, bold=True)
        cells = self._cells[row]
        segs = []
        for c in range(c0, c1):
            text, style = cells[c]
            if row == crow and c == ccol:
                style = cursor_style
            elif (row, c) in self._selected:
                style = style + underline
            segs.append(Segment(text, style))
        body = Strip(segs).crop(off, off + body_w)
        return Strip([label, *body], LABEL_WIDTH + body.cell_length).adjust_cell_length(width, base)

    def _header_line(self, y: int, sx: int, width: int, base: Style) -> Strip:
        header = self.get_component_rich_style("plangrid--header")
        cursor_col = self.cursor[1]
        cursor_style = self.get_component_rich_style("plangrid--cursor")
        c0, off = divmod(sx, CELL_WIDTH)
        body_w = max(0, width - LABEL_WIDTH)
        c1 = min(len(self.col_keys), c0 + (body_w + off) // CELL_WIDTH + 1)
        if y == 0:
            # Model names, sticky: each over the visible part of its run of columns, so the
            # model stays named however far the grid scrolls sideways.
            models = self._header[0]
            segs, x, c = [], 0, c0
            while c < c1:
                end = c
                while end < len(models) and models[end] == models[c]:
                    end += 1
                x_end = min(body_w, end * CELL_WIDTH - sx)
                span = x_end - x
                if span > 0:
                    segs.append(Segment(set_cell_size(fit(models[c], max(0, span - 1)), span), header))
                x, c = x_end, end
            body = Strip(segs)
        else:
            texts = self._header[1]
            segs = [Segment(set_cell_size(texts[c], CELL_WIDTH), cursor_style if c == cursor_col else header)
                    for c in range(c0, c1)]
            body = Strip(segs).crop(off, off + body_w)
        label = Segment(" " * LABEL_WIDTH, header)
        return Strip([label, *body], LABEL_WIDTH + body.cell_length).adjust_cell_length(width, header)
