"""What the layer grid shows: rows, columns, the quantities a cell can show and their values.

Pure: reads a Plan (through the plan API's getters) and returns numbers; no Textual here, so
the grid's content can be tested without running an app.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mergeplan.plan import view
from mergeplan.plan.edit import FIELDS, differs, get_value
from mergeplan.plan.model import OP_MERGE, Plan
from mergeplan.plan.names import parse_name
from mergeplan.plan.view import ROW_EMBED, ROW_HEAD, RowKey, short_component

__all__ = ["ROW_EMBED", "ROW_HEAD", "RowKey", "GridModel", "Quantity", "fmt_cell", "heat", "short_component",
           "value_range"]

@dataclass(frozen=True)
class Quantity:
    """One thing a grid cell can show."""

    key: str  # "density" | "weight" | "lambda" | "omega" | "aim" | "stat:<name>"
    label: str
    per_model: bool  # one column per (component, model) rather than per component
    field: str | None  # the PlanEditor field this quantity edits, None when read-only


class GridModel:
    """Layout of a plan as a (row x component) grid, and per-cell values for each quantity.

    The layout depends only on tensor names, which edits never change; values are read
    from the live plan on every call, so the grid reflects edits without rebuilding this.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        self.models = [m.id for m in plan.task_models]
        self._hand: dict = {}  # view.hand_set(plan), kept until the edit log changes
        self._hand_for: list | None = None
        self._hand_len = -1
        cells: dict[tuple[RowKey, str], list[str]] = {}
        layers: set[int] = set()
        comps: set[str] = set()
        for t in plan.tensors:
            pn = parse_name(t.name)
            row = view.row_of(t.name)
            if isinstance(row, int):
                layers.add(row)
            comps.add(pn.component)
            cells.setdefault((row, pn.component), []).append(t.name)
        # A cell shows the ".weight" tensor when a (row, component) holds several (bias, ...).
        self.cell_tensors = {
            k: sorted(v, key=lambda n: (parse_name(n).kind != "weight", v.index(n))) for k, v in cells.items()
        }
        rows: list[RowKey] = []
        if any(r == ROW_EMBED for r, _ in cells):
            rows.append(ROW_EMBED)
        rows += sorted(layers)
        if any(r == ROW_HEAD for r, _ in cells):
            rows.append(ROW_HEAD)
        self.rows = rows
        self.layers = sorted(layers)
        self.components = view.sort_components(comps)
        self._stat_kinds = self._find_stats()

    # -- layout ---------------------------------------------------------------------------
    def tensor_at(self, row: RowKey, comp: str) -> str | None:
        names = self.cell_tensors.get((row, comp))
        return names[0] if names else None

    row_label = staticmethod(view.row_label)

    def is_vector_component(self, comp: str) -> bool:
        """Every tensor of this column is 1-D (a norm): left out of wider range edits."""
        names = [n for (_, c), ns in self.cell_tensors.items() if c == comp for n in ns]
        return bool(names) and all(view.is_vector(self.plan.tensor(n)) for n in names)

    # -- quantities -----------------------------------------------------------------------
    def _find_stats(self) -> dict[str, bool]:
        """Numeric per-tensor statistics the grid can show: name -> per model?"""
        kinds: dict[str, bool] = {}
        model_set = set(self.models)
        for t in self.plan.tensors:
            for k, v in t.stats.items():
                if k in kinds or (k in view.DERIVED_STATS and t.relax):
                    continue
                if isinstance(v, dict) and v and set(v) <= model_set and all(_is_number(x) for x in v.values()):
                    kinds[k] = True
                elif _is_number(v):
                    kinds[k] = False
        return kinds

    def quantities(self) -> list[Quantity]:
        """Quantities present in this plan, editable ones first."""
        out = [
            Quantity("density", "density", True, "density"),
            Quantity("weight", "weight", True, "weight"),
            Quantity("lambda", "lambda", False, "lambda"),
        ]
        if any(t.relax for t in self.plan.tensors):
            out += [Quantity("omega", "AIM omega", False, "omega"), Quantity("aim", "mean AIM factor", False, None)]
        out += [Quantity(f"stat:{k}", k, per_model, None) for k, per_model in sorted(self._stat_kinds.items())]
        return out

    def initial_quantity(self) -> int:
        """Index of the quantity to open on: the first guide decision whose values differ
        across tensors (an AIM plan with a fixed density opens on the AIM factors), else
        the first guide decision, else density."""
        qs = self.quantities()
        keys = [q.key for q in qs]
        guided = [k for k in view.guided_quantities(self.plan) if k in keys]
        for k in guided:
            if self._varies(qs[keys.index(k)]):
                return keys.index(k)
        return keys.index(guided[0]) if guided else 0

    def _varies(self, q: Quantity) -> bool:
        first = None
        for comp, m in self.columns(q):
            for row in self.rows:
                name = self.tensor_at(row, comp)
                v = None if name is None else self.value(name, q, m)
                if v is None or not self.on_scale(name, q, m):
                    continue
                if first is None:
                    first = v
                elif v != first:
                    return True
        return False

    def value(self, tensor: str, q: Quantity, model: str | None) -> float | None:
        """The value a cell shows; None where the quantity does not apply."""
        if q.field in FIELDS:
            return get_value(self.plan, tensor, model if q.per_model else None, q.field)
        t = self.plan.tensor(tensor)
        if q.key == "aim":
            return view.aim_mean(t.relax) if t.op == OP_MERGE else None
        if q.key.startswith("stat:"):
            # Mask statistics an edit made stale are None here ("at apply"), never the old value.
            v = view.tensor_stats(t).get(q.key[5:])
            if q.per_model:
                v = v.get(model) if isinstance(v, dict) else None
            return float(v) if _is_number(v) else None
        raise KeyError(q.key)

    def on_scale(self, tensor: str, q: Quantity, model: str | None) -> bool:
        """Whether a cell's value takes part in the heatmap's colour scale. A dense
        contribution's density (norms, lm_head: 1.0 by definition) is not a decision, and
        would squeeze the planned densities into the bottom of the scale."""
        if q.key == "density":
            c = self.plan.tensor(tensor).contribution(model) if model else None
            return c is not None and c.mask is not None
        return True

    def set_by_hand(self, tensor: str, model: str | None, field: str, value: float | None) -> bool:
        """The value is what a saved edit session set (the edit log's last word on it)."""
        log = self.plan.edit_log
        if self._hand_for is not log or self._hand_len != len(log):  # a save appends to the log
            self._hand, self._hand_for, self._hand_len = view.hand_set(self.plan), log, len(log)
        set_to = self._hand.get((tensor, model, field))
        return set_to is not None and value is not None and not differs(value, set_to)

    @property
    def has_hand_edits(self) -> bool:
        return bool(self.plan.edit_log)

    def pending(self, tensor: str, q: Quantity, model: str | None) -> bool:
        """The cell's statistic is known only at apply (an edit changed the mask it measured)."""
        if not q.key.startswith("stat:"):
            return False
        return view.is_stale(self.plan.tensor(tensor), q.key[5:], model if q.per_model else None)

    def columns(self, q: Quantity, models: list[str] | None = None) -> list[tuple[str, str | None]]:
        """(component, model) per column; model is None for per-tensor quantities."""
        if not q.per_model:
            return [(c, None) for c in self.components]
        ms = models if models is not None else self.models
        return [(c, m) for m in ms for c in self.components]

    def values(self, q: Quantity, models: list[str] | None = None) -> dict[tuple[RowKey, str, str | None], float | None]:
        out = {}
        for comp, m in self.columns(q, models):
            for row in self.rows:
                name = self.tensor_at(row, comp)
                out[(row, comp, m)] = None if name is None else self.value(name, q, m)
        return out

    def series(self, q: Quantity, model: str | None, values: dict | None = None) -> list[float]:
        """Per decoder layer, the mean over components of the quantity (nan where none);
        values off the colour scale (dense densities) do not count. `values`: what
        values(q) already returned, to read instead of the plan."""
        out = []
        for layer in self.layers:
            vals = []
            for comp in self.components:
                name = self.tensor_at(layer, comp)
                if name is not None:
                    key = (layer, comp, model if q.per_model else None)
                    v = values[key] if values is not None and key in values else self.value(name, q, model)
                    if v is not None and math.isfinite(v) and self.on_scale(name, q, model):
                        vals.append(v)
            out.append(sum(vals) / len(vals) if vals else math.nan)
        return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


