"""The fused streaming kernel gives merge_tensor's bits, proven here rather than probed at
run time: property tests over dtypes, signs, signed zeros, subnormals, ties, cancellations,
huge values, masks with and without rescale, every weight sign, normalize on and off,
lambda, and both entry points (list of deltas; deltas as rows of one tensor)."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergeplan.methods.fused import FusedMerge, fused_applies
from mergeplan.methods.masks import MaskResult
from mergeplan.methods.registry import METHODS, merge_tensor

FUSED_METHODS = sorted(m for m in METHODS if fused_applies(m, {}, [1.0]))
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1e-3, -1e-3, 2.0 ** -126, 1e-40, -1e-40, 3.0e38, -3.0e38, 65504.0]


@st.composite
def cases(draw):
    method = draw(st.sampled_from(FUSED_METHODS))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
    models = draw(st.integers(1, 4))
    n = draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**31 - 1))
    g = np.random.default_rng(seed)
    style = draw(st.sampled_from(["normal", "special", "ties", "cancel", "huge"]))
    base = g.normal(0, 0.02, n)
    if style == "special":
        base = g.choice(SPECIAL, n)
    deltas = []
    for i in range(models):
        d = g.normal(0, 0.01, n)
        if style == "ties":
            d = np.round(d * 200) / 200  # few distinct values: equal magnitudes everywhere
        elif style == "cancel" and i % 2:
            d = -deltas[0]
        elif style == "huge":
            d = g.choice([3.0e38, -3.0e38, 1e-40, 0.0], n)
        elif style == "special":
            d = g.choice(SPECIAL, n)
        d[g.random(n) < 0.2] = 0.0  # unchanged entries
        deltas.append(d)
    base_t = torch.tensor(base, dtype=torch.float32).to(dtype)
    tensors = [(base_t.float() + torch.tensor(d, dtype=torch.float32)).to(dtype) for d in deltas]
    weights = [draw(st.sampled_from([1.0, 0.5, -0.7, 0.0, 2.0, 1e-9, 1.3])) for _ in range(models)]
    masks, scales = [], []
    for _ in range(models):
        if draw(st.booleans()):
            keep = torch.tensor(g.random(n) < draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])))
            scale = draw(st.sampled_from([None, 2.0, 1.0 / 0.3, 10.0]))
            masks.append(MaskResult(keep, scale))
            scales.append(scale)
        else:
            masks.append(None)
            scales.append(None)
    params = {}
    if draw(st.booleans()):
        params["normalize"] = draw(st.booleans())
    if draw(st.booleans()):
        params["lambda"] = draw(st.sampled_from([1.0, 0.5, 1.7]))
    if METHODS[method].consensus is not None and draw(st.booleans()):
        params["consensus_method"] = draw(st.sampled_from(["sum", None]))
    return method, base_t, tensors, weights, masks, scales, params


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_fused_kernel_gives_merge_tensor_bits(case):
    method, base, tensors, weights, masks, scales, params = case
    if not fused_applies(method, params, weights):
        return
    want = merge_tensor(method, base, tensors, weights, masks, params)
    b32 = base.float()
    deltas = [t.float() - b32 for t in tensors]
    bits = [None if m is None else m.mask.to(torch.int32).neg() for m in masks]
    kernel = FusedMerge(method, params, scales, weights)
    for got in (kernel(b32, [d.clone() for d in deltas], bits),
                kernel.rows(b32, torch.stack(deltas), bits)):
        if got is None:
            # only when the sign vote is not finite; the caller then runs merge_tensor itself
            vote = sum((torch.where(m.mask, d * (m.scale or 1.0), 0.0) if m else d) * w
                       for d, m, w in zip(deltas, masks, weights))
            assert not math.isfinite(float(vote.sum()))
            continue
        assert torch.equal(want.view(torch.int32), got.view(torch.int32)), (method, params, weights, scales)
