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

import dataclasses
import gc
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mergeplan.errors import MergeplanError
from mergeplan.evaluate.score import SampleScores
from mergeplan.plan.model import Plan
from mergeplan.tune.objective import Objective, margin, within_noise
from mergeplan.tune.record import task_summary, tuning_record
from mergeplan.tune.split import HeldOutData, load_heldout
from mergeplan.tune.strategy import make_asker, require_optuna

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


def tune_plan(recipe, opts, say: Callable[[str], None] = print, stats=None) -> Plan:
    """Search `recipe.tune.space`; return the best candidate's plan with its tuning record."""
    from mergeplan.devices import pick_device, torch_threads
    from mergeplan.evaluate.run import score_plan
    from mergeplan.planner import build_plan, calibrate_recipe

    spec = recipe.tune
    require_optuna(spec)
    dims = spec.dimensions()
    objective = objective_of(spec)
    # Every candidate is planned as `mergeplan plan` would (--full-hash, remaps and budget
    # included), without its progress display: the search prints a line per candidate.
    cand_opts = dataclasses.replace(opts, quiet=True, progress=None)
    untuned = recipe.with_assignment({})
    dev = pick_device(opts.device)

    # -- calibrate once ------------------------------------------------------------------
    t0 = time.perf_counter()
    if stats is None and _guided(untuned, dims):
        variants = _guide_variants(untuned, dims)
        say(f"tune: calibrating once for {len(variants)} guide setting(s)")
        stats = calibrate_recipe(untuned, dataclasses.replace(opts, progress=None), options=variants)
    calib_s = time.perf_counter() - t0

    with torch_threads(opts.threads):
        # -- held-out data and the baselines ---------------------------------------------
        data = load_heldout(untuned, spec.heldout, objective, remap=opts.remap)
        say(f"tune: held-out {data.describe()}")
        base_scores, expert_scores = _baselines(data, dev, say)
        _drop_experts_without_gain(objective, data, base_scores, expert_scores)
        for n in data.notes:
            say(n)

        def evaluate(c: Candidate, rec) -> None:
            t = time.perf_counter()
            plan = build_plan(rec, cand_opts, stats=stats)
            c.scores = score_plan(plan, data.search, threads=opts.threads, device=dev)
            c.score = float(objective.value(c.scores, base_scores["search"], expert_scores["search"]))
            c.plan = plan
            c.seconds = round(time.perf_counter() - t, 3)

        recipe_c = Candidate(0, {})
        evaluate(recipe_c, untuned)
        candidates = [recipe_c]
        best = recipe_c
        say(_line(recipe_c, best, objective, "recipe as written"))

        def consider(c: Candidate, handle=None) -> None:
            """Score one candidate, keep it if it is the best so far (its plan freed otherwise)."""
            nonlocal best
            try:
                evaluate(c, untuned.with_assignment(c.assignment))
            except MergeplanError as e:
                c.error = str(e)
                if handle is not None:
                    asker.fail(handle)
            else:
                if handle is not None:
                    asker.tell(handle, c.score, {"tasks": task_summary(c.scores), "seconds": c.seconds})
                if objective.better(c.score, best.score):
                    if best is not recipe_c:
                        best.plan = None
                    best = c
                else:
                    c.plan = None
            candidates.append(c)
            say(_line(c, best, objective, _show(c.assignment)))
            gc.collect()

        asker = make_asker(dims, spec.strategy, spec.seed, objective.direction, spec.storage, spec.study,
                           spec.candidates)
        end = None if spec.time is None else time.monotonic() + spec.time
        interrupted = False
        with _Stop() as stop:
            while not (interrupted := stop.requested):
                if end is not None and time.monotonic() >= end:
                    break
                asked = asker.ask()  # None once the budget or the space is spent
                if asked is None:
                    break
                consider(Candidate(len(candidates), asked[1]), asked[0])

        # -- a shared study: another worker's candidate may be the best ------------------
        if spec.storage:
            if not interrupted:
                _await_others(asker, candidates, end, say)
            finished = asker.finished()
            for t in finished:
                if t["value"] is not None and objective.better(t["value"], best.score):
                    # Re-planned and re-scored here: the written plan's scores are this machine's.
                    consider(Candidate(len(candidates), t["assignment"], worker=f"study trial {t['number']}"))
            say(f"tune: the study holds {len(finished)} finished candidate(s) from every worker")

        # -- test split: the winner and the recipe as written, on samples the search never saw
        test: dict[str, Any] = {}
        if data.test:
            say("tune: scoring the chosen plan and the recipe's on the test split")
            best_test = score_plan(best.plan, data.test, threads=opts.threads, device=dev)
            rec_test = best_test if best is recipe_c else score_plan(recipe_c.plan, data.test, threads=opts.threads,
                                                                      device=dev)
            bt, et = base_scores["test"], expert_scores["test"]
            test = {
                "chosen": float(objective.value(best_test, bt, et)),
                "recipe": float(objective.value(rec_test, bt, et)),
                "chosen_tasks": task_summary(best_test),
                "recipe_tasks": task_summary(rec_test),
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
    return plan


# -- helpers ---------------------------------------------------------------------------------
def _guided(recipe, dims: list) -> bool:
    return bool(recipe.guides) or any(d.path.startswith("guides.") for d in dims)


def _guide_variants(recipe, dims: list) -> list:
    """Guide option sets whose union covers every candidate: the recipe's own and every
    combination of the finite guide dimensions. A continuous range over an option that
    changes what calibration measures (lewis.wanda_sparsity) cannot be covered by one
    calibration: refused, with what to write instead."""
    from mergeplan.calibrate.request import MEASURED_OPTIONS
    from mergeplan.tune.space import grid, values

    gdims = [d for d in dims if d.path.startswith("guides.")]
    for d in gdims:
        if values(d) is None and tuple(d.path.split(".")[1:]) in MEASURED_OPTIONS:
            raise MergeplanError(
                f"tune.space.{d.path} changes what calibration measures, and calibration runs once: "
                "give a list of values or a {low, high, step} range"
            )
    finite = [d for d in gdims if values(d) is not None]
    out = [recipe.guide_options]
    if finite:
        for a in grid(finite):
            try:
                out.append(recipe.with_assignment(a).guide_options)
            except MergeplanError:
                continue  # a combination no recipe can take fails as a candidate; nothing to measure
    return out


def _drop_experts_without_gain(objective, data: HeldOutData, base_scores, expert_scores) -> None:
    """A task whose expert is no better than the base on it has no gain to recover: its
    ratio would divide by ~0 or flip sign. Left out of recovered_gain, and said."""
    if objective.kind != "recovered_gain":
        return
    for task, e in expert_scores["search"].items():
        if e is not None and not e.loss < base_scores["search"][task].loss:
            for split in expert_scores.values():
                split[task] = None
            data.notes.append(f"tune: task {task}: its expert {data.experts[task]} is no better than the base "
                              "on the held-out samples, so the task is left out of recovered_gain")
    if not any(e is not None for e in expert_scores["search"].values()):
        raise MergeplanError(
            "tune.objective recovered_gain needs a task whose expert (the fine-tune named like the task) "
            "beats the base on it; name held-out tasks after model ids, or use objective {loss: {task: weight}}"
        )


def _baselines(data: HeldOutData, dev, say) -> tuple[dict[str, Scores], dict[str, dict]]:
    """The base's and each task expert's scores on both splits, one model resident at a time."""
    from mergeplan.evaluate.run import _quiet_transformers, load_model_dir
    from mergeplan.evaluate.score import score_model

    _quiet_transformers()
    splits = {"search": data.search, **({"test": data.test} if data.test else {})}
    base: dict[str, Scores] = {}
    experts: dict[str, dict[str, SampleScores | None]] = {k: {t: None for t in v} for k, v in splits.items()}
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
    return base, experts


def _show(assignment: dict[str, Any]) -> str:
    return "  ".join(f"{k}={v}" for k, v in assignment.items())


def _await_others(asker, candidates: list[Candidate], end: float | None, say) -> None:
    """Wait while other workers still score trials (the budget counts them as spent), so
    that the worker ending last chooses from every trial of the study. Bounded by three
    times this worker's slowest candidate (at least 30 s; a crashed worker's trial stays
    RUNNING) and by the time budget."""
    limit = max(30.0, 3 * max((c.seconds for c in candidates), default=0.0))
    until = time.monotonic() + limit if end is None else min(end, time.monotonic() + limit)
    told = False
    while (n := asker.running()) and time.monotonic() < until:
        if not told:
            say(f"tune: waiting for {n} candidate(s) other workers are scoring (up to {until - time.monotonic():.0f} s)")
            told = True
        time.sleep(0.2)


def _line(c: Candidate, best: Candidate, objective: Objective, what: str) -> str:
    head = f"tune: #{c.id:<3}"
    if c.error:
        return f"{head} failed: {c.error}  [{what}]"
    mark = " *" if c is best else "  "
    return f"{head}{mark} {objective.kind} {c.score:.4f}  ({c.seconds:.1f} s)  {what}"
