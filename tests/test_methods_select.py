"""topk_mask: exactly the k largest |x|, equal |x| broken by lower flat index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergeplan.errors import MergeplanError
from mergeplan.methods.select import topk_mask


def reference_topk(x: torch.Tensor, k: int) -> np.ndarray:
    """Stable argsort of -|x| (float32 magnitudes): ties keep index order."""
    a = np.abs(x.detach().to(torch.float32).numpy().reshape(-1)).astype(np.float64)
    keep = np.zeros(a.size, dtype=bool)
    keep[np.argsort(-a, kind="stable")[:k]] = True
    return keep.reshape(tuple(x.shape))


def python_topk(values: list[float], k: int) -> set[int]:
    """Plain sorted() over (-|v|, index) tuples, for tiny inputs."""
    return {i for _, i in sorted((-abs(v), i) for i, v in enumerate(values))[:k]}


def check(x: torch.Tensor, k: int) -> None:
    got = topk_mask(x, k)
    assert got.dtype == torch.bool and got.shape == x.shape
    assert int(got.sum()) == k
    np.testing.assert_array_equal(got.numpy(), reference_topk(x, k))


@pytest.mark.parametrize("numel", [1, 2, 3, 17, 1000, 70_001])
def test_random_float32_all_k_regions(numel):
    g = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=g) * 1e-3
    for k in sorted({0, 1, numel // 3, numel // 2, numel - 1, numel}):
        check(x, k)


def test_bf16_derived_values_with_many_exact_ties():
    g = torch.Generator().manual_seed(1)
    # bf16 has 8 bits of precision: 200k deltas collapse onto few distinct magnitudes.
    x = (torch.randn(200_000, generator=g) * 0.01).to(torch.bfloat16).to(torch.float32)
    assert np.unique(np.abs(x.numpy())).size < 20_000
    for k in (1, 777, 20_000, 99_999, 150_001):
        check(x, k)
    # bf16 input dtype itself (compared in float32, exactly representable)
    check(x.to(torch.bfloat16), 12_345)


def test_small_integers_ties_everywhere_and_2d_shape():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-3, 4, (37, 29), generator=g).to(torch.float32) * 0.5
    for k in range(0, x.numel() + 1, 13):
        check(x, k)


@pytest.mark.parametrize("numel", [5, 65_536, 300_000])
def test_all_equal_keeps_the_first_k_indices(numel):
    x = torch.full((numel,), -0.25)
    for k in (1, numel // 2, numel - 1):
        got = topk_mask(x, k)
        assert got[:k].all() and not got[k:].any()


def test_ties_straddling_chunk_boundaries():
    # Many equal values in a tensor larger than one 65536-entry search chunk, with the
    # cut falling inside the second chunk, plus larger values scattered before and after.
    x = torch.full((200_003,), 1.0)
    x[::1000] = 2.0
    x[7] = -3.0
    for k in (65_535, 65_537, 131_072 + 5, 199_000):
        check(x, k)


def test_negative_and_positive_zeros_are_equal_magnitudes():
    x = torch.tensor([0.0, -0.0, 1.0, -0.0, 0.0, -1.0, 0.0])
    assert python_topk(x.tolist(), 4) == set(np.flatnonzero(topk_mask(x, 4).numpy()))
    check(x, 3)
    check(x, 5)


def test_extreme_magnitudes_infinities_and_subnormals():
    x = torch.tensor([1e-45, -1e-45, 3e38, -float("inf"), 1e-38, 0.0, float("inf"), -3e38])
    for k in range(x.numel() + 1):
        assert set(np.flatnonzero(topk_mask(x, k).numpy())) == python_topk(x.tolist(), k)


def test_float64_input_is_compared_in_float32():
    # 1 and 1 + 1e-12 are equal in float32: the lower index wins.
    x = torch.tensor([1.0, 1.0 + 1e-12, 0.5], dtype=torch.float64)
    assert topk_mask(x, 1).tolist() == [True, False, False]


def test_topk_sets_are_nested():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-5, 6, (500,), generator=g).to(torch.float32)
    prev = topk_mask(x, 0)
    for k in range(1, 501, 7):
        cur = topk_mask(x, k)
        assert not (prev & ~cur).any()
        prev = cur


def test_empty_tensor_and_bad_k():
    assert topk_mask(torch.zeros(0), 0).numel() == 0
    with pytest.raises(MergeplanError):
        topk_mask(torch.zeros(4), 5)
    with pytest.raises(MergeplanError):
        topk_mask(torch.zeros(4), -1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = (torch.randn(300_000) * 0.01).to(torch.bfloat16).float()
    for k in (1, 12_345, 150_000):
        assert torch.equal(topk_mask(x.cuda(), k).cpu(), topk_mask(x, k))
