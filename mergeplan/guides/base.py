"""What the guides hand to the planner: per-tensor decisions plus the statistics behind them.

Guides (LEWIS, AIM, Sens-Merging) turn calibration statistics into values; the planner
folds them into the plan and records which guide set which value. Keys are output tensor
names (e.g. "model.layers.3.mlp.down_proj.weight") and model ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class GuideDecisions:
    # tensor name -> model id -> keep density in (0, 1]  (LEWIS)
    densities: dict[str, dict[str, float]] = field(default_factory=dict)
    # tensor name -> model id -> coefficient multiplying the recipe weight  (Sens-Merging)
    weights: dict[str, dict[str, float]] = field(default_factory=dict)
    # tensor name -> {"kind": "aim", "omega": float, "axis": int, "scores": float32 array}
    #   apply scales the merged delta by f = 1 - scores * (1 - omega) along `axis`  (AIM)
    relax: dict[str, dict[str, Any]] = field(default_factory=dict)
    # tensor name -> statistics shown by `show`/review, e.g. {"lewis.delta": {model: x}}
    tensor_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    # plan-level statistics (per layer/component/model arrays) for review
    plan_stats: dict[str, Any] = field(default_factory=dict)
    # guide name -> parameters as used and a short summary
    guides: dict[str, Any] = field(default_factory=dict)
    # calibration settings, data digests, device, timings
    calibration: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInput:
    """One input model as the planner hands it to the guides: its recipe id and its directory."""

    id: str
    path: Path
