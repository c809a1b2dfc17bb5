"""Real model families (tests/arch_models.py): every data-free method and the guides plan and
apply, the output loads with AutoModelForCausalLM and runs, a self-merge reproduces the model,
and the review grid gives every stored weight a cell of its own, labelled as the module is.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import arch_models as am
from arch_models import one_torch_thread  # noqa: F401  (autouse fixture)
from cli_helpers import run_cli, write_recipe
from mergeplan.methods.registry import METHODS
from mergeplan.plan import read_plan
from mergeplan.plan.names import parse_name
from test_apply import load_all


@pytest.fixture(scope="module", params=am.ARCHS)
def fam(request, tmp_path_factory):
    return am.build(request.param, tmp_path_factory.mktemp(request.param))


def _models_yaml(fam, params: str) -> str:
    return "\n".join(f"  - model: {p}\n    parameters: {{{params}}}" for p in fam.finetunes.values())


def _loads_and_runs(out_dir) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out_dir))
    ids = torch.tensor([[1, 5, 9, 14, 2]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 5, am.VOCAB) and bool(torch.isfinite(logits).all())
    return logits


def _plan_apply(capsys, tmp_path, recipe, tag):
    code, _, err = run_cli(capsys, "plan", recipe, "-o", tmp_path / f"{tag}.plan", "-q")
    assert code == 0, err
    code, _, err = run_cli(capsys, "apply", tmp_path / f"{tag}.plan", tmp_path / tag, "-q")
    assert code == 0, err
    return read_plan(tmp_path / f"{tag}.plan"), tmp_path / tag


def test_every_data_free_method_plans_applies_and_loads(fam, tmp_path, capsys):
    base = load_all(fam.base)
    fts = [load_all(p) for p in fam.finetunes.values()]
    for method, spec in METHODS.items():
        params = "weight: 0.5" + (", density: 0.6" if spec.mask_kind in ("magnitude", "bernoulli", "della") else "")
        params += ", density: 0.6, gamma: 0.05" if spec.mask_kind == "breadcrumbs" else ""
        params += ", epsilon: 0.1" if spec.mask_kind == "della" else ""
        extra = "parameters: {n: 4, m: 8}" if method == "cabs" else ""
        base_line = f"base_model: {fam.base}\n" if spec.needs_base else ""
        r = write_recipe(tmp_path / f"{method}.yaml", f"merge_method: {method}\n{base_line}"
                         f"models:\n{_models_yaml(fam, params)}\n{extra}\n")
        plan, out = _plan_apply(capsys, tmp_path, r, method)
        got = load_all(out)
        assert sorted(got) == sorted(base), method  # the base's tensors, no more, no fewer
        if method == "task_arithmetic":  # every tensor of every family, against numpy
            for n, b0 in base.items():
                want = b0.astype(np.float64) + sum(0.5 * (ft[n] - b0.astype(np.float64)) for ft in fts)
                np.testing.assert_allclose(got[n], want, rtol=0, atol=2e-6, err_msg=n)
        _loads_and_runs(out)


def test_guides_plan_apply_and_load(fam, tmp_path, capsys):
    r = write_recipe(tmp_path / "g.yaml", f"""
merge_method: ties
base_model: {fam.base}
models:
{_models_yaml(fam, "weight: 1.0, density: 0.5")}
calibration: {{data: {fam.data}, samples: 6, seq_len: 16}}
guides: {{lewis: {{gamma: 0.3, epsilon: 0.8}}, aim: {{omega: 0.4}}, sens: {{temperature: 2.0}}}}
""")
    plan, out = _plan_apply(capsys, tmp_path, r, "guided")
    _loads_and_runs(out)
    stored = load_all(fam.base)
    by = {t.name: t for t in plan.tensors}
    # LEWIS: every decoder Linear weight got a density from the guide (experts no token
    # reached excepted), and its grid uses the stored tensors' labels.
    lewis = plan.stats["lewis"]
    lewis_w = [n for n, t in by.items() if t.contributions and t.contributions[0].source.get("density") == "lewis"]
    assert lewis_w and all(parse_name(n).layer is not None for n in lewis_w)
    assert {parse_name(n).component for n in lewis_w if n.endswith(".weight")} == set(lewis["components"])
    # AIM: relaxed along the input axis; a tied head is one stored tensor, never relaxed.
    for n, t in by.items():
        if t.relax is not None:
            w = stored[n]
            axis = t.relax["axis"]
            assert w.ndim in (1, 2) and t.relax["scores"].shape[0] == w.shape[axis], n
            if w.ndim == 2:
                assert axis == (0 if fam.arch == "gpt2" else 1), n  # GPT-2 Conv1D is [in, out]
    assert all(by[n].relax is None for n in by if parse_name(n).component in ("embed", "embed_pos"))
    # Sens: every merged tensor carries its layer group's coefficient, the groups sum to K.
    groups = plan.stats["sens"]["groups"]
    assert "embed" in groups and any(g.startswith("layers.") for g in groups)
    for t in plan.tensors:
        if t.op == "merge":
            assert all(c.source["weight"] == "recipe*sens" for c in t.contributions), t.name
    tied = fam.arch in ("gpt2", "gemma2", "gemma3")
    assert ("lm_head" in groups) == (not tied)
    if fam.arch == "gpt_neox":  # the head is stored as embed_out and merged in its own group
        assert by["embed_out.weight"].contributions[0].source["weight"] == "recipe*sens"
    if fam.arch == "mixtral":  # layer 0's router never picks expert 4 (arch_models._idle_expert)
        idle = "model.layers.0.block_sparse_moe.experts.4.w2.weight"
        tokens = plan.calibration["expert_tokens"]
        assert tokens["math on calib.txt"][idle] == 0 and tokens["code on calib.txt"][idle] == 0
        assert tokens["math on calib.txt"]["model.layers.1.block_sparse_moe.experts.4.w2.weight"] > 0
        assert any("no calibration token was routed" in n and "experts.4" in n for n in plan.calibration["notes"])
        assert {c.source["density"] for c in by[idle].contributions} == {"recipe"}  # no LEWIS density
        assert by["model.layers.0.block_sparse_moe.gate.weight"].contributions[0].source["density"] == "lewis"


def test_self_merge_reproduces_the_model(fam, tmp_path, capsys):
    copies = {n: am.copy_model(fam.base, tmp_path / n) for n in ("a", "b")}
    r = write_recipe(tmp_path / "self.yaml", f"""
