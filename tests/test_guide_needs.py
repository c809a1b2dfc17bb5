"""Each guide loads exactly the models its statistics need (mergeplan/guides/needs.py).

AIM reads only the base's activations, so an AIM-only recipe with `data: {base: PATH}`
plans without opening a fine-tune for calibration; a guide missing data for a model it
measures is one MergeplanError line naming the guide, the model and the entry to add.
"""

from __future__ import annotations

import pytest

import mergeplan.calibrate.run as run_mod
from cli_helpers import run_cli, write_recipe
from mergeplan.errors import MergeplanError
from mergeplan.guides import ModelInput, run_guides
from mergeplan.plan import read_plan
from test_calib_family import TASKS, family, one_thread  # noqa: F401


@pytest.fixture
def loads(monkeypatch):
    """Directory names of the models calibration loads, in load order."""
    seen: list[str] = []
    real = run_mod.load_model

    def load_model(path, *a, **k):
        seen.append(path.name)
        return real(path, *a, **k)

    monkeypatch.setattr(run_mod, "load_model", load_model)
    return seen


def test_aim_only_recipe_with_base_only_data_plans_without_opening_a_fine_tune(tiny_family, tmp_path, capsys, loads):
    fam = tiny_family
    r = write_recipe(tmp_path / "aim.yaml", f"""
        merge_method: task_arithmetic
        base_model: {fam.base}
        models:
          - model: {fam.finetunes['math']}
            parameters: {{weight: 0.5}}
          - model: {fam.finetunes['code']}
            parameters: {{weight: 0.5}}
        calibration:
          data: {{base: {fam.data['general']}}}
          samples: 2
          seq_len: 16
        guides: {{aim: {{omega: 0.4}}}}
    """)
    code, _, err = run_cli(capsys, "plan", r, "-o", tmp_path / "a.plan", "-q")
    assert code == 0, err
    assert loads == [fam.base.name]  # the base, once; no task model
    plan = read_plan(tmp_path / "a.plan")
    assert set(plan.guides) == {"aim"}
    assert sum(t.relax is not None for t in plan.tensors) > 20
    cal = plan.calibration
    assert cal["aim_data"] == [str(fam.data["general"])] and cal["data_for"] == {}
    assert set(cal["timings_s"]) == {fam.base.name}


@pytest.mark.parametrize("guides, loaded", [
    ({"aim": {}}, ["base"]),
    ({"sens": {"cross_task": False}}, list(TASKS[:2])),
    ({"lewis": {}}, ["base", *TASKS[:2]]),
])
def test_each_guide_loads_exactly_the_models_it_measures(family, loads, guides, loaded):
    data = {"base": str(family.text), **{t: str(family.data[t]) for t in TASKS[:2]}}
    cal = {"data": data, "samples": 2, "seq_len": 8}
    run_guides(guides, cal, ModelInput("base", family.base),
               [ModelInput(t, family.models[t]) for t in TASKS[:2]], family.root, quiet=True)
    assert loads == loaded


@pytest.mark.parametrize("guides, data, needles", [
    ({"lewis": {}}, {"base": "text", "math": "math"}, ["guides.lewis", "fine-tune 'code'", "add `code: PATH`"]),
    ({"sens": {}}, {"math": "math"}, ["guides.sens", "fine-tune 'code'", "add `code: PATH`"]),
    ({"aim": {}, "sens": {}}, {"base": "text", "code": "code"},
     ["guides.sens", "fine-tune 'math'", "add `math: PATH`"]),
])
def test_missing_data_for_a_measured_model_is_one_line_naming_guide_model_and_fix(family, loads, guides, data, needles):
    paths = {"text": family.text, **family.data}
    cal = {"data": {k: str(paths[v]) for k, v in data.items()}, "samples": 2, "seq_len": 8}
    with pytest.raises(MergeplanError) as e:
        run_guides(guides, cal, ModelInput("base", family.base),
                   [ModelInput(t, family.models[t]) for t in TASKS[:2]], family.root, quiet=True)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    assert loads == []  # refused before any model is loaded


def test_aim_without_base_entry_pools_the_fine_tunes_data(family, loads):
    cal = {"data": {"math": str(family.data["math"])}, "samples": 2, "seq_len": 8}
    dec = run_guides({"aim": {}}, cal, ModelInput("base", family.base),
                     [ModelInput(t, family.models[t]) for t in TASKS[:2]], family.root, quiet=True)
    assert dec.calibration["aim_data"] == [str(family.data["math"])]
    assert any("pooled the fine-tunes' data" in n for n in dec.calibration["notes"])
    assert loads == ["base"]
