"""Every command on the tiny family, as a user runs it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, family_recipe, run_cli
from mergeplan import __version__
from mergeplan.plan import PlanEditor, read_plan
from test_apply import load_all

Q = "model.layers.2.self_attn.q_proj.weight"


@pytest.fixture
def planned(tiny_family, tmp_path, capsys):
    fam = tiny_family
    r = family_recipe(tmp_path / "ties.yaml", "ties", fam.base,
                      {fam.finetunes["math"]: "weight: 1.0, density: [0.2, 0.8]",
                       fam.finetunes["code"]: "weight: 0.5, density: 0.5"},
                      "parameters: {normalize: true, int8_mask: true}")
    code, out, err = run_cli(capsys, "plan", r, "-o", tmp_path / "p.plan")
    assert code == 0, err
    assert out.strip().startswith("sha256:")
    assert "int8_mask" in err  # the note about the ignored key reaches the user
    return tmp_path / "p.plan"


def test_version_and_help(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and __version__ in out
    for cmd in ("plan", "apply", "show", "validate", "diff", "review"):
        code, out, _ = run_cli(capsys, cmd, "--help")
        assert code == 0 and "Usage" in out, cmd


def test_show_text_and_json(planned, capsys):
    code, out, err = run_cli(capsys, "show", planned)
    assert code == 0, err
    for needle in ("ties", "math", "code", "density per layer", "sha256:"):
        assert needle in out
    code, out, _ = run_cli(capsys, "show", planned, "--json")
    data = json.loads(out)
    assert data["method"] == "ties" and [m["id"] for m in data["models"]] == ["base", "math", "code"]
    layers = {r["layer"]: r for r in data["layers"]}
    # the density gradient 0.2 -> 0.8 over the layers is visible per layer
    assert layers[0]["density:math"] < layers[3]["density:math"]
    t = next(t for t in data["tensors"] if t["name"] == Q)
    assert t["models"]["code"]["density"] == 0.5 and len(t["models"]["code"]["mask"]["digest"]) == 32


def test_validate_plain_and_inputs(planned, capsys):
    code, out, err = run_cli(capsys, "validate", planned)
    assert code == 0 and "plan ok" in out, err
    code, out, err = run_cli(capsys, "validate", planned, "--inputs", "--full")
    assert code == 0, err
    assert out.count("matches") == 3


def test_edit_then_diff_then_apply_uses_edits(planned, tmp_path, capsys):
    edited = tmp_path / "edited.plan"
    ed = PlanEditor(read_plan(planned), str(planned))
    ed.set(ed.select(layers=[2], components=["q"], models=["math"]), "density", 0.05)
    ed.save(str(edited))
    code, out, _ = run_cli(capsys, "diff", planned, edited)
    assert code == 1 and "0.05" in out and Q not in out  # the summary: per layer and field
    code, out, _ = run_cli(capsys, "diff", planned, edited, "--tensors")
    assert code == 1 and Q in out and "0.05" in out
    code, out, _ = run_cli(capsys, "diff", planned, planned)
    assert code == 0 and "no differences" in out
    code, out, _ = run_cli(capsys, "diff", planned, edited, "--json")
    rows = json.loads(out)
    assert {(r["where"], r["model"], r["field"]) for r in rows} >= {(Q, "math", "density")}
    for plan, out_dir in ((planned, "a"), (edited, "b")):
        code, _, err = run_cli(capsys, "apply", plan, tmp_path / out_dir, "-q")
        assert code == 0, err
    a, b = load_all(tmp_path / "a"), load_all(tmp_path / "b")
    assert not np.array_equal(a[Q], b[Q])
    other = "model.layers.1.self_attn.q_proj.weight"
    np.testing.assert_array_equal(a[other], b[other])  # only the edited tensor changed


def test_apply_with_model_remap(planned, tiny_family, tmp_path, capsys):
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_family.finetunes["code"], moved)
    code, _, err = run_cli(capsys, "apply", planned, tmp_path / "out", "--model", f"code={moved}", "-q")
    assert code == 0, err
    code, _, err = run_cli(capsys, "apply", planned, tmp_path / "out2", "--model", "nosuch=/x")
    assert_one_line_error(code, err, "nosuch")
    code, _, err = run_cli(capsys, "apply", planned, tmp_path / "out3", "--model", "broken")
    assert_one_line_error(code, err, "NAME=PATH")


def test_missing_recipe_and_plan(tmp_path, capsys):
    code, _, err = run_cli(capsys, "plan", tmp_path / "none.yaml", "-o", tmp_path / "p.plan")
    assert_one_line_error(code, err, "none.yaml")
    code, _, err = run_cli(capsys, "show", tmp_path / "none.plan")
    assert_one_line_error(code, err, "none.plan")


def test_cabs_density_edit_applies(tiny_family, tmp_path, capsys):
    """Editing the first model in CABS order changes the later model's mask too; apply
    recomputes both (their digests were dropped) and succeeds."""
    fam = tiny_family
    r = family_recipe(tmp_path / "cabs.yaml", "cabs", fam.base,
                      {fam.finetunes["math"]: "weight: 1.0, n: 4", fam.finetunes["code"]: "weight: 1.0, n: 4"},
                      "parameters: {m: 8, order: [code, math]}")
    code, _, err = run_cli(capsys, "plan", r, "-o", tmp_path / "c.plan", "-q")
    assert code == 0, err
    ed = PlanEditor(read_plan(tmp_path / "c.plan"), str(tmp_path / "c.plan"))
    ed.set([(Q, "code")], "density", 0.25)
    t = ed.plan.tensor(Q)
    assert t.contribution("math").mask["digest"] is None
    ed.save()
    code, _, err = run_cli(capsys, "apply", tmp_path / "c.plan", tmp_path / "out", "-q")
    assert code == 0, err
