"""What the layer grid shows: rows, columns, the quantities a cell can show and their values.

Pure: reads a Plan (through the plan API's getters) and returns numbers; no Textual here, so
the grid's content can be tested without running an app.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from mergeplan.plan.edit import FIELDS, get_value
from mergeplan.plan.model import OP_MERGE, Plan, TensorPlan
from mergeplan.arch import component_key, short_label
from mergeplan.plan.names import parse_name

ROW_EMBED = "emb"  # tensors outside the decoder blocks that feed them (embeddings)
ROW_HEAD = "head"  # tensors outside the blocks after them (final norm, lm_head, others)
RowKey = Union[int, str]

_EMBED_COMPONENTS = {"embed", "embed_pos"}
# Column headers are 5 cells wide; long component labels get a short form (mergeplan.arch).
def short_component(comp: str) -> str:
    return short_label(comp)


@dataclass(frozen=True)
class Quantity:
    """One thing a grid cell can show."""

    key: str  # "density" | "weight" | "lambda" | "omega" | "aim" | "stat:<name>"
    label: str
    per_model: bool  # one column per (component, model) rather than per component
    field: str | None  # the PlanEditor field this quantity edits, None when read-only


def aim_factors(relax: dict[str, Any] | None) -> np.ndarray | None:
    """AIM factors f = 1 - scores * (1 - omega) for a relax spec, or None without AIM.

    Plans store the per-channel `scores` (so an omega edit stays exact); a spec that carries
    precomputed `factors` instead is shown as is.
    """
    if not relax or relax.get("kind", "aim") != "aim":
        return None
    if relax.get("scores") is not None:
        scores = np.asarray(relax["scores"], dtype=np.float64)
        return 1.0 - scores * (1.0 - float(relax.get("omega", 1.0)))
    if relax.get("factors") is not None:
        return np.asarray(relax["factors"], dtype=np.float64)
    return None


class GridModel:
    """Layout of a plan as a (row x component) grid, and per-cell values for each quantity.

    The layout depends only on tensor names, which edits never change; values are read
    from the live plan on every call, so the grid reflects edits without rebuilding this.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        self.models = [m.id for m in plan.task_models]
        cells: dict[tuple[RowKey, str], list[str]] = {}
        layers: set[int] = set()
        comps: set[str] = set()
        for t in plan.tensors:
            pn = parse_name(t.name)
            if pn.layer is not None:
                row: RowKey = pn.layer
                layers.add(pn.layer)
            else:
                row = ROW_EMBED if pn.component in _EMBED_COMPONENTS else ROW_HEAD
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
        self.components = sorted(comps, key=component_key)
        self._score_mean: dict[str, float | None] = {}
        self._stat_kinds = self._find_stats()

    # -- layout ---------------------------------------------------------------------------
    def tensor_at(self, row: RowKey, comp: str) -> str | None:
        names = self.cell_tensors.get((row, comp))
        return names[0] if names else None

    @staticmethod
    def row_label(row: RowKey) -> str:
        return f"L{row}" if isinstance(row, int) else str(row)

    # -- quantities -----------------------------------------------------------------------
    def _find_stats(self) -> dict[str, bool]:
        """Numeric per-tensor statistics the grid can show: name -> per model?"""
        kinds: dict[str, bool] = {}
        model_set = set(self.models)
        for t in self.plan.tensors:
            for k, v in t.stats.items():
                if k in kinds:
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

    def value(self, tensor: str, q: Quantity, model: str | None) -> float | None:
        """The value a cell shows; None where the quantity does not apply."""
        if q.field in FIELDS:
            return get_value(self.plan, tensor, model if q.per_model else None, q.field)
        t = self.plan.tensor(tensor)
        if q.key == "aim":
            return self._mean_factor(t)
        if q.key.startswith("stat:"):
            v = t.stats.get(q.key[5:])
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

    def _mean_factor(self, t: TensorPlan) -> float | None:
        # mean(1 - s*(1-omega)) = 1 - mean(s)*(1-omega): cache mean(s), which edits never change,
        # so switching to this view on a 70B plan does not re-read megabytes of scores.
        r = t.relax
        if not r or t.op != OP_MERGE:
            return None
        if r.get("scores") is None:
            f = aim_factors(r)
            return float(f.mean()) if f is not None and f.size else None
        if t.name not in self._score_mean:
            s = np.asarray(r["scores"])
            self._score_mean[t.name] = float(s.mean(dtype=np.float64)) if s.size else None
        m = self._score_mean[t.name]
        return None if m is None else 1.0 - m * (1.0 - float(r.get("omega", 1.0)))

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

    def series(self, q: Quantity, model: str | None) -> list[float]:
        """Per decoder layer, the mean over components of the quantity (nan where none);
        values off the colour scale (dense densities) do not count."""
        out = []
        for layer in self.layers:
            vals = []
            for comp in self.components:
                name = self.tensor_at(layer, comp)
                if name is not None:
                    v = self.value(name, q, model)
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
