import pytest

from mergeplan.errors import MergeplanError
from mergeplan.plan import PlanEditor, diff_plans, read_plan
from plan_factory import make_plan

Q2 = "model.layers.2.self_attn.q_proj.weight"


def test_range_edit_by_layers_and_component_and_save_log(tmp_path):
    ed = PlanEditor(make_plan(layers=6), str(tmp_path / "p.plan"))
    targets = ed.select(layers=range(2, 5), pattern="mlp.", models=["math"])
    assert len(targets) == 3 * 3  # layers 2..4 x gate/up/down, one model
    ed.set(targets, "density", 0.9)
    assert ed.get("model.layers.3.mlp.up_proj.weight", "math", "density") == 0.9
    assert ed.get("model.layers.3.mlp.up_proj.weight", "code", "density") != 0.9
    assert ed.get("model.layers.1.mlp.up_proj.weight", "math", "density") != 0.9
    ed.save()
    back = read_plan(tmp_path / "p.plan")
    assert back.tensor("model.layers.4.mlp.down_proj.weight").contribution("math").density == 0.9
    (entry,) = back.edit_log
    assert len(entry["changes"]) == 9 and all(ch[2] == "density" and ch[4] == 0.9 for ch in entry["changes"])


def test_density_edit_drops_digest_and_restoring_brings_it_back():
    ed = PlanEditor(make_plan())
    digest = ed.plan.tensor(Q2).contribution("math").mask["digest"]
    old = ed.get(Q2, "math", "density")
    ed.set([(Q2, "math")], "density", 0.77)
    assert ed.plan.tensor(Q2).contribution("math").mask["digest"] is None
    ed.set([(Q2, "math")], "density", old)
    assert ed.plan.tensor(Q2).contribution("math").mask["digest"] == digest
    assert not ed.dirty


def test_invalid_density_changes_nothing():
    ed = PlanEditor(make_plan())
    targets = ed.select(layers=[0, 1], models=["math"])
    before = [ed.get(t, m, "density") for t, m in targets]
    for bad in (0, 1.5, -0.1, float("nan"), "x"):
        with pytest.raises(MergeplanError):
            ed.set(targets, "density", bad)
    assert [ed.get(t, m, "density") for t, m in targets] == before
    # scaling that would leave (0, 1] for any target is refused as a whole
    with pytest.raises(MergeplanError, match=r"\(0, 1\]"):
        ed.scale(targets, "density", 3.0)
    assert [ed.get(t, m, "density") for t, m in targets] == before


def test_undo_redo_and_reset_to_planned():
    ed = PlanEditor(make_plan())
    t = ed.select(layers=[1], field="weight")
    ed.scale(t, "weight", 2.0)
    ed.set([(Q2, None)], "omega", 0.6)
    assert ed.get(Q2, None, "omega") == 0.6
    ed.undo()
    assert ed.get(Q2, None, "omega") == 0.4
    assert all(ed.get(n, m, "weight") == 2.0 for n, m in t)
    ed.undo()
    assert not ed.dirty and not ed.can_undo
    ed.redo()
    assert all(ed.get(n, m, "weight") == 2.0 for n, m in t)
    ed.reset(t, "weight")
    assert not ed.dirty


def test_diff_shows_edits_only():
    a = make_plan()
    ed = PlanEditor(a.clone())
    ed.set([(Q2, "code")], "weight", 0.5)
    rows = diff_plans(a, ed.plan)
    assert [(r.where, r.model, r.field, r.old, r.new) for r in rows] == [(Q2, "code", "weight", 1.0, 0.5)]
    assert diff_plans(a, a.clone()) == []


def _cabs_plan():
    from mergeplan.plan import Contribution, ModelRef, Plan, TensorPlan

    contribs = [Contribution(m, 1.0, {"kind": "nm", "n": 8, "m": 32, "density": 0.25, "digest": d})
                for m, d in (("a", "d" * 32), ("b", "e" * 32), ("c", "f" * 32))]
    t = TensorPlan("model.layers.0.mlp.up_proj.weight", (64, 64), "float32",
                   params={"cabs_order": [1, 0, 2]}, contributions=contribs)
    models = [ModelRef("base", "base", "b")] + [ModelRef(m, "task", m) for m in "abc"]
    return Plan("cabs", models, [t])


def test_cabs_density_edit_drops_digests_of_models_masked_later():
    ed = PlanEditor(_cabs_plan())
    name = "model.layers.0.mlp.up_proj.weight"
    ed.set([(name, "a")], "density", 0.4)  # order is b, a, c: a and c depend on a
    t = ed.plan.tensor(name)
    assert t.contribution("a").mask["n"] == 13 and ed.get(name, "a", "density") == 13 / 32
    assert [t.contribution(m).mask["digest"] for m in "bac"] == ["e" * 32, None, None]
    ed.undo()
    assert [t.contribution(m).mask["digest"] for m in "abc"] == ["d" * 32, "e" * 32, "f" * 32]
    ed.set([(name, "c")], "density", 0.5)  # last in order: only its own digest goes
    assert [t.contribution(m).mask["digest"] for m in "abc"] == ["d" * 32, "e" * 32, None]


def test_explicit_mask_density_edit_is_refused_before_any_change():
    plan = _cabs_plan()
    name = "model.layers.0.mlp.up_proj.weight"
    plan.tensor(name).contribution("b").mask["bits"] = b"\xff" * 512
    ed = PlanEditor(plan)
    with pytest.raises(MergeplanError, match="explicit"):
        ed.set([(name, "a"), (name, "b")], "density", 0.5)
    assert ed.get(name, "a", "density") == 0.25 and not ed.dirty and not ed.can_undo


def test_nan_values_are_not_unsaved_edits():
    """A plan holding NaN (hand-made or hostile; check_plan refuses it before apply) must not
    count as edited: NaN != NaN would keep the review's unsaved count and quit prompt on."""
    from mergeplan.plan.diff import diff_plans
    from mergeplan.plan.edit import PlanEditor
    from plan_factory import make_plan

    plan = make_plan(layers=2, models=("math", "code"))
    t = plan.tensors[1]
    t.contributions[0].weight = float("nan")
    ed = PlanEditor(plan.clone())
    assert ed.pending() == []
    assert diff_plans(plan, plan.clone()) == []
