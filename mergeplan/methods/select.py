"""Exact top-k by magnitude without sorting.

The total order used everywhere in mergeplan: larger |x| first; on equal |x| the lower
flat (row-major) index first. Every "keep the k largest" decision follows it, so top-k
sets are nested (topk(k) is a subset of topk(k+1)) and reproducible bit for bit.

How: |x| in float32, read as int32, is monotonic in magnitude (the sign bit is clear), so
the k-th largest value can be found by two counting passes over the bit patterns
(top 16 bits, then the low 15 bits inside the one boundary bucket) instead of a sort.
"""

from __future__ import annotations

import torch

from mergeplan.errors import MergeplanError

_HIGH_SHIFT = 15  # 31 magnitude bits = 16 high (first pass) + 15 low (boundary bucket)
_HIGH_BINS = 1 << 16
_LOW_BINS = 1 << _HIGH_SHIFT


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """|x| as float32 reinterpreted as int32: a monotonic integer key for the magnitude.

    -0.0 and +0.0 get the same key (0); NaN sorts above +inf.
    """
    return x.detach().to(torch.float32).abs().reshape(-1).view(torch.int32)


def _bucket_from_top(counts: torch.Tensor, k: int) -> tuple[int, int, int]:
    """(b, above, inside): the bucket holding the k-th largest key, the count of keys in
    higher buckets, and the count in bucket b."""
    above_or_in = torch.flip(torch.cumsum(torch.flip(counts, (0,)), 0), (0,)).cpu()
    # above_or_in[b] = keys in buckets >= b; the boundary is the highest b with >= k of them.
    b = int(torch.count_nonzero(above_or_in >= k).item()) - 1
    above = int(above_or_in[b + 1].item()) if b + 1 < counts.numel() else 0
    return b, above, int(above_or_in[b].item()) - above


def kth_largest_key(bits: torch.Tensor, k: int) -> tuple[int, int, int]:
    """(T, greater, equal) for a flat int32 key tensor: the k-th largest key T, how many
    keys are > T and how many are == T. Requires 1 <= k <= bits.numel()."""
    high = bits >> _HIGH_SHIFT
    b, above_high, inside = _bucket_from_top(torch.bincount(high, minlength=_HIGH_BINS), k)
    in_bucket = high == b
    if inside * 8 < bits.numel():
        # Usual case, a small boundary bucket: gather it (boolean indexing; masked_select
        # is ~15x slower on CPU).
        counts = torch.bincount(bits[in_bucket] & (_LOW_BINS - 1), minlength=_LOW_BINS)
    else:
        # Huge bucket (constant or heavily tied tensors): gathering costs more than
        # counting everything with the outsiders parked in one spare bin.
        low = torch.where(in_bucket, bits & (_LOW_BINS - 1), _LOW_BINS)
        counts = torch.bincount(low, minlength=_LOW_BINS + 1)[:_LOW_BINS]
    t, above_low, equal = _bucket_from_top(counts, k - above_high)
    return (b << _HIGH_SHIFT) | t, above_high + above_low, equal


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (shape of x) of exactly the k largest |x|; equal |x|: lower flat index wins.

    x may be any float dtype and live on any device; magnitudes are compared in float32.
    k = 0 gives an all-False mask, k = x.numel() an all-True one.
    """
    n = x.numel()
    if not 0 <= k <= n:
        raise MergeplanError(
            f"top-k selection asked for k={k} of a tensor with {n} elements; "
            "k must lie in [0, numel] (check the density)"
        )
    if k == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if k == n:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    bits = magnitude_bits(x)
    threshold, greater, ties_total = kth_largest_key(bits, k)
    mask = bits >= threshold
    ties_needed = k - greater
    if ties_needed < ties_total:
        # Keys equal to the threshold stay only up to the ties_needed-th of them (lowest
        # indices); past that position only strictly greater keys stay.
        cut = _nth_true_index(bits == threshold, ties_needed) + 1
        mask[cut:] = bits[cut:] > threshold
    return mask.reshape(x.shape)


_CHUNK = 1 << 16


def _nth_true_index(flags: torch.Tensor, nth: int) -> int:
    """Flat index of the nth (1-based) True in a 1-D bool tensor that has at least nth.

    Counts per chunk first so only one chunk is searched element by element: all-equal
    tensors would otherwise need an index list as long as the tensor.
    """
    head = flags.numel() - flags.numel() % _CHUNK
    per_chunk = flags[:head].view(-1, _CHUNK).sum(dim=1)
    per_chunk = torch.cat([per_chunk, flags[head:].sum().reshape(1)])
    before = torch.cumsum(per_chunk, 0).cpu()
    chunk = int(torch.count_nonzero(before < nth).item())
    seen = int(before[chunk - 1].item()) if chunk else 0
    start = chunk * _CHUNK
    local = torch.nonzero(flags[start : start + _CHUNK]).reshape(-1)
    return start + int(local[nth - seen - 1].item())