merge_method: ties
base_model: {fam.base}
models:
""" + "\n".join(f"  - model: {p}\n    parameters: {{weight: 1.0, density: 0.5}}" for p in copies.values())
                     + "\nparameters: {normalize: true}\n")
    _, out = _plan_apply(capsys, tmp_path, r, "self")
    want, got = load_all(fam.base), load_all(out)
    assert sorted(got) == sorted(want)
    for n in want:
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == json.loads((fam.base / "config.json").read_text())["model_type"]


# Labels each family's stored weights must get (a subset; every weight gets its own cell).
EXPECTED = {
    "llama": {"q", "k", "v", "o", "gate", "up", "down", "input_norm", "post_norm", "embed", "norm", "lm_head"},
    "mistral": {"q", "k", "v", "o", "gate", "up", "down", "lm_head"},
    "qwen2": {"q", "k", "v", "o", "gate", "up", "down"},
    "qwen3": {"q", "k", "v", "o", "q_norm", "k_norm"},
    "gemma2": {"q", "k", "v", "o", "pre_ff_norm", "post_ff_norm", "post_norm", "embed"},
    "gemma3": {"q_norm", "k_norm", "pre_ff_norm", "post_ff_norm"},
    "phi3": {"qkv", "o", "gate_up", "down"},
    "gpt2": {"qkv", "o", "up", "down", "input_norm", "post_norm", "embed", "embed_pos", "norm"},
    "gpt_neox": {"qkv", "o", "up", "down", "input_norm", "post_norm", "embed", "norm", "lm_head"},
    "mixtral": {"q", "router", "e0.gate", "e0.up", "e0.down", "e4.down", "lm_head"},
    "qwen2_moe": {"q", "router", "sh_router", "sh.gate", "sh.up", "sh.down", "e0.gate", "e3.down"},
    "qwen3_moe": {"q_norm", "router", "e0.gate", "e3.down"},
}
FORBIDDEN = {"gpt2": {"gate", "lm_head"}, "phi3": {"q", "gate", "up"}, "gpt_neox": {"dense", "embed_out"},
             "mixtral": {"gate", "up", "down", "w1"}, "qwen2_moe": {"gate", "up", "down", "shared_expert_gate"},
             "qwen3_moe": {"gate", "up", "down"}}


def test_review_grid_labels_every_weight_once(fam, tmp_path, capsys):
    from mergeplan_tui.gridmodel import GridModel

    r = write_recipe(tmp_path / "t.yaml", f"merge_method: task_arithmetic\nbase_model: {fam.base}\n"
                     f"models:\n{_models_yaml(fam, 'weight: 0.5')}\n")
    code, _, err = run_cli(capsys, "plan", r, "-o", tmp_path / "t.plan", "-q")
    assert code == 0, err
    grid = GridModel(read_plan(tmp_path / "t.plan"))
    comps = set(grid.components)
    assert EXPECTED[fam.arch] <= comps, sorted(comps)
    assert not (FORBIDDEN.get(fam.arch, set()) & comps), sorted(comps)
    # No two stored weights share a cell: a collision would show one and hide the other.
    weights = {}
    for (row, comp), names in grid.cell_tensors.items():
        w = [n for n in names if n.endswith(".weight")]
        assert len(w) <= 1, (row, comp, names)
        weights.update({n: (row, comp) for n in w})
    assert len(weights) == sum(1 for n in load_all(fam.base) if n.endswith(".weight"))
    assert grid.layers == [0, 1]
    # Experts sort by index, then gate, up, down.
    experts = [c for c in grid.components if c.startswith("e") and c[1].isdigit()]
    assert experts == sorted(experts, key=lambda c: (int(c[1:c.index(".")]), ["gate", "up", "down"].index(c.split(".")[1])))
