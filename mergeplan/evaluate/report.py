"""An EvalReport as Rich tables (stdout) or JSON. Names and paths come from plans and the
command line: they are escaped before they reach the terminal."""

from __future__ import annotations

import json
import math
from typing import Any

from rich.console import Console
from rich.table import Table

from mergeplan.evaluate.run import BASE, EvalReport
from mergeplan.safetext import clean, text


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def report_json(report: EvalReport) -> dict[str, Any]:
    models = []
    for r in report.results:
        tasks = {}
        for t, s in r.scores.items():
            tasks[t] = {**s.as_dict(), **({"gain": _num(r.gains[t])} if t in r.gains else {})}
        models.append({
            "name": r.target.name, "kind": r.target.kind, "path": str(r.target.path),
            "merged_in_memory": r.target.plan is not None, "seconds": r.seconds, "tasks": tasks,
            "mean_gain": _num(r.mean_gain),
            "mean_gain_ci": {k: _num(v) if k != "level" else v for k, v in r.mean_gain_ci.as_dict().items()}
            if r.mean_gain_ci else None,
        })
    comp = None
    if report.comparison:
        d = report.comparison["difference"]
        comp = {"best": report.comparison["best"], "runner_up": report.comparison["runner_up"],
                "difference": {k: _num(v) if k != "level" else v for k, v in d.as_dict().items()},
                "within_noise": report.comparison["within_noise"]}
    return {
        "settings": report.settings,
        "tasks": {t: {**es.record(), "expert": report.experts.get(t)} for t, es in report.tasks.items()},
        "models": models,
        "comparison": comp,
    }


def dumps(report: EvalReport) -> str:
    return json.dumps(report_json(report), indent=2, sort_keys=True, allow_nan=False) + "\n"


def print_report(console: Console, report: EvalReport) -> None:
    tasks = list(report.tasks)
    loss = Table(title="held-out loss (token accuracy); lower loss is better", title_justify="left")
    loss.add_column("model")
    loss.add_column("kind")
    for t in tasks:
        loss.add_column(text(t), justify="right")
    loss.add_column("time", justify="right")
    for r in report.results:
        loss.add_row(text(r.target.name), r.target.kind,
                     *[f"{r.scores[t].loss:.4f} ({100 * r.scores[t].accuracy:.1f}%)" for t in tasks],
                     f"{r.seconds:.1f}s")
    console.print(loss)
    with_expert = [t for t in tasks if report.experts.get(t)]
    rows = [r for r in report.results if r.target.kind != BASE and r.mean_gain is not None]
    if not with_expert or not rows:
        console.print("recovered gain: needs the base and, per task, its expert (a fine-tune whose id is the "
                      "task name, or that a plan calibrated on the task's file)", highlight=False)
        return
    level = int(round(100 * report.settings["bootstrap"]["level"]))
    gain = Table(title="recovered gain (base - model) / (base - expert); 1 = the expert, 0 = the base",
                 title_justify="left")
    gain.add_column("model")
    for t in with_expert:
        gain.add_column(text(f"{t} ({report.experts[t]})"), justify="right")
    gain.add_column(f"mean [{level}% CI]", justify="right")
    for r in rows:
        ci = r.mean_gain_ci
        band = f" [{ci.low:.3f}, {ci.high:.3f}]" if ci and math.isfinite(ci.low) else ""
        gain.add_row(text(r.target.name), *[_fmt(r.gains.get(t)) for t in with_expert], f"{_fmt(r.mean_gain)}{band}")
    console.print(gain)
    missing = [t for t in tasks if not report.experts.get(t)]
    if missing:
        console.print(f"no expert for {clean(', '.join(missing))}: left out of the gain", highlight=False, markup=False)
    if report.comparison:
        c, d = report.comparison, report.comparison["difference"]
        verdict = ("within the evaluation's noise: more samples would be needed to tell them apart"
                   if c["within_noise"] else "outside the evaluation's noise")
        console.print(f"best merge {clean(c['best'])} vs {clean(c['runner_up'])}: mean gain {d.estimate:+.3f} "
                      f"[{d.low:+.3f}, {d.high:+.3f}] ({level}% paired bootstrap over samples), {verdict}",
                      highlight=False, markup=False)


def _fmt(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3f}"
