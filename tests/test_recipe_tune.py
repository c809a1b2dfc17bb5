"""The recipe's `tune:` section: parsed and checked against the recipe, and candidate
recipes built through the same schema as a hand-written recipe."""

from __future__ import annotations

import pytest

from mergeplan.errors import MergeplanError
from mergeplan.recipe import Range, apply_assignment, parse_recipe
from mergeplan.recipe.tune import parse_duration

RECIPE = """\
merge_method: ties
base_model: ./base
models:
  - {model: ./math, parameters: {weight: 1.0, density: 0.5}}
  - {model: ./code, parameters: {weight: 1.0}}
parameters: {normalize: true, density: 0.6}
calibration:
  data: {math: data/math.txt, code: data/code.txt}
guides:
  aim: {omega: 0.4}
"""
TUNE = """\
tune:
  strategy: random
  candidates: 16
  time: 5m
  seed: 3
  objective: recovered_gain
  heldout:
    samples: 8
    test: 4
  storage: sqlite:///study.db
  study: ties-search
  space:
    merge_method: [ties, dare_ties]
    parameters.density: {low: 0.2, high: 0.8}
    parameters.normalize: [true, false]
    models.math.weight: {low: 0.3, high: 1.2}
    guides.aim.omega: {low: 0.2, high: 0.8, step: 0.2}
"""
MLP = "model.layers.1.mlp.up_proj.weight"


def tuned(space: str = "", **top: str) -> str:
    lines = ["tune:"] + [f"  {k}: {v}" for k, v in ({"candidates": "4"} | top).items()]
    return RECIPE + "\n".join(lines) + "\n  space:\n" + space


def error_of(text: str) -> str:
    with pytest.raises(MergeplanError) as info:
        parse_recipe(text, "r.yaml")
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_the_documented_example_parses():
    t = parse_recipe(RECIPE + TUNE).tune
    assert (t.strategy, t.candidates, t.time, t.seed) == ("random", 16, 300.0, 3)
    assert t.objective.kind == "recovered_gain" and t.objective.higher_is_better
    assert (t.heldout.data, t.heldout.samples, t.heldout.test) == (None, 8, 4)
    assert (t.storage, t.study) == ("sqlite:///study.db", "ties-search")
    dims = {d.path: d for d in t.dimensions()}
    assert list(dims) == ["merge_method", "parameters.density", "parameters.normalize", "models.math.weight", "guides.aim.omega"]
    assert dims["merge_method"].kind == "categorical" and dims["merge_method"].choices == ("ties", "dare_ties")
    assert (dims["parameters.density"].kind, dims["parameters.density"].low, dims["parameters.density"].high) == ("float", 0.2, 0.8)
    assert dims["guides.aim.omega"].grid() == (0.2, 0.4, 0.6, 0.8)
    assert dims["parameters.density"].grid() is None


def test_weighted_loss_objective_and_explicit_heldout_data():
    t = parse_recipe(
        tuned("    guides.aim.omega: [0.2, 0.6]\n", objective="{loss: {math: 1.0, code: 2}}",
              heldout="{data: {math: h/m.txt, code: h/c.txt}, samples: 4}")
    ).tune
    assert t.objective.kind == "loss" and t.objective.loss == {"math": 1.0, "code": 2.0}
    assert not t.objective.higher_is_better
    assert t.heldout.data == {"math": "h/m.txt", "code": "h/c.txt"}


