"""The one recipe schema: every section is validated by the same pydantic models, errors
map back to the file line, and hostile documents give one clear line, never a traceback."""

from __future__ import annotations

import copy
import random

import pytest
import yaml

from mergeplan.calibrate.settings import parse_calibration
from mergeplan.errors import MergeplanError
from mergeplan.guides import parse_guides, validate_guides
from mergeplan.recipe import CalibrationSettings, GuideOptions, RecipeSchema, parse_recipe

HEAD = "merge_method: ties\nbase_model: ./base\nmodels:\n  - {model: ./math, parameters: {weight: 1, density: 0.5}}\n  - {model: ./code, parameters: {weight: 1, density: 0.5}}\n"


def error_of(text: str) -> str:
    with pytest.raises(MergeplanError) as info:
        parse_recipe(text, "r.yaml")
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(
    "tail, line, needle",
    [
        # guide options: validated when the recipe loads, with the option's line
        ("guides:\n  lewis:\n    gamma: 0.4\n    epsilon: 1.5\n", 9, "guides.lewis.epsilon must be in (0.0, 1.0], got 1.5"),
        ("guides:\n  aim: {omega: high}\n", 7, "guides.aim.omega must be a number, got 'high'"),
        ("guides:\n  sens: {temperature: 1, per_sample: maybe}\n", 7, "guides.sens.per_sample must be true or false"),
        ("guides:\n  lewis: {gamma: 0.9, epsilon: 0.5}\n", 7, "guides.lewis: gamma (0.9) must not exceed epsilon (0.5)"),
        ("guides:\n  cabs: {n: 8}\n", 7, "guides.cabs: cabs is a merge method, not a guide"),
        # calibration settings: the same rules the calibration engine applies
        ("calibration:\n  data: c.txt\n  device: gpu\n", 8, "calibration.device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ("calibration:\n  data: c.txt\n  seq_len: 1\n", 8, "calibration.seq_len must be an integer >= 2, got 1"),
        ("calibration:\n  data: c.txt\n  dtype: fp8\n", 8, "calibration.dtype must be one of auto, float32, bfloat16, float16"),
        ("calibration:\n  data:\n    math: m.txt\n    code: 3\n", 9, "calibration.data.code must be a path"),
        # guides that cannot work with the method or lack data fail at load, with the guide's line
        ("guides:\n  aim: {}\n", 6, "guides need calibration data: add a `calibration:` section"),
        ("calibration: {samples: 4}\nguides:\n  aim: {}\n", 6, "calibration.data is missing"),
        # model references in mergekit's forms
        ("tokenizer_source: union\ntokenizer: {source: base}\n", 7, "give either 'tokenizer_source' or 'tokenizer', not both"),
        ("dtype: torch.float8\n", 6, "dtype 'torch.float8' is not supported"),
    ],
)
def test_section_errors_name_the_line(tail, line, needle):
    msg = error_of(HEAD + tail)
    assert msg.startswith(f"r.yaml:{line}: "), msg
    assert needle in msg, msg


def test_guides_that_do_not_fit_the_method_fail_at_load_with_the_guide_line():
    text = (
        "merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n  - {model: ./a, parameters: {weight: 1}}\n"
        "calibration: {data: c.txt}\nguides:\n  aim: {}\n  lewis: {gamma: 0.4}\n"
    )
    msg = error_of(text)
    assert msg.startswith("r.yaml:8: guides.lewis sets per-layer densities, but merge_method task_arithmetic")


def test_tokenizer_source_base_and_union():
    assert parse_recipe(HEAD + "tokenizer_source: union\n").tokenizer_source == "union"
    assert parse_recipe(HEAD + "tokenizer:\n  source: union\n").tokenizer_source == "union"
    assert parse_recipe(HEAD + "tokenizer_source: base\n").tokenizer_source == "base"
    assert parse_recipe(HEAD).tokenizer_source is None
    msg = error_of(HEAD + "tokenizer_source: ./math\n")
    assert msg.startswith("r.yaml:6: tokenizer_source './math' is not supported: use `base`") and "`union`" in msg


def test_recipe_exposes_the_validated_sections_beside_the_mappings_as_written():
    r = parse_recipe(HEAD + "calibration: {data: c.txt, samples: 8}\nguides:\n  aim:\n  lewis: {gamma: 0.3}\n")
    # as written (what the planner records and hands to the guides) ...
    assert r.guides == {"aim": {}, "lewis": {"gamma": 0.3}}
    assert r.calibration == {"data": "c.txt", "samples": 8}
    # ... and validated, defaults filled in, by the same models the guides use
    assert r.guide_options == parse_guides(r.guides)
    assert r.guide_options.enabled() == ["lewis", "aim"] and r.guide_options.aim.omega == 0.4
    assert r.calibration_settings == parse_calibration(r.calibration)
    assert (r.calibration_settings.seq_len, r.calibration_settings.device) == (512, "auto")
    assert r.tune is None


def test_guide_and_calibration_sections_are_the_recipe_schema_models():
    fields = RecipeSchema.model_fields
    assert fields["guides"].annotation is GuideOptions
    assert CalibrationSettings in getattr(fields["calibration"].annotation, "__args__", ())
    # validated on their own (no file) the messages name the key path without a line
    with pytest.raises(MergeplanError, match=r"^guides\.aim\.omega must be in \[0\.0, 1\.0\], got 1\.5$"):
        validate_guides({"aim": {"omega": 1.5}}, {"data": "x"}, "ties")
    with pytest.raises(MergeplanError, match=r"^calibration\.batch_size must be an integer >= 1, got True$"):
        parse_calibration({"data": "x", "batch_size": True})


def test_errors_point_inside_gradients_filters_and_model_references():
    text = (
        "merge_method: ties\nbase_model:\n  model:\n    path: ./base\n    revison: main\n"
        "models:\n  - {model: ./a, parameters: {weight: 1}}\n"
    )
    assert error_of(text).startswith("r.yaml:5: unknown key 'revison' in base_model.model (did you mean 'revision'?)")
    text = (
        "merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./a\n    parameters:\n      weight:\n"
        "        - filter: mlp\n          value: [0.5, 1.0, nope]\n        - value: 1\n"
    )
    assert error_of(text).startswith("r.yaml:8: models[0].parameters.weight must be a number, not text 'nope'")
    r = parse_recipe(HEAD.replace("./base", "{model: {path: org/base, revision: v2}}"))
    assert r.base_model.ref == "org/base@v2" and r.base_model.name == "base@v2"  # the basename, as before


def test_json_schema_of_the_recipe_lists_every_section():
    props = RecipeSchema.model_json_schema()["properties"]
    assert {"merge_method", "models", "parameters", "guides", "calibration", "tune", "tokenizer_source"} <= set(props)


# ------------------------------------------------------------------ hostile documents

FULL = yaml.safe_load(
    HEAD
    + """
parameters: {normalize: true, lambda: [1.0, 0.5]}
calibration: {data: {math: m.txt, code: c.txt}, samples: 8}
guides: {aim: {omega: 0.4}, lewis: {gamma: 0.3}}
tune:
  strategy: random
  candidates: 4
  objective: {loss: {math: 1.0}}
  space:
    parameters.lambda: {low: 0.5, high: 1.5}
    models.code.weight: [0.5, 1.0]
    guides.aim.omega: {low: 0.2, high: 0.8, step: 0.2}
"""
)
HOSTILE = [None, True, 0, -1, 1.5, float("nan"), float("inf"), "", "x", "ties", [], {}, [1, 2], {"a": 1},
           [{"filter": "mlp", "value": 1}], {"low": 0.2, "high": 0.8}, 2**70, "5m", [None], {"model": None},
           {"path": 3}, "\x1b[31m", ["a", {"b": []}]]


def _paths(d, p=()):
    yield p
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _paths(v, p + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _paths(v, p + (i,))


def test_mutated_recipes_give_one_line_errors_never_tracebacks():
    assert parse_recipe(yaml.safe_dump(FULL), "f.yaml").tune is not None  # the seed document loads
    rng = random.Random(0)
    paths = [p for p in _paths(FULL) if p]
    failures = 0
    for _ in range(250):
        d = copy.deepcopy(FULL)
        for _ in range(rng.randint(1, 3)):
            p = rng.choice(paths)
            tgt = d
            try:
                for k in p[:-1]:
                    tgt = tgt[k]
                if rng.random() < 0.8 or not isinstance(tgt, dict):
                    tgt[p[-1]] = copy.deepcopy(rng.choice(HOSTILE))
                else:
                    del tgt[p[-1]]
            except (KeyError, IndexError, TypeError):
                pass
        try:
            parse_recipe(yaml.safe_dump(d), "f.yaml")
        except MergeplanError as exc:
            failures += 1
            msg = str(exc)
            assert "\n" not in msg and msg.startswith("f.yaml"), msg
    assert failures > 150  # most mutations are refused, each with one line


BOMB = "".join(
    f"{k}: &{k} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['x'] * 9)}]\n"
    for p, k in zip(["", "a", "b", "c", "d", "e"], "abcdef")
)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("merge_method: &x [*x]\n", "r.yaml:1: a YAML alias refers to a value that contains it"),
        ("a: &x\n  b: *x\n", "r.yaml:1: a YAML alias refers to a value that contains it"),
        (BOMB, "r.yaml:1: the document expands to more than 100000 values (through YAML aliases?)"),
        ("a: " + "[" * 100 + "]" * 100 + "\n", "r.yaml:1: values are nested more than 64 levels deep"),
        ("[" * 5000 + "]" * 5000, "r.yaml: values are nested too deeply to read"),
    ],
)
def test_recursive_exploding_and_deep_yaml_is_refused_in_one_line(text, needle):
    assert error_of(text).startswith(needle)


BASE = "merge_method: ties\nbase_model: ./b\nmodels:\n  - {model: ./m, parameters: {weight: 1.0, density: 0.5}}\n"


HELD = "  heldout: {data: {m: m.txt}}\n"


@pytest.mark.parametrize("tail, needle", [
    ("parameters: {max_shard_size: " + "9" * 400 + "GB}\n", "positive byte count"),
    ("parameters: {max_shard_size: " + "9" * 30 + "}\n", "positive byte count"),
    ("tune:\n  time: " + "9" * 400 + "s\n" + HELD + "  space: {models.m.weight: [0.5]}\n", "positive duration"),
    ("tune:\n  strategy: grid\n" + HELD + "  space: {models.m.weight: {low: 0.1, high: 1.0, step: 1.0e-9}}\n",
     "use a larger step"),
])
def test_numbers_too_big_to_use_are_one_line_errors(tail, needle):
    """Sizes beyond the plan's 64-bit field, an infinite time budget and a grid of a billion
    points are refused where they are written, not later as a traceback or an endless run."""
    msg = error_of(BASE + tail)
    assert needle in msg and "\n" not in msg
