"""What the review screens compute, checked without running the app: grid layout and
values, the view it opens on, selections, AIM factor histogram, per-layer guide
statistics. (What plan values mean, masks and kept/overlap: tests/test_plan_view.py.)"""

import numpy as np
import pytest

from mergeplan.errors import MergeplanError
from mergeplan.plan import PlanEditor
from mergeplan_tui.gridmodel import ROW_EMBED, ROW_HEAD, GridModel, fmt_cell, heat
from mergeplan_tui.selection import format_layers, parse_components, parse_layers, parse_models
from mergeplan_tui.tensorinfo import aim_summary, layer_stats
from plan_factory import make_plan


def _q(gm, key):
    return next(q for q in gm.quantities() if q.key == key)


def test_grid_layout_rows_columns_and_cells():
    plan = make_plan(layers=3)
    gm = GridModel(plan)
    assert gm.rows == [ROW_EMBED, 0, 1, 2, ROW_HEAD]
    assert gm.components[:3] == ["embed", "input_norm", "q"]
    assert gm.components[-1] == "lm_head"
    assert gm.tensor_at(1, "down") == "model.layers.1.mlp.down_proj.weight"
    assert gm.tensor_at(ROW_EMBED, "embed") == "model.embed_tokens.weight"
    assert gm.tensor_at(ROW_HEAD, "lm_head") == "lm_head.weight"
    assert gm.tensor_at(ROW_EMBED, "q") is None
    # per-model quantities get one column per (component, model), model-major
    cols = gm.columns(_q(gm, "density"))
    assert cols[0] == ("embed", "math") and cols[len(gm.components)] == ("embed", "code")
    assert gm.columns(_q(gm, "omega")) == [(c, None) for c in gm.components]


def test_grid_values_follow_edits_and_copy_tensors_have_none():
    plan = make_plan(layers=3)
    ed = PlanEditor(plan)
    gm = GridModel(ed.plan)
    dens = _q(gm, "density")
    name = "model.layers.2.mlp.up_proj.weight"
    assert gm.value(name, dens, "code") == plan.tensor(name).contribution("code").density
    ed.set([(name, "code")], "density", 0.25)
    assert gm.value(name, dens, "code") == 0.25
    assert gm.value("model.embed_tokens.weight", dens, "math") is None  # copied, no contribution


def test_mean_aim_factor_matches_float64_rederivation_and_tracks_omega():
    plan = make_plan(layers=2)
    ed = PlanEditor(plan)
    gm = GridModel(ed.plan)
    aim = _q(gm, "aim")
    name = "model.layers.1.mlp.down_proj.weight"
    scores = plan.tensor(name).relax["scores"].astype(np.float64)
    # apply computes the factors in float32: equal to the float64 value to float32 precision
    expect = float(np.mean([1.0 - s * (1.0 - 0.4) for s in scores]))
    assert gm.value(name, aim, None) == pytest.approx(expect, rel=1e-6)
    ed.set([(name, None)], "omega", 0.9)
    expect = float(np.mean([1.0 - s * 0.1 for s in scores]))
    assert gm.value(name, aim, None) == pytest.approx(expect, rel=1e-6)
    assert gm.value("model.layers.1.input_layernorm.weight", aim, None) is None


def test_stat_quantities_and_layer_series():
    plan = make_plan(layers=4)
    gm = GridModel(plan)
    keys = [q.key for q in gm.quantities()]
    assert keys[:5] == ["density", "weight", "lambda", "omega", "aim"]
    stat = _q(gm, "stat:lewis.delta")
    assert stat.per_model and stat.field is None
    series = gm.series(_q(gm, "density"), "math")
    assert len(series) == 4
    # layer 2: mean over the 7 masked projections; the dense input norm (1.0) is no decision
    vals = [t.contribution("math").mask["density"] for t in plan.tensors
            if ".layers.2." in t.name and t.contribution("math").mask]
    assert len(vals) == 7 and series[2] == pytest.approx(sum(vals) / len(vals))


def test_grid_opens_on_the_guides_decision_that_varies():
    plan = make_plan(layers=3)  # LEWIS densities that differ by layer
    assert _key(GridModel(plan)) == "density"
    for _, c in plan.iter_contributions():  # an AIM plan with one fixed density from the recipe
        if c.mask:
            c.mask["density"] = 0.5
            c.source = {"density": "recipe", "weight": "recipe"}
    assert _key(GridModel(plan)) == "aim"
    for t in plan.tensors:
        t.relax = None
    assert _key(GridModel(plan)) == "density"  # no guide at all: density


def _key(gm):
    return gm.quantities()[gm.initial_quantity()].key