@pytest.mark.parametrize("text, seconds", [(90, 90.0), ("90s", 90.0), ("5m", 300.0), ("1h30m", 5400.0), ("1.5h", 5400.0)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_int_parameters_search_integers():
    cabs = (
        "merge_method: cabs\nbase_model: ./b\nmodels:\n  - {model: ./m, name: math, parameters: {weight: 1}}\n"
        "  - {model: ./c, name: code, parameters: {weight: 1}}\nparameters: {n: 8, m: 16}\ncalibration: {data: x.txt}\n"
        "tune:\n  strategy: grid\n  candidates: 4\n  space:\n    parameters.n: {low: 4, high: 16, step: 4}\n"
    )
    (dim,) = parse_recipe(cabs).tune.dimensions()
    assert dim.kind == "int" and dim.grid() == (4, 8, 12, 16)
    # 20 of every 16 entries is no n:m pattern: the range's end is refused when the recipe loads
    msg = error_of(cabs.replace("high: 16", "high: 20"))
    assert msg.startswith("r.yaml:12: tune.space.parameters.n: high 20 cannot be used: cabs keeps n of every m entries")


@pytest.mark.parametrize(
    "space, top, line, needle",
    [
        ("    parameters.densty: {low: 0.2, high: 0.8}\n", {}, 14, "tune.space.parameters.densty names nothing the recipe can vary (did you mean 'parameters.density'?)"),
        ("    models.maths.weight: [0.5]\n", {}, 14, "(did you mean 'models.math.weight'?)"),
        ("    models.base.weight: [0.5]\n", {}, 14, "'base' is the base model, which takes no per-model parameters"),
        ("    guides.lewis.gamma: [0.3]\n", {}, 14, "guide lewis is not enabled: add `guides: {lewis: {}}`"),
        ("    guides.aim.omega: {low: 0.8, high: 0.2}\n", {}, 14, "tune.space.guides.aim.omega: low (0.8) must be below high (0.2)"),
        ("    guides.aim.omega: {low: 0.1, hi: 0.5}\n", {}, 14, "unknown key 'hi' in tune.space.guides.aim.omega (did you mean 'high'?)"),
        ("    guides.aim.omega: {low: 0, high: 0.5, log: true}\n", {}, 14, "a log range needs low above 0"),
        ("    parameters.normalize: []\n", {}, 14, "tune.space.parameters.normalize is an empty list"),
        ("    parameters.normalize: {low: 0, high: 1}\n", {}, 14, "takes bool values: give a list of choices, not a range"),
        ("    models.math.density: {low: 0.2, high: 1.5}\n", {}, 14, "tune.space.models.math.density: high 1.5 cannot be used: models[0].parameters.density is 1.5, outside (0, 1]"),
        ("    merge_method: [ties, linear]\n", {}, 14, "value 'linear' cannot be used: 'density' in parameters is not a parameter of linear"),
        ("    merge_method: [ties, tiess]\n", {}, 14, "unknown method 'tiess' (did you mean 'ties'?)"),
        ("    models.code.weight: [0.5]\n", {"candidates": "null"}, 11, "tune needs a budget: add `candidates: N`, `time: 5m`, or both"),
        ("    guides.aim.omega: {low: 0.2, high: 0.8}\n", {"strategy": "grid"}, 15, "grid search needs finite choices; give a list or {low, high, step}"),
        ("    guides.aim.omega: [0.2]\n", {"strategy": "bayes"}, 13, "tune.strategy 'bayes' is not known; use grid, random or tpe"),
        ("    guides.aim.omega: [0.2]\n", {"time": "soon"}, 13, "tune.time must be a positive duration such as 300, '90s', '5m'"),
        ("    guides.aim.omega: [0.2]\n", {"objective": "{loss: {math: 1, legal: 2}}"}, 13, "tune.objective.loss.legal: unknown task 'legal'; tasks are the fine-tunes: math, code"),
        ("    guides.aim.omega: [0.2]\n", {"objective": "recovered"}, 13, "(did you mean 'recovered_gain'?)"),
        ("    guides.aim.omega: [0.2]\n", {"heldout": "{data: {math: m.txt}, test: -1}"}, 13, "tune.heldout.test"),
        ("    guides.aim.omega: [0.2]\n", {"budget": "3"}, 13, "unknown key 'budget' in tune"),
        ("    guides.aim.omega: [0.2]\n", {"storage": "study.db"}, 13, "tune.storage must be a database URL such as sqlite:///study.db"),
    ],
)
def test_tune_errors_name_the_line_and_suggest(space, top, line, needle):
    msg = error_of(tuned(space, **top))
    assert msg.startswith(f"r.yaml:{line}: "), msg
    assert needle in msg, msg


def test_a_top_level_value_every_model_overrides_is_not_searchable():
    text = tuned("    parameters.density: [0.2, 0.4]\n").replace("parameters: {weight: 1.0}}", "parameters: {weight: 1.0, density: 0.7}}")
    assert "every model sets its own density (lines 4, 5)" in error_of(text)
    parse_recipe(tuned("    parameters.density: [0.2, 0.4]\n"))  # code falls back to the top level


def test_tpe_and_shared_studies_need_optuna_only_to_search(monkeypatch):
    """A tuned recipe loads without Optuna (`--no-tune`, `pick`); the search says what to
    install before it calibrates anything."""
    import builtins

    from mergeplan.errors import MergeplanError
    from mergeplan.tune.strategy import require_optuna

    real = builtins.__import__

    def no_optuna(name, *a, **k):
        if name == "optuna" or name.startswith("optuna."):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    r = parse_recipe(tuned("    guides.aim.omega: [0.2]\n", strategy="tpe"), "r.yaml")
    with pytest.raises(MergeplanError, match=r"need Optuna: pip install 'mergeplan\[tune\]'"):
        require_optuna(r.tune)
    require_optuna(parse_recipe(tuned("    guides.aim.omega: [0.2]\n", strategy="random")).tune)


# ------------------------------------------------------------------ candidate recipes


def _resolved(r, names=(MLP, "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight")):
    return [r.tensor_params(n, 1 if "layers.1" in n else (0 if "layers.0" in n else None), 2) for n in names]


def test_a_candidate_equals_the_same_recipe_written_by_hand():
    r = parse_recipe(RECIPE + TUNE, "r.yaml")
    c = apply_assignment(
        r, {"merge_method": "dare_ties", "parameters.density": 0.3, "parameters.normalize": False,
            "models.math.weight": 0.7, "guides.aim.omega": 0.6},
    )
    by_hand = parse_recipe(
        RECIPE.replace("merge_method: ties", "merge_method: dare_ties")
        .replace("{weight: 1.0, density: 0.5}", "{weight: 0.7, density: 0.5}")
        .replace("{normalize: true, density: 0.6}", "{normalize: false, density: 0.3}")
        .replace("omega: 0.4", "omega: 0.6"),
        "r.yaml",
    )
    assert c.merge_method == "dare_ties" and c.guides == by_hand.guides == {"aim": {"omega": 0.6}}
    assert _resolved(c) == _resolved(by_hand)
    assert c.param("weight", tensor_name=MLP, layer=1, num_layers=2, model="math") == 0.7
    assert c.param("density", tensor_name=MLP, layer=1, num_layers=2, model="code") == 0.3
    assert c.guide_options.aim.omega == 0.6
    # a candidate is a plain recipe that remembers its values; the original is untouched
    assert c.tune is None and c.assignment["models.math.weight"] == 0.7
    assert r.merge_method == "ties" and r.model("math").parameters["weight"].setting == 1.0
    # more values build on the candidate's
    c2 = c.with_assignment({"models.code.weight": 0.2})
    assert c2.model("math").parameters["weight"].setting == 0.7 and c2.model("code").parameters["weight"].setting == 0.2


def test_a_candidate_goes_through_the_whole_schema():
    r = parse_recipe(RECIPE + TUNE, "r.yaml")
    with pytest.raises(MergeplanError, match=r"^r\.yaml:6: parameters\.density is 1\.5, outside \(0, 1\]"):
        r.with_assignment({"parameters.density": 1.5})
    with pytest.raises(MergeplanError, match=r"guides\.aim\.omega must be in \[0\.0, 1\.0\], got 2\.0"):
        r.with_assignment({"guides.aim.omega": 2.0})
    with pytest.raises(MergeplanError, match=r"tune\.space\.models\.legal\.weight: no model 'legal'; models: math, code"):
        r.with_assignment({"models.legal.weight": 1.0})
    with pytest.raises(MergeplanError, match=r"tune\.space\.seed: not a searchable path"):
        r.with_assignment({"seed": 1})
    # a value combination no single range end shows: della's keep probabilities leave (0, 1)
    d = parse_recipe(RECIPE.replace("ties", "della") + TUNE.replace("[ties, dare_ties]", "[della]"), "r.yaml")
    with pytest.raises(MergeplanError, match="della keeps entries with probabilities"):
        d.with_assignment({"parameters.epsilon": 0.55, "parameters.density": 0.5})


def test_range_values_visited_by_a_grid():
    assert Range(low=0.1, high=0.5, step=0.1).grid() == (0.1, 0.2, 0.3, 0.4, 0.5)
    assert Range(low=1, high=2).grid() is None


def test_model_ids_with_dots_and_the_long_parameters_form():
    text = (
        "merge_method: ties\nbase_model: org/base\nmodels:\n"
        "  - {model: {model: {path: org/llama-3.1, revision: v2}}, parameters: {weight: 1}}\n"
        "  - {model: ./code, name: code.v2, parameters: {weight: 1}}\n"
        "calibration: {data: c.txt}\n"
        "tune:\n  candidates: 2\n  space:\n"
        "    models.llama-3.1@v2.weight: [0.5, 1.0]\n"
        "    models.code.v2.parameters.density: {low: 0.3, high: 0.9}\n"
    )
    r = parse_recipe(text)
    assert [m.name for m in r.models] == ["llama-3.1@v2", "code.v2"]
    c = r.with_assignment({"models.llama-3.1@v2.weight": 0.5, "models.code.v2.parameters.density": 0.4})
    assert c.model("llama-3.1@v2").parameters["weight"].setting == 0.5
    assert c.model("code.v2").parameters["density"].setting == 0.4
    assert c.model("llama-3.1@v2").ref == "org/llama-3.1@v2"
