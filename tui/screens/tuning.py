"""Tuning: the candidates a `tune:` search scored, best first, the chosen one marked, a bar
per task (share of the expert's gain recovered); Enter re-plans with another candidate
(`mergeplan pick`) into a new plan file beside this one.

What the record means (sorting, gains, the verdict) is mergeplan.tune.report's; this screen
only lays it out.
"""

from __future__ import annotations

from pathlib import Path

from rich.text import Text as RichText
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from mergeplan.tune.report import MAX_COLUMNS, bar, candidate_rows, short_names, verdict_lines

from ..keys import BACK, COMMON
from ..richtext import fit, tell, text
from ..session import Session
from .dialogs import ConfirmScreen


class TuningScreen(Screen):
    BINDINGS = [
        *COMMON,
        BACK,
        Binding("enter", "pick", "Pick", tooltip="re-plan with this candidate into a new plan file"),
    ]

    def __init__(self, session: Session):
        super().__init__()
        self.session = session
        self.rows = candidate_rows(session.plan.tuning or {})

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="tuning-bar")
        yield DataTable(id="tuning-table", cursor_type="row", zebra_stripes=True)
        yield Static(id="tuning-row")  # the highlighted candidate in full: the values column may be cut
        yield Footer(compact=True)

    def on_mount(self) -> None:
        tuning = self.session.plan.tuning or {}
        obj = tuning.get("objective", {})
        head = text(f"{obj.get('kind', '?')} ({'higher' if obj.get('direction') == 'maximize' else 'lower'} "
                    f"is better) · {tuning.get('strategy', '?')} · bars: expert's gain recovered")
        # verdict_lines is Rich markup with every plan string escaped (safetext.markup)
        self.query_one("#tuning-bar", Static).update(
            RichText("\n").join([head, *(RichText.from_markup(line, emoji=False) for line in verdict_lines(tuning))]))
        self._fill()
        self.query_one(DataTable).focus()

    def on_resize(self) -> None:
        self._fill()

    def _fill(self) -> None:
        """The table laid out for the screen's width: the task bars narrow (8 down to 3
        cells) before the values column is cut."""
        table = self.query_one(DataTable)
        at = table.cursor_row
        tasks = list(next((r.losses for r in self.rows if r.score is not None), {}))[:MAX_COLUMNS]
        keys = list(dict.fromkeys(k for r in self.rows for k in r.assignment))[:MAX_COLUMNS]  # see MAX_COLUMNS
        labels = short_names(keys)
        values = [" ".join(f"{labels[k]}={_short(v)}" for k, v in r.assignment.items() if k in labels)
                  or "(recipe as written)" for r in self.rows]
        want = max([len("values"), *map(len, values)])
        spare = self.size.width - 4 - 7 - want - 2 * (3 + len(tasks)) - 2  # padding 2 per column, scrollbar
        width = max(3, min(8, spare // len(tasks))) if tasks else 8
        table.clear(columns=True)
        table.add_column("#", key="id", width=4)
        table.add_column("score", key="score", width=7)
        for t in tasks:
            table.add_column(text(fit(t, width)), key=f"task:{t}", width=width)
        table.add_column("values", key="values", width=want)  # set: a rebuilt table kept the header's width
        for r, v in zip(self.rows, values):
            score = "failed" if r.score is None else f"{r.score:.4f}"
            table.add_row(("●" if r.chosen else " ") + str(r.id), score,
                          *[bar(r.gains.get(t), width) for t in tasks], text(v), key=str(r.id))
        if self.rows:
            table.move_cursor(row=min(at, len(self.rows) - 1))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if not (0 <= event.cursor_row < len(self.rows)):
            return
        r = self.rows[event.cursor_row]
        values = ", ".join(f"{k}={_short(v)}" for k, v in r.assignment.items()) or "the recipe as written"
        losses = " ".join(f"{t} {v:.4f}" for t, v in r.losses.items() if isinstance(v, (int, float)))
        self.query_one("#tuning-row", Static).update(
            text(f"#{r.id}: {values}" + (f" · loss {losses}" if losses else "")))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        # Enter on the table is the table's "select" (it has the focus); it means pick here.
        event.stop()
        self.action_pick()

    def action_pick(self) -> None:
        table = self.query_one(DataTable)
        if not self.rows:
            return
        row = self.rows[table.cursor_row]
        if row.chosen:
            tell(self, f"candidate #{row.id} is already the plan")
            return
        if row.score is None:
            tell(self, f"candidate #{row.id} failed during the search; pick another")
            return
        out = _pick_path(self.session.editor.path, row.id)

        def answered(yes: bool | None) -> None:
            if yes:
                self.pick(row.id, out)

        self.app.push_screen(ConfirmScreen(
            f"Re-plan with candidate #{row.id} into {out}?\nThis reads the input models and calibrates "
            "again (as long as `mergeplan plan`); the inputs must be the ones the search read.",
            yes="Re-plan"), answered)

    @work(thread=True, exclusive=True, group="pick")
    def pick(self, cid: int, out: Path) -> None:
        from mergeplan.plan.codec import write_plan
        from mergeplan.tune.pick import pick

        self.app.call_from_thread(tell, self, f"re-planning with candidate #{cid}...")
        try:
            plan = pick(self.session.plan, cid, plan_path=self.session.editor.path)
            if out.exists():  # appeared during the minutes of re-planning: never overwritten
                out = _pick_path(self.session.editor.path, cid)
            write_plan(plan, out)
        except Exception as e:  # a toast, never the end of the review (unsaved edits stay)
            self.app.call_from_thread(tell, self, f"pick failed: {e}", severity="error", timeout=10)
            return
        self.app.call_from_thread(tell, self, f"wrote {out} (candidate #{cid}); review it with "
                                              f"`mergeplan review {out}`", timeout=10)


def _short(v) -> str:
    """Values as a reader scans them in a narrow column: 0.202191 -> 0.202."""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _pick_path(plan_path: str | None, cid: int) -> Path:
    """`tuned.plan` -> `tuned.candidate-3.plan`, numbered on if that exists (never overwritten)."""
    p = Path(plan_path or "merge.plan")
    out = p.with_name(f"{p.stem}.candidate-{cid}{p.suffix or '.plan'}")
    n = 2
    while out.exists():
        out = p.with_name(f"{p.stem}.candidate-{cid}-{n}{p.suffix or '.plan'}")
        n += 1
    return out
