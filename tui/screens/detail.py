"""Tensor detail: every decision for one tensor and the statistics behind it."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from mergeplan.plan import view
from mergeplan.plan.model import OP_MERGE
from mergeplan.plan.names import parse_name

from ..keys import COMMON
from ..messages import EditRequested, PlanChanged, Prefill
from ..richtext import add_row, clean, section, text
from ..session import Session
from ..tensorinfo import aim_summary, flatten_stats, fmt_num, layer_stats, per_model_stats, summarize


class DetailScreen(Screen):
    BINDINGS = [
        *COMMON,
        Binding("escape,backspace", "back", "Back", tooltip="back to the grid"),
        Binding("left_square_bracket", "step(-1)", "Prev", key_display="[", tooltip="previous tensor in plan order"),
        Binding("right_square_bracket", "step(1)", "Next", key_display="]", tooltip="next tensor in plan order"),
        Binding("e", "edit", "Edit", tooltip="edit this tensor"),
    ]

    tensor: reactive[str] = reactive("", init=False)

    def __init__(self, session: Session, tensor: str):
        super().__init__()
        self.session = session
        self.set_reactive(DetailScreen.tensor, tensor)

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="detail-scroll"):
            yield Static(id="detail-body")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self._render_body()
        self.query_one("#detail-scroll").focus()

    def watch_tensor(self) -> None:
        self._render_body()

    def on_plan_changed(self, message: PlanChanged) -> None:
        self._render_body()

    def _render_body(self) -> None:
        self.query_one("#detail-body", Static).update(render_tensor(self.session, self.tensor))

    def action_back(self) -> None:
        self.dismiss()

    def action_step(self, step: int) -> None:
        names = [t.name for t in self.session.plan.tensors]
        self.tensor = names[(names.index(self.tensor) + step) % len(names)]

    def action_edit(self) -> None:
        t = self.session.plan.tensor(self.tensor)
        field = "density" if t.contributions and t.op == OP_MERGE else "lambda"
        # This one tensor, chosen explicitly: a norm or bias too.
        self.post_message(EditRequested(Prefill(field=field, pattern=self.tensor, vectors=True)))


def render_tensor(session: Session, name: str) -> Group:
    editor = session.editor
    plan = editor.plan
    t = plan.tensor(name)
    pn = parse_name(name)
    models = [m.id for m in plan.task_models]
    parts: list = []

    # Every string from the plan goes through clean() (Text itself is never parsed as markup).
    head = Text()
    head.append(clean(name), style="bold")
    head.append("\n")
    where = f"layer {pn.layer}" if pn.layer is not None else "outside the blocks"
    shape = "x".join(map(str, t.shape)) or "scalar"
    head.append(clean(f"{where} · {pn.component} · shape {shape} · {t.dtype} · op {t.op}"))
    if t.source:
        head.append(clean(f" from {t.source}"))
    if t.params:
        head.append("\nparams: " + clean(", ".join(f"{k}={summarize(v)}" for k, v in sorted(t.params.items()))))
        planned_lambda = editor.planned(name, None, "lambda")
        if t.op == OP_MERGE and editor.get(name, None, "lambda") != planned_lambda:
            head.append(f" (planned lambda {fmt_num(planned_lambda)})", style="bold yellow")
    parts.append(head)

    if t.contributions:
        # One column per model, one row per fact: fits 80 columns with three or four models.
        cs = t.contributions
        infos = {c.model: view.mask_info(c) for c in cs}
        tab = Table(box=None, padding=(0, 1),
                    header_style="bold")
        # Wrappable: a no_wrap column holding "overlap <a 1000-character model id>" would
        # squeeze the model columns to nothing (see overview._kv_table).
        tab.add_column("", style="cyan")
        for c in cs:
            tab.add_column(text(c.model))  # a str header would be parsed as Rich markup

        def changed(value: float, planned: float | None) -> Text:
            out = Text(fmt_num(value))
            if planned is not None and planned != value:
                out.append(f" (was {fmt_num(planned)})", style="bold yellow")
            return out

        add_row(tab, "weight", *(changed(c.weight, editor.planned(name, c.model, "weight")) for c in cs))
        add_row(tab, "density", *(changed(c.density, editor.planned(name, c.model, "density")) for c in cs))
        add_row(tab, "mask", *(infos[c.model].kind + (f" {infos[c.model].params}" if infos[c.model].params else "")
                              for c in cs))
        add_row(tab, "mask digest", *(text(infos[c.model].digest, style="bold yellow" if infos[c.model].recompute
                                          else "") for c in cs))
        # Kept fractions as they stand: the planner's measurement while the mask is as
        # planned, "at apply" once an edit changed it (never the stale number).
        kept = {c.model: view.kept(t, c) for c in cs}
        add_row(tab, "kept", *(text(kept[c.model].text(4) + ("" if kept[c.model].how in ("exact", "measured", view.AT_APPLY)
                                                             else f" ({kept[c.model].how})"),
                                    style="bold yellow" if kept[c.model].pending else "") for c in cs))
        pm_stats = {k: v for k, v in per_model_stats(t, models).items() if k != "kept"}
        ov = view.pair_overlaps(t)
        approx = False
        for other in cs:
            cells = []
            for c in cs:
                if c.model == other.model:
                    cells.append("—")
                    continue
                st = ov[(c.model, other.model)]
                approx |= st.how != "exact"
                cells.append(("" if st.how == "exact" else "≈") + f"{st.value:.3f}")
            add_row(tab, f"overlap {other.model}", *cells)
        for key in sorted({k for c in cs for k in c.source}):
            add_row(tab, f"{key} set by", *(c.source.get(key, "—") for c in cs))
        for key, per in pm_stats.items():
            add_row(tab, key, *(summarize(per[c.model]) if c.model in per else "—" for c in cs))
        parts.append(section("Per model", tab))
        if any(i.recompute for i in infos.values()):
            parts.append(Text("Edited density: the planner's mask digest is dropped; apply recomputes the mask "
                              "from its recipe (kind, seed, density) without a digest check.", style="yellow"))
        if approx:
            parts.append(Text("overlap: share of entries both masks keep; ≈ is d_i·d_j, expected for independent "
                              "masks (exact only for explicit masks).", style="dim"))

    aim = aim_summary(t)
    if aim is not None:
        atext = Text()
        atext.append("AIM relaxation", style="bold")
        planned_omega = editor.planned(name, None, "omega")
        atext.append(f"  omega {aim.omega:g}")
        if planned_omega is not None and planned_omega != aim.omega:
            atext.append(f" (planned {planned_omega:g})", style="bold yellow")
        atext.append(f" · axis {aim.axis} · {aim.n} channels · factor 1 - a(1-omega): min {aim.lo:.3f} "
                     f"mean {aim.mean:.3f} max {aim.hi:.3f}\n")
        top = max(aim.counts, default=0) or 1
        for i, n in enumerate(aim.counts):
            bar = "█" * max(1 if n else 0, round(30 * n / top))
            atext.append(f"  {aim.edges[i]:.3f}-{aim.edges[i + 1]:.3f} ")
            atext.append(bar.ljust(30), style="cyan")
            atext.append(f" {n}\n")
        parts.append(atext)

    now = view.tensor_stats(t)  # stale mask statistics are None: shown "at apply"
    other = {k: (view.AT_APPLY if v is None else v) for k, v in now.items() if k not in per_model_stats(t, models)}
    if other:
        stab = Table(box=None, padding=(0, 1), header_style="bold")
        stab.add_column("statistic")
        stab.add_column("value")
        for k, v in flatten_stats(other):
            add_row(stab, k, v)
        parts.append(section("Tensor statistics", stab))

    lrows = layer_stats(plan, name, session.n_layers)
    if lrows:
        ltab = Table(box=None, padding=(0, 1),
                     header_style="bold")
        ltab.add_column("statistic")
        ltab.add_column("value")
        for k, v in lrows:
            add_row(ltab, k, v)
        parts.append(section(f"Guide statistics for {where}", ltab))
    elif not t.stats and aim is None:
        parts.append(Text("No guide statistics recorded for this tensor.", style="dim"))
    return Group(*parts)
