"""The planner records each magnitude mask's top-k boundary; apply rebuilds the mask from it
in one pass, still checked against the digest."""

from __future__ import annotations

import torch

from cli_helpers import assert_one_line_error, family_recipe, run_cli
from mergeplan.methods.select import magnitude_bits, topk_mask
from mergeplan.plan import read_plan, write_plan
from mergeplan.planner import magnitude_cutoff
from mergeplan.methods.select import TopK
from test_apply import sha_tree


def test_cutoff_rebuilds_the_topk_mask_with_ties():
    g = torch.Generator().manual_seed(0)
    # bf16-rounded values: many exact magnitude ties straddle the boundary
    x = (torch.randn(5000, generator=g) * 0.01).bfloat16().float()
    x[::7] = 0.0
    for k in (1, 37, 2500, 4999, 5000):
        mask = topk_mask(x, k)
        threshold, cut = magnitude_cutoff(x, mask)
        key = magnitude_bits(x)
        idx = torch.arange(x.numel())
        rebuilt = (key > threshold) | ((key == threshold) & (idx <= cut))
        assert torch.equal(rebuilt, mask.reshape(-1)), k
        # and the streamed selection built from it marks the same entries
        bits = TopK.known(x.numel(), k, threshold, cut).bits(key, 0)
        assert torch.equal(bits != 0, mask.reshape(-1)), k


def _ties(tmp_path, fam):
    return family_recipe(tmp_path / "t.yaml", "ties", fam.base,
                         {fam.finetunes["math"]: "weight: 1.0, density: 0.3",
                          fam.finetunes["code"]: "weight: 0.7, density: 0.6"})


def test_apply_with_and_without_cutoffs_gives_the_same_bytes(tiny_family_bf16, tmp_path, capsys):
    code, _, err = run_cli(capsys, "plan", _ties(tmp_path, tiny_family_bf16), "-o", tmp_path / "a.plan", "-q")
    assert code == 0, err
    plan = read_plan(tmp_path / "a.plan")
    masks = [c.mask for t in plan.tensors for c in t.contributions if c.mask]
    assert masks and all(len(m["cutoff"]) == 2 for m in masks)
    for m in masks:
        del m["cutoff"]
    write_plan(plan, tmp_path / "b.plan")
    for p, out in (("a.plan", "A"), ("b.plan", "B")):
        code, _, err = run_cli(capsys, "apply", tmp_path / p, tmp_path / out, "-q")
        assert code == 0, err
    a, b = sha_tree(tmp_path / "A"), sha_tree(tmp_path / "B")
    a.pop("README.md"), b.pop("README.md"), a.pop("mergeplan.json"), b.pop("mergeplan.json")  # name the plan digest
    assert a == b


def test_a_wrong_cutoff_is_caught_by_the_digest(tiny_family, tmp_path, capsys):
    code, _, err = run_cli(capsys, "plan", _ties(tmp_path, tiny_family), "-o", tmp_path / "a.plan", "-q")
    assert code == 0, err
    plan = read_plan(tmp_path / "a.plan")
    t = plan.tensor("model.layers.1.mlp.up_proj.weight")
    t.contributions[0].mask["cutoff"][0] += 1000  # a higher threshold keeps fewer entries
    write_plan(plan, tmp_path / "a.plan")
    code, _, err = run_cli(capsys, "apply", tmp_path / "a.plan", tmp_path / "out")
    assert_one_line_error(code, err, "model.layers.1.mlp.up_proj.weight", "digest")
    assert not (tmp_path / "out").exists()
