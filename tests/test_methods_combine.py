"""merge_deltas / linear / merge_tensor against float64 loops over the METHODS.md formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergeplan.errors import MergeplanError
from mergeplan.methods.combine import linear, merge_deltas
from mergeplan.methods.masks import MaskResult, build_masks
from mergeplan.methods.registry import mask_spec, merge_tensor, resolve_params


def rand(shape, seed, scale=1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def ties_reference(deltas, weights, keeps, scales, consensus, normalize, lam) -> np.ndarray:
    """Entry by entry, model by model, in float64 (METHODS.md 'ties' row)."""
    shape = deltas[0].shape
    flat = [d.double().numpy().reshape(-1) for d in deltas]
    keep = [np.ones(flat[0].size, bool) if k is None else k.numpy().reshape(-1) for k in keeps]
    out = np.zeros(flat[0].size)
    for j in range(out.size):
        e = [weights[i] * scales[i] * flat[i][j] if keep[i][j] else 0.0 for i in range(len(flat))]
        if consensus is None:
            total, div = sum(e), sum(weights)
            div = 1.0 if abs(div) < 1e-8 else div
        else:
            vote = sum(e) if consensus == "sum" else sum(np.sign(v) for v in e)
            elected = 1.0 if vote >= 0 else -1.0
            agree = [v != 0 and np.sign(v) == elected for v in e]
            total = sum(v for v, a in zip(e, agree) if a)
            div = sum(w for w, a in zip(weights, agree) if a) or 1.0
        out[j] = lam * (total / div if normalize else total)
    return out.reshape(tuple(shape))


@pytest.mark.parametrize("consensus", [None, "sum", "count"])
@pytest.mark.parametrize("normalize", [False, True])
def test_merge_deltas_matches_the_formula(consensus, normalize):
    deltas = [rand((5, 7), seed=i) for i in range(3)]
    weights = [0.7, 1.3, -0.4]
    keeps = [rand((5, 7), 10) > -0.3, None, rand((5, 7), 11) > 0.2]
    scales = [1.5, 1.0, 2.0]
    masks = [MaskResult(keeps[0], 1.5), None, MaskResult(keeps[2], 2.0)]
    got = merge_deltas(deltas, weights, masks, consensus, normalize, 0.8)
    assert got.dtype == torch.float32
    expected = ties_reference(deltas, weights, keeps, scales, consensus, normalize, 0.8)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_weights_sway_the_elected_sign():
    d = [torch.tensor([1.0]), torch.tensor([-2.0])]
    # unweighted sum is -1 (minus wins); weighted 3*1 - 1*2 = +1 (plus wins)
    assert merge_deltas(d, [3.0, 1.0], None, "sum", True, 1.0).item() == pytest.approx(1.0)
    assert merge_deltas(d, [1.0, 1.0], None, "sum", True, 1.0).item() == pytest.approx(-2.0)


def test_sign_tie_elects_plus():
    d = [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])]
    out = merge_deltas(d, [1.0, 1.0], None, "sum", True, 1.0)
    assert out.tolist() == [1.0, 0.0]  # + elected; all-zero entry: divisor 0 -> 1
    out = merge_deltas(d, [1.0, 1.0], None, "count", False, 1.0)
    assert out.tolist() == [1.0, 0.0]


def test_normalize_counts_only_agreeing_unpruned_weights():
    d = [torch.tensor([2.0]), torch.tensor([4.0]), torch.tensor([-1.0])]
    masks = [None, MaskResult(torch.tensor([False])), None]
    # model 1 pruned, model 2 disagrees: divisor is w0 only
    out = merge_deltas(d, [0.5, 1.0, 0.25], masks, "sum", True, 1.0)
    assert out.item() == pytest.approx(2.0)


def test_linear_against_numpy_and_zero_sum_error():
    ts = [rand((3, 4), seed=i) for i in range(3)]
    w = [0.2, 0.5, 1.1]
    stack = np.stack([t.double().numpy() for t in ts])
    wa = np.array(w)[:, None, None]
    np.testing.assert_allclose(linear(ts, w, False).numpy(), (stack * wa).sum(0), rtol=1e-6)
    np.testing.assert_allclose(linear(ts, w, True).numpy(), (stack * wa).sum(0) / sum(w), rtol=1e-6)
    with pytest.raises(MergeplanError, match="sum to 0"):
        linear(ts[:2], [1.0, -1.0], True)


def test_task_arithmetic_is_base_plus_lambda_times_weighted_deltas():
    base = rand((6, 5), 0).to(torch.bfloat16)
    ts = [(base.float() + rand((6, 5), i, 0.1)).to(torch.bfloat16) for i in (1, 2)]
    out = merge_tensor("task_arithmetic", base, ts, [0.6, 0.9], None, {"lambda": 0.5})
    b = base.double().numpy()
    expected = b + 0.5 * sum(w * (t.double().numpy() - b) for w, t in zip([0.6, 0.9], ts))
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)


def pipeline(method, base, ts, model_params, glob=None):
    """recipe-style parameters -> specs -> masks -> merged tensor, as apply runs it."""
    g, ms = resolve_params(method, glob or {}, model_params)
    specs = [mask_spec(method, g, m) for m in ms]
    keys = [(11, "w", f"m{i}") for i in range(len(ts))]
    masks = build_masks(specs, [t - base for t in ts], keys, {"order": g["order"]} if "order" in g else None)
    out = merge_tensor(method, base, ts, [m["weight"] for m in ms], masks, g)
    return out, masks


def test_ties_end_to_end_against_topk_and_formula():
    base = rand((8, 9), 0)
    ts = [base + rand((8, 9), i, 0.05).to(torch.bfloat16).float() for i in (1, 2, 3)]
    dens, w = [0.3, 0.5, 0.2], [1.0, 0.5, 0.8]
    out, masks = pipeline("ties", base, ts, [{"weight": x, "density": y} for x, y in zip(w, dens)])
    keeps = []
    for t, p in zip(ts, dens):
        d = (t - base).double().numpy().reshape(-1)
        keep = np.zeros(d.size, bool)
        keep[np.argsort(-np.abs(d.astype(np.float32)), kind="stable")[: max(1, int(p * d.size))]] = True
        keeps.append(torch.from_numpy(keep.reshape(8, 9)))
    expected = base.double().numpy() + ties_reference(
        [t - base for t in ts], w, keeps, [1.0] * 3, "sum", True, 1.0)  # ties: normalize on
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_dare_linear_rescales_by_inverse_density_by_default():
    base = rand((20, 10), 0)
    ts = [base + rand((20, 10), i, 0.1) for i in (1, 2)]
    out, masks = pipeline("dare_linear", base, ts, [{"weight": 1.0, "density": 0.25}, {"weight": 0.5, "density": 0.5}])
    expected = base.double().numpy() + sum(
        w / p * np.where(m.mask.numpy(), (t - base).double().numpy(), 0.0)
        for w, p, m, t in zip([1.0, 0.5], [0.25, 0.5], masks, ts))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    # mergekit's L1 matching on request, and no rescale with rescale: false
    _, l1 = pipeline("dare_linear", base, ts, [{"weight": 1.0, "density": 0.25}] * 2, {"rescale_mode": "l1"})
    d = (ts[0] - base).double().abs().numpy()
    assert l1[0].scale == pytest.approx(d.sum() / d[l1[0].mask.numpy()].sum())
    _, plain = pipeline("dare_linear", base, ts, [{"weight": 1.0, "density": 0.25}] * 2, {"rescale": False})
    assert plain[0].scale is None


def test_cabs_end_to_end_is_base_plus_weighted_masked_deltas():
    base = rand((4, 64), 0)
    ts = [base + rand((4, 64), i) for i in (1, 2)]
    out, masks = pipeline("cabs", base, ts, [{"weight": 1.2, "n": 16}, {"weight": 0.9, "n": 24}], {"m": 32})
    assert int((masks[0].mask & masks[1].mask).sum()) == 8 * 8  # 16 + 24 - 32 per group, 8 groups
    expected = base.double().numpy() + sum(
        w * np.where(m.mask.numpy(), (t - base).double().numpy(), 0.0)
        for w, m, t in zip([1.2, 0.9], masks, ts))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_della_applies_lambda_after_normalize():
    base = rand((6, 30), 0)
    ts = [base + rand((6, 30), i, 0.1) for i in (1, 2)]
    mp = [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {"weight": 2.0, "density": 0.5, "epsilon": 0.1}]
    out, masks = pipeline("della", base, ts, mp, {"lambda": 1.5})
    keeps = [m.mask for m in masks]
    scaled = [torch.where(m.mask, (t - base) * m.scale, 0.0) for m, t in zip(masks, ts)]
    expected = base.double().numpy() + ties_reference(scaled, [1.0, 2.0], keeps, [1.0, 1.0], "sum", True, 1.5)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_merge_tensor_errors():
    t = [torch.zeros(2)]
    with pytest.raises(MergeplanError, match="unknown merge method"):
        merge_tensor("slerp", None, t, [1.0], None, {})
    with pytest.raises(MergeplanError, match="base"):
        merge_tensor("ties", None, t, [1.0], None, {})
    with pytest.raises(MergeplanError, match="one of each"):
        merge_deltas(t, [1.0, 2.0], None, None, False, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_is_bit_identical_to_cpu():
    deltas = [rand((64, 48), seed=i) for i in range(3)]
    masks = [MaskResult(rand((64, 48), 9) > 0, 1.7), None, MaskResult(rand((64, 48), 8) > 0.5, 3.0)]
    for consensus in (None, "sum", "count"):
        cpu = merge_deltas(deltas, [0.3, 0.9, 0.7], masks, consensus, True, 1.1)
        gpu = merge_deltas([d.cuda() for d in deltas], [0.3, 0.9, 0.7],
                           [None if m is None else MaskResult(m.mask.cuda(), m.scale) for m in masks],
                           consensus, True, 1.1)
        assert torch.equal(cpu, gpu.cpu())
