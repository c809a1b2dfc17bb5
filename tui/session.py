"""What the review's screens share: the plan being edited, its grid layout, the plan to
compare with, and what the background checks found. Screens get it in their constructor
and hear about changes through messages (messages.py); none of them reaches into the app.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mergeplan.plan.edit import PlanEditor
from mergeplan.plan.model import Plan

from .gridmodel import GridModel


@dataclass
class Session:
    editor: PlanEditor
    grid: GridModel
    compare_plan: Plan | None = None
    compare_path: str = ""
    # model id -> "found" | "changed: ..." | "missing: ..." | "not checked (...)"
    model_status: dict[str, str] = field(default_factory=dict)
    file_digest: str = ""  # of the plan file as loaded or last saved
    saved_once: bool = False
    pending_count: int = 0  # values that differ from the plan as loaded or last saved

    @property
    def plan(self) -> Plan:
        return self.editor.plan

    @property
    def n_layers(self) -> int:
        return max(self.grid.layers) + 1 if self.grid.layers else 0
