"""Keys every full screen lists first in its footer, so that Save, Help and Quit stay
visible however narrow the terminal (Textual's footer cuts entries from the right)."""

from __future__ import annotations

from textual.binding import Binding

COMMON = [
    Binding("s,ctrl+s", "app.save", "Save", tooltip="write the plan in place (atomically), logging the edits"),
    Binding("question_mark,f1", "app.help", "Help", tooltip="this list of keys"),
    Binding("q", "app.quit", "Quit", tooltip="quit; offers to save unsaved edits"),
]

# The overview, diff and tuning screens are modes beside the grid: Esc goes back to it, as
# it does from a tensor's detail.
BACK = Binding("escape", "app.switch_mode('grid')", "Grid", tooltip="back to the grid")
