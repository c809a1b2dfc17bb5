"""tune's search space and objective: grid order, seeded draws, the objective's arithmetic,
and the bootstrap that says whether a winner's margin is noise."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mergeplan.evaluate.score import SampleScores
from mergeplan.tune.objective import Objective, margin, within_noise
from mergeplan.tune.space import grid, grid_size, random_draws
from mergeplan.tune.strategy import make_asker

from mergeplan.recipe.tune import Dimension

DIMS = [
    Dimension("merge_method", "categorical", choices=("ties", "dare_ties")),
    Dimension("parameters.density", "float", low=0.2, high=0.8, step=0.3),
    Dimension("models.math.weight", "float", low=0.5, high=1.5),
]


def test_grid_is_the_cartesian_product_in_recipe_order():
    dims = [DIMS[0], DIMS[1], Dimension("parameters.normalize", "categorical", choices=(True, False))]
    got = list(grid(dims))
    want = [dict(zip([d.path for d in dims], c)) for c in itertools.product(["ties", "dare_ties"], [0.2, 0.5, 0.8], [True, False])]
    assert got == want
    assert grid_size(dims) == 12 and grid_size(DIMS) is None


def test_random_draws_are_seeded_in_range_and_distinct():
    a = list(itertools.islice(random_draws(DIMS, 7), 12))
    assert a == list(itertools.islice(random_draws(DIMS, 7), 12))
    assert a != list(itertools.islice(random_draws(DIMS, 8), 12))
    assert len({repr(sorted(x.items())) for x in a}) == 12
    for x in a:
        assert x["merge_method"] in ("ties", "dare_ties")
        assert x["parameters.density"] in (0.2, 0.5, 0.8)
        assert 0.5 <= x["models.math.weight"] <= 1.5


def test_random_draws_stop_when_a_finite_space_is_exhausted():
    dims = [Dimension("a", "categorical", choices=(1, 2, 3)), Dimension("parameters.n", "int", low=0, high=2, step=1)]
    got = sorted((d["a"], d["parameters.n"]) for d in random_draws(dims, 0))
    assert got == [(a, b) for a in (1, 2, 3) for b in (0, 1, 2)]


def test_integer_ranges_stay_integers_and_log_ranges_stay_in_bounds():
    n = Dimension("parameters.n", "int", low=4, high=16)
    lr = Dimension("guides.sens.temperature", "float", low=0.1, high=10.0, log=True)
    draws = list(itertools.islice(random_draws([n, lr], 1), 50))
    assert all(isinstance(d["parameters.n"], int) and 4 <= d["parameters.n"] <= 16 for d in draws)
    t = np.array([d["guides.sens.temperature"] for d in draws])
    assert (0.1 <= t).all() and (t <= 10).all() and (t < 1).sum() > 10  # log-uniform: half below 1


def _ts(losses, tokens):
    losses, tokens = np.asarray(losses, float), np.asarray(tokens, np.int64)
    return SampleScores(loss_sum=losses * tokens, correct=np.zeros_like(tokens), tokens=tokens)


def test_recovered_gain_by_hand():
    obj = Objective()
    tok = [10, 10]
    base = {"math": _ts([4, 4], tok), "code": _ts([6, 6], tok)}
    experts = {"math": _ts([2, 2], tok), "code": _ts([5, 5], tok)}
    merged = {"math": _ts([3, 3], tok), "code": _ts([5.5, 5.5], tok)}
    # math: (4-3)/(4-2) = 0.5; code: (6-5.5)/(6-5) = 0.5
    assert obj.value(merged, base, experts) == pytest.approx(0.5)
    assert obj.direction == "maximize" and obj.better(0.6, 0.5)


def test_weighted_loss_objective_is_token_weighted_per_task():
    obj = Objective("loss", {"math": 1.0, "code": 3.0})
    merged = {"math": _ts([1.0, 3.0], [1, 3]), "code": _ts([4.0], [5]), "x": _ts([100.0], [1])}
    math_loss = (1 * 1 + 3 * 3) / 4
    assert obj.value(merged, {}, {}) == pytest.approx((math_loss + 3 * 4.0) / 4)
    assert obj.direction == "minimize" and obj.better(1.0, 2.0)


def test_bootstrap_margin_separates_a_real_win_from_noise():
    rng = np.random.default_rng(0)
    n = 40
    tok = np.full(n, 50)
    b = 5 + rng.normal(0, 0.3, n)
    base = {"t": _ts(b, tok)}
    expert = {"t": _ts(3 + rng.normal(0, 0.3, n), tok)}
    good = {"t": _ts(b - 1.0 + rng.normal(0, 0.05, n), tok)}
    same = {"t": _ts(b - 1.0 + rng.normal(0, 0.05, n), tok)}
    obj = Objective()
    far = margin(obj, good, base, base, expert, n_boot=300)
    assert far.estimate > 0.3 and not within_noise(obj, far)
    near = margin(obj, good, same, base, expert, n_boot=300)
    assert within_noise(obj, near) and near.low <= near.estimate <= near.high
    # Independent check of the point value: the gains computed directly from the losses.
    loss = lambda m: m["t"].loss_sum.sum() / m["t"].tokens.sum()  # noqa: E731
    g = lambda m: (loss(base) - loss(m)) / (loss(base) - loss(expert))  # noqa: E731
    assert near.estimate == pytest.approx(g(good) - g(same))


def test_grid_asker_walks_the_grid_then_stops():
    dims = [Dimension("a", "categorical", choices=(1, 2)), Dimension("b", "categorical", choices=(True, False))]
    asker = make_asker(dims, "grid", 0, "maximize")
    seen = []
    while (x := asker.ask()) is not None:
        seen.append(x[1])
    assert seen == [{"a": 1, "b": True}, {"a": 1, "b": False}, {"a": 2, "b": True}, {"a": 2, "b": False}]


def test_failed_study_candidates_spend_the_budget():
    """A space where every candidate fails must still end: Optuna's failed trials count."""
    pytest.importorskip("optuna")
    dims = [Dimension("guides.aim.omega", "float", low=0.1, high=0.9)]
    asker = make_asker(dims, "tpe", 0, "maximize", budget=3)
    asked = 0
    while (x := asker.ask()) is not None and asked < 20:
        asked += 1
        asker.fail(x[0])
    assert asked == 3


