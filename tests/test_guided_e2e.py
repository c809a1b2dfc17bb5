"""Guided recipes through the CLI: plan -> show -> apply, and apply honours every guide decision."""

from __future__ import annotations

import json

import numpy as np

from cli_helpers import assert_one_line_error, run_cli, write_recipe
from mergeplan.plan import read_plan
from test_apply import load_all


def _recipe(tmp_path, fam, method, guides, params="", model_params="weight: 1.0"):
    data = fam.data
    return write_recipe(tmp_path / "g.yaml", f"""
        merge_method: {method}
        base_model: {fam.base}
        models:
          - model: {fam.finetunes['math']}
            parameters: {{{model_params}}}
          - model: {fam.finetunes['code']}
            parameters: {{{model_params}}}
        {params}
        calibration:
          data: {{base: {data['general']}, math: {data['math']}, code: {data['code']}}}
          samples: 4
          seq_len: 32
          batch_size: 4
        guides: {guides}
    """)


def test_aim_relaxation_is_applied_exactly(tiny_family, tmp_path, capsys):
    fam = tiny_family
    r = _recipe(tmp_path, fam, "task_arithmetic", "{aim: {omega: 0.3}}", model_params="weight: 0.5")
    code, _, err = run_cli(capsys, "plan", r, "-o", tmp_path / "a.plan", "-q")
    assert code == 0, err
    plan = read_plan(tmp_path / "a.plan")
    code, _, err = run_cli(capsys, "apply", tmp_path / "a.plan", tmp_path / "out", "-q")
    assert code == 0, err
    base, a, b = (load_all(p) for p in (fam.base, fam.finetunes["math"], fam.finetunes["code"]))
    got = load_all(tmp_path / "out")
    relaxed = 0
    for t in plan.tensors:
        b0 = base[t.name].astype(np.float64)
        delta = 0.5 * (a[t.name] - b0) + 0.5 * (b[t.name] - b0)
        if t.relax is not None:
            f = 1.0 - t.relax["scores"].astype(np.float64) * (1.0 - 0.3)
            shape = [1] * delta.ndim
            shape[t.relax["axis"] % delta.ndim] = -1
            delta = delta * f.reshape(shape)
            relaxed += 1
        np.testing.assert_allclose(got[t.name], b0 + delta, rtol=0, atol=3e-6, err_msg=t.name)
    assert relaxed > 20  # every linear and norm of the decoder, and lm_head
    assert plan.tensor("model.embed_tokens.weight").relax is None  # embeddings are never relaxed


def test_lewis_drives_cabs_n_and_sens_scales_weights(tiny_family, tmp_path, capsys):
    fam = tiny_family
    r = _recipe(tmp_path, fam, "cabs", "{lewis: {gamma: 0.25, epsilon: 0.75}, sens: {temperature: 2.0}}",
                params="parameters: {m: 32}")
    code, _, err = run_cli(capsys, "plan", r, "-o", tmp_path / "c.plan", "-q")
    assert code == 0, err
    plan = read_plan(tmp_path / "c.plan")
    ns = {c.mask["n"] for t in plan.tensors for c in t.contributions if c.source.get("density") == "lewis"}
    assert ns and ns <= set(range(8, 25)) and len(ns) > 1  # densities 0.25..0.75 of m=32
    weights = [c.weight for t in plan.tensors for c in t.contributions]
    assert min(weights) != max(weights)  # Sens coefficients vary by layer group and model
    assert all(c.source["weight"] == "recipe*sens" for t in plan.tensors for c in t.contributions)
    code, out, _ = run_cli(capsys, "show", tmp_path / "c.plan")
    assert "guide lewis" in out and "guide sens" in out and "Sens K*sigma" in out
    data = json.loads(run_cli(capsys, "show", tmp_path / "c.plan", "--json")[1])
    assert "lewis" in data["guides"] and data["calibration"]
    code, _, err = run_cli(capsys, "apply", tmp_path / "c.plan", tmp_path / "out", "-q")
    assert code == 0, err


def test_senseless_guide_combination_refused_before_calibration(tiny_family, tmp_path, capsys):
    r = _recipe(tmp_path, tiny_family, "task_arithmetic", "{lewis: {gamma: 0.3}}")
    code, _, err = run_cli(capsys, "plan", r, "-o", tmp_path / "x.plan")
    assert_one_line_error(code, err, "lewis")
    assert not (tmp_path / "x.plan").exists()
