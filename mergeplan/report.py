"""Readable and machine-readable views of plans and plan diffs (for `show` and `diff`)."""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .plan.codec import plan_digest
from .plan.identity import decision_digest, edit_summary
from .plan.diff import DiffRow, is_mask_digest, summarize
from .plan.model import OP_MERGE, Plan
from .plan.names import parse_name
from .plan import view
from .plan.view import short_component
from .safetext import clean, markup, text


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
    per model over merged tensors, plus mean lambda, AIM factor and mask overlap.

    A kept fraction or overlap that an edit made stale (the planner measured a mask apply
    will now rebuild) is known only at apply: the layer's value is None and its key is
    listed in "at_apply", rather than an average that mixes in the old measurement."""
    acc: dict[Any, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    pending: dict[Any, set[str]] = defaultdict(set)
    for t in plan.tensors:
        if t.op != OP_MERGE:
            continue
        layer = parse_name(t.name).layer
        key = layer if layer is not None else "-"
        a = acc[key]
        recorded = t.stats.get("kept", {})
        for c in t.contributions:
            a[f"density:{c.model}"].append(c.density)
            a[f"weight:{c.model}"].append(c.weight)
            if c.model in recorded:
                k = view.kept(t, c)
                if k.pending:
                    pending[key].add(f"kept:{c.model}")
                else:
                    a[f"kept:{c.model}"].append(k.value)
        a["lambda"].append(float(t.params.get("lambda", 1.0)))
        mean = view.aim_mean(t.relax)
        if mean is not None:
            a["aim_factor"].append(mean)
        ov = view.overlap(t)
        if ov is not None:
            if ov.pending:
                pending[key].add("overlap")
            else:
                a["overlap"].append(ov.value)
    rows = []
    for key in sorted(acc, key=lambda k: (k == "-", k if k != "-" else 0)):
        row = {"layer": key, **{k: float(np.mean(v)) for k, v in acc[key].items()}}
        if pending[key]:
            row.update({k: None for k in pending[key]})
            row["at_apply"] = sorted(pending[key])
        rows.append(row)
    return rows


def plan_json(plan: Plan, digest: str | None = None) -> dict[str, Any]:
    """`digest`: the plan file's, as read_plan_with_digest checked it (else computed)."""
    return {
        "digest": digest or plan_digest(plan),
        "decision_digest": decision_digest(plan),
        "edits": edit_summary(plan),
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
        "tuning": _jsonable(plan.tuning),
        "tensors": [
            {"name": t.name, "op": t.op, "shape": list(t.shape), "dtype": t.dtype, "params": _jsonable(t.params),
             "models": {c.model: {"weight": c.weight, "density": c.density,
                                  "mask": _jsonable({k: v for k, v in (c.mask or {}).items()}),
                                  "source": c.source} for c in t.contributions},
             # Mask statistics an edit made stale are null (known at apply), never the old value.
             "relax": _jsonable(t.relax), "stats": _jsonable(view.tensor_stats(t))}
            for t in plan.tensors
        ],
    }


