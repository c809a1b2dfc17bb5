"""Messages between the review's screens and the app.

Screens post requests (open a tensor, edit a selection) that bubble up to the app; the
app posts PlanChanged / StatusChanged to every screen it made when the plan or the
background checks change, and each screen redraws from its Session.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message


@dataclass
class OpenTensor(Message):
    """Show this tensor's detail screen."""

    tensor: str


@dataclass(frozen=True)
class Prefill:
    """The edit dialog's fields as a screen fills them from a selection."""

    field: str = "density"
    action: str = "set"
    layers: str = ""
    components: str = ""
    pattern: str = ""
    models: str = ""
    value: str = ""
    vectors: bool = False  # include 1-D tensors (norm weights, biases)


@dataclass
class EditRequested(Message):
    """Open the edit dialog prefilled with this selection."""

    prefill: Prefill


class PlanChanged(Message):
    """The plan changed (edit, undo, redo, save): values, pending edits, file name."""


class StatusChanged(Message):
    """A background check finished: model status on this machine, or the file digest."""
