"""Make another candidate of a tuned plan the plan: `mergeplan pick PLAN N` and the review's
candidates screen.

The tuning record keeps each candidate's assignment, not its plan (that would be one plan
per candidate). Picking re-plans: the recipe text the plan carries, with the candidate's
values written in, planned against the same inputs; the inputs must still be the ones the
search read (the same tensor digests), so the picked plan is the one the search scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergeplan.errors import MergeplanError
from mergeplan.plan.model import Plan


def candidate(plan: Plan, cid: int) -> dict[str, Any]:
    t = plan.tuning
    if not t:
        raise MergeplanError("the plan has no tuning record: it was not made by a `tune:` search")
    for c in t.get("candidates", []):
        if isinstance(c, dict) and c.get("id") == cid:
            if c.get("score") is None:
                raise MergeplanError(f"candidate #{cid} failed during the search ({c.get('error', 'no score')}); pick another")
            return c
    ids = [c.get("id") for c in t.get("candidates", []) if isinstance(c, dict)]
    raise MergeplanError(f"the plan has no candidate #{cid}; candidates: {', '.join(map(str, ids))}")


def pick(plan: Plan, cid: int, remap: dict[str, str] | None = None, plan_path: str | None = None,
         device: str = "auto", threads: int = 1, quiet: bool = True) -> Plan:
    """The plan of candidate `cid`, with the tuning record kept and `chosen` set to it."""
    from mergeplan.apply import model_paths
    from mergeplan.planner import PlanOptions, build_plan
    from mergeplan.recipe import parse_recipe

    c = candidate(plan, cid)
    rdir = plan.recipe.get("dir") or (str(Path(plan_path).parent) if plan_path else ".")
    rpath = Path(rdir) / (Path(plan.recipe.get("path") or "recipe.yaml").name)
    recipe = parse_recipe(plan.recipe.get("text", ""), rpath)
    paths = model_paths(plan, dict(remap or {}), plan_path)
    new = build_plan(recipe.with_assignment(dict(c["assignment"])),
                     PlanOptions(device=device, threads=threads, quiet=quiet,
                                 remap={k: str(v) for k, v in paths.items()}))
    for m in plan.models:
        was = m.content_digests()
        now = new.model(m.id).content_digests() if any(x.id == m.id for x in new.models) else {}
        if was and now != was:
            changed = next((n for n in was if now.get(n) != was[n]), "its tensor list")
            raise MergeplanError(
                f"model {m.id} is not the one the search read ({changed} differs); candidate #{cid}'s "
                "scores do not apply to it: run the search again on these inputs"
            )
    new.tuning = {**plan.tuning, "chosen": cid}
    new.notes.append(f"tune: candidate #{cid} picked over the search's choice #{plan.tuning.get('chosen')}")
    new.edit_log = list(plan.edit_log)
    return new
