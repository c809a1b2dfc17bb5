"""The review app: built by make_app from a plan file, edited only through PlanEditor."""

from __future__ import annotations

import os
from pathlib import Path

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import ModalScreen

from mergeplan.errors import MergeplanError
from mergeplan.plan.codec import plan_digest, read_plan
from mergeplan.plan.edit import PlanEditor
from mergeplan.plan.model import OP_MERGE, Plan

from .fingerprint import ModelChecker, make_checker
from .gridmodel import GridModel
from .richtext import clean
from .screens.detail import DetailScreen
from .screens.dialogs import ConfirmScreen, PathScreen
from .screens.diff import DiffScreen
from .screens.edit import EditRequest, EditScreen, Prefill
from .screens.grid import GridScreen
from .screens.help import HelpScreen
from .screens.overview import OverviewScreen
from .widgets.plangrid import PlanGrid

# Actions that make no sense while a dialog is open (its own keys take precedence).
_APP_ACTIONS = {"switch_mode", "undo", "redo", "save", "save_as", "help", "quit"}


class ReviewApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "mergeplan review"
    MODES = {"grid": GridScreen, "overview": OverviewScreen, "diff": DiffScreen}
    DEFAULT_MODE = "grid"
    # Its footer entry costs 80x24 space the review's own keys need; ? lists every key.
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("question_mark,f1", "help", "Help", tooltip="this list of keys"),
        Binding("g", "switch_mode('grid')", "Grid", show=False, tooltip="layer grid (heatmap of the plan's values)"),
        Binding("o", "switch_mode('overview')", "Overview",
                tooltip="models and their status here, method, guides, calibration, digest, edit history"),
        Binding("d", "switch_mode('diff')", "Diff", tooltip="differences from the plan as loaded, or another plan"),
        Binding("u,ctrl+z", "undo", "Undo", tooltip="undo the last edit"),
        Binding("r,ctrl+y", "redo", "Redo", show=False, tooltip="redo what undo took back"),
        Binding("s,ctrl+s", "save", "Save", tooltip="write the plan in place (atomically), logging the edits"),
        Binding("S,shift+s", "save_as", "Save as", show=False, tooltip="write the edited plan to another file"),
        Binding("q", "quit", "Quit", tooltip="quit; asks first when edits are unsaved"),
    ]

    # Bumped after every change to the plan (edit, undo, redo, save); screens watch it.
    revision: reactive[int] = reactive(0, init=False)
    # model id -> "found" | "changed: ..." | "missing: ..." | "not checked (...)"
    model_status: reactive[dict[str, str]] = reactive(dict, init=False)
    # Digest of the plan file as loaded or last saved ("" while it is being computed).
    file_digest: reactive[str] = reactive("", init=False)

    def __init__(self, editor: PlanEditor, compare_plan: Plan | None = None, compare_path: str | None = None,
                 model_checker: ModelChecker | None = None):
        super().__init__()
        self.editor = editor
        self.grid_model = GridModel(editor.plan)
        self.compare_plan = compare_plan
        self.compare_path = compare_path or ""
        self.model_checker = model_checker or make_checker(editor.plan, editor.path)
        self.pending_count = 0
        self.saved_once = False
        self.sub_title = self._describe_file()

    def get_driver_class(self):
        driver = super().get_driver_class()
        if driver.__name__ == "LinuxDriver" and not os.environ.get("TEXTUAL_DRIVER"):
            from .driver import FastExitDriver  # quits without Textual's 0.1-0.2 s input-thread wait

            return FastExitDriver
        return driver

    # -- startup ------------------------------------------------------------------------
    def on_mount(self) -> None:
        # After the first paint, so opening the plan is not slowed by these.
        self.call_after_refresh(self.check_models)
        self.call_after_refresh(self.compute_digest)

    @work(thread=True, exclusive=True, group="models")
    def check_models(self) -> None:
        for m in self.editor.plan.models:
            try:
                status = self.model_checker(m)
            except Exception as e:  # a status line, never a crash of the review
                status = f"not checked ({type(e).__name__}: {e})"
            self.call_from_thread(self._set_status, m.id, status)

    def _set_status(self, model_id: str, status: str) -> None:
        self.model_status = {**self.model_status, model_id: status}

    @work(thread=True, exclusive=True, group="digest")
    def compute_digest(self) -> None:
        loaded = self.editor.loaded
        digest = plan_digest(loaded)

        def done() -> None:
            if self.editor.loaded is loaded:
                self.file_digest = digest
            elif not self.file_digest:
                # An edit came first: the editor copied the plan as loaded and changed the
                # plan this digest was read from. Hash the copy. (A save sets file_digest.)
                self.compute_digest()

        self.call_from_thread(done)

    # -- state shared by the screens --------------------------------------------------------
    def _describe_file(self) -> str:
        # The Header shows the title as literal Content, but it writes control characters through.
        path = clean(self.editor.path or "(unsaved)")
        return f"{path} · {self.pending_count} unsaved" if self.pending_count else path

    def plan_changed(self, message: str | None = None) -> None:
        self.pending_count = len(self.editor.pending())
        self.sub_title = self._describe_file()
        self.revision += 1
        if message:
            self.tell(message, timeout=4)

    def tell(self, message: str, **kwargs) -> None:
        """notify() with the message as literal text: messages here quote paths, model ids,
        tensor names and error text, which notify's default markup would parse (a "[/x]"
        in a file name raised MarkupError; a "[@click=...]" would make the toast run it)."""
        self.notify(clean(message, keep_newlines=True), markup=False, **kwargs)

    def editable_fields(self) -> list[str]:
        plan = self.editor.plan
        fields = []
        if plan.task_models:
            fields += ["density", "weight"]
        if any(t.op == OP_MERGE for t in plan.tensors):
            fields.append("lambda")
        if any(t.relax for t in plan.tensors):
            fields.append("omega")
        return fields

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in _APP_ACTIONS and isinstance(self.screen, ModalScreen):
            return False
        return True

    # -- screens ------------------------------------------------------------------------
    def open_detail(self, tensor: str) -> None:
        self.push_screen(DetailScreen(tensor))

    def open_edit(self, prefill: Prefill) -> None:
        fields = self.editable_fields()
        if not fields:
            self.tell("this plan has nothing editable", severity="warning")
            return
        self.push_screen(EditScreen(self.editor, self.grid_model, fields, prefill), self._apply_edit)

    def _apply_edit(self, req: EditRequest | None) -> None:
        if req is None:
            return
        try:
            if req.action == "set":
                changes = self.editor.set(req.targets, req.field, req.value)
            elif req.action == "scale":
                changes = self.editor.scale(req.targets, req.field, req.value)
            else:
                changes = self.editor.reset(req.targets, req.field)
        except MergeplanError as e:
            self.tell(str(e), severity="error", timeout=8)
            return
        self.plan_changed(f"{req.field} {req.action}: {len(changes)} values changed (u undoes)")

    def action_help(self) -> None:
        self.push_screen(HelpScreen([
            ("Everywhere", ReviewApp.BINDINGS),
            ("Layer grid", GridScreen.BINDINGS),
            ("Grid cursor", PlanGrid.BINDINGS),
            ("Tensor detail", DetailScreen.BINDINGS),
            ("Diff", DiffScreen.BINDINGS),
            ("Edit dialog", EditScreen.BINDINGS),
        ]))

    # -- edits --------------------------------------------------------------------------
    def action_undo(self) -> None:
        changes = self.editor.undo()
        if not changes:
            self.tell("nothing to undo", severity="warning", timeout=2)
            return
        self.plan_changed(f"undid {len(changes)} changes ({changes[0].field})")

    def action_redo(self) -> None:
        changes = self.editor.redo()
        if not changes:
            self.tell("nothing to redo", severity="warning", timeout=2)
            return
        self.plan_changed(f"redid {len(changes)} changes ({changes[0].field})")

    # -- saving -------------------------------------------------------------------------
    def action_save(self) -> None:
        if not self.pending_count:
            self.tell("no unsaved edits", timeout=2)
            return
        self._save(None)

    def action_save_as(self) -> None:
        def chosen(path: str | None) -> None:
            if not path:
                return
            same = self.editor.path and os.path.abspath(path) == os.path.abspath(self.editor.path)
            if Path(path).exists() and not same:
                self.push_screen(ConfirmScreen(f"{path} exists. Overwrite it?", yes="Overwrite"),
                                 lambda ok: self._save(path) if ok else None)
            else:
                self._save(path)

        self.push_screen(PathScreen("Save plan as", self.editor.path or "merge.plan"), chosen)

    def _save(self, path: str | None) -> bool:
        n = self.pending_count
        try:
            digest = self.editor.save(path)
        except (MergeplanError, OSError) as e:
            self.tell(f"not saved: {e}", severity="error", timeout=10)
            return False
        self.saved_once = True
        self.file_digest = digest
        self.plan_changed(f"saved {n} edits to {self.editor.path}")
        return True

    # -- quitting -----------------------------------------------------------------------
    async def action_quit(self) -> None:
        if not self.pending_count:
            self.exit(0)
            return

        def answered(discard: bool | None) -> None:
            if discard:
                self.exit(0)

        n = self.pending_count
        self.push_screen(ConfirmScreen(f"Quit without saving {n} edited value{'s' if n != 1 else ''}?\n"
                                       "(Cancel, then s saves.)", yes="Quit", no="Cancel"), answered)


def make_app(plan_path: str, compare: str | None = None, *, model_checker: ModelChecker | None = None) -> ReviewApp:
    """Load the plan (and the plan to compare with) and build the app.

    Raises PlanFormatError for a missing, corrupt or newer-version plan, before any screen
    is shown. `model_checker` replaces the on-disk model fingerprint check (tests use it to
    make the overview deterministic).
    """
    plan = read_plan(plan_path)
    other = read_plan(compare) if compare else None
    return ReviewApp(PlanEditor(plan, path=str(plan_path)), other, compare, model_checker)
