"""The planner's streamed mask pass records exactly what building each mask whole records:
digest, magnitude cutoff, kept count and overlap, for every streamable mask kind, with
slices that cut rows anywhere, on bf16 inputs full of equal magnitudes."""

from __future__ import annotations

import math

import pytest
import torch

from cli_helpers import family_recipe
from mergeplan.execute import deltas_of, TensorInputs
from mergeplan.io.modeldir import ModelDir
from mergeplan.methods.masks import build_masks, mask_digest, overlap_rate
from mergeplan.planner import PlanOptions, build_plan, magnitude_cutoff
from mergeplan.recipe import load_recipe
from mergeplan.stream import MemorySlices, plan_streamed, streamable

CASES = {
    "ties": ("weight: 1.0, density: 0.3", ""),
    "breadcrumbs_ties": ("weight: 1.0, density: 0.6, gamma: 0.05", ""),
    "dare_ties": ("weight: 1.0, density: 0.4", ""),
    "dare_linear": ("weight: 0.5, density: 0.7", "parameters: {rescale: true}"),
}


@pytest.mark.parametrize("method,chunk", [("ties", 37), ("breadcrumbs_ties", 37), ("ties", 4096),
                                          ("dare_ties", 4096), ("dare_linear", 1000)])
def test_streamed_records_equal_whole_tensor_records(tiny_family_bf16, tmp_path, method, chunk):
    fam = tiny_family_bf16
    params, extra = CASES[method]
    r = family_recipe(tmp_path / "r.yaml", method, fam.base,
                      {fam.finetunes["math"]: params, fam.finetunes["code"]: params, fam.finetunes["legal"]: params},
                      extra)
    plan = build_plan(load_recipe(r), PlanOptions(quiet=True))
    dirs = {m.id: ModelDir.open(p) for m, p in zip(plan.models, [fam.base, *(fam.finetunes[k] for k in ("math", "code", "legal"))])}
    checked = 0
    for tp in plan.tensors:
        if not streamable(plan, tp):
            continue
        base = dirs[plan.base.id].read(tp.name)
        tensors = [dirs[c.model].read(tp.name) for c in tp.contributions]
        # identical equal-magnitude runs force the tie cut inside slices
        for t in tensors:
            t.view(-1)[: t.numel() // 3] = base.view(-1)[: t.numel() // 3] + 0.0078125
        deltas = deltas_of(TensorInputs(base, tensors))
        specs = [None if c.mask is None else {k: v for k, v in c.mask.items() if k not in ("digest", "cutoff")}
                 for c in tp.contributions]
        whole = build_masks(specs, deltas, [(plan.seed, tp.name, c.model) for c in tp.contributions], None)
        records, overlap = plan_streamed(plan, tp, MemorySlices(base, tensors, [plan.base.id] + [c.model for c in tp.contributions]),
                                         chunk=chunk)
        real = [m.mask for m in whole if m is not None]
        for w, rec, d, spec in zip(whole, records, deltas, specs):
            if w is None:
                assert rec is None
                continue
            assert rec.digest == mask_digest(w.mask)
            assert rec.kept == int(w.mask.sum())
            if spec["kind"] == "magnitude":
                assert rec.cutoff == magnitude_cutoff(d, w.mask)
            else:
                assert rec.cutoff is None
        if len(real) > 1:
            assert overlap == overlap_rate(real)
        else:
            assert overlap is None
        checked += 1
    assert checked >= 10


def test_planner_memory_no_longer_follows_whole_tensors(tiny_family_bf16, tmp_path, monkeypatch):
    """Streamable tensors never take the whole-tensor path in the planner."""
    import mergeplan.planner as planner

    fam = tiny_family_bf16
    r = family_recipe(tmp_path / "r.yaml", "ties", fam.base,
                      {fam.finetunes["math"]: "weight: 1.0, density: 0.5", fam.finetunes["code"]: "weight: 1.0, density: 0.5"})

    def boom(*a, **k):
        raise AssertionError("whole-tensor mask path used for a streamable tensor")

    monkeypatch.setattr(planner, "build_masks", boom)
    plan = build_plan(load_recipe(r), PlanOptions(quiet=True, threads=2))
    assert all(c.mask.get("digest") for _, c in plan.iter_contributions() if c.mask and c.mask["density"] < 1)
    assert math.isclose(sum(plan.tensors[0].stats["kept"].values()) / 2, 0.5, abs_tol=0.01)
