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


def pick(plan: Plan, cid: int, recipe_path: str | Path | None = None, remap: dict[str, str] | None = None,
         plan_path: str | None = None, device: str = "auto", threads: int = 1, quiet: bool = True) -> Plan:
    """The plan of candidate `cid`, with the tuning record kept and `chosen` set to it.

    The recipe that runs is a file on this machine (`recipe_path`, else where the plan
    says it was), never the text inside the plan: that text is untrusted and names data
    files and hub datasets the re-plan would read. The file must be the recipe the search
    ran (the same text), so the candidate's values mean what they meant in the search."""
    from mergeplan.apply import model_paths
    from mergeplan.planner import PlanOptions, build_plan
    from mergeplan.recipe import load_recipe

    c = candidate(plan, cid)
    rpath = Path(recipe_path) if recipe_path else Path(plan.recipe.get("dir") or ".") / Path(
        plan.recipe.get("path") or "recipe.yaml").name
    if not rpath.is_file():
        raise MergeplanError(f"{rpath}: the recipe this plan was tuned with is not there; "
                             "give it with --recipe PATH")
    recipe = load_recipe(rpath)
    if recipe.text != plan.recipe.get("text"):
        raise MergeplanError(f"{rpath} is not the recipe this plan was tuned with (its text differs); "
                             "give that recipe with --recipe PATH")
    if {m.name for m in recipe.all_models} != {m.id for m in plan.models}:
        raise MergeplanError(f"{rpath}: its models are not the plan's ({', '.join(m.id for m in plan.models)})")
    _check_assignment(recipe, c["assignment"], cid)
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
    tuning = {**plan.tuning, "chosen": cid}
    if cid != plan.tuning.get("chosen"):
        # The test-split scores and both margins were measured for the search's choice; the
        # record keeps no per-sample scores to redo them for another candidate.
        tuning.update(test={}, search_margin=None)
    new.tuning = tuning
    new.notes.append(f"tune: candidate #{cid} picked over the search's choice #{plan.tuning.get('chosen')}; "
                     "its test-split score was not measured (mergeplan eval measures it)")
    new.edit_log = list(plan.edit_log)
    return new


def _check_assignment(recipe, assignment: dict[str, Any], cid: int) -> None:
    """The candidate's values must be ones the recipe's `tune.space` offers: the record is
    part of a received plan, and a forged one could otherwise re-plan any value the schema
    allows (another method, any parameter) under candidate #cid's name and scores."""
    from mergeplan.tune.space import values

    dims = {d.path: d for d in (recipe.tune.dimensions() if recipe.tune else [])}
    for path, v in assignment.items():
        d = dims.get(path)
        if d is None:
            raise MergeplanError(f"candidate #{cid} sets {path!r}, which the recipe's tune.space does not search; "
                                 "the plan's tuning record is corrupt or hostile")
        finite = values(d)
        if finite is not None:
            ok = any(type(v) is type(x) and v == x for x in finite)
        else:
            kind_ok = isinstance(v, int) if d.kind == "int" else isinstance(v, (int, float))
            ok = kind_ok and not isinstance(v, bool) and float(d.low) <= v <= float(d.high)
        if not ok:
            raise MergeplanError(f"candidate #{cid} sets {path} to {v!r}, outside the recipe's tune.space; "
                                 "the plan's tuning record is corrupt or hostile")
