"""Readable and machine-readable views of plans and plan diffs (for `show` and `diff`)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from .execute import aim_factors
from .plan.codec import plan_digest
from .plan.diff import DiffRow
from .plan.model import OP_MERGE, Plan
from .plan.names import parse_name


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return [round(float(x), 6) for x in v.ravel()] if v.size <= 64 else {
            "shape": list(v.shape), "mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def layer_summary(plan: Plan) -> list[dict[str, Any]]:
    """Per layer ("-" for tensors outside decoder blocks): mean density, weight, kept fraction
    per model over merged tensors, plus mean lambda, AIM factor and mask overlap."""
    acc: dict[Any, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for t in plan.tensors:
        if t.op != OP_MERGE:
            continue
        layer = parse_name(t.name).layer
        key = layer if layer is not None else "-"
        a = acc[key]
        for c in t.contributions:
            a[f"density:{c.model}"].append(c.density)
            a[f"weight:{c.model}"].append(c.weight)
            kept = t.stats.get("kept", {})
            if c.model in kept:
                a[f"kept:{c.model}"].append(kept[c.model])
        a["lambda"].append(float(t.params.get("lambda", 1.0)))
        if t.relax:
            a["aim_factor"].append(float(aim_factors(t.relax).mean()))
        if "overlap" in t.stats:
            a["overlap"].append(t.stats["overlap"])
    rows = []
    for key in sorted(acc, key=lambda k: (k == "-", k if k != "-" else 0)):
        rows.append({"layer": key, **{k: float(np.mean(v)) for k, v in acc[key].items()}})
    return rows


def plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "digest": plan_digest(plan),
        "mergeplan_version": plan.mergeplan_version,
        "created": plan.created,
        "method": plan.method,
        "params": _jsonable(plan.params),
        "seed": plan.seed,
        "out_dtype": plan.out_dtype,
        "models": [{"id": m.id, "role": m.role, "path": m.path,
                    "shards": len(m.fingerprint.get("shards", [])),
                    "bytes": sum(s["size"] for s in m.fingerprint.get("shards", []))} for m in plan.models],
        "guides": _jsonable(plan.guides),
        "calibration": _jsonable(plan.calibration),
        "notes": plan.notes,
        "edit_log": _jsonable(plan.edit_log),
        "layers": layer_summary(plan),
        "stats": _jsonable(plan.stats),
        "tensors": [
            {"name": t.name, "op": t.op, "shape": list(t.shape), "dtype": t.dtype, "params": _jsonable(t.params),
             "models": {c.model: {"weight": c.weight, "density": c.density,
                                  "mask": _jsonable({k: v for k, v in (c.mask or {}).items()}),
                                  "source": c.source} for c in t.contributions},
             "relax": _jsonable(t.relax), "stats": _jsonable(t.stats)}
            for t in plan.tensors
        ],
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_plan(console: Console, plan: Plan, path: Path | str, tensors: bool = False) -> None:
    console.print(f"[bold]{path}[/]  {plan_digest(plan)}")
    console.print(f"method [bold]{plan.method}[/]  seed {plan.seed}  out dtype {plan.out_dtype or 'as inputs'}  "
                  f"mergeplan {plan.mergeplan_version}  created {plan.created}")
    if plan.params:
        console.print("params: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(plan.params.items())))
    for n in plan.notes:
        console.print(f"note: {n}")
    mt = Table(title="models", title_justify="left")
    for col in ("id", "role", "path", "shards", "size"):
        mt.add_column(col)
    for m in plan.models:
        shards = m.fingerprint.get("shards", [])
        mt.add_row(m.id, m.role, m.path, str(len(shards)), f"{sum(s['size'] for s in shards) / 1e6:,.1f} MB")
    console.print(mt)
    if plan.guides:
        for g, v in sorted(plan.guides.items()):
            console.print(f"guide [bold]{g}[/]: " + ", ".join(f"{k}={_fmt(x)}" for k, x in sorted(_jsonable(v).items())
                                                            if not isinstance(x, (dict, list))))
    if plan.calibration:
        cal = _jsonable(plan.calibration)
        console.print("calibration: " + ", ".join(f"{k}={_fmt(x)}" for k, x in sorted(cal.items()) if not isinstance(x, (dict, list))))
    _print_sens(console, plan)
    rows = layer_summary(plan)
    ids = [m.id for m in plan.task_models]
    # One small table per quantity keeps any number of models readable at 80 columns.
    for qty, title in (("density", "density"), ("weight", "weight"), ("kept", "kept")):
        cols = [i for i in ids if any(f"{qty}:{i}" in r for r in rows)]
        if not cols:
            continue
        t = Table(title=f"{title} per layer", title_justify="left")
        t.add_column("layer", justify="right")
        for i in cols:
            t.add_column(i, justify="right")
        for r in rows:
            t.add_row(str(r["layer"]), *[_fmt(r.get(f"{qty}:{i}", "")) for i in cols])
        console.print(t)
    extra = [c for c in ("lambda", "aim_factor", "overlap") if any(c in r for r in rows)]
    if extra:
        t = Table(title="tensor params per layer", title_justify="left")
        t.add_column("layer", justify="right")
        for c in extra:
            t.add_column({"aim_factor": "AIM factor", "overlap": "mask overlap"}.get(c, c), justify="right")
        for r in rows:
            t.add_row(str(r["layer"]), *[_fmt(r.get(c, "")) for c in extra])
        console.print(t)
    if plan.edit_log:
        console.print(f"edit log: {len(plan.edit_log)} save(s), last {plan.edit_log[-1].get('time')} "
                      f"({len(plan.edit_log[-1].get('changes', []))} change(s))")
    if tensors:
        tt = Table(title="tensors", title_justify="left")
        for col in ("tensor", "op", "shape", "dtype", "models (weight/density)", "mask digest"):
            tt.add_column(col)
        for t in plan.tensors:
            contrib = " ".join(f"{c.model}={c.weight:.3g}/{c.density:.3g}" for c in t.contributions)
            digests = " ".join((c.mask or {}).get("digest") or ("recompute" if c.mask else "-") for c in t.contributions)
            tt.add_row(t.name, t.op, "x".join(map(str, t.shape)), t.dtype, contrib, digests[:40])
        console.print(tt)


def _print_sens(console: Console, plan: Plan) -> None:
    sens = plan.stats.get("sens") if isinstance(plan.stats, dict) else None
    if not sens or "sigma" not in sens:
        return
    groups = list(sens.get("groups", []))
    t = Table(title="Sens K*sigma", title_justify="left")
    t.add_column("group")
    models = list(sens["sigma"])
    k = len(models)
    for m in models:
        t.add_column(m, justify="right")
    for gi, g in enumerate(groups):
        t.add_row(str(g), *[f"{k * float(np.asarray(sens['sigma'][m]).ravel()[gi]):.3f}" for m in models])
    console.print(t)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, str) and len(v) == 32 and all(c in "0123456789abcdef" for c in v):
        return v[:12]  # a mask digest: the prefix is enough to tell them apart
    return _fmt(v)


def print_diff(console: Console, rows: list[DiffRow], a: Path | str, b: Path | str) -> None:
    if not rows:
        console.print(f"{a} and {b}: no differences")
        return
    console.print(f"{a} -> {b}: {len(rows)} difference(s)")
    t = Table()
    # Tensor names stay whole (a truncated name is useless in a diff); values fold.
    t.add_column("where", no_wrap=True)
    for col in ("model", "field", "old", "new"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(r.where, r.model or "", r.field, _cell(r.old), _cell(r.new))
    console.print(t)
