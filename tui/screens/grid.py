"""Layer grid screen: the heatmap with its legend, per-model sparklines across layers, and
the cell under the cursor; mark a rectangle with Space to edit a range; / and g jump."""

from __future__ import annotations

from fnmatch import fnmatch

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from mergeplan.plan import view
from mergeplan.plan.edit import differs

from ..gridmodel import ROW_EMBED, ROW_HEAD, PALETTE, Quantity
from ..keys import COMMON
from ..messages import EditRequested, OpenTensor, PlanChanged, Prefill
from ..richtext import clean, tell
from mergeplan.arch import component_groups

from ..selection import format_layers
from ..session import Session
from ..widgets.layerbars import LayerBars
from ..widgets.plangrid import PlanGrid
from ..widgets.statusline import StatusLine


class GridScreen(Screen):
    BINDINGS = [
        *COMMON,
        Binding("e", "edit", "Edit", tooltip="set / scale / reset the marked cells (or the cursor cell)"),
        Binding("space", "mark", "Mark", tooltip="start (or drop) a marked box; it runs to the cursor"),
        Binding("escape", "clear_mark", "Unmark", show=False, tooltip="drop the marked box"),
        Binding("v", "quantity(1)", "Show",
                tooltip="next shown quantity: density, weight, lambda, AIM omega, mean AIM factor, statistics"),
        Binding("V", "quantity(-1)", "Prev quantity", show=False, tooltip="previous shown quantity"),
        Binding("m", "models", "Models", tooltip="all task models side by side, or one at a time"),
        Binding("slash", "find", "Find", key_display="/", tooltip="jump to a tensor by (part of) its name"),
        Binding("g", "goto_layer", "Layer", show=False, tooltip="jump to a layer (number, emb or head)"),
    ]

    quantity_index: reactive[int] = reactive(0, init=False)
    # None: every task model side by side; else the one model shown.
    model_filter: reactive[str | None] = reactive(None, init=False)
    # (row index, column index) where Space was pressed; the selection runs to the cursor.
    anchor: reactive[tuple[int, int] | None] = reactive(None, init=False)

    def __init__(self, session: Session):
        super().__init__()
        self.session = session
        self.gm = session.grid
        self.quantities = self.gm.quantities()

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="grid-bar")
        yield LayerBars(id="bars")
        yield PlanGrid(self.gm, self.session.editor, id="grid")
        yield StatusLine(id="cell-info")
        yield Footer(compact=True)

    async def on_mount(self) -> None:
        # The most informative view for this plan: a guide's decision (AIM factors, LEWIS densities...).
        self.set_reactive(GridScreen.quantity_index, self.gm.initial_quantity())
        await self._redraw()
        grid = self.query_one(PlanGrid)
        # Start on the first decoder layer's first component rather than the embeddings.
        gm = self.gm
        if gm.layers:
            row = gm.rows.index(gm.layers[0])
            norms = set(component_groups(gm.components)["norms"])
            col = next((i for i, (c, _) in enumerate(grid.col_keys)
                        if c not in norms and gm.tensor_at(gm.layers[0], c)), 0)
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
        gm = self.gm
        series_models = (self._models() or gm.models) if q.per_model else [None]
        series = [(m or "tensors", gm.series(q, m, grid.values), gm.layers) for m in series_models]
        await self.query_one(LayerBars).update_series(series)
        self.query_one("#grid-bar", Static).update(self._legend(q, grid.value_range, self._any_pending(q, grid)))
        self._update_cell_info()

    def _any_pending(self, q: Quantity, grid: PlanGrid) -> bool:
        """Whether some cell shows `?` (a statistic an edit made stale)."""
        if not q.key.startswith("stat:"):
            return False
        return any(v is None and (name := self.gm.tensor_at(row, comp)) is not None and self.gm.pending(name, q, m)
                   for (row, comp, m), v in grid.values.items())

    def _legend(self, q: Quantity, scale: tuple[float, float], pending: bool = False) -> Text:
        """`label · models  lo ▇▇▇▇▇▇▇▇▇ hi  *edited +saved ?at apply`: what the colours and
        marks mean (`+saved` only for a plan with an edit log, `?at apply` only when a cell
        shows it)."""
        shown = "per tensor" if not q.per_model else (self.model_filter or "all models")
        bar = Text()
        bar.append(clean(q.label), style="bold")
        bar.append(f" · {clean(shown)} · {scale[0]:.3g} ")
        for colour in PALETTE:
            bar.append("█", style=colour)
        # The marks tersely (the help and docs/review.md spell them out), so that at 60
        # columns they fit after the scale: `*` unsaved edit, `+` set in a saved review.
        bar.append(f" {scale[1]:.3g}")
        if self.session.pending_count:
            bar.append("  *edited")
        if self.gm.has_hand_edits:
            bar.append("  +saved")
        if pending:
            bar.append("  ?at apply")
        if not q.field:
            bar.append("  read-only")
        if q.per_model and not self.model_filter and len(self.gm.models) > 1:
            bar.append("  m: one model")
        bar.no_wrap = True
        bar.overflow = "ellipsis"
        return bar

    async def watch_quantity_index(self) -> None:
        await self._redraw()

    async def watch_model_filter(self) -> None:
        self.anchor = None
        await self._redraw()

    def watch_anchor(self) -> None:
        self._update_selection()
        self._update_cell_info()

    async def on_plan_changed(self, message: PlanChanged) -> None:
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
        name = self.gm.tensor_at(row, comp)
        where = f"{self.gm.row_label(row)} {comp}" + (f" [{model}]" if model else "")
        if name is None:
            text = f"{where}: no tensor"
        else:
            v = self.gm.value(name, q, model)
            t = self.session.plan.tensor(name)
            if v is None and self.gm.pending(name, q, model):
                text = f"{where} {q.label} {view.AT_APPLY} (an edit changed the mask it measured)"
            elif v is None:
                text = f"{where}: no {q.label}" + (f" (copied from {t.source})" if t.source else "")
            else:
                text = f"{where} {q.label} {v:.4g}"
            if q.field and v is not None:
                m = model if q.per_model else None
                planned = self.session.editor.planned(name, m, q.field)
                if differs(planned, v):  # NaN-aware: a NaN value is not "planned nan" forever
                    text += f" (planned {planned:.4g})"
                elif self.gm.set_by_hand(name, m, q.field, v):
                    text += " (set by hand in a saved review)"
        box = self._selection_box()
        if box:
            text += f" · box {len(box[0])}x{len(box[1])} (e edits)"
        info.text = clean(text)

    def selection_prefill(self) -> Prefill:
        """The marked box (or the cursor cell) as edit-screen fields. A box over q..down
        means the projections, not the norm between them: its components include the norm
        columns but 1-D tensors stay off (the preview counts what that leaves out, and
        ticking 1-D takes them in); a box of norm columns alone has 1-D on."""
        grid = self.query_one(PlanGrid)
        gm = self.gm
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
        vector_comps = [c for c in comps if gm.is_vector_component(c)]
        vectors = bool(comps) and len(vector_comps) == len(comps)
        models = sorted({m for _, m in cols if m}, key=gm.models.index)
        layer_rows = [r for r in rows if isinstance(r, int)]
        pattern = ""
        if len(layer_rows) != len(rows):
            # embeddings / head rows: select by exact tensor name (no layer index to filter by).
            names = [gm.tensor_at(r, c) for r in rows if r in (ROW_EMBED, ROW_HEAD) for c in comps]
            names = [n for n in names if n]
            if not layer_rows and len(names) == 1:
                pattern = names[0]
                vectors = view.is_vector(self.session.plan.tensor(pattern))
        return Prefill(
            field=field,
            layers=format_layers(layer_rows) if layer_rows else "",
            components=",".join(comps) if (layer_rows or not pattern) else "",
            pattern=pattern,
            models=",".join(models) if models and set(models) != set(gm.models) else "",
            vectors=vectors,
        )

    # -- actions ------------------------------------------------------------------------
    def action_quantity(self, step: int) -> None:
        self.quantity_index = (self.quantity_index + step) % len(self.quantities)

    def action_models(self) -> None:
        options: list[str | None] = [None, *self.gm.models]
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
        self.post_message(EditRequested(self.selection_prefill()))

    def on_plan_grid_tensor_chosen(self, event: PlanGrid.TensorChosen) -> None:
        event.stop()
        self.post_message(OpenTensor(event.tensor))

    # -- jumps ----------------------------------------------------------------------------
    def action_find(self) -> None:
        from .dialogs import PathScreen

        self.app.push_screen(PathScreen("Jump to tensor", "", "name, part of it or a glob; Enter jumps, Esc cancels",
                                        empty="type part of a tensor name"), self.find)

    def find(self, text: str | None) -> None:
        if not text:
            return
        names = [t.name for t in self.session.plan.tensors]
        low = text.lower()
        name = next((n for n in names if n == text), None) or next((n for n in names if low in n.lower()), None) \
            or next((n for n in names if fnmatch(n, text)), None)
        if name is None:
            tell(self, f"no tensor name has {text!r}", severity="warning", timeout=4)
            return
        grid = self.query_one(PlanGrid)
        row = view.row_of(name)
        comp = next(c for r, c in self.gm.cell_tensors if r == row and name in self.gm.cell_tensors[(r, c)])
        model = grid.col_keys[grid.cursor[1]][1] if grid.col_keys else None
        col = next((i for i, k in enumerate(grid.col_keys) if k == (comp, model)),
                   next((i for i, (c, _) in enumerate(grid.col_keys) if c == comp), None))
        if col is not None:
            grid.move_cursor(self.gm.rows.index(row), col)
        if col is None or self.gm.tensor_at(row, comp) != name:
            self.post_message(OpenTensor(name))  # a bias behind its weight's cell: show it

    def action_goto_layer(self) -> None:
        from .dialogs import PathScreen

        last = self.gm.layers[-1] if self.gm.layers else 0
        self.app.push_screen(PathScreen("Jump to layer", "", f"0-{last}, emb or head; Enter jumps, Esc cancels",
                                        empty="type a layer number"), self.goto_layer)

    def goto_layer(self, text: str | None) -> None:
        if not text:
            return
        key = text.strip().lower().lstrip("l")
        row = int(key) if key.isdecimal() else {"emb": ROW_EMBED, "head": ROW_HEAD}.get(text.strip().lower())
        if row not in self.gm.rows:
            tell(self, f"no layer {text!r} in this plan", severity="warning", timeout=4)
            return
        grid = self.query_one(PlanGrid)
        grid.move_cursor(self.gm.rows.index(row), grid.cursor[1])
