"""`mergeplan plan` with a `tune:` section: calibrate once, merge and score many candidates,
keep the best plan and the record of how it was chosen.

    plan = tune_plan(recipe, PlanOptions(...))

1. Calibrate once, for the union of what every candidate's guides measure (decisions are
   pure functions of the statistics: guides/decide.py), so a candidate costs a mask pass,
   an in-memory merge (apply's engine) and a scoring pass, never a calibration.
2. Held-out data (split.py): per task, samples after the ones calibration read; a search
   set scores the candidates, a test set the search never saw scores the winner and the
   recipe as written, so the reported gain is not the search's own optimism.
3. Candidate 0 is the recipe as written. Then the strategy's candidates until the budget
   (candidates and/or time) is spent or Ctrl-C; the plan keeps the best so far.
One model is resident at a time: baselines are scored one by one, each candidate's merge
is freed before the next.
"""

from __future__ import annotations

import gc
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mergeplan.errors import MergeplanError
from mergeplan.evaluate.score import SampleScores
from mergeplan.plan.model import Plan
from mergeplan.tune.objective import Objective, margin, within_noise
from mergeplan.tune.record import tuning_record
from mergeplan.tune.split import HeldOutData, load_heldout
from mergeplan.tune.strategy import make_asker

Scores = dict[str, SampleScores]


@dataclass
class Candidate:
    id: int
    assignment: dict[str, Any]
    score: float | None = None  # objective on the search set; None when it failed
    scores: Scores = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    worker: str = "local"
    plan: Plan | None = None  # kept only for the best so far and the recipe's own


@dataclass
class TuneResult:
    plan: Plan
    candidates: list[Candidate]
    chosen: Candidate
    recipe: Candidate
    test: dict[str, Any]
    interrupted: bool = False


def objective_of(spec) -> Objective:
    o = spec.objective
    return Objective("loss", dict(o.loss)) if o.kind == "loss" else Objective()


class _Stop:
    """Ctrl-C during the search ends it after the candidate in progress; a second one
    interrupts as usual."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread (tests driving the search from a thread)
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def tune_plan(recipe, opts, say: Callable[[str], None] = print, stats=None) -> TuneResult:
    """Search `recipe.tune.space`; return the best candidate's plan with its tuning record."""
    from mergeplan.planner import PlanOptions, build_plan, calibrate_recipe

    spec = recipe.tune
    dims = spec.dimensions()
    objective = objective_of(spec)
    base_opts = PlanOptions(device=opts.device, threads=opts.threads, quiet=True, remap=dict(opts.remap),
                            memory_budget=opts.memory_budget)
    untuned = recipe.with_assignment({})

    # -- calibrate once ------------------------------------------------------------------
    t0 = time.perf_counter()
    if stats is None and _guided(untuned, dims):
        variants = _guide_variants(untuned, dims)
        say(f"tune: calibrating once for {len(variants)} guide setting(s)")
        stats = calibrate_recipe(untuned, PlanOptions(device=opts.device, quiet=opts.quiet,
                                                      remap=dict(opts.remap)), options=variants)
    calib_s = time.perf_counter() - t0

    # -- held-out data and the baselines -------------------------------------------------
    data = load_heldout(untuned, spec.heldout, stats, remap=opts.remap)
    dev = _device(opts.device)
    say(f"tune: held-out {data.describe()}")
    base_scores, expert_scores = _baselines(data, dev, opts.threads, say)
    for task, e in expert_scores["search"].items():
        # A task whose expert is no better than the base on it has no gain to recover: its
        # ratio would divide by ~0 or flip sign. Left out of the objective, and said.
        if objective.kind == "recovered_gain" and e is not None and not e.loss < base_scores["search"][task].loss:
            for split in expert_scores.values():
                split[task] = None
            data.notes.append(f"tune: task {task}: its expert {data.experts[task]} is no better than the base "
                              "on the held-out samples, so the task is left out of recovered_gain")
    for n in data.notes:
        say(n)
    if objective.kind == "recovered_gain" and not any(e is not None for e in expert_scores["search"].values()):
        raise MergeplanError(
            "tune.objective recovered_gain needs a task whose expert (the fine-tune named like the task) "
            "is in the recipe; name held-out tasks after model ids, or use objective {loss: {task: weight}}"
        )

    def evaluate(c: Candidate, rec) -> None:
        t = time.perf_counter()
        plan = build_plan(rec, base_opts, stats=stats)
        c.scores = _score_plan(plan, data.search, dev, opts.threads)
        c.score = float(objective.value(c.scores, base_scores["search"], expert_scores["search"]))
        c.plan = plan
        c.seconds = round(time.perf_counter() - t, 3)

    candidates: list[Candidate] = []
    recipe_c = Candidate(0, {})
    evaluate(recipe_c, untuned)
    candidates.append(recipe_c)
    best = recipe_c
    say(_line(recipe_c, best, objective, "recipe as written"))

    asker = make_asker(dims, spec.strategy, spec.seed, objective.direction, spec.storage, spec.study,
                       spec.candidates)
    limit = spec.candidates
    end = None if spec.time is None else time.monotonic() + spec.time
    interrupted = False
    with _Stop() as stop:
        while True:
            if stop.requested:
                interrupted = True
                break
            searched = len(candidates) - 1
            if limit is not None and not asker.shared and searched >= limit:
                break
            if end is not None and time.monotonic() >= end:
                break
            asked = asker.ask()
            if asked is None:
                break
            handle, assignment = asked
            c = Candidate(len(candidates), assignment)
            try:
                evaluate(c, untuned.with_assignment(assignment))
            except MergeplanError as e:
                c.error = str(e)
                asker.fail(handle)
            else:
                asker.tell(handle, c.score, {"tasks": _task_summary(c.scores), "seconds": c.seconds})
                if objective.better(c.score, best.score):
                    if best is not recipe_c:
                        best.plan = None
                    best = c
                elif c is not recipe_c:
                    c.plan = None
            candidates.append(c)
            say(_line(c, best, objective, _show(assignment)))
            gc.collect()

    # -- a shared study: another worker's candidate may be the best ----------------------
    if spec.storage:
        for t in asker.finished():
            if t["value"] is None or not objective.better(t["value"], best.score):
                continue
            c = Candidate(len(candidates), t["assignment"], worker=f"study trial {t['number']}")
            evaluate(c, untuned.with_assignment(t["assignment"]))
            candidates.append(c)
            if objective.better(c.score, best.score):
                best = c
        say(f"tune: the study holds {len(asker.finished())} finished candidate(s) from every worker")

    # -- test set: the winner and the recipe as written, on samples the search never saw --
    test: dict[str, Any] = {}
    if data.test:
        say("tune: scoring the chosen plan and the recipe's on the test split")
        best_test = _score_plan(best.plan, data.test, dev, opts.threads)
        rec_test = best_test if best is recipe_c else _score_plan(recipe_c.plan, data.test, dev, opts.threads)
        bt, et = base_scores["test"], expert_scores["test"]
        test = {
            "chosen": float(objective.value(best_test, bt, et)),
            "recipe": float(objective.value(rec_test, bt, et)),
            "chosen_tasks": _task_summary(best_test),
            "recipe_tasks": _task_summary(rec_test),
        }
        if best is not recipe_c:
            iv = margin(objective, best_test, rec_test, bt, et, seed=spec.seed)
            test["margin"] = iv.as_dict()
            test["within_noise"] = within_noise(objective, iv)
    search_margin = None
    if best is not recipe_c:
        iv = margin(objective, best.scores, recipe_c.scores, base_scores["search"], expert_scores["search"],
                    seed=spec.seed)
        search_margin = {**iv.as_dict(), "within_noise": within_noise(objective, iv)}

    plan = best.plan
    plan.tuning = tuning_record(
        spec, objective, candidates, best, data, base_scores, expert_scores, test, search_margin,
        calib_seconds=calib_s, interrupted=interrupted,
    )
    if interrupted:
        plan.notes.append(f"tune: interrupted after {len(candidates) - 1} candidate(s); the best so far was kept")
    return TuneResult(plan, candidates, best, recipe_c, test, interrupted)


