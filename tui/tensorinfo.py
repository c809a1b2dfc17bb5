"""Display helpers for the detail and overview screens: the AIM factor histogram, short
text for statistics of any shape, and plan-level guide statistics picked for one layer.
Pure; no Textual. What the plan's values mean (masks, kept fractions, overlaps, AIM
factors) comes from mergeplan.plan.view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mergeplan.plan.model import Plan, TensorPlan
from mergeplan.plan.names import parse_name
from mergeplan.plan.view import aim_factors


@dataclass(frozen=True)
class AimSummary:
    omega: float
    axis: int | None
    n: int
    lo: float
    mean: float
    hi: float
    counts: list[int]  # histogram of factors over [omega, 1] in equal bins
    edges: list[float]


def aim_summary(t: TensorPlan, bins: int = 8) -> AimSummary | None:
    f = aim_factors(t.relax)
    if f is None or f.size == 0:
        return None
    omega = float(t.relax["omega"])
    finite = f[np.isfinite(f)]
    if finite.size == 0 or not np.isfinite(omega):
        # A hand-made or hostile plan (check_plan refuses it before apply): no histogram.
        return AimSummary(omega, None, int(f.size), float("nan"), float("nan"), float("nan"), [], [])
    lo_edge = min(omega, float(finite.min()))
    hi_edge = max(1.0, float(finite.max()))
    counts, edges = np.histogram(finite, bins=bins, range=(lo_edge, hi_edge))
    axis = t.relax.get("axis")
    return AimSummary(omega, None if axis is None else int(axis), int(f.size), float(finite.min()),
                      float(finite.mean()), float(finite.max()), [int(x) for x in counts], [float(x) for x in edges])


# -- statistics -----------------------------------------------------------------------------
def summarize(v: Any) -> str:
    """One short line for a statistic value of any shape."""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v):
        v = np.asarray(v, dtype=np.float64)
    if isinstance(v, np.ndarray):
        if v.size == 0:
            return "[]"
        if v.size <= 4:
            return "[" + ", ".join(f"{float(x):.4g}" for x in v.ravel()) + "]"
        vf = v.astype(np.float64)
        return f"{'x'.join(map(str, v.shape))} min {vf.min():.4g} mean {vf.mean():.4g} max {vf.max():.4g}"
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    text = str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def flatten_stats(obj: Any, prefix: str = "", limit: int = 60) -> list[tuple[str, str]]:
    """Nested dict of statistics -> [(dotted key, summary)], at most `limit` rows."""
    rows: list[tuple[str, str]] = []

    def walk(o: Any, path: str) -> None:
        if len(rows) >= limit:
            return
        if isinstance(o, dict):
            for k in sorted(o, key=str):
                walk(o[k], f"{path}.{k}" if path else str(k))
        else:
            rows.append((path, summarize(o)))

    walk(obj, prefix)
    return rows


def per_model_stats(t: TensorPlan, models: list[str]) -> dict[str, dict[str, Any]]:
    """Tensor statistics keyed by model ({"lewis.delta": {model: x}}): stat -> model -> value."""
    ms = set(models)
    return {k: v for k, v in t.stats.items() if isinstance(v, dict) and v and set(v) <= ms}


def layer_stats(plan: Plan, tensor: str, n_layers: int) -> list[tuple[str, str]]:
    """Plan-level statistics (plan.stats["sens"], ["lewis"], ...) as they bear on this
    tensor's layer: arrays indexed by layer give their entry for it, dicts keyed by
    layer or component give the matching entry, other values are shown whole.

    The layout of these statistics belongs to each guide; this reads them generically so
    a new guide's statistics show up without a change here.
    """
    pn = parse_name(tensor)
    rows: list[tuple[str, str]] = []

    def pick(o: Any) -> Any:
        if isinstance(o, dict):
            # Keys of a msgpack map are strings, so a layer key is "12", never 12.
            for key in (str(pn.layer) if pn.layer is not None else None, pn.component):
                if key is not None and key in o:
                    return pick(o[key])
            return {k: pick(v) for k, v in o.items()}
        if pn.layer is not None and n_layers:
            if isinstance(o, np.ndarray) and o.ndim >= 1 and o.shape[0] >= n_layers:
                x = o[pn.layer]
                return x.item() if isinstance(x, np.generic) else x
            if isinstance(o, (list, tuple)) and len(o) >= n_layers and all(isinstance(x, (int, float)) for x in o):
                return o[pn.layer]
        return o

    for guide in sorted(plan.stats, key=str):
        rows += flatten_stats(pick(plan.stats[guide]), prefix=str(guide), limit=40)
    return rows


def fmt_num(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}g}"
