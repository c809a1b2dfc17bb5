"""End to end: recipe -> plan -> apply on a tiny Llama family, checked against the formulas."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cli_helpers import family_recipe, run_cli
from mergeplan.apply import ApplyOptions, apply_plan
from mergeplan.planner import PlanOptions, build_plan
from mergeplan.plan.codec import read_plan
from mergeplan.recipe import load_recipe


def load_all(model_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            for k in s.keys():
                out[k] = s.get_tensor(k).float().numpy()
    return out


def sha_tree(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def ties_reference(base, fts, weights, densities):
    """TIES per METHODS.md, written independently: stable argsort top-k (lower index wins on
    equal magnitude), weights before sign election, normalise over agreeing kept entries."""
    base64 = base.astype(np.float64)
    weighted = []
    for ft, w, dens in zip(fts, weights, densities):
        d32 = (ft.astype(np.float32) - base.astype(np.float32))  # selection on float32 deltas
        flat = np.abs(d32).ravel()
        k = max(1, int(dens * flat.size))
        keep = np.zeros(flat.size, dtype=bool)
        keep[np.argsort(-flat, kind="stable")[:k]] = True
        weighted.append(w * np.where(keep.reshape(d32.shape), d32.astype(np.float64), 0.0))
    total = np.sum(weighted, axis=0)
    elected = np.where(total >= 0, 1.0, -1.0)
    num = np.zeros_like(base64)
    den = np.zeros_like(base64)
    for x, w in zip(weighted, weights):
        agree = np.sign(x) == elected
        num += np.where(agree, x, 0.0)
        den += np.where(agree, w, 0.0)
    den[den == 0] = 1.0
    return base64 + num / den


def _plan_apply(recipe_path: Path, out: Path, threads: int = 1):
    plan = build_plan(load_recipe(recipe_path), PlanOptions(threads=threads, quiet=True))
    apply_plan(plan, out, ApplyOptions(threads=threads))
    return plan


def test_ties_output_matches_formula(tiny_family, tmp_path):
    fam = tiny_family
    r = family_recipe(tmp_path / "ties.yaml", "ties", fam.base,
                      {fam.finetunes["math"]: "weight: 1.0, density: 0.5",
                       fam.finetunes["code"]: "weight: 0.6, density: 0.7"},
                      "parameters: {normalize: true}\ndtype: float32")
    _plan_apply(r, tmp_path / "out")
    base, math, code = (load_all(p) for p in (fam.base, fam.finetunes["math"], fam.finetunes["code"]))
    got = load_all(tmp_path / "out")
    assert got.keys() == base.keys()
    for name in base:
        want = ties_reference(base[name], [math[name], code[name]], [1.0, 0.6], [0.5, 0.7])
        np.testing.assert_allclose(got[name], want, rtol=0, atol=2e-6, err_msg=name)


def test_task_arithmetic_matches_formula(tiny_family, tmp_path):
    fam = tiny_family
    r = family_recipe(tmp_path / "ta.yaml", "task_arithmetic", fam.base,
                      {fam.finetunes["math"]: "weight: 0.7", fam.finetunes["legal"]: "weight: -0.2"},
                      "parameters: {lambda: 0.9}")
    _plan_apply(r, tmp_path / "out")
    base, a, b = (load_all(p) for p in (fam.base, fam.finetunes["math"], fam.finetunes["legal"]))
    got = load_all(tmp_path / "out")
    for name in base:
        b0 = base[name].astype(np.float64)
        want = b0 + 0.9 * (0.7 * (a[name] - b0) + -0.2 * (b[name] - b0))
        np.testing.assert_allclose(got[name], want, rtol=0, atol=2e-6, err_msg=name)


def test_apply_is_byte_reproducible_across_threads_and_loads(tiny_family_bf16, tmp_path, capsys):
    fam = tiny_family_bf16
    r = family_recipe(tmp_path / "dare.yaml", "dare_ties", fam.base,
                      {fam.finetunes["math"]: "weight: 1.0, density: 0.5",
                       fam.finetunes["code"]: "weight: 1.0, density: 0.6",
                       fam.finetunes["legal"]: "weight: 0.5, density: 0.4"},
                      "seed: 11\nparameters: {max_shard_size: 200KB}")
    code, _, err = run_cli(capsys, "plan", r, "-o", tmp_path / "m.plan", "--threads", "2")
    assert code == 0, err
    for name, threads in (("a", 1), ("b", 2), ("c", 2)):
        code, _, err = run_cli(capsys, "apply", tmp_path / "m.plan", tmp_path / name, "--threads", threads, "-q")
        assert code == 0, err
    a, b, c = (sha_tree(tmp_path / n) for n in "abc")
    assert a == b == c
    assert sum(n.endswith(".safetensors") for n in a) > 1 and "model.safetensors.index.json" in a
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a"), local_files_only=True)
    assert model.dtype == torch.bfloat16
    merged = load_all(tmp_path / "a")
    base = load_all(fam.base)
    # DARE actually sparsified: some entries equal the base, others moved.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert 0.05 < float(np.mean(merged[q] == base[q])) < 0.95
    card = (tmp_path / "a" / "README.md").read_text()
    assert "dare_ties" in card and read_plan(tmp_path / "m.plan") is not None


def test_every_sample_method_runs(tiny_family, tmp_path, capsys):
    """Each data-free method plans and applies on the family; outputs differ from the base."""
    fam = tiny_family
    methods = {
        "linear": "",
        "task_arithmetic": "",
        "ties": "density: 0.5",
        "dare_linear": "density: 0.5",
        "breadcrumbs": "density: 0.8, gamma: 0.05",
        "breadcrumbs_ties": "density: 0.8, gamma: 0.05",
        "della": "density: 0.5, epsilon: 0.1",
        "della_linear": "density: 0.5, epsilon: 0.1",
        "cabs": "n: 8",
    }
    base = load_all(fam.base)
    for method, extra in methods.items():
        params = "weight: 0.5" + (", " + extra if extra else "")
        r = family_recipe(tmp_path / f"{method}.yaml", method, None if method == "linear" else fam.base,
                          {fam.finetunes["math"]: params, fam.finetunes["code"]: params},
                          "parameters: {m: 16}" if method == "cabs" else "")
        plan_file = tmp_path / f"{method}.plan"
        code, _, err = run_cli(capsys, "plan", r, "-o", plan_file, "-q")
        assert code == 0, (method, err)
        code, _, err = run_cli(capsys, "apply", plan_file, tmp_path / f"out-{method}", "-q")
        assert code == 0, (method, err)
        got = load_all(tmp_path / f"out-{method}")
        name = "model.layers.1.mlp.down_proj.weight"
        assert not np.array_equal(got[name], base[name]), method