# -- helpers ---------------------------------------------------------------------------------
def _guided(recipe, dims: list) -> bool:
    return bool(recipe.guides) or any(d.path.startswith("guides.") for d in dims)


def _guide_variants(recipe, dims: list) -> list:
    """Guide option sets whose union covers every candidate: the recipe's own, and one per
    choice of each categorical guide dimension (ranges over guide options change only the
    decision math, which the same statistics serve)."""
    from mergeplan.guides import parse_guides

    out = [parse_guides(recipe.guides)]
    for d in dims:
        if d.path.startswith("guides.") and d.kind == "categorical":
            for v in d.choices:
                out.append(parse_guides(recipe.with_assignment({d.path: v}).guides))
    return out


def _device(name: str) -> torch.device:
    from mergeplan.devices import pick_device

    return pick_device(name)


def _score_plan(plan: Plan, sets, dev, threads: int) -> Scores:
    from mergeplan.evaluate.run import score_plan

    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return score_plan(plan, sets, threads=threads, device=dev)
    finally:
        torch.set_num_threads(prev)


def _baselines(data: HeldOutData, dev, threads: int, say) -> tuple[dict[str, Scores], dict[str, dict]]:
    """The base's and each task expert's scores on both splits, one model resident at a time."""
    from mergeplan.evaluate.run import _quiet_transformers, load_model_dir
    from mergeplan.evaluate.score import score_model

    _quiet_transformers()

    splits = {"search": data.search, **({"test": data.test} if data.test else {})}
    base: dict[str, Scores] = {}
    experts: dict[str, dict[str, SampleScores | None]] = {k: {t: None for t in v} for k, v in splits.items()}
    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        for mid, path in [(data.base_id, data.base_path), *data.expert_paths.items()]:
            t = time.perf_counter()
            model = load_model_dir(Path(path), dev)
            for split, sets in splits.items():
                s = score_model(model, sets, dev)
                if mid == data.base_id:
                    base[split] = s
                for task, expert in data.experts.items():
                    if expert == mid:
                        experts[split][task] = s[task]
            del model
            gc.collect()
            say(f"tune: scored {mid} on the held-out data ({time.perf_counter() - t:.1f} s)")
    finally:
        torch.set_num_threads(prev)
    return base, experts


def _task_summary(scores: Scores) -> dict[str, dict[str, float]]:
    return {t: {"loss": round(s.loss, 6), "accuracy": round(s.accuracy, 6)} for t, s in scores.items()}


def _show(assignment: dict[str, Any]) -> str:
    return "  ".join(f"{k}={v}" for k, v in assignment.items())


def _line(c: Candidate, best: Candidate, objective: Objective, what: str) -> str:
    head = f"tune: #{c.id:<3}"
    if c.error:
        return f"{head} failed: {c.error}  [{what}]"
    mark = " *" if c is best else "  "
    return f"{head}{mark} {objective.kind} {c.score:.4f}  ({c.seconds:.1f} s)  {what}"
