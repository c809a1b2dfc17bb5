"""Edit a selection: set, scale or reset one field on layers x components x models.

Every keystroke re-evaluates the selection and the value through the plan API
(PlanEditor.select, validate_value), so the user sees what will change, or why it
cannot, before applying; Apply stays disabled while the input is invalid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Footer, Input, Label, Select, Static

from mergeplan.errors import MergeplanError
from mergeplan.plan.diff import number_span
from mergeplan.plan.edit import MODEL_FIELDS, PlanEditor, Target, differs, validate_value
from mergeplan.plan.names import parse_name

from ..gridmodel import GridModel
from ..messages import Prefill
from ..richtext import clean, content
from ..selection import parse_selection

ACTIONS = ("set", "scale", "reset")
_HINT = {
    "set": "new value",
    "scale": "factor (each value is multiplied)",
    "reset": "(reset needs no value: back to the planned values)",
}


class FormError(MergeplanError):
    """The form cannot be applied; `summary` still describes the selection when it resolved."""

    def __init__(self, message: str, summary: str = ""):
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class EditRequest:
    """What the user asked for; the app applies it through PlanEditor."""

    action: str  # "set" | "scale" | "reset"
    field: str
    targets: list[Target]
    value: float | None
    summary: str


def evaluate(editor: PlanEditor, gm: GridModel, action: str, field: str, layers: str, components: str,
             pattern: str, models: str, value: str, vectors: bool = False) -> EditRequest:
    """Resolve the form into an EditRequest or raise MergeplanError saying what is wrong.

    1-D tensors (norm weights, biases) are selected only with `vectors`: a box over the
    projections must not change the norm between them. The summary names the components
    and counts the tensors it changes, and how many 1-D tensors it leaves out.
    """
    sel = parse_selection(layers, components, pattern, models, n_layers=len(gm.layers) and max(gm.layers) + 1,
                          known_components=gm.components, known_models=gm.models)
    args = (sel.layers, sel.components, sel.pattern, sel.models, field)
    targets = editor.select(*args, vectors=vectors)
    left_out = 0 if vectors else len({t for t, _ in editor.select(*args, vectors=True)} - {t for t, _ in targets})
    if not targets:
        hint = f" ({_n(left_out, '1-D tensor')} left out: tick 1-D to include)" if left_out else ""
        raise MergeplanError(f"the selection holds no tensor with a {field}{hint}")
    if field == "density":
        for t, m in targets:
            c = editor.plan.tensor(t).contribution(m)
            if c is not None and c.mask is not None and "bits" in c.mask:
                raise MergeplanError(f"{t} [{m}]: explicit mask; its density is fixed by its bits")
    current = [editor.get(t, m, field) for t, m in targets]
    names = list(dict.fromkeys(t for t, _ in targets))
    comps = sorted({parse_name(t).component for t in names},
                   key=lambda c: gm.components.index(c) if c in gm.components else len(gm.components))
    per_model = field in MODEL_FIELDS
    nmodels = len({m for _, m in targets})
    what = (f"{field} of {_n(len(names), 'tensor')} ({', '.join(comps)})"
            + (f" x {_n(nmodels, 'model')}" if per_model else ""))
    if left_out:
        what += f"; {_n(left_out, '1-D tensor')} left out"
    now = number_span(current)
    v: float | None = None
    if action in ("set", "scale") and not value.strip():
        raise FormError(f"{field}: type the {'new value' if action == 'set' else 'factor'}", f"{what}; now {now}")
    if action == "set":
        try:
            v = validate_value(field, value)
        except MergeplanError as e:
            raise FormError(str(e), f"{what}; now {now}") from None
        summary = f"{what}: {now} -> {v:g}"
    elif action == "scale":
        try:
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
        except ValueError:
            raise FormError(f"{field}: the scale factor must be a finite number, got {value!r}",
                            f"{what}; now {now}") from None
        try:
            for (t, m), cur in zip(targets, current):
                try:
                    validate_value(field, cur * v)
                except MergeplanError as e:
                    raise MergeplanError(f"{e} at {t}" + (f" [{m}]" if m else "")) from None
        except MergeplanError as e:
            raise FormError(str(e), f"{what}; now {now}") from None
        summary = f"{what}: {now} -> {number_span([c * v for c in current])}"
    elif action == "reset":
        differ = sum(differs(editor.planned(t, m, field), c) for (t, m), c in zip(targets, current))
        summary = f"{what}: {differ} differ from the plan as loaded and go back"
    else:
        raise MergeplanError(f"unknown action {action!r}")
    return EditRequest(action, field, targets, v, summary)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class _Tick(Checkbox, inherit_bindings=False):
    """A checkbox that Space toggles and Enter leaves to the dialog, which applies: the
    button says `Apply (Enter)`, and a tick then Enter used to untick instead."""

    BINDINGS = [Binding("space", "toggle_button", "Toggle", show=False)]


class EditScreen(ModalScreen["EditRequest | None"]):
    BINDINGS = [
        Binding("escape", "cancel", "Cancel", tooltip="close without changing anything"),
        Binding("ctrl+s", "apply", "Apply", tooltip="apply (as Enter in any field)"),
        Binding("enter", "apply", "Apply", show=False, tooltip="apply (as Enter in any field)"),  # the 1-D tick too
    ]

    def __init__(self, editor: PlanEditor, gm: GridModel, fields: list[str], prefill: Prefill):
        super().__init__(classes="dialog-screen")
        self.editor = editor
        self.gm = gm
        self.fields = fields
        self.prefill = prefill
        self.request: EditRequest | None = None

    def compose(self) -> ComposeResult:
        p = self.prefill
        with Vertical(classes="dialog", id="edit-dialog"):
            yield Label("Edit selection", classes="dialog-title")
            with Grid(id="edit-form"):
                yield Label("Field")
                yield Select([(f, f) for f in self.fields], value=p.field if p.field in self.fields else self.fields[0],
                             allow_blank=False, compact=True, id="field")
                yield Label("Action")
                yield Select([(a, a) for a in ACTIONS], value=p.action, allow_blank=False, compact=True, id="action")
                yield Label("Layers")
                yield Input(p.layers, placeholder="all, or e.g. 10-20,25", compact=True, id="layers")
                yield Label("Components")
                yield Input(p.components, placeholder="all, or q,k,v,o,gate,up,down / attn, mlp, norms",
                            compact=True, id="components")
                yield Label("Name has")
                yield Input(p.pattern, placeholder="substring or glob of tensor names", compact=True, id="pattern")
                yield Label("Models")
                yield Input(p.models, placeholder=clean("all, or " + ",".join(self.gm.models)), compact=True,
                            id="models")
                yield Label("Value")
                yield Input(p.value, placeholder=_HINT[p.action], compact=True, id="value")
                yield Label("1-D")
                yield _Tick("also norm weights and biases", p.vectors, compact=True, id="vectors")
            yield Static("", id="edit-preview")
            yield Static("", id="edit-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Apply (Enter)", variant="primary", id="apply")
                yield Button("Cancel (Esc)", id="cancel")
        yield Footer(compact=True)  # this dialog's keys, not those of the screen beneath

    def on_mount(self) -> None:
        self.query_one("#value" if self.prefill.action != "reset" else "#layers", Input).focus()
        self._revalidate()

    @on(Input.Changed)
    @on(Select.Changed)
    @on(Checkbox.Changed)
    def _changed(self, event) -> None:
        event.stop()
        self._revalidate()

    def _revalidate(self) -> None:
        field = str(self.query_one("#field", Select).value)
        action = str(self.query_one("#action", Select).value)
        value_in = self.query_one("#value", Input)
        if action == "reset" and value_in.has_focus:
            self.query_one("#layers", Input).focus()  # keep Enter-applies working
        value_in.disabled = action == "reset"
        value_in.placeholder = _HINT[action]
        self.query_one("#models", Input).disabled = field not in MODEL_FIELDS
        text = {i.id: i.value for i in self.query(Input)}
        preview = self.query_one("#edit-preview", Static)
        error = self.query_one("#edit-error", Static)
        try:
            self.request = evaluate(self.editor, self.gm, action, field, text["layers"], text["components"],
                                    text["pattern"], text["models"] if field in MODEL_FIELDS else "", text["value"],
                                    self.query_one("#vectors", Checkbox).value)
        except MergeplanError as e:
            # Literal: errors quote what was typed, tensor names and model ids ("t [math]"
            # read as markup dropped the model; a typed "[/b]" raised MarkupError).
            self.request = None
            preview.update(content(getattr(e, "summary", "")))
            error.update(content(str(e)))
        else:
            preview.update(content(self.request.summary))
            error.update("")
        self.query_one("#apply", Button).disabled = self.request is None

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_apply()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "apply":
            self.action_apply()
        else:
            self.action_cancel()

    def action_apply(self) -> None:
        if self.request is None:
            self.app.bell()  # the reason is already shown under the form
            return
        self.dismiss(self.request)

    def action_cancel(self) -> None:
        self.dismiss(None)
