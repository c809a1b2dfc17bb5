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


@dataclass
class EditRequested(Message):
    """Open the edit dialog prefilled with this selection (a screens.edit.Prefill)."""

    prefill: object


class PlanChanged(Message):
    """The plan changed (edit, undo, redo, save): values, pending edits, file name."""


class StatusChanged(Message):
    """A background check finished: model status on this machine, or the file digest."""
