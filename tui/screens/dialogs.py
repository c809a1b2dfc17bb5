"""Small modal dialogs: yes/no confirmation and a path prompt."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, Static

from ..richtext import content


class ConfirmScreen(ModalScreen[bool]):
    """Ask a yes/no question; dismisses with True for yes. y/n and Escape work too."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "cancel", "Cancel"),  # its own action: the footer shows one key per action
    ]

    def __init__(self, question: str, yes: str = "Yes", no: str = "Cancel"):
        super().__init__(classes="dialog-screen")
        self.question = question
        self.yes = yes
        self.no = no

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            # Literal: a question quotes a path the user typed or a plan named.
            yield Static(content(self.question, keep_newlines=True), classes="dialog-text")
            with Horizontal(classes="dialog-buttons"):
                yield Button(f"{self.yes} (y)", variant="error", id="yes")
                yield Button(f"{self.no} (n)", variant="primary", id="no")
        yield Footer(compact=True)  # this dialog's keys, not those of the screen beneath

    def on_mount(self) -> None:
        # The safe answer has the focus, so a stray Enter loses nothing.
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

    def action_cancel(self) -> None:
        self.dismiss(False)


class QuitScreen(ModalScreen["str | None"]):
    """Unsaved edits at quit: dismisses with "save", "discard" or None (stay)."""

    BINDINGS = [
        Binding("s", "answer('save')", "Save and quit"),
        Binding("d", "answer('discard')", "Discard"),
        Binding("escape,c", "answer(None)", "Cancel"),
    ]

    def __init__(self, pending: int, path: str):
        super().__init__(classes="dialog-screen")
        self.pending = pending
        self.path = path

    def compose(self) -> ComposeResult:
        n = self.pending
        with Vertical(classes="dialog"):
            yield Static(content(f"{n} edited value{'s' if n != 1 else ''} not saved to {self.path or 'a file'}.",
                                 keep_newlines=True), classes="dialog-text")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save (s)", variant="primary", id="save")
                yield Button("Discard (d)", variant="error", id="discard")
                yield Button("Cancel (Esc)", id="cancel")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#save", Button).focus()  # Enter saves: the answer that loses nothing

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(None if event.button.id == "cancel" else event.button.id)

    def action_answer(self, choice: str | None) -> None:
        self.dismiss(choice)


class PathScreen(ModalScreen["str | None"]):
    """Ask for a line of text (a file path, a tensor name); dismisses with it, or None on Escape."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, initial: str = "", hint: str = "", empty: str = "give a file name"):
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.initial = initial
        self.hint = hint
        self.empty = empty

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(content(self.title_text), classes="dialog-title")
            yield Input(self.initial, id="path")
            yield Static(content(self.hint or "Enter to confirm, Escape to cancel"), classes="dialog-hint",
                         id="path-hint")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        path = event.value.strip()
        if not path:
            self.query_one("#path-hint", Static).update(content(self.empty))
            return
        self.dismiss(path)

    def action_cancel(self) -> None:
        self.dismiss(None)
