"""`mergeplan plan` with `tune:`: calibrate once, score candidates on held-out samples, keep
the best; the record says how it was chosen; workers share one study; Ctrl-C keeps the best.

The family is random (tests/conftest.py), so its experts do not beat the base on their own
tasks: these tests use the weighted-loss objective; recovered gain is exercised by the
sample-family benchmark (benchmarks/tune_bench.py) and tests/test_tune_space.py.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import run_cli
from mergeplan.plan.codec import read_plan
from mergeplan.plan.identity import decision_digest

TASKS = ("math", "code")


def _recipe(tmp_path: Path, fam, tune: str, guides: str = "guides:\n  aim: {omega: 0.5}\n", name="t.yaml") -> Path:
    text = f"""merge_method: ties
base_model: {fam.base}
models:
  - model: {fam.finetunes['math']}
    name: math
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {fam.finetunes['code']}
    name: code
    parameters: {{weight: 1.0, density: 0.5}}
parameters: {{normalize: true}}
calibration:
  data:
    base: {fam.data['general']}
    math: {fam.data['math']}
    code: {fam.data['code']}
  samples: 4
  seq_len: 32
{guides}seed: 3
tune:
{tune}"""
    p = tmp_path / name
    p.write_text(text)
    return p


GRID = """  strategy: grid
  objective: {loss: {math: 1.0, code: 2.0}}
  heldout: {samples: 4, test: 4}
  space:
    parameters.normalize: [true, false]
    guides.aim.omega: [0.2, 0.9]
