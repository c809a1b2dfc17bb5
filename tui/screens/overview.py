"""Overview: what this plan is (models, method, guides, calibration, digest, history)."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from mergeplan.plan.model import OP_MERGE

from ..keys import BACK, COMMON
from ..messages import PlanChanged, StatusChanged
from ..richtext import add_row, section, text
from ..session import Session
from ..tensorinfo import flatten_stats, summarize

_STATUS_STYLE = {"found": "green", "changed": "bold red", "missing": "yellow"}


class OverviewScreen(Screen):
    BINDINGS = [*COMMON, BACK]

    def __init__(self, session: Session):
        super().__init__()
        self.session = session

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="overview-scroll"):
            yield Static(id="overview-body")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self._render_body()
        self.query_one("#overview-scroll").focus()

    def on_plan_changed(self, message: PlanChanged) -> None:
        self._render_body()

    def on_status_changed(self, message: StatusChanged) -> None:
        self._render_body()

    def _render_body(self) -> None:
        self.query_one("#overview-body", Static).update(render_overview(self.session))


def _kv_table(title: str, rows: list[tuple[str, str]]) -> Group:
    tab = Table(box=None, padding=(0, 1), show_header=False)
    # No no_wrap column in these tables: Rich gives an over-wide no_wrap cell its width and
    # squeezes the other columns to nothing, so a plan with a 1000-character key, id, path
    # or tool name could hide its values, or the "changed" status. Wrappable columns shrink
    # widest first instead (a long name is cut with an ellipsis); when all fits, nothing moves.
    tab.add_column(style="cyan")
    tab.add_column()
    for k, v in rows:
        add_row(tab, k, v)
    return section(title, tab)


def render_overview(session: Session) -> Group:
    plan = session.plan
    merged = sum(t.op == OP_MERGE for t in plan.tensors)
    layers = session.grid.layers
    rows = [
        ("file", session.editor.path or "(unsaved)"),
        ("method", plan.method + (" · " + ", ".join(f"{k}={summarize(v)}" for k, v in sorted(plan.params.items()))
                                  if plan.params else "")),
        ("seed", str(plan.seed)),
        ("out dtype", plan.out_dtype or "as inputs"),
        ("tensors", f"{len(plan.tensors)} ({merged} merged, {len(plan.tensors) - merged} copied) · "
                    f"{len(layers)} layers"),
        ("digest", session.file_digest or "(not saved yet)"),
        ("created", f"{plan.created or '?'} by mergeplan {plan.mergeplan_version or '?'}"),
    ]
    if plan.recipe.get("path"):
        rows.append(("recipe", str(plan.recipe["path"])))
    parts: list = [_kv_table("Plan", rows)]

    mtab = Table(box=None, padding=(0, 1),
                 header_style="bold")
    for col in ("id", "role", "path", "on this machine"):
        mtab.add_column(col)  # wrappable: see _kv_table
    for m in plan.models:
        status = session.model_status.get(m.id, "checking...")
        # A status quotes paths and errors from the model directory: cleaned like plan text.
        add_row(mtab, m.id, m.role, m.path, text(status, style=_STATUS_STYLE.get(status.split(" ")[0].rstrip(":"), "")))
    parts.append(section("Models", mtab))

    if plan.guides:
        parts.append(_kv_table("Guides", flatten_stats(plan.guides)))
    else:
        parts.append(_kv_table("Guides", [("none", "values come from the recipe")]))
    if plan.calibration:
        parts.append(_kv_table("Calibration", flatten_stats(plan.calibration)))
    if plan.stats:
        parts.append(_kv_table("Plan statistics", flatten_stats(plan.stats, limit=12)))
    if plan.notes:
        # Notes are free text: their line breaks are meant; other control characters are not.
        parts.append(_kv_table("Notes", [("-", text(n, keep_newlines=True)) for n in plan.notes]))

    pending = session.pending_count
    htab = Table(box=None, padding=(0, 1),
                 header_style="bold")
    for col in ("when", "tool", "changes"):
        htab.add_column(col)  # wrappable: see _kv_table
    for entry in plan.edit_log:
        changes = entry.get("changes", [])
        first = ", ".join(_change_text(c) for c in changes[:2]) + (f" +{len(changes) - 2} more" if len(changes) > 2 else "")
        add_row(htab, str(entry.get("time", "?")), str(entry.get("tool", "?")), f"{len(changes)}: {first}")
    if pending:
        add_row(htab, "now", "review", Text(f"{pending} unsaved (s saves, d shows them)", style="bold yellow"))
    if not plan.edit_log and not pending:
        add_row(htab, "—", "", "no edits since planning")
    parts.append(section("Edit history", htab))
    return Group(*parts)


def _change_text(c) -> str:
    try:
        tensor, model, field, old, new = c
    except (TypeError, ValueError):
        return str(c)
    return f"{tensor}{f' [{model}]' if model else ''} {field} {summarize(old)}->{summarize(new)}"