def test_stale_statistics_show_as_pending_cells():
    plan = make_plan(layers=1)
    name = "model.layers.0.mlp.up_proj.weight"
    plan.tensor(name).stats.update({"kept": {"math": 0.41, "code": 0.62}, "overlap": 0.3})
    ed = PlanEditor(plan)
    gm = GridModel(ed.plan)
    kept, ov = _q(gm, "stat:kept"), _q(gm, "stat:overlap")
    assert gm.value(name, kept, "math") == 0.41 and gm.value(name, ov, None) == 0.3
    ed.set([(name, "math")], "density", 0.2)
    assert gm.value(name, kept, "math") is None and gm.pending(name, kept, "math")
    assert gm.value(name, kept, "code") == 0.62 and not gm.pending(name, kept, "code")
    assert gm.value(name, ov, None) is None and gm.pending(name, ov, None)
    ed.undo()
    assert gm.value(name, kept, "math") == 0.41 and not gm.pending(name, kept, "math")


def test_cell_text_fits_and_heat_scale():
    for v in (0.5, 1.0, 12.25, 123.4, -0.5, 0.003, -12.0, 1e9, None, float("nan")):
        assert len(fmt_cell(v)) == 4
    assert fmt_cell(0.456) == ".456" and fmt_cell(1.0) == "1.00" and fmt_cell(12.25) == "12.2"
    assert fmt_cell(0.0004) == "4e-4" and fmt_cell(-0.004) == " -~0" and fmt_cell(None).strip() == "·"
    assert heat(None, 0, 1) is None
    lo, hi = heat(0.0, 0.0, 1.0), heat(1.0, 0.0, 1.0)
    assert lo != hi and heat(5.0, 5.0, 5.0) == heat(0.5, 0.0, 1.0)  # flat scale -> middle colour


def test_selection_parsing():
    assert parse_layers("10-12, 20", 80) == {10, 11, 12, 20}
    assert parse_layers("12-10", 80) == {10, 11, 12}
    assert parse_layers("", 80) is None and parse_layers("all", 80) is None
    with pytest.raises(MergeplanError, match="past the last layer"):
        parse_layers("70-80", 80)
    with pytest.raises(MergeplanError, match="not a layer or range"):
        parse_layers("a-b", 80)
    known = ["q", "k", "v", "o", "gate", "up", "down", "input_norm"]
    assert parse_components("mlp", known) == {"gate", "up", "down"}
    assert parse_components("q, down", known) == {"q", "down"}
    with pytest.raises(MergeplanError, match="unknown 'ffn'"):
        parse_components("ffn", known)
    assert parse_models("code,math,code", ["math", "code"]) == ("code", "math")
    with pytest.raises(MergeplanError, match="task models are math, code"):
        parse_models("chat", ["math", "code"])
    assert format_layers([3, 1, 2, 7, 9, 8]) == "1-3,7-9"
    assert parse_layers(format_layers([0, 4, 5, 6]), 10) == {0, 4, 5, 6}


def test_aim_summary_histogram_counts_every_channel():
    plan = make_plan(layers=1)
    t = plan.tensor("model.layers.0.mlp.down_proj.weight")
    s = aim_summary(t, bins=5)
    f = 1.0 - t.relax["scores"].astype(np.float64) * 0.6
    assert s.n == f.size and sum(s.counts) == f.size
    assert s.lo == pytest.approx(f.min()) and s.hi == pytest.approx(f.max()) and s.mean == pytest.approx(f.mean())
    width = (s.edges[-1] - s.edges[0]) / 5
    manual = [0] * 5
    for x in f:
        manual[min(4, int((x - s.edges[0]) / width))] += 1
    assert s.counts == manual
    assert aim_summary(plan.tensor("lm_head.weight")) is None


def test_layer_stats_pick_this_layer_from_plan_level_statistics():
    plan = make_plan(layers=4)
    plan.stats["sens"] = {"alpha": {"math": np.array([0.1, 0.2, 0.3, 0.4, 0.9], dtype=np.float32)},
                          "tau": {"math": 0.7}}
    plan.stats["lewis"] = {"delta": {"down": {"math": [0.01, 0.02, 0.03, 0.04]}}}
    rows = dict(layer_stats(plan, "model.layers.2.mlp.down_proj.weight", 4))
    assert rows["sens.alpha.math"] == "0.3"
    assert rows["sens.tau.math"] == "0.7"
    assert rows["lewis.delta.math"] == "0.03"
    assert layer_stats(make_plan(layers=1), "model.layers.0.mlp.down_proj.weight", 1) == []
