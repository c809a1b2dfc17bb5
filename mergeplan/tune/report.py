"""The tuning record as a Rich table: `mergeplan plan` prints it after a search, `mergeplan
show` prints it for a tuned plan. Reads only the plan's plain `tuning` record (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.table import Table
from rich.text import Text

from mergeplan.safetext import markup, text

TOP = 10  # candidates listed; the rest are counted
# Columns for searched values and for tasks, each: a search varies a handful, but a crafted
# record with thousands of keys made `show` spend minutes in short_names and Rich's layout.
MAX_COLUMNS = 12


def _map(x: Any) -> dict:
    """A record's sub-map, or {} when a hand-made or hostile plan put something else there
    (the schema checks the candidates' shape, not these free-form parts)."""
    return x if isinstance(x, dict) else {}


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else markup(str(x))


def short_names(paths: list[str]) -> dict[str, str]:
    """Column headers: the last path component (`omega`, `merge_method` -> `method`), longer
    only where two collide."""
    out = {}
    for p in paths:
        if p == "merge_method":
            out[p] = "method"
            continue
        parts = p.split(".")
        k = 1
        while k < len(parts) and sum(q.split(".")[-k:] == parts[-k:] for q in paths) > 1:
            k += 1
        out[p] = ".".join(parts[-k:])
    return out


@dataclass(frozen=True)
class CandidateRow:
    id: int
    score: float | None
    chosen: bool
    assignment: dict[str, Any]
    losses: dict[str, float | None]  # task -> held-out loss (search split)
    gains: dict[str, float | None]  # task -> share of the expert's gain recovered, for bars
    error: str | None = None


def candidate_rows(tuning: dict[str, Any]) -> list[CandidateRow]:
    """The record's candidates, best first (failed ones last), with per-task losses and the
    recovered share of each task's gain (base and expert losses from the record)."""
    obj = _map(tuning.get("objective"))
    maximize = obj.get("direction") == "maximize"
    base = _map(_map(tuning.get("baselines")).get("base"))
    experts = _map(_map(tuning.get("baselines")).get("experts"))
    out = []
    for c in tuning.get("candidates", []):
        if not isinstance(c, dict):
            continue
        tasks = c.get("tasks") or {}
        losses = {t: v.get("loss") if isinstance(v, dict) else None for t, v in tasks.items()}
        gains = {}
        for t, loss in losses.items():
            b, e = _map(base.get(t)).get("loss"), _map(experts.get(t)).get("loss")
            ok = all(isinstance(x, (int, float)) for x in (b, e, loss)) and b - e > 0
            gains[t] = (b - loss) / (b - e) if ok else None
        score = c.get("score") if isinstance(c.get("score"), (int, float)) else None
        out.append(CandidateRow(c.get("id"), score, c.get("id") == tuning.get("chosen"),
                                dict(c.get("assignment") or {}), losses, gains, c.get("error")))
    scored = sorted((r for r in out if r.score is not None), key=lambda r: -r.score if maximize else r.score)
    return scored + [r for r in out if r.score is None]


def bar(fraction: float | None, width: int = 8) -> str:
    """A gain share as a bar of eighth blocks (0 empty, 1 full; beyond is clipped)."""
    if fraction is None:
        return " " * width
    cells = max(0.0, min(1.0, fraction)) * width
    full, part = int(cells), int(round((cells - int(cells)) * 8))
    s = "█" * full + ("▏▎▍▌▋▊▉"[part - 1] if 0 < part < 8 and full < width else "")
    return s.ljust(width)


def _cell(x: Any) -> Text:
    """A table cell from the record: Text, which Rich prints literally (a markup string
    would still turn a plan's ":fire:" into an emoji)."""
    return Text("-") if x is None else Text(f"{x:.4f}") if isinstance(x, float) else text(str(x))


def candidates_table(tuning: dict[str, Any], top: int = TOP) -> Table:
    obj = _map(tuning.get("objective"))
    rows = candidate_rows(tuning)
    scored = [r for r in rows if r.score is not None]
    all_tasks = list(next((r.losses for r in scored), {}))
    all_dims = list(dict.fromkeys(k for r in rows for k in r.assignment))
    tasks, dims = all_tasks[:MAX_COLUMNS], all_dims[:MAX_COLUMNS]
    short = short_names(dims)
    # Every string from the record goes in as Text: headers, cells and the title.
    t = Table(title=Text.assemble("tuning: ", text(str(obj.get("describe", obj.get("kind", "")))),
                                  f"; {len(rows) - 1} candidate(s) and the recipe as written (#0)"),
              title_justify="left")
    t.add_column("#", justify="right", no_wrap=True)
    t.add_column(text(str(obj.get("kind", "score")).replace("_", " ")), justify="right")
    for d in dims:
        t.add_column(text(short[d]), justify="right")
    for task in tasks:
        t.add_column(text(task), justify="right")
    for r in scored[:top]:
        t.add_row(Text.assemble((">", "bold green") if r.chosen else "", str(r.id)), _cell(r.score),
                  *[_cell(r.assignment[d]) if d in r.assignment else Text("-") for d in dims],
                  *[_cell(r.losses.get(k)) for k in tasks])
    failed = len(rows) - len(scored)
    cut = len(all_dims) - len(dims) + len(all_tasks) - len(tasks)
    t.caption = (f"> chosen; task columns: held-out loss; {max(0, len(scored) - top)} more scored, {failed} failed"
                 + (f"; {cut} more column(s) left out" if cut else ""))
    return t


def verdict_lines(tuning: dict[str, Any]) -> list[str]:
    """Held-out (search) beside test score, and whether the margin is within noise."""
    cands = {c.get("id"): c for c in tuning.get("candidates", []) if isinstance(c, dict)}
    chosen, recipe = cands.get(tuning.get("chosen")), cands.get(0)
    if not chosen or not recipe:
        return []
    kind = markup(str(_map(tuning.get("objective")).get("kind", "score")))  # plan text: escaped
    lines = [f"search split: chosen #{markup(str(chosen.get('id')))} {kind} {_fmt(chosen.get('score'))} "
             f"vs the recipe as written {_fmt(recipe.get('score'))}"]
    test = _map(tuning.get("test"))
    if test:
        lines.append(f"test split (never seen by the search): chosen {_fmt(test.get('chosen'))} "
                     f"vs the recipe {_fmt(test.get('recipe'))}")
    sm, tm = _map(tuning.get("search_margin")), _map(test.get("margin"))
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
