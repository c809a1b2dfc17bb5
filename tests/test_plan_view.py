"""mergeplan.plan.view: what a plan's values mean to `review` and `show`. Masks, kept
fractions and overlaps checked against independent computations; statistics an edit made
stale come back as "at apply", never as the old number."""

import numpy as np
import pytest

from mergeplan.plan import PlanEditor, view
from plan_factory import make_plan

Q = "model.layers.0.self_attn.q_proj.weight"


def test_aim_factors_are_apply_float32_arithmetic():
    s = np.array([0.0, 0.5, 1.0, 0.3], dtype=np.float32)
    f = view.aim_factors({"kind": "aim", "omega": 0.2, "axis": 0, "scores": s})
    assert f.dtype == np.float32
    # whole.aim_factors: 1 - scores * (1 - omega) on float32 tensors
    expect = np.float32(1.0) - s * np.float32(0.8)
    np.testing.assert_array_equal(f, expect)
    assert view.aim_mean({"kind": "aim", "omega": 0.2, "axis": 0, "scores": s}) == pytest.approx(
        float(np.mean([1.0, 0.6, 0.2, 1 - 0.3 * 0.8])), rel=1e-6)
    assert view.aim_factors(None) is None and view.aim_mean(None) is None


def test_mask_info_and_kept_after_a_density_edit():
    plan = make_plan(layers=1)
    plan.tensor(Q).stats.update({"kept": {"math": 0.4567, "code": 0.75}, "overlap": 0.33})
    ed = PlanEditor(plan)
    t = ed.plan.tensor(Q)
    math_ = t.contribution("math")
    assert view.mask_info(math_).digest == math_.mask["digest"][:12] and not view.mask_info(math_).recompute
    assert view.kept(t, math_) == view.Stat(0.4567, "measured")
    assert view.overlap(t) == view.Stat(0.33, "measured")
    ed.set([(Q, "math")], "density", 0.42)
    t = ed.plan.tensor(Q)
    info = view.mask_info(t.contribution("math"))
    assert info.recompute and "recomputed at apply" in info.digest
    # the planner measured the old mask: not shown any more, for this model and the overlap
    assert view.kept(t, t.contribution("math")).text() == "at apply"
    assert view.kept(t, t.contribution("code")) == view.Stat(0.75, "measured")
    assert view.overlap(t).pending
    assert view.tensor_stats(t)["kept"] == {"math": None, "code": 0.75} and view.tensor_stats(t)["overlap"] is None
    assert view.stale_stats(t) == ["kept.math", "overlap"]
    ed.undo()  # back to the planned density: the digest and the measurements hold again
    t = ed.plan.tensor(Q)
    assert view.kept(t, t.contribution("math")) == view.Stat(0.4567, "measured")
    dense = ed.plan.tensor("lm_head.weight").contribution("math")
    assert view.mask_info(dense).kind == "dense" and view.kept(ed.plan.tensor("lm_head.weight"), dense).value == 1.0


def test_explicit_bits_give_exact_kept_and_overlap():
    plan = make_plan(layers=1)
    t = plan.tensor(Q)
    n = int(np.prod(t.shape))
    rng = np.random.default_rng(3)
    a, b = rng.random(n) < 0.3, rng.random(n) < 0.6
    t.contributions[0].mask = {"kind": "explicit", "density": 0.3, "bits": np.packbits(a).tobytes()}
    t.contributions[1].mask = {"kind": "explicit", "density": 0.6, "bits": np.packbits(b).tobytes()}
    both = sum(1 for x, y in zip(a.tolist(), b.tolist()) if x and y) / n
    assert view.pair_overlaps(t)[("math", "code")] == view.Stat(pytest.approx(both), "exact")
    assert view.kept(t, t.contributions[0]) == view.Stat(pytest.approx(a.sum() / n), "exact")
    t2 = plan.tensor("model.layers.0.mlp.up_proj.weight")
    da, db = (c.density for c in t2.contributions)
    assert view.pair_overlaps(t2)[("code", "math")] == view.Stat(pytest.approx(da * db), "expected")


def test_range_selection_leaves_1d_tensors_out_unless_asked():
    plan = make_plan(layers=2)
    ed = PlanEditor(plan)
    every = ed.select(layers=[0, 1], field="density")
    matrices = ed.select(layers=[0, 1], field="density", vectors=False)
    vectors = {t for t, _ in every} - {t for t, _ in matrices}
    assert vectors == {"model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"}
    assert all(len(plan.tensor(t).shape) == 2 for t, _ in matrices)


def test_layout_fields_and_guides():
    plan = make_plan(layers=2)
    assert [view.row_of(n) for n in ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight",
                                     "lm_head.weight", "model.norm.weight")] == ["emb", 1, "head", "head"]
    assert view.editable_fields(plan) == ["density", "weight", "lambda", "omega"]
    assert view.guided_quantities(plan) == ["density", "aim"]
    assert view.editable_fields(make_plan(layers=1, models=(), aim=False)) == ["lambda"]