# -- cell text and colour -------------------------------------------------------------------
def fmt_cell(v: float | None, width: int = 4) -> str:
    """A number in at most `width` characters, right-aligned; '·' where nothing applies."""
    if v is None:
        return "·".rjust(width)
    if not math.isfinite(v):
        return ("nan" if math.isnan(v) else "inf").rjust(width)
    if v != 0 and abs(v) < 0.001:
        mant, exp = f"{v:.0e}".split("e")
        s = f"{mant}e{int(exp)}"
        if len(s) <= width:
            return s.rjust(width)
    if 0 < abs(v) < 1:
        # Drop the leading zero: ".702" keeps a third decimal, which tells apart values
        # (AIM factors, densities) that two decimals would show as equal.
        s = format(v, f".{width - 1 if v > 0 else width - 2}f").replace("0.", ".", 1)
        if s.strip("-.0") == "":
            return "-~0".rjust(width)  # a tiny negative value that no 4-character form shows
        if len(s) <= width:
            return s.rjust(width)
    for fmt in (".2f", ".1f", ".0f"):
        s = format(v, fmt)
        if len(s) <= width:
            return s.rjust(width)
    return "big".rjust(width) if v > 0 else "-big".rjust(width)


# Viridis, 9 steps: perceptually ordered and readable for colour-blind users.
PALETTE = ("#440154", "#472c7a", "#3b518b", "#2c718e", "#21908d", "#27ad81", "#5cc863", "#aadc32", "#fde725")


def heat(v: float | None, lo: float, hi: float) -> tuple[str, str] | None:
    """(background, foreground) for a value on the [lo, hi] scale; None for no value."""
    if v is None or not math.isfinite(v):
        return None
    t = 0.5 if hi <= lo else (v - lo) / (hi - lo)
    i = min(len(PALETTE) - 1, max(0, int(round(t * (len(PALETTE) - 1)))))
    return PALETTE[i], ("#ffffff" if i < 5 else "#000000")


def value_range(values) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return (min(finite), max(finite)) if finite else (0.0, 1.0)
