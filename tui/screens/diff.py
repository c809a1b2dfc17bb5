"""Diff: the plan being edited against the plan as loaded, or against another plan file."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from mergeplan.errors import MergeplanError
from mergeplan.plan.codec import read_plan
from mergeplan.plan.diff import diff_plans, is_mask_digest, summarize as summarize_diff
from mergeplan.plan.names import parse_name
from mergeplan.plan.view import short_component

from ..keys import BACK, COMMON
from ..messages import PlanChanged
from ..richtext import markup, tell, text
from ..session import Session
from ..tensorinfo import summarize
from .dialogs import PathScreen

LOADED, OTHER = "loaded", "other"


class DiffScreen(Screen):
    BINDINGS = [
        *COMMON,
        BACK,
        Binding("t", "toggle", "Loaded/other", tooltip="switch between the plan as loaded and the other plan"),
        Binding("c", "compare", "Compare file", tooltip="choose another plan file to compare with"),
    ]

    against: reactive[str] = reactive(LOADED, init=False)

    def __init__(self, session: Session):
        super().__init__()
        self.session = session
        self.rows: list = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="diff-bar")
        yield DataTable(id="diff-table", cursor_type="row", zebra_stripes=True)
        yield Static(id="diff-row")  # the highlighted change in full: names and values may be cut above
        yield Footer(compact=True)

    def on_mount(self) -> None:
        if self.session.compare_plan is not None:
            self.set_reactive(DiffScreen.against, OTHER)
        self.refresh_rows()
        self.query_one(DataTable).focus()

    def on_resize(self) -> None:
        self.refresh_rows()

    def watch_against(self) -> None:
        self.refresh_rows()

    def on_plan_changed(self, message: PlanChanged) -> None:
        self.refresh_rows()

    def refresh_rows(self) -> None:
        ses = self.session
        if self.against == OTHER and ses.compare_plan is not None:
            base, label = ses.compare_plan, ses.compare_path
        else:
            base, label = ses.editor.loaded, "as last saved" if ses.saved_once else "as loaded"
        rows = diff_plans(base, ses.plan)
        self.rows = rows
        # Values cut shorter below 80 columns, so that old -> new stays whole beside the name.
        most = 14 if self.size.width >= 80 else 10
        cells = [[_short_name(r.where), r.model or "", r.field,
                  f"{_cell(r.shown('old'), most)} -> {_cell(r.shown('new'), most)}"] for r in rows]
        widths = _widths(cells, self.size.width)
        table = self.query_one(DataTable)
        at = table.cursor_row
        table.clear(columns=True)
        for (head, key), w in zip(_COLUMNS, widths):
            table.add_column(head, key=key, width=w)
        for i, (c, r) in enumerate(zip(cells, rows)):
            c[0] = _fit(c[0], widths[0], r.where)
            table.add_row(*map(text, c), key=str(i))
        if rows:
            table.move_cursor(row=min(at, len(rows) - 1))
        else:
            self.query_one("#diff-row", Static).update("")
        fields = ", ".join(f"{f.field} {f.values}" for f in summarize_diff(rows).fields[:3])
        # The path goes in as a variable: literal text, never markup (rich's escape() is not Textual's).
        self.query_one("#diff-bar", Static).update(
            markup("[b]$n differences[/b]: $label (old) -> this plan (new) · $fields", n=len(rows),
                   fields=fields or "none", label=label))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if 0 <= event.cursor_row < len(self.rows):
            r = self.rows[event.cursor_row]
            self.query_one("#diff-row", Static).update(text(
                f"{r.where}" + (f" [{r.model}]" if r.model else "")
                + f" {r.field}: {summarize(r.shown('old'))} -> {summarize(r.shown('new'))}"))

    def action_toggle(self) -> None:
        if self.session.compare_plan is None:
            self.action_compare()
            return
        self.against = LOADED if self.against == OTHER else OTHER

    def action_compare(self) -> None:
        def chosen(path: str | None) -> None:
            if not path:
                return
            try:
                plan = read_plan(path)
            except MergeplanError as e:
                tell(self, str(e), severity="error", timeout=8)
                return
            self.session.compare_plan = plan
            self.session.compare_path = path
            if self.against == OTHER:
                self.refresh_rows()
            self.against = OTHER

        self.app.push_screen(PathScreen("Compare with plan file", self.session.compare_path or "",
                                        "old = that file, new = this plan"), chosen)


_COLUMNS = (("where", "where"), ("model", "model"), ("field", "field"), ("old -> new", "change"))


def _widths(cells: list[list[str]], width: int) -> list[int]:
    """Column widths for a screen `width` wide: model, field and old -> new as wide as their
    longest cell (within limits), the tensor name gets what is left (at least 8: `L12 down`);
    each column takes 2 more for its padding, and the scrollbar 2."""
    want = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _) in enumerate(_COLUMNS)]
    model, field, change = min(want[1], 12), min(want[2], 14), min(want[3], 31)
    where = max(8, min(want[0], width - model - field - change - 2 * len(_COLUMNS) - 2))
    return [where, model, field, change]


def _fit(name: str, width: int, where: str = "") -> str:
    """A tensor's short name in `width` characters: without `.weight` first, then as the
    grid labels it (`L0 down`, `L3 q.bias`), then cut in the middle. The line under the
    table names the highlighted tensor in full."""
    if len(name) > width and name.endswith(".weight"):
        name = name[: -len(".weight")]
    if len(name) > width and where:
        pn = parse_name(where)
        if pn.layer is not None:
            name = f"L{pn.layer} {short_component(pn.component)}" + ("" if pn.kind == "weight" else f".{pn.kind}")
    if len(name) <= width:
        return name
    keep = width - 1
    return name[: keep - keep // 2] + "…" + name[len(name) - keep // 2:]


def _short_name(where: str) -> str:
    # "model.layers.12.mlp.down_proj.weight" -> "L12 mlp.down_proj.weight": room for old/new at 80 columns.
    pn = parse_name(where)
    if pn.layer is None:
        return where
    marker = f"{pn.layer}."
    cut = where.find(marker, where.find("layers.") if "layers." in where else 0)
    return f"L{pn.layer} {where[cut + len(marker):]}" if cut >= 0 else where


def _cell(v, most: int = 14) -> str:
    if v is None:
        return "-"
    if is_mask_digest(v):
        return v[:8]
    text = summarize(v)
    return text if len(text) <= most else text[: most - 3] + "..."