def _fmt(v: Any) -> str:
    if v is None:
        return view.AT_APPLY
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_plan(console: Console, plan: Plan, path: Path | str, tensors: bool = False, digest: str | None = None) -> None:
    """`digest`: the plan file's, as read_plan_with_digest checked it (else computed)."""
    # Every plan string is escaped (markup) or wrapped (text): the plan may be hostile.
    say = partial(console.print, emoji=False)
    say(f"[bold]{markup(path)}[/]  file {digest or plan_digest(plan)}")
    ed = edit_summary(plan)
    edited = f"edited by hand: {ed['changes']} change(s) in {ed['sessions']} session(s)" if ed["edited"] else "not edited"
    say(f"decision digest {decision_digest(plan)}  ({edited})")
    say(f"method [bold]{markup(plan.method)}[/]  seed {plan.seed}  out dtype {markup(plan.out_dtype or 'as inputs')}  "
        f"mergeplan {markup(plan.mergeplan_version)}  created {markup(plan.created)}")
    if plan.params:
        say("params: " + _pairs(sorted(plan.params.items())))
    for n in plan.notes:
        say(f"note: {markup(n)}")
    mt = Table(title="models", title_justify="left")
    for col in ("id", "role", "path", "shards", "size"):
        mt.add_column(col)
    rows = []
    for m in plan.models:
        shards = m.fingerprint.get("shards", [])
        rows.append([m.id, m.role, m.path, str(len(shards)), f"{sum(s['size'] for s in shards) / 1e6:,.1f} MB"])
    print_table(console, mt, rows)
    if plan.guides:
        for g, v in sorted(plan.guides.items()):
            say(f"guide [bold]{markup(g)}[/]: "
                + _pairs((k, x) for k, x in sorted(_jsonable(v).items()) if not isinstance(x, (dict, list))))
    if plan.calibration:
        cal = _jsonable(plan.calibration)
        say("calibration: " + _pairs((k, x) for k, x in sorted(cal.items()) if not isinstance(x, (dict, list))))
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
            t.add_column(text(i), justify="right")
        print_table(console, t, [[str(r["layer"]), *[_fmt(r.get(f"{qty}:{i}", "")) for i in cols]] for r in rows])
    extra = [c for c in ("lambda", "aim_factor", "overlap") if any(c in r for r in rows)]
    if extra:
        t = Table(title="tensor params per layer", title_justify="left")
        t.add_column("layer", justify="right")
        for c in extra:
            t.add_column({"aim_factor": "AIM factor", "overlap": "mask overlap"}.get(c, c), justify="right")
        print_table(console, t, [[str(r["layer"]), *[_fmt(r.get(c, "")) for c in extra]] for r in rows])
    if any(r.get("at_apply") for r in rows):
        say("at apply: an edit changed these masks since the planner measured them; apply rebuilds them "
            "from their recipe, so their kept fraction and overlap are known only then")
    if plan.tuning:
        from .tune.report import candidates_table, verdict_lines

        console.print(candidates_table(plan.tuning))
        for line in verdict_lines(plan.tuning):
            say(line)
    if plan.edit_log:
        say(f"edit log: {len(plan.edit_log)} save(s), last {markup(plan.edit_log[-1].get('time'))} "
            f"({len(plan.edit_log[-1].get('changes', []))} change(s))")
    if tensors:
        tt = Table(title="tensors", title_justify="left")
        for col in ("tensor", "op", "shape", "dtype", "models (weight/density)", "mask digest"):
            tt.add_column(col)
        rows = []
        for t in plan.tensors:
            contrib = " ".join(f"{c.model}={c.weight:.3g}/{c.density:.3g}" for c in t.contributions)
            digests = " ".join((c.mask or {}).get("digest") or ("recompute" if c.mask else "-") for c in t.contributions)
            rows.append([t.name, t.op, "x".join(map(str, t.shape)), t.dtype, contrib, digests[:40]])
        print_table(console, tt, rows)


def _pairs(items) -> str:
    """k=v, k=v as markup, keys and values escaped."""
    return ", ".join(f"{markup(k)}={markup(_fmt(v))}" for k, v in items)


# rich lays out a Table at about 0.1 ms per cell (benchmarks/diff_bench.py): 50 ms of `show`
# for the per-layer tables of a 70B plan (80 layers), and seconds for the tens of
# thousands of rows (or models, as columns) a crafted 1 MB plan can make. Bigger tables
# print as aligned plain columns under the same title and header styles, a few microseconds
# per cell.
TABLE_CELLS = 200
_PLAIN_WIDTH = 60  # widest column padded in plain layout; longer cells just push the rest right


def print_table(console: Console, table: Table, rows: list[list[Any]]) -> None:
    """`table` (its columns set up) filled with `rows`, whose cells are printed literally
    and with control characters made visible (the cells come from plans)."""
    cells = [[clean(c) for c in r] for r in rows]
    if len(cells) * len(table.columns) <= TABLE_CELLS:
        for r in cells:
            table.add_row(*map(Text, r))
        console.print(table)
        return
    if table.title:
        console.print(Text(str(table.title), style="table.title"))
    heads = [clean(c.header.plain if isinstance(c.header, Text) else c.header) for c in table.columns]
    right = [c.justify == "right" for c in table.columns]
    widths = [min(_PLAIN_WIDTH, max([len(h)] + [len(r[i]) for r in cells])) for i, h in enumerate(heads)]

    def line(r: list[str]) -> str:
        return "  ".join(x.rjust(w) if rj else x.ljust(w) for x, w, rj in zip(r, widths, right)).rstrip()

    console.print(Text(line(heads), style="table.header"))
    console.out("\n".join(line(r) for r in cells), highlight=False)


