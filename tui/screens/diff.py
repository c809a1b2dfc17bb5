"""Diff: the plan being edited against the plan as loaded, or against another plan file."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.app import ComposeResult
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from mergeplan.errors import MergeplanError
from mergeplan.plan.codec import read_plan
from mergeplan.plan.diff import diff_plans
from mergeplan.plan.names import parse_name

from ..richtext import markup, text
from ..tensorinfo import summarize
from .dialogs import PathScreen

if TYPE_CHECKING:
    from ..app import ReviewApp

LOADED, OTHER = "loaded", "other"


class DiffScreen(Screen):
    BINDINGS = [
        Binding("t", "toggle", "Loaded/other", tooltip="switch between the plan as loaded and the other plan"),
        Binding("c", "compare", "Compare file", tooltip="choose another plan file to compare with"),
    ]

    against: reactive[str] = reactive(LOADED, init=False)

    @property
    def review(self) -> "ReviewApp":
        return cast("ReviewApp", self.app)

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="diff-bar")
        yield DataTable(id="diff-table", cursor_type="row", zebra_stripes=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("tensor / where", key="where")
        table.add_column("model", key="model")
        table.add_column("field", key="field")
        table.add_column("old", key="old")
        table.add_column("new", key="new")
        if self.review.compare_plan is not None:
            self.set_reactive(DiffScreen.against, OTHER)
        self.watch(self.review, "revision", self.refresh_rows, init=False)
        self.refresh_rows()
        table.focus()

    def watch_against(self) -> None:
        self.refresh_rows()

    def refresh_rows(self) -> None:
        app = self.review
        if self.against == OTHER and app.compare_plan is not None:
            base, label = app.compare_plan, app.compare_path
        else:
            base, label = app.editor.loaded, "as last saved" if app.saved_once else "as loaded"
        rows = diff_plans(base, app.editor.plan)
        table = self.query_one(DataTable)
        table.clear()
        for i, r in enumerate(rows):
            table.add_row(*(text(x) for x in (_short_name(r.where), r.model or "", r.field, _cell(r.old), _cell(r.new))),
                          key=str(i))
        # The path goes in as a variable: literal text, never markup (rich's escape() is not Textual's).
        self.query_one("#diff-bar", Static).update(
            markup("[b]$n differences[/b]: $label (old) -> this plan (new)", n=len(rows), label=label))

    def action_toggle(self) -> None:
        if self.review.compare_plan is None:
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
                self.review.tell(str(e), severity="error", timeout=8)
                return
            self.review.compare_plan = plan
            self.review.compare_path = path
            if self.against == OTHER:
                self.refresh_rows()
            self.against = OTHER

        self.app.push_screen(PathScreen("Compare with plan file", self.review.compare_path or "",
                                        "old = that file, new = this plan"), chosen)


def _short_name(where: str) -> str:
    # "model.layers.12.mlp.down_proj.weight" -> "L12 mlp.down_proj.weight": room for old/new at 80 columns.
    pn = parse_name(where)
    if pn.layer is None:
        return where
    marker = f"{pn.layer}."
    cut = where.find(marker, where.find("layers.") if "layers." in where else 0)
    return f"L{pn.layer} {where[cut + len(marker):]}" if cut >= 0 else where


def _cell(v) -> str:
    text = summarize(v)
    return text if len(text) <= 18 else text[:15] + "..."
