"""samples/evaluate.py: the family's losses through mergeplan.evaluate, a plan merged in
memory beside its applied directory, progress on stderr."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cli_helpers import family_recipe
from test_calib_family import one_thread  # noqa: F401  (tiny models: one torch thread)

SCRIPT = Path(__file__).resolve().parent.parent / "samples" / "evaluate.py"


def _script():
    spec = importlib.util.spec_from_file_location("samples_evaluate", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_evaluate_script_prints_the_familys_losses(family_builder, tiny_family, tmp_path, capsys):
    from mergeplan.apply import ApplyOptions, apply_plan
    from mergeplan.plan.codec import write_plan
    from mergeplan.planner import PlanOptions, build_plan
    from mergeplan.recipe import load_recipe

    fam = tiny_family
    models = {fam.finetunes[m]: "weight: 0.5, density: 0.5" for m in ("math", "code", "legal")}
    plan = build_plan(load_recipe(family_recipe(tmp_path / "t.yaml", "ties", fam.base, models)),
                      PlanOptions(quiet=True))
    write_plan(plan, tmp_path / "ties.plan")
    apply_plan(plan, tmp_path / "ties", ApplyOptions())
    assert _script().main([str(fam.root), str(tmp_path / "ties"), str(tmp_path / "ties.plan"), "--threads", "1",
                          "--records", "8"]) == 0
    out, err = capsys.readouterr()
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out.strip().splitlines()[1:]}
    assert list(rows) == ["base", "math", "code", "legal", "ties", "ties.plan"]
    want = family_builder.eval_family(fam, max_records=8)  # the builder's own loss, written independently
    for name in ("base", "math", "code", "legal"):
        assert rows[name] == pytest.approx([round(want[name][t], 3) for t in family_builder.TASKS], abs=1.5e-3)
    assert rows["ties"] == rows["ties.plan"]
    assert "evaluate: ties.plan · merge in memory" in err and "evaluate: base · 4 tasks" in err
