"""Layer grid screen: the heatmap, per-model sparklines across layers, and the cell under
the cursor; mark a rectangle with Space to edit a range."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.app import ComposeResult
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from ..gridmodel import ROW_EMBED, ROW_HEAD, Quantity
from ..richtext import clean, markup
from ..selection import GROUPS, format_layers
from ..widgets.layerbars import LayerBars
from ..widgets.plangrid import PlanGrid
from ..widgets.statusline import StatusLine
from .edit import Prefill

if TYPE_CHECKING:
    from ..app import ReviewApp


class GridScreen(Screen):
    BINDINGS = [
        Binding("e", "edit", "Edit", tooltip="set / scale / reset the marked cells (or the cursor cell)"),
        Binding("space", "mark", "Mark", tooltip="start (or drop) a marked box; it runs to the cursor"),
        Binding("escape", "clear_mark", "Unmark", show=False, tooltip="drop the marked box"),
        Binding("v", "quantity(1)", "Show",
                tooltip="next shown quantity: density, weight, lambda, AIM omega, mean AIM factor, statistics"),
        Binding("V", "quantity(-1)", "Prev quantity", show=False, tooltip="previous shown quantity"),
        Binding("m", "models", "Models", tooltip="all task models side by side, or one at a time"),
    ]

    quantity_index: reactive[int] = reactive(0, init=False)
    # None: every task model side by side; else the one model shown.
    model_filter: reactive[str | None] = reactive(None, init=False)
    # (row index, column index) where Space was pressed; the selection runs to the cursor.
    anchor: reactive[tuple[int, int] | None] = reactive(None, init=False)

    @property
    def review(self) -> "ReviewApp":
        return cast("ReviewApp", self.app)

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="grid-bar")
        yield LayerBars(id="bars")
        yield PlanGrid(self.review.grid_model, self.review.editor, id="grid")
        yield StatusLine(id="cell-info")
        yield Footer(compact=True)

    async def on_mount(self) -> None:
        self.quantities = self.review.grid_model.quantities()
        self.watch(self.review, "revision", self._plan_changed, init=False)
        await self._redraw()
        grid = self.query_one(PlanGrid)
        # Start on the first decoder layer's first component rather than the embeddings.
        gm = self.review.grid_model
        if gm.layers:
            row = gm.rows.index(gm.layers[0])
            col = next((i for i, (c, _) in enumerate(grid.col_keys)
                        if c not in GROUPS["norms"] and gm.tensor_at(gm.layers[0], c)), 0)
            grid.move_cursor(row, col)
        grid.focus()

    @property
    def quantity(self) -> Quantity:
        return self.quantities[self.quantity_index % len(self.quantities)]

    def _models(self) -> list[str] | None:
        return [self.model_filter] if self.model_filter else None

    async def _redraw(self) -> None:
        q = self.quantity
        grid = self.query_one(PlanGrid)
        grid.show(q, self._models())
        self._update_selection()
        gm = self.review.grid_model
        series_models = (self._models() or gm.models) if q.per_model else [None]
        series = [(m or "tensors", gm.series(q, m), gm.layers) for m in series_models]
        await self.query_one(LayerBars).update_series(series)
        shown = "all models" if not q.per_model or not self.model_filter else self.model_filter
        if not q.per_model:
            shown = "per tensor"
        # A statistic's label and a model id come from the plan: variables, inserted literally.
        self.query_one("#grid-bar", Static).update(markup(
            "[b]$label[/b] · $shown · $scale", label=q.label, shown=shown,
            scale=f"scale {grid.value_range[0]:.3g}..{grid.value_range[1]:.3g}" + ("" if q.field else " · read-only"),
        ))
        self._update_cell_info()

    async def watch_quantity_index(self) -> None:
        await self._redraw()

    async def watch_model_filter(self) -> None:
        self.anchor = None
        await self._redraw()

    def watch_anchor(self) -> None:
        self._update_selection()
        self._update_cell_info()

    async def _plan_changed(self) -> None:
        await self._redraw()

    # -- selection ----------------------------------------------------------------------
    def _selection_box(self) -> tuple[range, range] | None:
        if self.anchor is None:
            return None
        row, col = self.query_one(PlanGrid).cursor
        r0, r1 = sorted((self.anchor[0], row))
        c0, c1 = sorted((self.anchor[1], col))
        return range(r0, r1 + 1), range(c0, c1 + 1)

    def _update_selection(self) -> None:
        box = self._selection_box()
        cells = {(r, c) for r in box[0] for c in box[1]} if box else set()
        self.query_one(PlanGrid).set_selected(cells)

    def on_plan_grid_cursor_moved(self, event: PlanGrid.CursorMoved) -> None:
        if self.anchor is not None:
            self._update_selection()
        self._update_cell_info()

    def _update_cell_info(self) -> None:
        grid = self.query_one(PlanGrid)
        cell = grid.cursor_cell()
        info = self.query_one("#cell-info", StatusLine)
        if cell is None:
            info.text = ""
            return
        row, comp, model = cell
        q = self.quantity
        name = self.review.grid_model.tensor_at(row, comp)
        where = f"{self.review.grid_model.row_label(row)} {comp}" + (f" [{model}]" if model else "")
        if name is None:
            text = f"{where}: no tensor"
        else:
            v = self.review.grid_model.value(name, q, model)
            t = self.review.editor.plan.tensor(name)
            if v is None:
                text = f"{where}: no {q.label}" + (f" (copied from {t.source})" if t.source else "")
            else:
                text = f"{where} {q.label} {v:.4g}"
            if q.field and v is not None:
                planned = self.review.editor.planned(name, model if q.per_model else None, q.field)
                if planned != v:
                    text += f" (planned {planned:.4g})"
        box = self._selection_box()
        if box:
            text += f" · marked {len(box[0])} rows x {len(box[1])} cols (e edits them)"
        info.text = clean(text)

    def selection_prefill(self) -> Prefill:
        """The marked box (or the cursor cell) as edit-screen fields."""
        grid = self.query_one(PlanGrid)
        gm = self.review.grid_model
        q = self.quantity
        field = q.field or ("omega" if q.key == "aim" else "density")
        if grid.cursor_cell() is None:  # nothing shown (no task models / tensors): an empty form
            return Prefill(field=field)
        box = self._selection_box()
        row, col = grid.cursor
        rows_i, cols_i = box if box else (range(row, row + 1), range(col, col + 1))
        rows = [gm.rows[r] for r in rows_i]
        cols = [grid.col_keys[c] for c in cols_i]
        comps = sorted({c for c, _ in cols}, key=gm.components.index)
        models = sorted({m for _, m in cols if m}, key=gm.models.index)
        layer_rows = [r for r in rows if isinstance(r, int)]
        pattern = ""
        if len(layer_rows) != len(rows):
            # embeddings / head rows: select by exact tensor name (no layer index to filter by).
            names = [gm.tensor_at(r, c) for r in rows if r in (ROW_EMBED, ROW_HEAD) for c in comps]
            names = [n for n in names if n]
            if not layer_rows and len(names) == 1:
                pattern = names[0]
        return Prefill(
            field=field,
            layers=format_layers(layer_rows) if layer_rows else "",
            components=",".join(comps) if (layer_rows or not pattern) else "",
            pattern=pattern,
            models=",".join(models) if models and set(models) != set(gm.models) else "",
        )

    # -- actions ------------------------------------------------------------------------
    def action_quantity(self, step: int) -> None:
        self.quantity_index = (self.quantity_index + step) % len(self.quantities)

    def action_models(self) -> None:
        options: list[str | None] = [None, *self.review.grid_model.models]
        self.model_filter = options[(options.index(self.model_filter) + 1) % len(options)]

    def action_mark(self) -> None:
        grid = self.query_one(PlanGrid)
        if grid.cursor_cell() is None:
            return
        cur = grid.cursor
        self.anchor = None if self.anchor == cur else cur

    def action_clear_mark(self) -> None:
        self.anchor = None

    def action_edit(self) -> None:
        self.review.open_edit(self.selection_prefill())

    def on_plan_grid_tensor_chosen(self, event: PlanGrid.TensorChosen) -> None:
        self.review.open_detail(event.tensor)
