"""Mask specs -> masks: magnitude, breadcrumbs, bernoulli (DARE), della, n:m and CABS."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
import torch

from mergeplan.errors import MergeplanError
from mergeplan.methods.masks import (
    MaskResult,
    build_masks,
    check_spec,
    della_keep_prob,
    mask_digest,
    nm_mask,
    overlap_rate,
    pack_bits,
    unpack_bits,
)
from mergeplan.methods.rng import generator_for


def delta(shape, seed=0, scale=1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def order_desc(x: torch.Tensor) -> list[int]:
    """Flat indices by (larger |x| first, lower index first), via explicit tuples."""
    vals = x.reshape(-1).tolist()
    return [i for _, i in sorted((-abs(v), i) for i, v in enumerate(vals))]


def one(spec, d, key=(7, "layer.w", "model-a")) -> MaskResult | None:
    return build_masks([spec], [d], [key])[0]


# ---------------------------------------------------------------- magnitude / breadcrumbs


@pytest.mark.parametrize("density", [0.001, 0.1, 0.37, 0.5, 0.999])
def test_magnitude_keeps_mergekit_k_by_the_documented_order(density):
    d = delta((13, 11), seed=1).to(torch.bfloat16).float()  # ties included
    n = d.numel()
    k = max(1, int(density * n))
    res = one({"kind": "magnitude", "density": density}, d)
    expected = np.zeros(n, bool)
    expected[order_desc(d)[:k]] = True
    np.testing.assert_array_equal(res.mask.reshape(-1).numpy(), expected)
    assert res.scale is None


def test_magnitude_density_edges():
    d = delta((4, 5))
    assert one({"kind": "magnitude", "density": 1.0}, d) is None
    assert not one({"kind": "magnitude", "density": 0.0}, d).mask.any()
    assert int(one({"kind": "magnitude", "density": 0.01}, d).mask.sum()) == 1  # max(1, .)


def test_rescale_inverse_and_l1_against_float64():
    d = delta((6, 7), seed=2)
    a = d.double().abs().numpy().reshape(-1)
    res_inv = one({"kind": "magnitude", "density": 0.3, "rescale": "inverse"}, d)
    k = int(res_inv.mask.sum())
    assert res_inv.scale == pytest.approx(d.numel() / k)
    res_l1 = one({"kind": "magnitude", "density": 0.3, "rescale": "l1"}, d)
    kept = res_l1.mask.reshape(-1).numpy()
    assert res_l1.scale == pytest.approx(a.sum() / a[kept].sum(), rel=1e-12)
    applied = res_l1.apply(d)
    assert applied.abs().sum().item() == pytest.approx(a.sum(), rel=1e-5)
    assert (applied[~res_l1.mask] == 0).all()


@pytest.mark.parametrize("density,gamma", [(0.3, 0.05), (0.5, 0.0), (0.9, 0.2), (0.2, 0.9), (0.01, 0.01)])
def test_breadcrumbs_drops_the_top_gamma_and_keeps_the_next_density(density, gamma):
    d = delta((10, 9), seed=3).to(torch.bfloat16).float()
    n = d.numel()
    # mergekit: ascending sort, keep [n_bot, n_bot + target); n_bot = max(0, n - target - n_top)
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    ascending = list(reversed(order_desc(d)))  # ties: lower index counts as larger
    expected = np.zeros(n, bool)
    expected[ascending[n_bot : n_bot + target]] = True
    res = one({"kind": "breadcrumbs", "density": density, "gamma": gamma}, d)
    np.testing.assert_array_equal(res.mask.reshape(-1).numpy(), expected)


# ---------------------------------------------------------------- random masks


def test_rng_seed_is_sha256_of_the_length_prefixed_key():
    h = hashlib.sha256()
    for field in ("7", "layer.w", "model-a"):
        h.update(len(field).to_bytes(8, "big") + field.encode())
    g = torch.Generator().manual_seed(int.from_bytes(h.digest()[:8], "big") & (2**63 - 1))
    expected = torch.rand(1000, generator=g)
    assert torch.equal(torch.rand(1000, generator=generator_for(7, "layer.w", "model-a", "cpu")), expected)


def test_bernoulli_mask_is_u_below_density_with_inverse_scale():
    d = delta((50, 40), seed=4)
    res = one({"kind": "bernoulli", "density": 0.3, "rescale": "inverse"}, d)
    u = torch.rand((50, 40), generator=generator_for(7, "layer.w", "model-a", "cpu"))
    assert torch.equal(res.mask, u < 0.3)
    assert res.scale == pytest.approx(1 / 0.3)
    assert abs(res.mask.float().mean().item() - 0.3) < 0.03


def test_random_masks_depend_only_on_the_key():
    ds = [delta((64, 33), seed=s) for s in range(3)]
    specs = [{"kind": "bernoulli", "density": 0.4}, {"kind": "della", "density": 0.4, "epsilon": 0.2},
             {"kind": "bernoulli", "density": 0.4}]
    keys = [(3, "t", "a"), (3, "t", "b"), (3, "t", "c")]
    first = [r.mask for r in build_masks(specs, ds, keys)]
    torch.manual_seed(12345)  # the global RNG must not matter
    torch.rand(10)
    again = [r.mask for r in build_masks(specs, ds, keys)]
    perm = [2, 0, 1]
    permuted = build_masks([specs[i] for i in perm], [ds[i] for i in perm], [keys[i] for i in perm])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = [r.mask for r in build_masks(specs, ds, keys)]
    finally:
        torch.set_num_threads(threads)
    for i in range(3):
        assert torch.equal(first[i], again[i])
        assert torch.equal(first[i], permuted[perm.index(i)].mask)
        assert torch.equal(first[i], single[i])
    # models a and c share spec and data shape but not the key: different masks
    assert not torch.equal(first[0], first[2])
    other_tensor = build_masks(specs[:1], ds[:1], [(3, "t2", "a")])[0].mask
    other_seed = build_masks(specs[:1], ds[:1], [(4, "t", "a")])[0].mask
    assert not torch.equal(first[0], other_tensor) and not torch.equal(first[0], other_seed)


def della_prob_reference(x: torch.Tensor, density: float, eps: float) -> np.ndarray:
    rows = x.reshape(x.shape[0] if x.dim() >= 2 else 1, -1)
    out = np.zeros(tuple(rows.shape))
    cols = rows.shape[1]
    for r in range(rows.shape[0]):
        ranked = order_desc(rows[r])  # position 0 = largest
        for pos, c in enumerate(ranked):
            rank = 0.5 if cols == 1 else (cols - 1 - pos) / (cols - 1)
            out[r, c] = density - eps + 2 * eps * rank
    return out.reshape(tuple(x.shape))


@pytest.mark.parametrize("shape", [(5, 8), (17,), (4, 1), (2, 3, 4)])
def test_della_keep_probability_by_rank_within_rows(shape):
    x = delta(shape, seed=5).to(torch.bfloat16).float()
    got = della_keep_prob(x, 0.4, 0.15).double().numpy()
    np.testing.assert_allclose(got, della_prob_reference(x, 0.4, 0.15), rtol=1e-6)


def test_della_mask_and_inverse_scale():
    d = delta((30, 20), seed=6)
    res = one({"kind": "della", "density": 0.5, "epsilon": 0.2, "rescale": "inverse"}, d)
    p = della_prob_reference(d, 0.5, 0.2)
    u = torch.rand((30, 20), generator=generator_for(7, "layer.w", "model-a", "cpu")).double().numpy()
    np.testing.assert_array_equal(res.mask.numpy(), u < p.astype(np.float32))
    kept = res.mask.numpy()
    np.testing.assert_allclose(res.scale.numpy()[kept], 1 / p[kept], rtol=1e-6)


# ---------------------------------------------------------------- n:m and CABS


def nm_reference(x: torch.Tensor, n: int, m: int, taken: np.ndarray | None = None) -> np.ndarray:
    """Group by group: free positions by (|x| desc, index asc), then taken ones likewise."""
    flat = x.reshape(-1).tolist()
    taken = np.zeros(len(flat), bool) if taken is None else taken.reshape(-1)
    keep = np.zeros(len(flat), bool)
    for start in range(0, len(flat), m):
        idx = list(range(start, min(start + m, len(flat))))
        quota = n if len(idx) == m else n * len(idx) // m
        ranked = sorted(idx, key=lambda i: (bool(taken[i]), -abs(flat[i]), i))
        keep[ranked[:quota]] = True
    return keep.reshape(tuple(x.shape))


@pytest.mark.parametrize("shape,n,m", [((8, 32), 8, 32), ((5, 13), 3, 8), ((7,), 2, 4), ((3,), 4, 8), ((6, 10), 4, 4)])
def test_nm_mask_against_group_loop(shape, n, m):
    x = delta(shape, seed=7).to(torch.bfloat16).float()
    np.testing.assert_array_equal(nm_mask(x, n, m).numpy(), nm_reference(x, n, m))


def test_nm_ties_within_a_group_go_to_the_lower_index():
    x = torch.randint(-2, 3, (6, 24), generator=torch.Generator().manual_seed(9)).float()
    np.testing.assert_array_equal(nm_mask(x, 5, 8).numpy(), nm_reference(x, 5, 8))
    assert nm_mask(torch.ones(8), 3, 8).tolist() == [True] * 3 + [False] * 5


def test_nm_tail_rule_keeps_floor_of_density():
    x = delta((1, 45), seed=8)  # 45 = 32 + tail of 13
    mask = nm_mask(x, 8, 32).reshape(-1)
    assert int(mask[:32].sum()) == 8
    assert int(mask[32:].sum()) == 8 * 13 // 32  # 3


def cabs(ds, ns, m, order=None, tensor="t"):
    specs = [{"kind": "nm", "n": n, "m": m, "density": n / m} for n in ns]
    keys = [(0, tensor, f"m{i}") for i in range(len(ds))]
    return [r.mask for r in build_masks(specs, ds, keys, {"order": order} if order else None)]


@pytest.mark.parametrize("ns", [(8, 8), (16, 16), (5, 10, 17), (1, 1, 1, 1)])
def test_cabs_zero_overlap_when_densities_sum_to_at_most_one(ns):
    ds = [delta((9, 37), seed=10 + i) for i in range(len(ns))]  # 333 = 10 groups + tail 13
    masks = cabs(ds, ns, 32)
    cover = sum(mk.to(torch.int32) for mk in masks)
    assert int(cover.max()) <= 1
    assert overlap_rate(masks) == 0.0
    for mk, n in zip(masks, ns):
        groups = mk.reshape(-1)[:320].view(-1, 32).sum(1)
        assert (groups == n).all()


@pytest.mark.parametrize("ns", [(16, 24), (24, 24, 24), (32, 8)])
def test_cabs_minimal_overlap_when_densities_exceed_one(ns):
    ds = [delta((4, 64), seed=20 + i) for i in range(len(ns))]
    masks = cabs(ds, ns, 32)
    for mk, n in zip(masks, ns):
        assert (mk.reshape(-1, 32).sum(1) == n).all()  # every group keeps exactly n
    union = torch.zeros(4 * 64, dtype=torch.bool)
    for mk in masks:
        union |= mk.reshape(-1)
    # Least overlap n:m allows: each group covered as widely as possible.
    assert (union.view(-1, 32).sum(1) == min(32, sum(ns))).all()
    # and the masks are exactly the sequential free-first choice, model by model
    taken = np.zeros((4, 64), bool)
    for d, n, mk in zip(ds, ns, masks):
        expected = nm_reference(d, n, 32, taken)
        np.testing.assert_array_equal(mk.numpy(), expected)
        taken |= expected


def test_cabs_order_decides_who_is_pruned_first():
    ds = [delta((2, 32), seed=30), delta((2, 32), seed=31)]
    masks = cabs(ds, (20, 20), 32, order=[1, 0])
    np.testing.assert_array_equal(masks[1].numpy(), nm_reference(ds[1], 20, 32))  # unconstrained
    assert not torch.equal(masks[0], nm_mask(ds[0], 20, 32))


def test_cabs_bad_group_settings():
    ds = [delta((2, 32), seed=i) for i in range(2)]
    with pytest.raises(MergeplanError, match="order"):
        cabs(ds, (8, 8), 32, order=[0, 0])
    specs = [{"kind": "nm", "n": 4, "m": 16}, {"kind": "nm", "n": 8, "m": 32}]
    with pytest.raises(MergeplanError, match="one m"):
        build_masks(specs, ds, [(0, "t", "a"), (0, "t", "b")])


# ---------------------------------------------------------------- overlap, bits, specs


def test_overlap_rate_definition():
    rng = np.random.default_rng(0)
    masks = [torch.from_numpy(rng.random(200) < p) for p in (0.3, 0.5, 0.2)]
    shared = total = 0
    for i, j in itertools.product(range(3), range(200)):
        if masks[i][j]:
            total += 1
            shared += any(masks[o][j] for o in range(3) if o != i)
    assert overlap_rate(masks) == pytest.approx(shared / total)
    a = torch.tensor([1, 1, 0, 1, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)
    assert overlap_rate([a, b]) == pytest.approx(2 / 3)  # paper: |A & B| / |A|
    assert overlap_rate([torch.zeros(3, dtype=torch.bool)] * 2) == 0.0


def test_pack_bits_layout_and_roundtrip():
    mask = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    data = pack_bits(mask)
    # row-major: 10000001 | 10000000 | 01000000 (first entry is the most significant bit)
    assert data == bytes([0b10000001, 0b10000000, 0b01000000])
    assert torch.equal(unpack_bits(data, (2, 9)), mask)
    assert mask_digest(mask) == hashlib.sha256(data).hexdigest()[:32]
    big = torch.rand(37, 11, generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.equal(unpack_bits(pack_bits(big), big.shape), big)
    with pytest.raises(MergeplanError, match="bytes"):
        unpack_bits(data, (3, 9))


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "topk", "density": 0.5},
        {"kind": "magnitude", "density": 1.5},
        {"kind": "bernoulli", "density": 0.5, "rescale": "l2"},
        {"kind": "della", "density": 0.1, "epsilon": 0.15},
        {"kind": "breadcrumbs", "density": 0.5},
        {"kind": "nm", "n": 9, "m": 8},
    ],
)
def test_bad_specs_raise_one_line_errors(spec):
    with pytest.raises(MergeplanError) as err:
        check_spec(spec, "tensor 'x', model 'y'")
    assert "\n" not in str(err.value) and "'x'" in str(err.value)


def test_plan_annotations_beside_a_spec_are_ignored():
    d = delta((5, 6))
    plain = one({"kind": "magnitude", "density": 0.3}, d)
    annotated = one({"kind": "magnitude", "density": 0.3, "digest": "ab", "kept": 0.3}, d)
    assert torch.equal(plain.mask, annotated.mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_masks_match_cpu():
    ds = [delta((64, 48), seed=s) for s in range(3)]
    specs = [{"kind": "bernoulli", "density": 0.3, "rescale": "inverse"},
             {"kind": "della", "density": 0.4, "epsilon": 0.1, "rescale": "inverse"},
             {"kind": "breadcrumbs", "density": 0.3, "gamma": 0.02, "rescale": "l1"}]
    keys = [(1, "t", f"m{i}") for i in range(3)]
    cpu = build_masks(specs, ds, keys)
    gpu = build_masks(specs, [d.cuda() for d in ds], keys)
    for c, g in zip(cpu, gpu):
        assert torch.equal(c.mask, g.mask.cpu())
    assert torch.equal(cpu[1].scale, gpu[1].scale.cpu())
    assert cpu[2].scale == gpu[2].scale
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cabs(ds, (12, 24, 8), 32), cabs([d.cuda() for d in ds], (12, 24, 8), 32)))