def test_local_strategies_stop_at_the_budget():
    dims = [Dimension("a", "categorical", choices=(1, 2, 3, 4))]
    for strategy in ("grid", "random"):
        asker = make_asker(dims, strategy, 0, "maximize", budget=2)
        got = []
        while (x := asker.ask()) is not None:
            got.append(x[1]["a"])
        assert len(got) == 2, strategy


def test_one_calibration_covers_every_guide_combination_or_says_why_not():
    """Finite guide dimensions are calibrated for in every combination; a continuous range
    over an option that changes what is measured is refused."""
    from mergeplan.calibrate.request import Request
    from mergeplan.errors import MergeplanError
    from mergeplan.recipe import parse_recipe
    from mergeplan.tune.search import _guide_variants

    rec = parse_recipe("""merge_method: ties
base_model: ./b
models:
  - {model: ./m, parameters: {weight: 1.0, density: 0.5}}
  - {model: ./c, parameters: {weight: 1.0, density: 0.5}}
calibration: {data: d.txt}
guides:
  lewis: {wanda_prune: true}
""")
    gamma = Dimension("guides.lewis.gamma", "categorical", choices=(0.2, 0.6))
    sparsity = Dimension("guides.lewis.wanda_sparsity", "float", low=0.3, high=0.5, step=0.2)
    union = Request.of(_guide_variants(rec, [gamma, sparsity]))
    for g in (0.2, 0.6):
        for s in (0.3, 0.5):
            need = Request.of(rec.with_assignment({gamma.path: g, sparsity.path: s}).guide_options)
            assert union.covers(need), (g, s)
    assert not Request.of(rec.guide_options).covers(Request.of(rec.with_assignment({sparsity.path: 0.3}).guide_options))
    with pytest.raises(MergeplanError, match="changes what calibration measures"):
        _guide_variants(rec, [gamma, Dimension("guides.lewis.wanda_sparsity", "float", low=0.3, high=0.5)])


@pytest.mark.parametrize("race", [
    "(sqlite3.OperationalError) table studies already exists",
    "(sqlite3.OperationalError) database is locked",
    "(sqlite3.IntegrityError) UNIQUE constraint failed: studies.study_name",
])
def test_workers_started_together_retry_the_study_creation_race(tmp_path, monkeypatch, race):
    """Two workers creating one SQLite study at once: the loser's first attempt fails with
    one of these (the first was seen in a CI-like run), and a retry must open the study."""
    optuna = pytest.importorskip("optuna")
    import sqlalchemy.exc

    real, calls = optuna.create_study, []

    def racing(**kw):
        calls.append(kw["study_name"])
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError("CREATE TABLE", {}, Exception(race))
        return real(**kw)

    monkeypatch.setattr(optuna, "create_study", racing)
    monkeypatch.setattr("mergeplan.tune.strategy.time.sleep", lambda s: None)
    asker = make_asker(DIMS[:1], "random", 0, "maximize", storage=f"sqlite:///{tmp_path}/s.db", study="s", budget=1)
    assert len(calls) == 2 and asker.ask() is not None


def test_a_study_that_cannot_open_is_one_line_without_retries(tmp_path, monkeypatch):
    optuna = pytest.importorskip("optuna")
    calls = []
    monkeypatch.setattr(optuna, "create_study", lambda **kw: calls.append(1) or (_ for _ in ()).throw(ValueError("bad url")))
    with pytest.raises(Exception, match=r"tune.storage 'nope://x': cannot open the study \(ValueError: bad url\)"):
        make_asker(DIMS[:1], "random", 0, "maximize", storage="nope://x", study="s", budget=1)
    assert calls == [1]


def test_a_record_with_thousands_of_keys_prints_a_bounded_table():
    """A crafted tuning record with 3,000 searched keys and tasks made `show` spend seconds
    to minutes (quadratic short names, one Rich column each); the table keeps 12 of each."""
    import io
    import time

    from rich.console import Console

    from mergeplan.tune.report import MAX_COLUMNS, candidates_table

    tuning = {"objective": {"kind": "loss"}, "chosen": 0, "candidates": [
        {"id": 0, "assignment": {}, "score": 1.0, "tasks": {f"t{i}": {"loss": 1.0} for i in range(3000)}},
        {"id": 1, "assignment": {f"guides.g{j}.x": 0.1 for j in range(3000)}, "score": 1.0, "tasks": {}}]}
    t0 = time.perf_counter()
    table = candidates_table(tuning)
    buf = io.StringIO()
    Console(file=buf, width=200).print(table)
    assert time.perf_counter() - t0 < 2
    assert len(table.columns) == 2 + 2 * MAX_COLUMNS
    assert f"{2 * (3000 - MAX_COLUMNS)} more column(s) left out" in buf.getvalue()
