"""The tuning record as a Rich table: `mergeplan plan` prints it after a search, `mergeplan
show` prints it for a tuned plan. Reads only the plan's plain `tuning` record (no torch)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from mergeplan.safetext import markup

TOP = 10  # candidates listed; the rest are counted


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else markup(str(x))


def _short_names(paths: list[str]) -> dict[str, str]:
    """Column headers: the last path component (`omega`), longer only where two collide."""
    out = {}
    for p in paths:
        parts = p.split(".")
        k = 1
        while k < len(parts) and sum(q.split(".")[-k:] == parts[-k:] for q in paths) > 1:
            k += 1
        out[p] = ".".join(parts[-k:])
    return out


def candidates_table(tuning: dict[str, Any], top: int = TOP) -> Table:
    obj = tuning.get("objective", {})
    maximize = obj.get("direction") == "maximize"
    cands = [c for c in tuning.get("candidates", []) if isinstance(c, dict)]
    scored = sorted((c for c in cands if isinstance(c.get("score"), (int, float))),
                    key=lambda c: -c["score"] if maximize else c["score"])
    tasks = list(next((c.get("tasks") or {} for c in scored), {}))
    dims = list(dict.fromkeys(k for c in cands for k in (c.get("assignment") or {})))
    short = _short_names(dims)
    t = Table(title=f"tuning: {markup(str(obj.get('describe', obj.get('kind', ''))))}; "
                    f"{len(cands) - 1} candidate(s) and the recipe as written (#0)",
              title_justify="left")
    t.add_column("#", justify="right", no_wrap=True)
    t.add_column(markup(str(obj.get("kind", "score"))).replace("_", " "), justify="right")
    for d in dims:
        t.add_column(markup(short[d]), justify="right")
    for task in tasks:
        t.add_column(f"{markup(task)}", justify="right")
    chosen = tuning.get("chosen")
    for c in scored[:top]:
        mark = "[bold green]>[/]" if c.get("id") == chosen else ""
        a = c.get("assignment") or {}
        t.add_row(f"{mark}{c.get('id')}", _fmt(c.get("score")),
                  *[_fmt(a[d]) if d in a else "-" for d in dims],
                  *[_fmt((c.get("tasks") or {}).get(k, {}).get("loss")) for k in tasks])
    failed = [c for c in cands if c.get("score") is None]
    notes = [f"> chosen; task columns: held-out loss; {max(0, len(scored) - top)} more scored, {len(failed)} failed"]
    t.caption = notes[0]
    return t


def verdict_lines(tuning: dict[str, Any]) -> list[str]:
    """Held-out (search) beside test score, and whether the margin is within noise."""
    cands = {c.get("id"): c for c in tuning.get("candidates", []) if isinstance(c, dict)}
    chosen, recipe = cands.get(tuning.get("chosen")), cands.get(0)
    if not chosen or not recipe:
        return []
    kind = tuning.get("objective", {}).get("kind", "score")
    lines = [f"search split: chosen #{chosen.get('id')} {kind} {_fmt(chosen.get('score'))} "
             f"vs the recipe as written {_fmt(recipe.get('score'))}"]
    test = tuning.get("test") or {}
    if test:
        lines.append(f"test split (never seen by the search): chosen {_fmt(test.get('chosen'))} "
                     f"vs the recipe {_fmt(test.get('recipe'))}")
    sm, tm = tuning.get("search_margin") or {}, test.get("margin") or {}
    if chosen is recipe:
        lines.append("no candidate beat the recipe as written; the plan is the recipe's own")
    elif test and test.get("within_noise"):
        lines.append(f"[yellow]the chosen plan's margin on the test split is within noise[/] "
                     f"(95% interval {_fmt(tm.get('low'))}..{_fmt(tm.get('high'))})")
    elif test:
        lines.append(f"the margin holds on the test split (95% interval {_fmt(tm.get('low'))}..{_fmt(tm.get('high'))})")
    elif sm.get("within_noise"):
        lines.append("[yellow]the chosen plan's margin on the search split is within noise[/] "
                     "(and there is no test split to confirm it)")
    if tuning.get("interrupted"):
        lines.append("[yellow]the search was interrupted; the best candidate so far was kept[/]")
    return lines
