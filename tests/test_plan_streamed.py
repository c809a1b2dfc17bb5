"""The planner's streamed mask pass records exactly what building each mask whole records:
digest, magnitude cutoff, kept count and overlap, for every streamable mask kind, with
slices that cut rows anywhere, on bf16 inputs full of equal magnitudes."""

from __future__ import annotations

import math

import pytest
import torch

from cli_helpers import family_recipe
from mergeplan.whole import deltas_of, TensorInputs
from mergeplan.io.modeldir import ModelDir
from mergeplan.methods.masks import build_masks, mask_digest, overlap_rate
from mergeplan.planner import PlanOptions, build_plan, magnitude_cutoff
from mergeplan.recipe import load_recipe
from mergeplan.mask_records import plan_streamed
from mergeplan.slices import MemorySlices
from mergeplan.streamed import streamable

CASES = {
    "ties": ("weight: 1.0, density: 0.3", ""),
    "breadcrumbs_ties": ("weight: 1.0, density: 0.6, gamma: 0.05", ""),
    "dare_ties": ("weight: 1.0, density: 0.4", ""),
    "dare_linear": ("weight: 0.5, density: 0.7", "parameters: {rescale: true}"),
    "della": ("weight: 1.0, density: 0.5, epsilon: 0.1", ""),
    "cabs": ("weight: 1.0, n: 3", "parameters: {m: 8}"),
}


@pytest.mark.parametrize("method,chunk", [("ties", 37), ("breadcrumbs_ties", 37), ("ties", 4096),
                                          ("dare_ties", 4096), ("dare_linear", 1000), ("della", 37), ("della", 4096), ("cabs", 37), ("cabs", 4096)])
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


def test_band_top_k_equals_topk_mask_or_says_it_missed():
    """One pass with a band: the exact topk_mask set when the k-th key is in the band
    (ties cut by index inside the band included), a clear miss otherwise."""
    import numpy as np

    from mergeplan.methods.masks import pack_bits
    from mergeplan.methods.select import BandTopK, band_from_sample, magnitude_bits, topk_mask

    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = int(torch.randint(50, 5000, (1,), generator=g))
        x = (torch.randn(n, generator=g) * 0.01).to(torch.bfloat16).float()  # many equal magnitudes
        k = int(torch.randint(1, n, (1,), generator=g))
        key = magnitude_bits(x)
        want = topk_mask(x, k)
        sample = key[torch.randperm(n, generator=g)[: max(1, n // 4)]] if trial % 2 else key
        lo, hi = band_from_sample(sample, k, n)
        band = BandTopK(n, k, lo, hi, keep_limit=n)
        for start in range(0, n, 97):
            band.feed(key[start:start + 97], start)
        if band.resolve():
            assert band.packed.tobytes() == pack_bits(want)
            kept_keys = key[want]
            assert band.threshold == int(kept_keys.min())
            assert band.cut == int(torch.nonzero(want & (key == band.threshold)).max())
        else:
            # only when the k-th key really lies outside the band
            kth = int(torch.sort(key, descending=True).values[k - 1])
            assert not lo <= kth <= hi
    # a band that misses on purpose is reported
    x = torch.arange(1, 101, dtype=torch.float32)
    band = BandTopK(100, 10, 1, 50, keep_limit=100)
    band.feed(magnitude_bits(x), 0)
    assert band.resolve() is False


def test_missed_bands_fall_back_to_counting_with_the_same_records(tiny_family_bf16, tmp_path, monkeypatch):
    import mergeplan.mask_records as stream

    fam = tiny_family_bf16
    r = family_recipe(tmp_path / "r.yaml", "breadcrumbs_ties", fam.base,
                      {fam.finetunes["math"]: "weight: 1.0, density: 0.6, gamma: 0.05",
                       fam.finetunes["code"]: "weight: 1.0, density: 0.6, gamma: 0.05"})
    want = build_plan(load_recipe(r), PlanOptions(quiet=True))
    monkeypatch.setattr(stream, "band_from_sample", lambda sample, k, n: (0, 0))  # always misses
    calls = []
    real = stream._plan_counted
    monkeypatch.setattr(stream, "_plan_counted", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = build_plan(load_recipe(r), PlanOptions(quiet=True))
    assert calls
    for a, b in zip(want.tensors, got.tensors):
        assert [c.mask for c in a.contributions] == [c.mask for c in b.contributions]
        assert a.stats == b.stats