def _print_sens(console: Console, plan: Plan) -> None:
    sens = plan.stats.get("sens") if isinstance(plan.stats, dict) else None
    if not sens or "sigma" not in sens:
        return
    groups = list(sens.get("groups", []))
    if not groups:
        return
    t = Table(title="Sens K*sigma", title_justify="left")
    t.add_column("group")
    sigma = {m: np.asarray(v).ravel() for m, v in sens["sigma"].items()}
    k = len(sigma)
    for m in sigma:
        t.add_column(text(m), justify="right")
    # A plan may list more groups than it has values for: those cells stay empty.
    print_table(console, t, [[str(g), *[f"{k * float(v[gi]):.3f}" if gi < v.size else "-" for v in sigma.values()]]
                             for gi, g in enumerate(groups)])


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if is_mask_digest(v):
        return v[:12]
    return _fmt(v)


def print_diff(console: Console, rows: list[DiffRow], a: Path | str, b: Path | str, tensors: bool = False) -> None:
    """A summary that fits the console's width (80 columns when piped, unless COLUMNS says
    otherwise): plan- and model-level changes, changed values per layer x component, and
    per field how many values changed from what to what; `tensors` adds every change,
    grouped by tensor. Plan strings are cleaned and never read as markup."""
    if not rows:
        console.print(f"{markup(a)} and {markup(b)}: no differences", emoji=False)
        return
    s = summarize(rows)
    console.print(f"{markup(a)} -> {markup(b)}: {len(rows)} difference(s) in {s.tensors} tensor(s)", emoji=False)
    width = max(40, console.width)
    out: list[str] = []  # plain lines, written in one go (a crafted plan may make tens of thousands)

    def say(line: str) -> None:
        line = clean(line)
        out.append(line if len(line) <= width else line[: width - 3] + "...")

    def heading(title: str) -> None:
        if out:
            console.out("\n".join(out), highlight=False)
            out.clear()
        console.print(f"[bold]{title}[/]")

    for r in s.global_rows:
        say(f"{r.where}  {r.field}: {_cell(r.shown('old'))} -> {_cell(r.shown('new'))}")
    if s.rows:
        ranged = next((label for label, _ in s.rows if "-" in label[1:]), None)  # "L3-9": equal counts merged
        heading("changed values per layer and component"
                + (f" ({markup(ranged)}: in each of those layers)" if ranged else ""))
        label_w = max(len(label) for label, _ in s.rows) + 1
        per_block = max(1, (width - label_w) // 5)
        for i in range(0, len(s.components), per_block):
            comps = s.components[i:i + per_block]
            say(" " * label_w + "".join(fit(short_component(c), 4).rjust(5) for c in comps))
            for label, counts in s.rows:
                cells = counts[i:i + per_block]
                say(label.ljust(label_w) + "".join((str(n) if n else "·").rjust(5) for n in cells))
        heading("fields")
        fw = min(18, max(len(clean(f.field)) for f in s.fields))
        say(f"{'field':<{fw}} {'values':>6} {'tensors':>7}  old -> new")
        for f in s.fields:
            say(f"{fit(f.field, fw):<{fw}} {f.values:>6} {f.tensors:>7}  {f.old} -> {f.new}")
    if out:
        console.out("\n".join(out), highlight=False)
    if not tensors:
        if s.rows:
            console.print("every change, tensor by tensor: mergeplan diff --tensors (or --json)", emoji=False)
        return
    console.print("[bold]every change[/]")
    lines: list[str] = []
    where = None
    for r in rows:
        if r.where == "plan" or r.where.startswith("model "):
            continue
        if r.where != where:
            where = r.where
            lines.append(clean(r.where))
        lines.append(clean(f"  {r.model + '  ' if r.model else ''}{r.field}: {_cell(r.shown('old'))} -> {_cell(r.shown('new'))}"))
    # console.out: plain text, no markup or highlighting; long lines wrap as the terminal wraps them.
    console.out("\n".join(lines), highlight=False)


def fit(s: Any, width: int) -> str:
    s = clean(s)
    return s if len(s) <= width else s[: width - 1] + "~"