"""


@pytest.fixture(scope="module")
def grid_run(tiny_family, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    recipe = _recipe(tmp, tiny_family, GRID)
    plan = tmp / "tuned.plan"
    proc = subprocess.run([sys.executable, "-m", "mergeplan.cli", "plan", str(recipe), "-o", str(plan), "--threads", "1"],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return recipe, plan, proc.stderr


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "COLUMNS": "100"}


def test_search_visits_the_grid_and_keeps_the_best(grid_run):
    recipe, plan_path, err = grid_run
    plan = read_plan(plan_path)
    t = plan.tuning
    cands = t["candidates"]
    assert [c["assignment"] for c in cands[1:]] == [
        {"parameters.normalize": n, "guides.aim.omega": o} for n in (True, False) for o in (0.2, 0.9)
    ]
    assert cands[0]["assignment"] == {}  # the recipe as written is candidate 0
    best = min(cands, key=lambda c: c["score"])
    assert t["chosen"] == best["id"] and t["objective"] == {**t["objective"], "kind": "loss", "direction": "minimize"}
    # The score is the objective of the per-task losses the record lists: (math + 2 code) / 3.
    for c in cands:
        assert c["score"] == pytest.approx((c["tasks"]["math"]["loss"] + 2 * c["tasks"]["code"]["loss"]) / 3, rel=1e-5)
    assert t["split"]["math"]["skip"] == 4 and t["split"]["math"]["search"] == 4 and t["split"]["math"]["test"] == 4
    assert "tuning:" in err and "test split" in err


def test_tuned_plan_is_the_chosen_candidates_own_plan(grid_run, tiny_family, tmp_path):
    """The written plan makes the same decisions as planning the recipe with the chosen
    values written in, and its search score is what `mergeplan eval` measures after apply."""
    from mergeplan.planner import PlanOptions, build_plan
    from mergeplan.recipe import load_recipe

    recipe, plan_path, _ = grid_run
    plan = read_plan(plan_path)
    chosen = next(c for c in plan.tuning["candidates"] if c["id"] == plan.tuning["chosen"])
    direct = build_plan(load_recipe(recipe).with_assignment(chosen["assignment"]), PlanOptions(quiet=True))
    assert decision_digest(direct) == decision_digest(plan)

    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "mergeplan.cli", "apply", str(plan_path), str(out), "-q"],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr
    from mergeplan.evaluate.run import evaluate

    rep = evaluate([str(out)], {t: str(tiny_family.data[t]) for t in TASKS}, baselines=False,
                   samples=4, seq_len=32, skip=4, quiet=True)
    losses = {t: rep.results[0].scores[t].loss for t in TASKS}
    assert chosen["score"] == pytest.approx((losses["math"] + 2 * losses["code"]) / 3, rel=1e-6)


def test_no_tune_plans_the_recipe_as_written(grid_run, tmp_path, capsys):
    recipe, plan_path, _ = grid_run
    plain = tmp_path / "plain.plan"
    code, out, err = run_cli(capsys, "plan", recipe, "-o", plain, "--no-tune", "-q")
    assert code == 0, err
    p = read_plan(plain)
    assert p.tuning is None
    zero = read_plan(plan_path).tuning["candidates"][0]
    assert zero["assignment"] == {}


def test_recovered_gain_without_a_better_expert_says_what_to_do(tiny_family, tmp_path, capsys):
    """A fine-tune identical to the base recovers nothing on its task: no gain can be measured."""
    import shutil

    same = tmp_path / "same"
    shutil.copytree(tiny_family.base, same)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""merge_method: ties
base_model: {tiny_family.base}
models:
  - model: {same}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {tiny_family.finetunes['code']}
    name: code
    parameters: {{weight: 1.0, density: 0.5}}
tune:
  strategy: grid
  heldout: {{data: {{same: {tiny_family.data['math']}}}, samples: 2, test: 0}}
  space:
    parameters.normalize: [true, false]
""")
    code, out, err = run_cli(capsys, "plan", recipe, "-o", tmp_path / "x.plan", "-q")
    assert code != 0 and not (tmp_path / "x.plan").exists()
    assert "recovered_gain" in err and "loss" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_two_workers_share_one_sqlite_study(tiny_family, tmp_path):
    pytest.importorskip("optuna")
    db = tmp_path / "study.db"
    tune = f"""  strategy: tpe
  candidates: 4
  objective: {{loss: {{math: 1.0}}}}
  heldout: {{samples: 3, test: 0}}
  storage: sqlite:///{db}
  study: shared
  space:
    guides.aim.omega: {{low: 0.1, high: 1.0}}
    parameters.normalize: [true, false]
"""
    recipe = _recipe(tmp_path, tiny_family, tune)
    procs = [subprocess.Popen([sys.executable, "-m", "mergeplan.cli", "plan", str(recipe), "-o", str(tmp_path / f"w{i}.plan"),
                               "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for i in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    with sqlite3.connect(db) as con:
        done = con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    assert 4 <= done <= 5  # the budget counts both workers' trials (one may start as the other ends)
    plans = [read_plan(tmp_path / f"w{i}.plan") for i in range(2)]
    searched = [len(p.tuning["candidates"]) - 1 for p in plans]
    assert all(n >= 1 for n in searched) and sum(n for n in searched) >= 4
    # A worker whose budget is spent waits for the other's running trials, so both choose
    # from every trial: each plan is the study's best (or the recipe's, if that is better).
    with sqlite3.connect(db) as con:
        best = con.execute("select min(value) from trial_values").fetchone()[0]
    for plan in plans:
        chosen = next(c for c in plan.tuning["candidates"] if c["id"] == plan.tuning["chosen"])
        assert chosen["score"] <= best + 1e-12


def test_a_worker_waits_for_other_workers_trials_within_its_bound():
    from mergeplan.tune.search import Candidate, _await_others

    class Study:
        def __init__(self, running):
            self.left = list(running)

        def running(self):
            return self.left.pop(0) if len(self.left) > 1 else self.left[0]

    said = []
    t0 = time.monotonic()
    _await_others(Study([2, 1, 1, 0]), [Candidate(0, {}, seconds=0.1)], None, said.append)
    assert len(said) == 1 and "waiting for 2 candidate(s)" in said[0] and time.monotonic() - t0 < 5
    # Another worker's trial that never ends (a crashed worker): the time budget still holds.
    t0 = time.monotonic()
    _await_others(Study([1]), [Candidate(0, {}, seconds=0.1)], time.monotonic() + 0.5, said.append)
    assert 0.4 < time.monotonic() - t0 < 3


def test_ctrl_c_keeps_the_best_so_far(tiny_family, tmp_path):
    tune = """  strategy: random
  candidates: 200
  objective: {loss: {math: 1.0}}
  heldout: {samples: 2, test: 2}
  space:
    guides.aim.omega: {low: 0.1, high: 1.0}
"""
    recipe = _recipe(tmp_path, tiny_family, tune)
    plan = tmp_path / "x.plan"
    proc = subprocess.Popen([sys.executable, "-m", "mergeplan.cli", "plan", str(recipe), "-o", str(plan), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    seen = ""
    deadline = time.monotonic() + 300
    while "tune: #2" not in seen and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=300)
    assert proc.returncode == 0, (seen + rest)[-2000:]
    t = read_plan(plan).tuning
    assert t["interrupted"] is True
    n = len(t["candidates"])
    assert 3 <= n < 200
    assert t["chosen"] == min(t["candidates"], key=lambda c: c["score"])["id"]
    assert "interrupted" in rest


def test_pick_replans_another_candidate(grid_run, tmp_path, capsys):
    """`mergeplan pick` gives the plan the search would have written had it chosen N."""
    from mergeplan.planner import PlanOptions, build_plan
    from mergeplan.recipe import load_recipe

    recipe, plan_path, _ = grid_run
    tuned = read_plan(plan_path)
    other = next(c for c in tuned.tuning["candidates"] if c["id"] not in (0, tuned.tuning["chosen"]))
    out = tmp_path / "picked.plan"
    code, stdout, err = run_cli(capsys, "pick", plan_path, str(other["id"]), "-o", out)
    assert code == 0, err
    picked = read_plan(out)
    direct = build_plan(load_recipe(recipe).with_assignment(other["assignment"]), PlanOptions(quiet=True))
    assert decision_digest(picked) == decision_digest(direct) == stdout.strip()
    assert picked.tuning["chosen"] == other["id"] and picked.tuning["candidates"] == tuned.tuning["candidates"]
    code, _, err = run_cli(capsys, "pick", plan_path, "99", "-o", tmp_path / "x.plan")
    assert code != 0 and "no candidate #99" in err and len(err.strip().splitlines()) == 1


def test_pick_refuses_inputs_the_search_did_not_read(grid_run):
    from mergeplan.errors import MergeplanError
    from mergeplan.tune.pick import pick

    _, plan_path, _ = grid_run
    tuned = read_plan(plan_path)
    fp = tuned.model("code").fingerprint
    blob = bytearray(fp["tensor_blake3"])
    blob[0] ^= 1  # as if the search had read a different first tensor
    fp["tensor_blake3"] = bytes(blob)
    with pytest.raises(MergeplanError, match="model code is not the one the search read"):
        pick(tuned, 1, plan_path=str(plan_path))


def test_show_prints_the_candidates_and_the_verdict(grid_run, capsys):
    _, plan_path, _ = grid_run
    code, out, err = run_cli(capsys, "show", plan_path)
    assert code == 0, err
    t = read_plan(plan_path).tuning
    assert "tuning:" in out and "test split (never seen by the search)" in out
    assert f">{t['chosen']}" in out.replace(" ", "")
    code, out, err = run_cli(capsys, "show", plan_path, "--json")
    import json

    assert json.loads(out)["tuning"]["chosen"] == t["chosen"]


async def _open_tuning(app, pilot):
    from mergeplan_tui.screens.tuning import TuningScreen

    await pilot.press("T")
    await pilot.pause()
    assert isinstance(app.screen, TuningScreen)


def test_review_lists_the_candidates_and_picks_another(grid_run, tmp_path):
    """T opens the candidates, best first with the chosen one marked; Enter on another and
    yes writes that candidate's plan beside the reviewed one."""
    import asyncio
    import shutil

    from mergeplan_tui.app import make_app
    from textual.widgets import DataTable

    _, plan_path, _ = grid_run
    local = tmp_path / "tuned.plan"
    shutil.copy(plan_path, local)
    t = read_plan(local).tuning
    order = sorted(t["candidates"], key=lambda c: c["score"])  # loss: lower is better

    async def drive():
        app = make_app(str(local), model_checker=lambda ref: "found")
        async with app.run_test(size=(80, 24)) as pilot:
            await _open_tuning(app, pilot)
            table = app.screen.query_one(DataTable)
            ids = [int(str(table.get_row_at(i)[0]).strip("● ")) for i in range(table.row_count)]
            assert ids == [c["id"] for c in order]
            assert str(table.get_row_at(0)[0]).startswith("●") == (order[0]["id"] == t["chosen"])
            await pilot.press("down")
            await pilot.pause()
            # The highlighted candidate in full under the table (the values column may be cut).
            row = str(app.screen.query_one("#tuning-row").render())
            second = next(c for c in order if c["id"] == ids[1])
            assert row.startswith(f"#{ids[1]}: ") and " · loss " in row, row
            assert all(f"{k}=" in row for k in second["assignment"]), (row, second)
            await pilot.press("enter")
            await pilot.pause()
            await pilot.press("y")
            for _ in range(600):
                await asyncio.sleep(0.1)
                if list(tmp_path.glob("tuned.candidate-*.plan")):
                    break
            await app.workers.wait_for_complete()
        return ids[1]

    picked_id = asyncio.run(drive())
    (out,) = tmp_path.glob("tuned.candidate-*.plan")
    assert out.name == f"tuned.candidate-{picked_id}.plan"
    assert read_plan(out).tuning["chosen"] == picked_id


def test_review_of_an_untuned_plan_has_no_tuning_screen(tmp_path):
    import asyncio

    from mergeplan.plan import write_plan
    from mergeplan_tui.app import make_app
    from mergeplan_tui.screens.grid import GridScreen
    from plan_factory import make_plan

    path = tmp_path / "p.plan"
    write_plan(make_plan(layers=2, models=("math", "code")), path)

    async def drive():
        app = make_app(str(path), model_checker=lambda ref: "found")
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("T")
            await pilot.pause()
            return type(app.screen)

    assert asyncio.run(drive()) is GridScreen


def test_grid_on_a_shared_study_visits_each_point_once(tiny_family, tmp_path, capsys):
    """Optuna's GridSampler stops a study from inside tell() once the grid is covered; the
    search ends there, with every point scored once."""
    pytest.importorskip("optuna")
    db = tmp_path / "grid.db"
    tune = f"""  strategy: grid
  objective: {{loss: {{math: 1.0}}}}
  heldout: {{samples: 2, test: 0}}
  storage: sqlite:///{db}
  space:
    parameters.normalize: [true, false]
"""
    recipe = _recipe(tmp_path, tiny_family, tune)
    code, _, err = run_cli(capsys, "plan", recipe, "-o", tmp_path / "g.plan", "-q")
    assert code == 0, err
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0] == 2
    t = read_plan(tmp_path / "g.plan").tuning
    assert sorted(c["assignment"].get("parameters.normalize") for c in t["candidates"][1:]) == [False, True]


HOSTILE_TUNING = {
    "objective": {"kind": "[bold red]loss[/] :fire:", "direction": "minimize", "describe": "[@click=app.quit]x[/]"},
    "strategy": "[blink]grid",
    "chosen": 1,
    "candidates": [
        {"id": 0, "assignment": {}, "score": 2.0, "tasks": {"[red]t": {"loss": 2.0, "accuracy": 0.1}}},
        {"id": 1, "assignment": {"guides.aim.[b]omega": "[@click=app.quit]", "x": [1, {"y": None}]},
         "score": float("nan"), "tasks": {"[red]t": {"loss": float("inf"), "accuracy": 0.0}}},
    ],
    "test": ["not", "a", "map"],
    "search_margin": "nope",
    "baselines": 7,
}


def test_a_hostile_tuning_record_prints_literally_and_never_crashes(tmp_path, capsys):
    """show and the Tuning screen read the record's free-form parts defensively and print
    every string from it as text (no markup, no click actions)."""
    import asyncio

    from mergeplan.plan import write_plan
    from mergeplan_tui.app import make_app
    from plan_factory import make_plan

    plan = make_plan(layers=2, models=("math", "code"))
    plan.tuning = HOSTILE_TUNING
    path = tmp_path / "h.plan"
    write_plan(plan, path)
    code, out, err = run_cli(capsys, "show", path)
    assert code == 0, err
    assert "[bold red]loss[/]" in out and "[@click=app.quit]" in out
    assert ":fire:" in out and "\U0001f525" not in out  # an emoji code is text, not a glyph

    async def drive():
        app = make_app(str(path), model_checker=lambda ref: "found")
        async with app.run_test(size=(80, 24)) as pilot:
            await _open_tuning(app, pilot)
            await pilot.press("enter")  # the chosen one: nothing to re-plan
            await pilot.pause()
            return app.is_running

    assert asyncio.run(drive())


def test_pick_runs_only_the_recipe_the_search_ran(grid_run, tmp_path, capsys):
    """The recipe text inside a received plan names data files and datasets: pick runs a
    recipe file from this machine, and only the one whose text the plan recorded. A picked
    candidate keeps no test-split verdict measured for another."""
    recipe, plan_path, _ = grid_run
    other = tmp_path / "other.yaml"
    other.write_text(recipe.read_text().replace("seed: 3", "seed: 4"))
    code, _, err = run_cli(capsys, "pick", plan_path, "1", "-o", tmp_path / "x.plan", "--recipe", other)
    assert code != 0 and "not the recipe this plan was tuned with" in err and len(err.strip().splitlines()) == 1
    tuned = read_plan(plan_path)
    cid = next(c["id"] for c in tuned.tuning["candidates"] if c["id"] not in (0, tuned.tuning["chosen"]))
    code, _, err = run_cli(capsys, "pick", plan_path, str(cid), "-o", tmp_path / "y.plan", "--recipe", recipe)
    assert code == 0, err
    t = read_plan(tmp_path / "y.plan").tuning
    assert t["test"] == {} and t["search_margin"] is None
    code, out, _ = run_cli(capsys, "show", tmp_path / "y.plan")
    assert "test split" not in out and "margin holds" not in out


def test_loss_weights_must_name_a_held_out_task(tiny_family, tmp_path, capsys):
    tune = f"""  strategy: grid
  objective: {{loss: {{code: 1.0}}}}
  heldout: {{data: {{math: {tiny_family.data['math']}}}, samples: 2, test: 0}}
  space:
    parameters.normalize: [true, false]
"""
    code, _, err = run_cli(capsys, "plan", _recipe(tmp_path, tiny_family, tune), "-o", tmp_path / "x.plan", "-q")
    assert code != 0 and "weigh at least one of them" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_pick_refuses_a_forged_candidate_outside_the_recipes_space(grid_run, tmp_path, capsys):
    """A received plan's tuning record is untrusted: a candidate whose values the recipe's
    tune.space does not offer (another method, an unsearched parameter) is not re-planned
    under that candidate's name and scores. The plan is re-signed, as an attacker would."""
    from mergeplan.plan import write_plan

    recipe, plan_path, _ = grid_run
    tuned = read_plan(plan_path)
    cid = next(c["id"] for c in tuned.tuning["candidates"] if c["id"] not in (0, tuned.tuning["chosen"]))
    key = next(iter(next(c for c in tuned.tuning["candidates"] if c["id"] == cid)["assignment"]))
    for forged, needle in (({key: 123.456}, "outside the recipe's tune.space"),
                           ({"merge_method": "linear"}, "does not search")):
        t = dict(tuned.tuning)
        t["candidates"] = [dict(c, assignment=forged) if c["id"] == cid else c for c in t["candidates"]]
        tuned.tuning = t
        bad = tmp_path / "forged.plan"
        write_plan(tuned, bad)
        code, _, err = run_cli(capsys, "pick", bad, str(cid), "-o", tmp_path / "x.plan", "--recipe", recipe)
        assert code != 0 and needle in err and "corrupt or hostile" in err, err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.plan").exists()
