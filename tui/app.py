"""The review app: built by make_app from a plan file, edited only through PlanEditor.

Screens are made here with what they need (a Session) and talk back with messages
(messages.py); they are imported when first shown, so opening a plan loads only the grid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.screen import ModalScreen, Screen

from mergeplan.errors import MergeplanError
from mergeplan.plan.codec import read_plan, read_plan_with_digest
from mergeplan.plan.edit import PlanEditor
from mergeplan.plan.view import editable_fields

from .fingerprint import ModelChecker, make_checker
from .gridmodel import GridModel
from .keys import COMMON
from .messages import EditRequested, OpenTensor, PlanChanged, StatusChanged
from .richtext import clean, tell
from .session import Session

# Actions that make no sense while a dialog is open (its own keys take precedence).
_APP_ACTIONS = {"switch_mode", "undo", "redo", "save", "save_as", "help", "quit"}


def _grid(session: Session) -> Screen:
    from .screens.grid import GridScreen

    return GridScreen(session)


def _overview(session: Session) -> Screen:
    from .screens.overview import OverviewScreen

    return OverviewScreen(session)


def _tuning(session: Session) -> Screen:
    from .screens.tuning import TuningScreen

    return TuningScreen(session)


def _diff(session: Session) -> Screen:
    from .screens.diff import DiffScreen

    return DiffScreen(session)


class ReviewApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "mergeplan review"
    DEFAULT_MODE = "grid"
    # Its footer entry costs 80x24 space the review's own keys need; ? lists every key.
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        *COMMON,  # save, help, quit: also first in every screen's footer
        Binding("g", "switch_mode('grid')", "Grid", show=False,
                tooltip="layer grid (heatmap of the plan's values); on the grid, g jumps to a layer"),
        Binding("o", "switch_mode('overview')", "Overview",
                tooltip="models and their status here, method, guides, calibration, digest, edit history"),
        Binding("d", "switch_mode('diff')", "Diff", tooltip="differences from the plan as loaded, or another plan"),
        Binding("T", "switch_mode('tuning')", "Tuning",
                tooltip="the candidates a tune: search scored (only for a tuned plan); Enter picks another"),
        Binding("u,ctrl+z", "undo", "Undo", tooltip="undo the last edit"),
        Binding("r,ctrl+y", "redo", "Redo", show=False, tooltip="redo what undo took back"),
        Binding("S,shift+s", "save_as", "Save as", show=False, tooltip="write the edited plan to another file"),
    ]

    def __init__(self, editor: PlanEditor, compare_plan=None, compare_path: str | None = None,
                 model_checker: ModelChecker | None = None, file_digest: str = ""):
        super().__init__()
        self.session = Session(editor, GridModel(editor.plan), compare_plan, compare_path or "",
                               file_digest=file_digest)
        self.model_checker = model_checker or make_checker(editor.plan, editor.path)
        self._screens: list[Screen] = []  # every screen made here: they hear PlanChanged / StatusChanged
        for mode, factory in (("grid", _grid), ("overview", _overview), ("diff", _diff), ("tuning", _tuning)):
            self.add_mode(mode, self._maker(factory))
        self.sub_title = self._describe_file()

    # Kept as attributes for callers and tests that hold the app.
    @property
    def editor(self) -> PlanEditor:
        return self.session.editor

    @property
    def pending_count(self) -> int:
        return self.session.pending_count

    def _maker(self, factory: Callable[[Session], Screen]) -> Callable[[], Screen]:
        def make() -> Screen:
            screen = factory(self.session)
            self._screens.append(screen)
            return screen

        return make

    def _broadcast(self, message_type: type) -> None:
        self._screens = [s for s in self._screens if s.is_attached or s in self.screen_stack]
        for s in self._screens:
            s.post_message(message_type())

    def get_driver_class(self):
        driver = super().get_driver_class()
        if driver.__name__ == "LinuxDriver" and not os.environ.get("TEXTUAL_DRIVER"):
            try:  # quits without Textual's 0.1-0.2 s input-thread wait
                from .driver import FastExitDriver
            except ImportError:  # a Textual whose internals moved: its own driver, a slower quit
                return driver
            return FastExitDriver
        return driver

    # -- startup ------------------------------------------------------------------------
    def on_mount(self) -> None:
        # After the first paint, so opening the plan is not slowed by it.
        self.call_after_refresh(self.check_models)

    @work(thread=True, exclusive=True, group="models")
    def check_models(self) -> None:
        for m in self.editor.plan.models:
            try:
                status = self.model_checker(m)
            except Exception as e:  # a status line, never a crash of the review
                status = f"not checked ({type(e).__name__}: {e})"
            self.call_from_thread(self._set_status, m.id, status)

    def _set_status(self, model_id: str, status: str) -> None:
        self.session.model_status = {**self.session.model_status, model_id: status}
        self._broadcast(StatusChanged)

    # -- state shared by the screens --------------------------------------------------------
    def _describe_file(self) -> str:
        # The Header shows the title as literal Content, but it writes control characters through.
        path = clean(self.editor.path or "(unsaved)")
        n = self.session.pending_count
        return f"{path} · {n} unsaved" if n else path

    def plan_changed(self, message: str | None = None) -> None:
        self.session.pending_count = len(self.editor.pending())
        self.sub_title = self._describe_file()
        self._broadcast(PlanChanged)
        if message:
            self.tell(message, timeout=4)

    def tell(self, message: str, **kwargs) -> None:
        """richtext.tell on the app: messages quote paths, model ids, tensor names and
        error text, shown as literal text."""
        tell(self, message, **kwargs)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in _APP_ACTIONS and isinstance(self.screen, ModalScreen):
            return False
        if action == "switch_mode" and parameters == ("tuning",) and not self.editor.plan.tuning:
            return False  # not a tuned plan: no Tuning screen, and no footer entry for it
        return True

    # -- requests from the screens ------------------------------------------------------------
    def on_open_tensor(self, message: OpenTensor) -> None:
        from .screens.detail import DetailScreen

        screen = DetailScreen(self.session, message.tensor)
        self._screens.append(screen)
        self.push_screen(screen)

    def on_edit_requested(self, message: EditRequested) -> None:
        from .screens.edit import EditScreen

        fields = editable_fields(self.editor.plan)
        if not fields:
            self.tell("this plan has nothing editable", severity="warning")
            return
        self.push_screen(EditScreen(self.editor, self.session.grid, fields, message.prefill), self._apply_edit)

    def _apply_edit(self, req) -> None:
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
        n = len(changes)
        self.plan_changed(f"{req.field} {req.action}: {n} value{'' if n == 1 else 's'} changed (u undoes)")

    def action_help(self) -> None:
        from .screens.detail import DetailScreen
        from .screens.diff import DiffScreen
        from .screens.edit import EditScreen
        from .screens.grid import GridScreen
        from .screens.help import HelpScreen
        from .screens.tuning import TuningScreen
        from .widgets.plangrid import PlanGrid

        def own(bindings):  # the common keys are listed once, under "Everywhere"
            return [b for b in bindings if b not in COMMON]

        self.push_screen(HelpScreen([
            # The Tuning key only where there is a search to show (as in the footer)
            ("Everywhere", [b for b in ReviewApp.BINDINGS if self.editor.plan.tuning or b.action != "switch_mode('tuning')"]),
            ("Layer grid", own(GridScreen.BINDINGS)),
            ("Grid cursor", PlanGrid.BINDINGS),
            ("Tensor detail", own(DetailScreen.BINDINGS)),
            ("Diff", own(DiffScreen.BINDINGS)),
            *([("Tuning", own(TuningScreen.BINDINGS))] if self.editor.plan.tuning else []),
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
        if not self.session.pending_count:
            self.tell("no unsaved edits", timeout=2)
            return
        self._save(None)

    def action_save_as(self) -> None:
        from .screens.dialogs import ConfirmScreen, PathScreen

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
        n = self.session.pending_count
        try:
            digest = self.editor.save(path)
        except (MergeplanError, OSError) as e:
            self.tell(f"not saved: {e}", severity="error", timeout=10)
            return False
        self.session.saved_once = True
        self.session.file_digest = digest
        self.plan_changed(f"saved {n} edit{'' if n == 1 else 's'} to {self.editor.path}")
        self._broadcast(StatusChanged)
        return True

    # -- quitting -----------------------------------------------------------------------
    async def action_quit(self) -> None:
        if not self.session.pending_count:
            self.exit(0)
            return
        from .screens.dialogs import QuitScreen

        def answered(choice: str | None) -> None:
            if choice == "discard" or (choice == "save" and self._save(None)):
                self.exit(0)

        self.push_screen(QuitScreen(self.session.pending_count, self.editor.path or ""), answered)


def make_app(plan_path: str, compare: str | None = None, *, model_checker: ModelChecker | None = None) -> ReviewApp:
    """Load the plan (and the plan to compare with) and build the app.

    Raises PlanFormatError for a missing, corrupt or newer-version plan, before any screen
    is shown. `model_checker` replaces the on-disk model fingerprint check (tests use it to
    make the overview deterministic).
    """
    plan, digest = read_plan_with_digest(plan_path)  # checked against the body: no second hashing
    other = read_plan(compare) if compare else None
    return ReviewApp(PlanEditor(plan, path=str(plan_path)), other, compare, model_checker, digest)
